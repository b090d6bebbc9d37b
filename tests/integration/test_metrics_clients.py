"""Hostile metrics clients cannot hold the supervisor: it serves /metrics from the same
loop that reaps and replaces workers, honours signals and feeds the systemd watchdog.

Clients that trickle a request head one line at a time (slowloris), connect and send
nothing, send a huge head, or stall in the middle of a TLS handshake: meanwhile scrapes
from another client are answered, a killed worker is replaced, WATCHDOG=1 keeps coming and
SIGTERM stops the daemon, and each such connection is closed (at the latest
metrics.request_timeout_ms after accept) and counted. The daemons run with the default
limits (16 connections, 5000 ms).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import netlab
import pytest

pytestmark = pytest.mark.integration

MAX_CONNECTIONS = 16  # metrics.max_connections, default
DEADLINE_S = 5.0  # metrics.request_timeout_ms, default
DEFER_S = 1.0  # a connection that sends nothing reaches the daemon this late (TCP_DEFER_ACCEPT)
ATTACKERS = MAX_CONNECTIONS + 4
TRICKLE_S = 1.5  # one header line (or handshake byte) every 1.5 s: under any read timeout
ANSWER_WITHIN_S = 2.0  # what a scrape may take while the attack goes on
SLOW_HEAD = [b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n",
             *(b"X-Slow-%d: 1\r\n" % i for i in range(10_000))]


class Trickler:
    """A client thread that connects, sends chunks[0], then one more chunk every `every`
    seconds (and after the last, nothing), until the daemon closes the connection; then,
    `every` seconds later, it connects again, until stopped. Counts its connections and
    the closes it saw."""

    def __init__(self, ns: netlab.NetNS, port: int, chunks: list[bytes],
                 every: float = TRICKLE_S) -> None:
        self.ns, self.port, self.chunks, self.every = ns.name, port, chunks, every
        self.connections = 0
        self.closed_after: list[float] = []  # seconds from connect to the daemon's close
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                with netlab.in_netns(self.ns):
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
            except OSError:
                self.stop.wait(0.1)
                continue
            with sock:
                connected = time.monotonic()
                self.connections += 1
                for chunk in itertools.chain(self.chunks, itertools.repeat(b"")):
                    try:
                        if chunk:
                            sock.sendall(chunk)
                        if self._closed(sock) or self.stop.is_set():
                            break
                    except OSError:  # reset: closed with our data unread
                        break
                if not self.stop.is_set():
                    self.closed_after.append(time.monotonic() - connected)
            self.stop.wait(self.every)  # as slowloris does: a new connection at its next turn

    def _closed(self, sock: socket.socket) -> bool:
        """Wait `every` s (less when stopped); True once the daemon closed the connection."""
        deadline = time.monotonic() + self.every
        while (left := deadline - time.monotonic()) > 0 and not self.stop.is_set():
            if select.select([sock], [], [], min(left, 0.1))[0]:
                return not sock.recv(65536)  # an answer (none is expected) or the end
        return False

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


class Attack:
    """Several Tricklers at once, stopped on exit."""

    def __init__(self, daemon: netlab.Daemon, count: int,
                 chunks: Callable[[int], list[bytes]]) -> None:
        self.clients = [Trickler(daemon.ns, daemon.metrics_port, chunks(i))
                        for i in range(count)]

    def wait_connected(self) -> list[str]:
        """Wait (bounded) until every client has connected; what went wrong."""
        try:
            netlab.wait_for(lambda: all(c.connections for c in self.clients), 10,
                            "every attacking client to connect")
        except netlab.WaitTimeout:
            connected = sum(bool(c.connections) for c in self.clients)
            return [f"only {connected} of {len(self.clients)} attacking clients could connect"]
        return []

    def __enter__(self) -> Attack:
        return self

    def __exit__(self, *exc: object) -> None:
        for client in self.clients:
            client.stop.set()
        for client in self.clients:
            client.close()


def get(daemon: netlab.Daemon, context: ssl.SSLContext | None = None,
        timeout: float = ANSWER_WITHIN_S) -> tuple[int, bytes]:
    """(status, body) of GET /metrics over http, or https with context."""
    scheme = "https" if context is not None else "http"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=context))
    with netlab.in_netns(daemon.ns.name):
        try:
            with opener.open(f"{scheme}://127.0.0.1:{daemon.metrics_port}/metrics",
                             timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()


def scrapes_during(daemon: netlab.Daemon, seconds: float,
                   context: ssl.SSLContext | None = None) -> list[str]:
    """Scrape again and again for `seconds`; what went wrong (nothing: [])."""
    problems = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        try:
            status, body = get(daemon, context)
        except OSError as e:
            problems.append(f"scrape failed after {time.monotonic() - started:.1f} s: {e}")
            continue
        took = time.monotonic() - started
        if status != 200 or b"fanoutd_workers_up" not in body or took > ANSWER_WITHIN_S:
            problems.append(f"scrape: status {status} after {took:.1f} s")
        time.sleep(0.2)  # paces the scrapes
    return problems


def dropped(daemon: netlab.Daemon, context: ssl.SSLContext | None = None) -> dict[str, float]:
    """fanoutd_metrics_connections_dropped_total by reason."""
    m = netlab.parse_metrics(get(daemon, context, timeout=5)[1].decode())
    return {reason: netlab.metric_sum(m, "fanoutd_metrics_connections_dropped_total",
                                      reason=reason)
            for reason in ("limit", "timeout", "oversized", "tls")}


def watchdog_pings(sink: netlab.DatagramSink) -> list[float]:
    return [t for t, data in sink.snapshot() if b"WATCHDOG=1" in data.split(b"\n")]


def longest_silence(pings: list[float], start: float, end: float) -> float:
    """The longest time without a ping between start and end."""
    times = [start, *(t for t in pings if start < t < end), end]
    return max(b - a for a, b in itertools.pairwise(times))


def socket_fds(pid: int) -> int:
    """How many sockets the process has open."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


@pytest.fixture
def watched_daemon(start_daemon):
    """Factory: a daemon whose sd_notify messages (WATCHDOG_USEC=1 s: a ping every 0.5 s
    while healthy) arrive in a sink: (daemon, sink)."""
    with netlab.workdir() as wd, netlab.DatagramSink(wd / "notify.sock") as sink:
        daemons = []

        def start(**kw) -> tuple[netlab.Daemon, netlab.DatagramSink]:
            daemon = start_daemon(workers=1, env={"NOTIFY_SOCKET": str(sink.path),
                                                  "WATCHDOG_USEC": "1000000"}, **kw)
            daemons.append(daemon)
            return daemon, sink
        try:
            yield start
        finally:
            for daemon in daemons:
                daemon.kill()  # before the sink goes: the daemon must never see it missing


def check_supervisor_is_free(daemon: netlab.Daemon, sink: netlab.DatagramSink,
                             context: ssl.SSLContext | None = None
                             ) -> tuple[list[str], dict[str, float]]:
    """With an attack going on: scrapes are answered, WATCHDOG=1 keeps coming, a SIGKILLed
    worker is replaced, and SIGTERM stops the daemon. What went wrong (nothing: []), and
    the drop counters after 3 s of attack."""
    problems, counts = [], {}
    baseline = socket_fds(daemon.pid)
    started = time.monotonic()
    problems += scrapes_during(daemon, 3.0, context)
    silence = longest_silence(watchdog_pings(sink), started, time.monotonic())
    if silence > 1.5:
        problems.append(f"no WATCHDOG=1 for {silence:.1f} s (one is due every 0.5 s)")
    if socket_fds(daemon.pid) > baseline + MAX_CONNECTIONS:
        problems.append(f"{socket_fds(daemon.pid)} sockets open, from {baseline}: more "
                        f"than {MAX_CONNECTIONS} connections")
    try:
        counts = dropped(daemon, context)
    except (OSError, ValueError) as e:
        problems.append(f"cannot read the drop counters: {e}")

    killed = daemon.children_by_comm()["fanoutd-w0"]
    os.kill(killed, signal.SIGKILL)
    killed_at = time.monotonic()

    def replaced() -> bool:
        new = daemon.children_by_comm().get("fanoutd-w0")
        return new is not None and new != killed and not os.path.exists(f"/proc/{killed}")
    try:
        netlab.wait_for(replaced, 3, "the killed worker to be reaped and replaced")
        netlab.wait_for(lambda: [t for t in watchdog_pings(sink) if t > killed_at], 3,
                        "WATCHDOG=1 once the new worker runs")
    except netlab.WaitTimeout as e:
        problems.append(str(e))

    stopped_at = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    try:
        status = daemon.proc.wait(timeout=3)
        if status != 0:
            problems.append(f"exit status {status} after SIGTERM")
    except subprocess.TimeoutExpired:
        problems.append(f"still running {time.monotonic() - stopped_at:.1f} s after SIGTERM")
    return problems, counts


def test_slowloris_cannot_hold_the_supervisor(watched_daemon):
    """More slowloris clients than the daemon takes connections, each sending a header
    line every 1.5 s and reconnecting when closed: scrapes from another client are
    answered within 2 s, the watchdog is fed, a killed worker is replaced at once and
    SIGTERM is honoured; the clients beyond the bound are counted as dropped."""
    daemon, sink = watched_daemon()
    with Attack(daemon, ATTACKERS, lambda _: SLOW_HEAD) as attack:
        problems = attack.wait_connected()
        found, counts = check_supervisor_is_free(daemon, sink)
        problems += found
    if counts and counts["limit"] < ATTACKERS - MAX_CONNECTIONS:
        problems.append(f"connections over the bound not counted: {counts}")
    assert not problems, "\n".join(problems) + "\n" + daemon.logs()


def test_idle_huge_and_trickling_clients_are_dropped(start_daemon):
    """Under the connection bound: a client that trickles a header line every 0.3 s (never
    silent long enough for a per-read timeout) is closed request_timeout_ms after it
    connected, one that connects and sends nothing as long after the kernel hands it over
    (1 s: TCP_DEFER_ACCEPT); one that sends a 1 MiB head is answered 431 at once. Scrapes
    meanwhile are answered, and each drop is counted."""
    daemon = start_daemon(workers=1)
    huge = SLOW_HEAD[0] + b"X-Big: " + b"x" * (1 << 20) + b"\r\n\r\n"
    idle = Trickler(daemon.ns, daemon.metrics_port, [b""])
    trickle = Trickler(daemon.ns, daemon.metrics_port, SLOW_HEAD, every=0.3)
    try:
        netlab.wait_for(lambda: idle.connections and trickle.connections, 5,
                        "the idle and trickling clients to connect")
        with netlab.in_netns(daemon.ns.name):
            big = socket.create_connection(("127.0.0.1", daemon.metrics_port), timeout=3)
        with big:
            answer = b""
            with contextlib.suppress(OSError):  # closed with the head unread: the
                big.sendall(huge)  # answer may still be there
            try:
                answer = big.recv(100)
            except OSError as e:
                answer = str(e).encode()
        problems = scrapes_during(daemon, 3.0)
        if not (answer.startswith(b"HTTP/1.1 431 ") or b"reset" in answer):
            problems.append(f"the huge head got {answer!r}")
        try:
            netlab.wait_for(lambda: idle.closed_after and trickle.closed_after,
                            DEADLINE_S + 3, "the idle and trickling clients to be closed")
        except netlab.WaitTimeout as e:
            problems.append(str(e))
        for client, name, late in ((idle, "idle", DEFER_S), (trickle, "trickling", 0)):
            if client.closed_after and not (DEADLINE_S - 0.5 < client.closed_after[0]
                                            < DEADLINE_S + late + 1.5):
                problems.append(f"the {name} client was closed after "
                                f"{client.closed_after[0]:.1f} s, not {DEADLINE_S + late} s")
    finally:
        idle.close()
        trickle.close()
    try:
        counts = dropped(daemon)
        if counts["timeout"] < 2 or counts["oversized"] != 1 or counts["limit"] != 0:
            problems.append(f"drops counted: {counts}")
    except (OSError, ValueError) as e:
        problems.append(f"cannot read the drop counters: {e}")
    assert not problems, "\n".join(problems) + "\n" + daemon.logs()


def client_hello() -> bytes:
    """The first flight of a TLS client: its ClientHello."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def stalled_handshake(i: int) -> list[bytes]:
    """Every other client connects and sends nothing; the others send the first bytes of
    a ClientHello, then one more byte every 1.5 s, never all of it."""
    if i % 2:
        return [b""]
    hello = client_hello()
    return [hello[:10], *(hello[n:n + 1] for n in range(10, len(hello) - 1))]


def test_stalled_tls_handshakes_cannot_hold_the_supervisor(watched_daemon):
    """Metrics over TLS; more clients than the daemon takes connections stall in the TLS
    handshake, reconnecting when closed: TLS scrapes are answered, the watchdog is fed, a
    killed worker is replaced and SIGTERM is honoured. A plain HTTP client on the TLS
    port is counted as a failed handshake."""
    with netlab.workdir() as wd:
        cert, key = Path(wd) / "cert.pem", Path(wd) / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                        "-keyout", str(key), "-out", str(cert), "-days", "1",
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                       check=True, capture_output=True)
        config = Path(wd) / "fanoutd.yaml"
        config.write_text(f"metrics:\n  tls_cert_file: {cert}\n  tls_key_file: {key}\n")
        context = ssl.create_default_context(cafile=str(cert))
        daemon, sink = watched_daemon(ready=False, extra=("-c", str(config)))

        def ready() -> bool:
            daemon.check_running()
            try:
                return b"fanoutd_workers_up{interface=\"cap0\"} 1.0" in get(daemon, context)[1]
            except OSError:
                return False
        netlab.wait_for(ready, 20, "a TLS scrape with the worker up", detail=daemon.logs)
        with pytest.raises(OSError):
            get(daemon)  # plain HTTP on the TLS port: no answer

        with Attack(daemon, ATTACKERS, stalled_handshake) as attack:
            problems = attack.wait_connected()
            found, counts = check_supervisor_is_free(daemon, sink, context)
            problems += found
        if counts and (counts["tls"] != 1 or counts["limit"] < ATTACKERS - MAX_CONNECTIONS):
            problems.append(f"drops counted: {counts}")
        assert not problems, "\n".join(problems) + "\n" + daemon.logs()
