"""Operating fanoutd: /metrics after known traffic (and promtool's lint), the `stats`
topic, `fanoutd stats`, sd_notify (READY, STATUS, WATCHDOG, STOPPING) and structured
logging to the journal.

sd_notify and the journal are received on AF_UNIX datagram sockets the tests bind
themselves (no systemd needed); a thread drains them at once, because a full datagram
queue would block the daemon's sends and make the daemon, not the test, look stuck.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import frames as F
import msgpack
import netlab
import programs
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

import fanoutd
from fanoutd import encoder
from fanoutd.slotstats import PROXY_COUNTERS, PROXY_GAUGES
from fanoutd.wire import ERROR_REASONS

pytestmark = pytest.mark.integration

WORKERS = {"0", "1"}
COUNTERS = (
    "fanoutd_kernel_packets_total",
    "fanoutd_kernel_drops_total",
    "fanoutd_kernel_freezes_total",
    "fanoutd_packets_decoded_total",
    "fanoutd_decode_errors_total",
    "fanoutd_batches_published_total",
    "fanoutd_publish_drops_total",
    "fanoutd_worker_restarts_total",
    "fanoutd_bytes_total",
)
PER_WORKER = (*COUNTERS, "fanoutd_ring_blocks_user")
GAUGES = ("fanoutd_workers_up", "fanoutd_ring_blocks_user", "fanoutd_build_info")


# --------------------------------------------------------------------------- helpers


def known_frames(n_good: int) -> list[bytes]:
    """n_good well-formed UDP frames, then one IPv4 frame cut inside its IP header and
    one TCP frame cut inside its TCP header (the IP total length claims the full header)."""
    good = [F.udp4_frame(src=f"10.9.0.{i % 250 + 1}", sport=23000 + i) for i in range(n_good)]
    cut_ipv4 = F.udp4_frame(sport=24001)[:14 + 10]
    cut_tcp = F.tcp4_frame(sport=24002)[:14 + 20 + 10]
    return [*good, cut_ipv4, cut_tcp]


def settled_metrics(daemon: netlab.Daemon, decoded: int, timeout: float = 10.0
                    ) -> tuple[str, dict]:
    """Once fanoutd_packets_decoded_total sums to >= `decoded`, poll until two scrapes in
    a row agree (a worker bumps its counters one after the other), and return that scrape
    as (text, parsed)."""
    def enough() -> bool:
        m = daemon.try_metrics() or {}
        return netlab.metric_sum(m, "fanoutd_packets_decoded_total") >= decoded
    netlab.wait_for(enough, timeout, f"fanoutd_packets_decoded_total >= {decoded}",
                    interval=0.1, detail=daemon.logs)
    last: list[str] = [""]

    def stable() -> tuple[str, dict] | None:
        text = netlab.scrape(daemon.ns, daemon.metrics_port)
        same, last[0] = text == last[0], text
        return (text, netlab.parse_metrics(text)) if same else None
    return netlab.wait_for(stable, 5, "two identical scrapes in a row", interval=0.2,
                           detail=lambda: last[0])


def write_config(directory: Path, **supervisor: int) -> Path:
    """A YAML config file setting supervisor.* keys (the rest comes from the flags)."""
    path = directory / "fanoutd.yaml"
    path.write_text("supervisor:\n" + "".join(f"  {k}: {v}\n" for k, v in supervisor.items()))
    return path


def parse_journal_native(data: bytes) -> dict[str, str]:
    """One journal native-protocol datagram -> {field: value}.

    Each field is either `KEY=VALUE\\n`, or binary-safe: `KEY\\n`, a 64-bit little-endian
    length, that many bytes, `\\n`.
    """
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        nl = data.index(b"\n", pos)
        line = data[pos:nl]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            pos = nl + 1
        else:
            key = line
            (size,) = struct.unpack_from("<Q", data, nl + 1)
            start = nl + 1 + 8
            value = data[start:start + size]
            assert data[start + size:start + size + 1] == b"\n", f"bad binary field {key!r}"
            pos = start + size + 1
        fields[key.decode()] = value.decode(errors="replace")
    return fields


class StatsSubscriber:
    """A real zmq SUB socket subscribed to the `stats` topic only."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.subscribe(b"stats")
        self.sock.connect(endpoint)

    def next(self, timeout: float, detail: Callable[[], str] | None = None) -> dict:
        """The next [b"stats", body] message's body (bounded wait)."""
        if not self.sock.poll(int(timeout * 1000)):
            extra = f"\n{detail()}" if detail else ""
            raise netlab.WaitTimeout(f"no stats message within {timeout}s{extra}")
        msg = self.sock.recv_multipart()
        assert len(msg) == 2 and msg[0] == b"stats", f"unexpected message {msg!r:.200}"
        return msgpack.unpackb(msg[1])

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()

    def __enter__(self) -> StatsSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def worker_sum(body: dict, key: str) -> int:
    return sum(w[key] for w in body["workers"])


# --------------------------------------------------------------------------- /metrics


def test_metrics_after_known_traffic(injector, start_daemon):
    """Every metric exists for both workers at 0 before any traffic; after N known frames
    (two of them truncated) the families have the right types and labels, and the sums
    over workers match exactly what was injected."""
    daemon = start_daemon(workers=2, fanout="lb")

    before = daemon.metrics()
    for name in PER_WORKER:
        for worker in WORKERS:
            got = netlab.samples(before, name, interface="cap0", worker=worker)
            if name == "fanoutd_decode_errors_total":
                reasons = {dict(lbl)["reason"]: v for lbl, v in got.items()}
                assert reasons == dict.fromkeys(ERROR_REASONS, 0), \
                    f"worker {worker}: decode errors before traffic {reasons}"
            else:
                assert list(got.values()) == [0], f"{name}{{worker={worker}}} before traffic: {got}"

    sent = known_frames(30)
    n = injector.send_all(sent)
    text, m = settled_metrics(daemon, n)

    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in COUNTERS:
        family = families.get(name.removesuffix("_total"))
        assert family is not None and family.type == "counter", \
            f"{name}: {family and family.type}, want a counter"
        assert {s.name for s in family.samples} == {name}
    for name in GAUGES:
        assert families[name].type == "gauge", f"{name}: {families[name].type}, want a gauge"
    special_labels = {"fanoutd_decode_errors_total": {"interface", "worker", "reason"},
                      "fanoutd_workers_up": {"interface"},
                      "fanoutd_build_info": {"version", "encoder"},
                      "fanoutd_link_events_total": {"interface", "event"},
                      "fanoutd_link_up": {"interface"},
                      "fanoutd_metrics_connections_dropped_total": {"reason"},
                      "fanoutd_proxy_rejected_messages_total": {"reason"}}
    special_labels.update({f"{name}_total": set() for name, _, _ in PROXY_COUNTERS})
    special_labels.update({name: set() for name, _, _ in PROXY_GAUGES})  # the publisher's
    for family in families.values():
        for s in family.samples:
            assert s.timestamp is None, f"{s.name}{s.labels} carries a timestamp"
            assert "total" not in s.labels.values(), f"{s.name}{s.labels}: a 'total' label"
            if s.name.startswith("process_"):  # the supervisor's own (ProcessCollector)
                assert s.labels == {}, f"{s.name}{s.labels}"
                continue
            want = special_labels.get(s.name, {"interface", "worker"})
            assert set(s.labels) == want, f"{s.name}: labels {s.labels}, want {sorted(want)}"

    assert m[("fanoutd_workers_up", frozenset({("interface", "cap0")}))] == 2
    assert m[("fanoutd_link_up", frozenset({("interface", "cap0")}))] == 1
    build = frozenset({("version", fanoutd.__version__), ("encoder", encoder.IMPLEMENTATION)})
    assert m[("fanoutd_build_info", build)] == 1

    def total(name: str, **labels: str) -> float:
        return netlab.metric_sum(m, name, interface="cap0", **labels)

    assert total("fanoutd_kernel_packets_total") >= n, text
    assert total("fanoutd_batches_published_total") >= 1, text
    got = {
        "decoded": total("fanoutd_packets_decoded_total"),
        "bytes": total("fanoutd_bytes_total"),
        "truncated-ipv4": total("fanoutd_decode_errors_total", reason="truncated-ipv4"),
        "truncated-tcp": total("fanoutd_decode_errors_total", reason="truncated-tcp"),
        "other decode errors": total("fanoutd_decode_errors_total")
        - total("fanoutd_decode_errors_total", reason="truncated-ipv4")
        - total("fanoutd_decode_errors_total", reason="truncated-tcp"),
        "kernel drops": total("fanoutd_kernel_drops_total"),
        "publish drops": total("fanoutd_publish_drops_total"),
        "restarts": total("fanoutd_worker_restarts_total"),
    }
    want = {"decoded": n, "bytes": sum(map(len, sent)), "truncated-ipv4": 1, "truncated-tcp": 1,
            "other decode errors": 0, "kernel drops": 0, "publish drops": 0, "restarts": 0}
    assert got == want, f"sums over workers after {n} frames\n{text}"

    # Without JOURNAL_STREAM the same log records go to stderr (their journal form is
    # checked in test_journal_logging_with_fields).
    stderr = daemon.stderr_text()
    assert "capturing on cap0" in stderr and "worker 0 capturing on cap0" in stderr, stderr


@pytest.mark.skipif(programs.promtool() is None,
                    reason="promtool is not installed (scripts/install.sh --test)")
def test_promtool_accepts_a_real_scrape(injector, start_daemon):
    """`promtool check metrics` finds no lint problem in a scrape of a daemon that has
    counted traffic (exit 0, nothing printed)."""
    daemon = start_daemon(workers=2, fanout="lb")
    n = injector.send_all(known_frames(10))
    text, _ = settled_metrics(daemon, n)

    proc = subprocess.run([programs.promtool(), "check", "metrics"], input=text,
                          capture_output=True, text=True, timeout=30, check=False)

    problems = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 0 and not problems, \
        f"promtool exit {proc.returncode}: {problems}\n--- scrape:\n{text}"


# --------------------------------------------------------------------------- stats topic


def test_stats_topic(injector, start_daemon):
    """A SUB socket subscribed to `stats` receives [b"stats", msgpack body] every
    status_interval_ms; the body names its counters as /metrics does, and once frames
    were decoded the next message counts them all."""
    with netlab.workdir() as wd:
        config = write_config(wd, status_interval_ms=300)
        daemon = start_daemon(workers=2, fanout="lb", extra=["-c", str(config)])
        with StatsSubscriber(daemon.endpoint) as sub:
            body = sub.next(timeout=5, detail=daemon.logs)
            assert body["v"] == 1 and body["iface"] == "cap0", body
            assert body["workers_up"] == 2, body
            assert sorted(w["worker"] for w in body["workers"]) == [0, 1], body

            # The per-worker keys are the /metrics names without the fanoutd_ prefix.
            scraped = daemon.metrics()
            names = {n.removeprefix("fanoutd_") for n, lbl in scraped if ("worker", "0") in lbl}
            for w in body["workers"]:
                assert set(w) == names | {"worker", "up"}, \
                    f"worker {w['worker']} keys {sorted(w)}, /metrics has {sorted(names)}"
                assert set(w["decode_errors_total"]) == set(ERROR_REASONS)
                assert w["up"] is True

            # Two messages arrive about 300 ms apart (not the 5 s default).
            start = time.monotonic()
            sub.next(timeout=2, detail=daemon.logs)
            sub.next(timeout=2, detail=daemon.logs)
            assert time.monotonic() - start < 1.5

            sent = known_frames(20)
            n = injector.send_all(sent)
            _, m = settled_metrics(daemon, n)
            counted_at = time.time_ns()
            deadline = time.monotonic() + 5
            while (body := sub.next(timeout=2, detail=daemon.logs))["ts_ns"] <= counted_at:
                assert time.monotonic() < deadline, "no stats message newer than the counts"
            assert worker_sum(body, "packets_decoded_total") == n, body
            assert worker_sum(body, "bytes_total") == sum(map(len, sent)), body
            for w in body["workers"]:
                labels = {"interface": "cap0", "worker": str(w["worker"])}
                assert w["packets_decoded_total"] == netlab.metric_sum(
                    m, "fanoutd_packets_decoded_total", **labels), (body, m)


# --------------------------------------------------------------------------- fanoutd stats


def test_stats_command(ns, injector, start_daemon):
    """`fanoutd stats` prints a per-worker table and a total row whose kernel packet
    count is what was injected; an unreachable metrics port exits 69 with one line."""
    daemon = start_daemon(workers=2, fanout="lb")
    n = injector.send_all(known_frames(40))
    settled_metrics(daemon, n)

    # A proxy in the environment must not be used for the metrics address.
    proc = netlab.run_cli(ns, "stats", "--metrics", f"127.0.0.1:{daemon.metrics_port}",
                          "--interval", "0.5", env={"http_proxy": "http://127.0.0.1:1"})

    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr}"
    header, *rows = proc.stdout.strip().splitlines()
    assert "packets/s" in header and "drops" in header, header
    titles = re.split(r"\s{2,}", header.strip())
    numeric = titles[2:]  # after interface and worker; "total" leaves the worker cell empty
    table = {}
    for row in rows:
        cells = row.split()
        values = dict(zip(numeric, cells[-len(numeric):], strict=True))
        table[tuple(cells[:-len(numeric)])] = {k: int(v.replace(",", ""))
                                               for k, v in values.items()}
    assert list(table) == [("cap0", "0"), ("cap0", "1"), ("total",)], proc.stdout
    assert table[("total",)]["kernel pkts"] == n, proc.stdout
    assert table[("cap0", "0")]["kernel pkts"] + table[("cap0", "1")]["kernel pkts"] == n
    assert table[("total",)]["decoded"] == n, proc.stdout

    closed = ns.free_port()
    proc = netlab.run_cli(ns, "stats", "--metrics", f"127.0.0.1:{closed}", "--interval", "0.1")
    assert proc.returncode == 69, f"exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""


# --------------------------------------------------------------------------- sd_notify


def test_sd_notify_ready_status_watchdog_stopping(start_daemon):
    """READY=1 (with "2/2 workers up") once every worker captures, STATUS= every
    status_interval_ms, WATCHDOG=1 at half WATCHDOG_USEC while healthy; the pings stop
    while a worker is frozen (SIGSTOP) past heartbeat_timeout_ms and resume once it runs
    again; SIGTERM sends STOPPING=1 and the daemon exits 0 leaving no child."""
    with netlab.workdir() as wd, netlab.DatagramSink(wd / "notify.sock") as sink:
        config = write_config(wd, status_interval_ms=300, heartbeat_timeout_ms=500)
        daemon = start_daemon(ready=False, workers=2, fanout="lb", extra=["-c", str(config)],
                              env={"NOTIFY_SOCKET": str(sink.path), "WATCHDOG_USEC": "1000000"})
        frozen: tuple[int, int] | None = None
        try:
            def lines_after(t: float, prefix: str) -> list[float]:
                return [at for at, line in sink.notify_lines()
                        if at > t and line.startswith(prefix)]

            def notified() -> str:
                return f"notify: {sink.notify_lines()}\n{daemon.logs()}"

            def ready() -> tuple[float, bytes] | None:
                daemon.check_running()
                return next(((t, d) for t, d in sink.snapshot() if b"READY=1" in d), None)
            ready_at, datagram = netlab.wait_for(ready, 20, "READY=1", detail=notified)
            assert b"STATUS=2/2 workers up on cap0" in datagram, datagram
            assert daemon.workers_up() == 2

            netlab.wait_for(lambda: len(lines_after(ready_at, "STATUS=")) >= 3, 3,
                            "3 STATUS= lines after READY", detail=notified)
            # The first ping goes out in the same supervisor tick as READY.
            netlab.wait_for(lambda: len(lines_after(ready_at - 0.1, "WATCHDOG=1")) >= 3, 3,
                            "3 WATCHDOG=1", detail=notified)
            third = lines_after(ready_at - 0.1, "WATCHDOG=1")[2]
            assert third - ready_at <= 2.5, f"3 pings took {third - ready_at:.2f} s"

            # Freeze worker 0: its heartbeat goes stale, the watchdog must starve.
            pid = daemon.children_by_comm()["fanoutd-w0"]
            frozen = netlab.proc_identity(pid)
            os.kill(pid, signal.SIGSTOP)

            def starved() -> bool:
                last = max(lines_after(0, "WATCHDOG=1"))
                return (time.monotonic() - last > 1.2
                        and len(lines_after(last, "STATUS=")) >= 2)
            netlab.wait_for(starved, 6, "no WATCHDOG=1 for 1.2 s while STATUS= goes on",
                            interval=0.1, detail=notified)

            resumed_at = time.monotonic()
            os.kill(pid, signal.SIGCONT)
            frozen = None
            netlab.wait_for(lambda: lines_after(resumed_at, "WATCHDOG=1"), 3,
                            "WATCHDOG=1 after SIGCONT", detail=notified)

            children = {i for i in map(netlab.proc_identity,
                                       netlab.proc_descendants(daemon.pid)) if i}
            assert len(children) >= 3, children  # two workers and the proxy
            stopped_at = time.monotonic()
            assert daemon.stop(signal.SIGTERM) == 0, daemon.logs()
            netlab.wait_for(lambda: lines_after(stopped_at, "STOPPING=1"), 2, "STOPPING=1",
                            detail=notified)
            left = [i for i in children if netlab.proc_alive(i)]
            assert not left, f"children still running after exit: {left}"
        finally:
            if frozen is not None and netlab.proc_alive(frozen):
                os.kill(frozen[0], signal.SIGCONT)
            daemon.kill()  # before the sink goes: the daemon must never see it missing


def test_a_notify_socket_that_is_gone_does_not_stop_capture(injector, start_daemon,
                                                            subscribe):
    """sd_notify is fire and forget: a NOTIFY_SOCKET that does not exist (inherited, or a
    container without it) is reported once, and the daemon captures and stops cleanly."""
    with netlab.workdir() as wd:
        daemon = start_daemon(workers=1, env={"NOTIFY_SOCKET": str(wd / "nothing.sock"),
                                              "WATCHDOG_USEC": "200000"})
        sub = subscribe(daemon)
        n = injector.send_all(known_frames(10))
        sub.collect(netlab.at_least(n), timeout=10, detail=daemon.logs)
        assert daemon.stop(signal.SIGTERM) == 0, daemon.logs()
        logs = daemon.logs()
        assert logs.count("cannot notify systemd") == 1, logs
        assert "Traceback" not in logs


# --------------------------------------------------------------------------- journal

JOURNAL_SOCKET = Path("/run/systemd/journal/socket")


def test_journal_logging_with_fields(start_daemon):
    """With stderr being the JOURNAL_STREAM, log records go to the journal socket in the
    native protocol, with SYSLOG_IDENTIFIER, PRIORITY and the INTERFACE/WORKER fields."""
    if JOURNAL_SOCKET.exists() or JOURNAL_SOCKET.is_symlink():
        pytest.skip(f"{JOURNAL_SOCKET} exists (a real journald, or a leftover): not ours "
                    "to take over")
    created = []  # only the directories this test made are removed again
    daemon = None
    try:
        for directory in (JOURNAL_SOCKET.parent.parent, JOURNAL_SOCKET.parent):
            with contextlib.suppress(FileExistsError):
                directory.mkdir(mode=0o755)
                created.append(directory)
        try:
            sink = netlab.DatagramSink(JOURNAL_SOCKET)
        except OSError as e:  # bound meanwhile, e.g. by a concurrent run of this test
            pytest.skip(f"cannot bind {JOURNAL_SOCKET}: {e.strerror}")
        # As journald's: workers log after dropping to an unprivileged user.
        JOURNAL_SOCKET.chmod(0o666)
        for directory in created:
            directory.chmod(0o755)
        with sink:
            try:
                daemon = start_daemon(workers=2, journal_stream=True)

                def records() -> list[dict[str, str]]:
                    return [parse_journal_native(d) for _, d in sink.snapshot()]

                def find(text: str) -> dict[str, str] | None:
                    return next((r for r in records() if text in r.get("MESSAGE", "")), None)

                def detail() -> str:
                    return f"records: {records()}\n{daemon.logs()}"
                main = netlab.wait_for(lambda: find("capturing on cap0:"), 10,
                                       "the supervisor's 'capturing on cap0' record",
                                       detail=detail)
                worker = netlab.wait_for(lambda: find("worker 0 capturing"), 10,
                                         "worker 0's 'capturing' record", detail=detail)
            finally:
                if daemon is not None:
                    daemon.kill()  # stop logging before the socket goes away
        expect = {"INTERFACE": "cap0", "SYSLOG_IDENTIFIER": "fanoutd", "PRIORITY": "6"}
        assert {k: main.get(k) for k in expect} == expect, main
        assert "WORKER" not in main, main
        assert {k: worker.get(k) for k in expect} == expect, worker
        assert worker.get("WORKER") == "0", worker
        assert "capturing on cap0" not in daemon.stderr_text(), daemon.stderr_text()
    finally:
        for directory in reversed(created):
            with contextlib.suppress(OSError):  # not empty: someone else's socket is in it
                directory.rmdir()
