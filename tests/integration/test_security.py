"""Securing the endpoints: CURVE encryption and client authentication on the publisher,
TLS (optionally mutual) and basic auth on the metrics endpoint."""

import base64
import hashlib
import json
import re
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import frames as F
import netlab
import pytest
import zmq
import zmq.auth

from fanoutd import outbox
from fanoutd.client import Subscriber

pytestmark = pytest.mark.integration


@pytest.fixture
def curve_daemon(start_daemon):
    """A daemon whose publisher only admits the client key in clients/."""
    with netlab.workdir() as wd:
        keys = netlab.curve_keys(wd, admitted=["client"], others=["intruder"])
        daemon = start_daemon(workers=1, extra=("-c", str(keys.config)))
        yield daemon, keys.server_public, keys.secrets["client"], keys.secrets["intruder"]


def test_curve_admits_the_authorised_client(curve_daemon, injector):
    daemon, server_public, client_secret, _ = curve_daemon
    with Subscriber(daemon.endpoint, curve_server_key=str(server_public),
                    curve_client_cert=str(client_secret)) as sub:
        assert sub.wait_ready(10), daemon.logs()
        injector.send_all(F.udp4_frame(sport=4000 + i) for i in range(20))
        seen: set[int] = set()
        for pkt in sub.packets(timeout=5):
            seen.add(pkt["sport"])
            if len(seen) == 20:
                break
        assert seen == set(range(4000, 4020))


def refused_keys(who: str, server_public: Path, client_secret: Path,
                 intruder_secret: Path) -> dict:
    """Subscriber keyword arguments of a client the publisher refuses, and why."""
    return {"plain": {},  # no CURVE at all
            "intruder": {"curve_server_key": str(server_public),  # a key not admitted
                         "curve_client_cert": str(intruder_secret)},
            "wrong-server-key": {"curve_server_key": str(intruder_secret),  # not the server's
                                 "curve_client_cert": str(client_secret)}}[who]


# What the subscriber is told (the start of it). A plain client learns from the server's
# greeting that it wants CURVE, unless the server hung up on it first.
REFUSED_BECAUSE = {"plain": r"the publisher requires CURVE|the handshake failed: the "
                            r"publisher hung up \(does it require CURVE\?\)",
                   "intruder": "the CURVE handshake failed: the publisher does not admit "
                               "this client's key",
                   "wrong-server-key": "the CURVE handshake failed: the server key is not "
                                       "the publisher's"}


@pytest.mark.parametrize("who", REFUSED_BECAUSE)
def test_curve_refuses_others(curve_daemon, injector, who):
    """A subscriber without CURVE, with a key the publisher does not know, or with the
    wrong server key gets nothing, not even the welcome message; it is told why."""
    daemon, server_public, client_secret, intruder_secret = curve_daemon
    keys = refused_keys(who, server_public, client_secret, intruder_secret)
    with Subscriber(daemon.endpoint, **keys) as sub:
        started = time.monotonic()
        assert not sub.wait_ready(10)
        assert time.monotonic() - started < 5, "wait_ready should stop at the refusal"
        assert re.match(REFUSED_BECAUSE[who], sub.refused[daemon.endpoint]), sub.refused
        injector.send_all(F.udp4_frame(sport=5000 + i) for i in range(5))
        assert list(sub.batches(timeout=1)) == []
    daemon.check_running()


@pytest.mark.parametrize("who", REFUSED_BECAUSE)
def test_tail_says_it_was_refused(curve_daemon, who):
    """`fanoutd tail` refused by the only publisher says why, naming the endpoint, and
    exits 77 at once (ZeroMQ would not try again, or would fail again)."""
    daemon, server_public, client_secret, intruder_secret = curve_daemon
    keys = refused_keys(who, server_public, client_secret, intruder_secret)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in keys.items()]
    proc = netlab.run_cli(None, "tail", "--endpoint", daemon.endpoint, *flags, timeout=20)
    assert proc.returncode == 77, f"exit {proc.returncode}\n{proc.stderr}"
    assert len(proc.stderr.splitlines()) == 1 and proc.stdout == "", proc.stderr
    prefix = f"fanoutd tail: {daemon.endpoint}: "
    assert proc.stderr.startswith(prefix), proc.stderr
    assert re.match(REFUSED_BECAUSE[who], proc.stderr[len(prefix):]), proc.stderr


def test_the_daemon_logs_a_refused_client_once(curve_daemon):
    """The proxy warns of a subscriber whose key it does not admit, naming its address
    and key: once, however often that client comes back."""
    daemon, server_public, _, intruder_secret = curve_daemon
    intruder_public = zmq.auth.load_certificate(str(intruder_secret))[0].decode()
    for _ in range(3):
        with Subscriber(daemon.endpoint, curve_server_key=str(server_public),
                        curve_client_cert=str(intruder_secret)) as sub:
            assert not sub.wait_ready(10) and daemon.endpoint in sub.refused

    def warnings() -> list[str]:
        return [line for line in daemon.stderr_text().splitlines()
                if "refused subscriber" in line]
    netlab.wait_for(warnings, 10, "the daemon's warning of a refused client",
                    detail=daemon.logs)
    line, = warnings()
    assert "WARNING" in line and "from localhost:" in line, line  # ipc: the peer's uid:gid:pid
    assert f"CURVE client key {intruder_public}: its key is not in " in line, line
    daemon.check_running()


def test_tail_with_curve_keys(curve_daemon, ns, injector):
    daemon, server_public, client_secret, _ = curve_daemon
    argv = [*netlab.cli_argv(), "tail", "--endpoint", daemon.endpoint, "--json", "--count", "1",
            "--timeout", "10", "--curve-server-key", str(server_public),
            "--curve-client-cert", str(client_secret)]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=netlab.base_env(),
                          cwd=netlab.REPO) as tail:
        # tail connects asynchronously; inject until its line arrives (bounded)
        reader = netlab.LineReader(tail)
        netlab.wait_for(lambda: injector.send(F.udp4_frame(sport=6001)) or reader.drain(), 10,
                        "a line from tail", interval=0.2)
        tail.wait(timeout=10)
    assert json.loads(reader.drain()[0])["sport"] == 6001


# --------------------------------------------------------------------------- metrics

PASSWORD = "s3cret scrape"


@pytest.fixture
def tls_daemon(start_daemon):
    """Metrics over mutual TLS with a self-signed certificate, behind basic auth."""
    with netlab.workdir() as wd:
        cert, key = wd / "cert.pem", wd / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                        "-keyout", str(key), "-out", str(cert), "-days", "1",
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                       check=True, capture_output=True)
        digest = hashlib.sha256(PASSWORD.encode()).hexdigest()
        config = wd / "fanoutd.yaml"
        config.write_text(f"metrics:\n  tls_cert_file: {cert}\n  tls_key_file: {key}\n"
                          f"  client_ca_file: {cert}\n  basic_auth_user: prometheus\n"
                          f"  basic_auth_password_sha256: {digest}\n")
        daemon = start_daemon(workers=1, ready=False, extra=("-c", str(config)))
        yield daemon, cert, key


def fetch(daemon: netlab.Daemon, scheme: str, context: ssl.SSLContext | None = None,
          password: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(f"{scheme}://127.0.0.1:{daemon.metrics_port}/metrics")
    if password is not None:
        token = base64.b64encode(f"prometheus:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=context))
    with netlab.in_netns(daemon.ns.name):
        try:
            with opener.open(request, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, ""


def client_context(cert: Path, key: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert))
    if key is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def test_metrics_over_mutual_tls_with_basic_auth(tls_daemon):
    daemon, cert, key = tls_daemon
    good = client_context(cert, key)

    def scraped() -> str | None:
        daemon.check_running()
        try:
            status, body = fetch(daemon, "https", good, PASSWORD)
        except OSError:
            return None
        return body if status == 200 and "fanoutd_workers_up" in body else None

    netlab.wait_for(scraped, 20, "an authenticated TLS scrape", detail=daemon.logs)
    assert fetch(daemon, "https", good)[0] == 401  # no credentials
    assert fetch(daemon, "https", good, "wrong")[0] == 401
    with pytest.raises(OSError):  # plain HTTP is not answered
        fetch(daemon, "http")
    with pytest.raises(OSError):  # no client certificate: the handshake fails
        fetch(daemon, "https", client_context(cert, None), PASSWORD)
    assert scraped(), "a refused client must not disturb the next scrape"


# --------------------------------------------------------------------------- the workers' socket

FORGED = b"not a batch of this worker"


def hostile_hellos(backend: Path) -> list[socket.socket]:
    """Connections to the proxy's socket for the workers' outboxes that must be refused:
    four malformed (a short hello, a ring id out of range, a ring not in use, a hello
    without the eventfd), then a well-formed outbox for worker 0's ring, on its topic,
    holding a forged batch, from this process, which is not that worker. (What only a
    ring's own worker could hand over, such as an outbox not sealed against shrinking, is
    refused too: tests/test_outbox.py.)"""
    conns = []

    def send(hello: bytes, fds: list[int]) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(str(backend))
        socket.send_fds(sock, [hello], fds)
        conns.append(sock)

    box = outbox.Outbox(65536)
    assert box.put(2**63, FORGED)
    send(b"FOB1", [box.memfd, box.eventfd])
    for ring_id in (65535, 1):
        send(box.hello(ring_id, b"pkt.cap0.0"), [box.memfd, box.eventfd])
    send(box.hello(0, b"pkt.cap0.0"), [box.memfd])
    send(box.hello(0, b"pkt.cap0.0"), [box.memfd, box.eventfd])
    box.close()
    return conns


def test_the_proxy_takes_a_rings_outbox_only_from_its_worker(injector, start_daemon):
    """Anything on the workers' socket that is no outbox of a ring in use, or that
    another process than the ring's worker hands over (an outbox holding a batch for
    worker 0's ring, with a seq far ahead that would have acknowledged everything), is
    refused and counted by reason; the proxy keeps running and forwarding real batches."""
    with netlab.workdir() as wd:
        run = wd / "run"
        run.mkdir()
        daemon = start_daemon(workers=1, extra=("--runtime-dir", str(run)))
        (backend,) = run.glob("*/workers.sock")
        proxy = netlab.proc_identity(daemon.children_by_comm()["fanoutd-proxy"])
        ctx = zmq.Context()
        conns: list[socket.socket] = []
        try:
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            for topic in (b"pkt.", b"stats", b"fanoutd.hello"):
                sub.subscribe(topic)
            sub.connect(daemon.endpoint)
            netlab.wait_for(lambda: sub.poll(100) and sub.recv_multipart() == [b"fanoutd.hello"],
                            10, "the welcome", detail=daemon.logs)
            conns = hostile_hellos(backend)

            def rejected() -> dict[str, float] | None:
                m = daemon.try_metrics()
                if m is None:
                    return None
                got = {dict(lbl)["reason"]: v for lbl, v in netlab.samples(
                    m, "fanoutd_proxy_rejected_messages_total").items()}
                return got if sum(got.values()) >= 5 else None
            got = netlab.wait_for(rejected, 10, "five connections counted as refused",
                                  detail=daemon.logs)
            assert got == {"malformed": 4, "sender": 1, "topic": 0}, got
            assert netlab.proc_alive(proxy), daemon.logs()
            for conn in conns:  # the proxy ended every one of them
                conn.settimeout(5)
                assert conn.recv(1) == b""

            # Real batches still flow, and nothing forged ever reached the subscriber.
            injector.send_all(F.udp4_frame(sport=7000 + i) for i in range(20))
            seen: list[list[bytes]] = []

            def batch_arrived() -> bool:
                while sub.poll(50):
                    seen.append(sub.recv_multipart())
                return any(m[0] == b"pkt.cap0.0" for m in seen)
            netlab.wait_for(batch_arrived, 10, "a real batch", detail=daemon.logs)
            assert not [m for m in seen if FORGED in m], seen
        finally:
            for conn in conns:
                conn.close()
            ctx.destroy(linger=0)
        assert netlab.proc_alive(proxy), daemon.logs()
        assert "Traceback" not in daemon.stderr_text()
        assert "refused a worker's connection: from a process that is not the ring's " \
               "worker" in daemon.stderr_text()
