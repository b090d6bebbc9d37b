"""Surviving faults: a worker killed or hung mid-traffic loses nothing; a child that keeps
failing to start ends the daemon with a clear FATAL and exit status 70."""

import contextlib
import itertools
import os
import pwd
import signal
import socket
import statistics
import threading
import time
from pathlib import Path

import netlab
import pytest

from fanoutd import exits

pytestmark = pytest.mark.integration


def assert_every_frame_delivered(sub: netlab.Subscriber, daemon: netlab.Daemon,
                                 total: int) -> netlab.Capture:
    want = {netlab.frame_id(i) for i in range(total)}
    cap = sub.collect(netlab.all_keys(want, lambda r: (r["src"], r["sport"])), timeout=30,
                      detail=daemon.logs)
    for worker in {b["worker"] for b in cap.batches}:
        seqs = {b["seq"] for b in cap.batches if b["worker"] == worker}
        missing = set(range(max(seqs) + 1)) - seqs
        assert not missing, f"worker {worker}: batches never delivered: {sorted(missing)}"
    return cap


def wait_replaced(daemon: netlab.Daemon, comm: str, old: int) -> None:
    netlab.wait_for(lambda: daemon.children_by_comm().get(comm) not in (None, old), 15,
                    f"a new {comm}", detail=daemon.logs)


@pytest.mark.parametrize("block_timeout", ["5", "1000"],
                         ids=["blocks-handed-over-by-timeout", "full-blocks-taken-after-pauses"])
def test_sigkill_worker_mid_traffic_loses_nothing(injector, start_daemon, subscribe,
                                                  block_timeout):
    """SIGKILL a worker while frames flow: it is replaced, the new worker maps the same
    ring, and every frame still reaches the subscriber, with no gap in any worker's seq.
    With a long block timeout the blocks come full, and the worker pauses between them
    and signals the proxy once for several (worker.pause_after_block): the kill may come
    mid-pause, with batches written and not signalled."""
    daemon = start_daemon(workers=2, fanout="lb",
                          extra=("--block-count", "64", "--block-timeout", block_timeout))
    sub = subscribe(daemon)
    total = 12_000
    with netlab.Pump(injector, total, mark=total // 3) as pump:
        assert pump.reached.wait(30)
        victim = daemon.children_by_comm()["fanoutd-w0"]
        os.kill(victim, signal.SIGKILL)
        wait_replaced(daemon, "fanoutd-w0", victim)
    assert_every_frame_delivered(sub, daemon, total)
    m = daemon.metrics()
    assert netlab.metric_sum(m, "fanoutd_worker_restarts_total", worker="0") == 1
    assert netlab.metric_sum(m, "fanoutd_worker_restarts_total", worker="1") == 0
    assert netlab.metric_sum(m, "fanoutd_kernel_drops_total") == 0
    assert "fanoutd-w0 was killed by SIGKILL" in daemon.logs()


def test_stopped_proxy_makes_the_worker_wait_and_loses_nothing(injector, start_daemon,
                                                               subscribe):
    """SIGSTOP the proxy while frames come: the worker fills its outbox, then waits with
    the next blocks unread in its ring, and counts the waits (fanoutd_outbox_full_total);
    once the proxy runs again every frame reaches the subscriber, none dropped."""
    # A ring with room for what waits meanwhile (the tests' default has 8 blocks; a round
    # split over two blocks by the 5 ms block timeout would fill it, and the kernel drop).
    daemon = start_daemon(workers=1, extra=("--block-count", "64"))
    sub = subscribe(daemon)
    proxy = daemon.children_by_comm()["fanoutd-proxy"]
    rounds, per_round = 8, 100  # more blocks than the outbox has slots (4)
    os.kill(proxy, signal.SIGSTOP)
    try:
        for r in range(rounds):
            injector.send_all(netlab.numbered_frame(i)
                              for i in range(r * per_round, (r + 1) * per_round))
            # Each round its own block: the worker has written it (or waits to).
            netlab.wait_for(lambda r=r: netlab.metric_sum(
                daemon.metrics(), "fanoutd_batches_published_total") >= min(r + 1, 4)
                and netlab.metric_sum(daemon.metrics(), "fanoutd_kernel_packets_total")
                >= (r + 1) * per_round, 10, f"round {r} in the ring", detail=daemon.logs)
        netlab.wait_for(lambda: netlab.metric_sum(daemon.metrics(),
                                                  "fanoutd_outbox_full_total") > 0,
                        10, "the worker to wait for a free outbox slot", detail=daemon.logs)
        m = daemon.metrics()
        assert netlab.metric_sum(m, "fanoutd_batches_published_total") == 4, \
            "the worker wrote more batches than its outbox holds"
    finally:
        os.kill(proxy, signal.SIGCONT)
    assert_every_frame_delivered(sub, daemon, rounds * per_round)
    m = daemon.metrics()
    assert netlab.metric_sum(m, "fanoutd_kernel_drops_total") == 0
    assert netlab.metric_sum(m, "fanoutd_publish_drops_total") == 0


def capture_span_s(batch: dict) -> float:
    """Seconds from a batch's first packet to its last, by their capture times."""
    ts = [row[batch["fields"].index("ts_ns")] for row in batch["packets"]]
    return (max(ts) - min(ts)) / 1e9


def test_blocks_that_come_full_are_taken_a_few_at_a_time_and_none_is_lost(
        injector, start_daemon, subscribe):
    """Heavy traffic: once a block comes full, the worker pauses (up to the block
    timeout, here a second, and no longer than 3 blocks take to fill) and then takes the
    blocks that came meanwhile together: the proxy, woken once for them, sends them back
    to back (2-3 at a time here). Taken one at a time, the batches would come a block's
    fill time (~20 ms) apart. Every frame is delivered, nothing is dropped."""
    daemon = start_daemon(workers=1, extra=("--block-size", "65536", "--block-count", "64",
                                            "--block-timeout", "1000"))
    sub = subscribe(daemon)
    total = 12_000  # ~450 frames a 64 KiB block: ~26 blocks, at the pump's ~20k frames/s
    arrived: list[float] = []
    with netlab.Pump(injector, total, mark=total):
        deadline = time.monotonic() + 30
        while len(sub.capture.rows) < total:
            assert time.monotonic() < deadline, f"{sub.capture.summary()}\n{daemon.logs()}"
            arrived += sub.take_arrivals(0.2)
    assert_every_frame_delivered(sub, daemon, total)
    # Back to back: sooner after the batch before than half the time a block took to
    # fill (from its packets' capture times; the pump slows down on a busy machine).
    fill_s = statistics.median(capture_span_s(b) for b in sub.capture.batches)
    groups = 1 + sum(b - a > fill_s / 2 for a, b in itertools.pairwise(arrived))
    assert groups <= 0.75 * len(arrived), \
        f"{len(arrived)} batches came in {groups} groups: taken one block at a time"
    assert netlab.metric_sum(daemon.metrics(), "fanoutd_kernel_drops_total") == 0


def test_hung_worker_is_terminated_replaced_and_loses_nothing(injector, start_daemon,
                                                              subscribe):
    """A worker that stops heartbeating (SIGSTOP) gets SIGTERM, then SIGKILL, and is
    replaced; what arrived in its ring meanwhile is delivered by its successor."""
    with netlab.workdir() as wd:
        config = wd / "fanoutd.yaml"
        config.write_text("supervisor:\n  heartbeat_timeout_ms: 500\n")
        daemon = start_daemon(workers=2, fanout="lb", extra=("-c", str(config)))
        sub = subscribe(daemon)
        hung = daemon.children_by_comm()["fanoutd-w1"]
        os.kill(hung, signal.SIGSTOP)
        try:
            total = 400
            injector.send_all(netlab.numbered_frame(i) for i in range(total))
            wait_replaced(daemon, "fanoutd-w1", hung)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung, signal.SIGCONT)
        assert_every_frame_delivered(sub, daemon, total)
        logs = daemon.logs()
        assert "fanoutd-w1 has not heartbeaten for 500 ms; terminating it" in logs
        assert "fanoutd-w1 ignored SIGTERM; killing it" in logs
        m = daemon.metrics()
        assert netlab.metric_sum(m, "fanoutd_worker_restarts_total", worker="1") == 1


def test_proxy_that_cannot_restart_goes_fatal(ns, start_daemon):
    """The proxy dies and its port is taken meanwhile: each restart fails, backs off, and
    after five the daemon gives up, says why, and exits 70 with no child left."""
    port = ns.free_port()
    daemon = start_daemon(workers=1, extra=("--publish", f"tcp://127.0.0.1:{port}"))
    proxy = netlab.proc_identity(daemon.children_by_comm()["fanoutd-proxy"])
    os.kill(daemon.pid, signal.SIGSTOP)  # hold the supervisor so the port can be taken
    try:
        os.kill(proxy[0], signal.SIGKILL)
        with netlab.in_netns(ns.name):
            squatter = socket.socket()
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

        def took_port() -> bool:
            # The port frees once the proxy's last thread has exited, which can be after
            # its main thread already shows as a zombie.
            try:
                squatter.bind(("127.0.0.1", port))
            except OSError:
                return False
            return True

        netlab.wait_for(took_port, 10, "the dead proxy's port")
        squatter.listen()
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    try:
        status = netlab.wait_for(lambda: daemon.proc.poll(), 30, "the daemon to give up",
                                 detail=daemon.logs)
    finally:
        squatter.close()
    logs = daemon.logs()
    assert status == exits.SOFTWARE, logs
    assert "fanoutd-proxy could not start: publish.endpoint: cannot bind" in logs
    assert "fanoutd-proxy failed to start 5 times in a row" in logs
    assert "Traceback" not in logs


def test_runtime_dirs_left_by_killed_daemons_are_removed(start_daemon):
    """A daemon that was SIGKILLed leaves its runtime directory behind; the next one
    removes it, and only what a daemon made: the base may be a shared directory (the
    temp dir is the default without root), where a directory that merely looks like one
    (PID-..., its PID gone) belongs to someone else and stays."""
    with netlab.workdir() as wd:
        base = wd / "run"
        base.mkdir()
        killed = start_daemon(workers=1, extra=("--runtime-dir", str(base)))
        left = [d for d in base.iterdir() if d.name.startswith(f"{killed.pid}-cap0-")]
        assert len(left) == 1, list(base.iterdir())
        os.kill(killed.pid, signal.SIGKILL)
        killed.proc.wait(timeout=10)  # reaped: its pid is gone
        netlab.wait_for(lambda: not netlab.session_processes(killed.pid), 10,
                        "the killed daemon's children to go", detail=killed.logs)
        dead_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) - 1
        while os.path.exists(f"/proc/{dead_pid}"):
            dead_pid -= 1
        precious = base / f"{dead_pid}-precious-data"
        lookalike = base / f"{dead_pid}-cap0-abcd1234"
        alive = base / f"{os.getpid()}-cap0-alive"
        for d in (precious, lookalike, alive):
            d.mkdir()
            (d / "workers.sock").touch()
        daemon = start_daemon(workers=1, extra=("--runtime-dir", str(base)))
        assert not left[0].exists()
        for d in (precious, lookalike, alive):
            assert (d / "workers.sock").exists(), d
        own = [d for d in base.iterdir() if d.name.startswith(f"{daemon.pid}-cap0-")]
        assert len(own) == 1, list(base.iterdir())


def proc_status(pid: int, tid: int | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/task/{tid}/status" if tid else f"/proc/{pid}/status"
    lines = Path(path).read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def test_workers_and_proxy_run_unprivileged(start_daemon):
    """Once set up, every worker (it parses hostile frames) and the proxy run, by default,
    as fanoutd, an account of their own (not nobody, whose other processes could SIGSTOP
    them), with no capability in any set and no_new_privs, in every thread (ZeroMQ's I/O
    threads read from the network too); the supervisor keeps root."""
    daemon = start_daemon(workers=2)
    account = pwd.getpwnam("fanoutd")  # scripts/install.sh made it
    children = daemon.children_by_comm()
    assert set(children) == {"fanoutd-w0", "fanoutd-w1", "fanoutd-proxy"}
    threads = [(name, pid, int(tid)) for name, pid in children.items()
               for tid in os.listdir(f"/proc/{pid}/task")]
    assert len(threads) > len(children)  # the I/O threads are there to be checked
    for name, pid, tid in threads:
        status = proc_status(pid, tid)
        assert status["Uid"].split() == [str(account.pw_uid)] * 4, (name, status["Uid"])
        assert status["Gid"].split() == [str(account.pw_gid)] * 4, (name, status["Gid"])
        assert status["Groups"].strip() == "", (name, status["Groups"])
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[caps], 16) == 0, (name, caps, status[caps])
        assert status["NoNewPrivs"] == "1", name
    assert proc_status(daemon.pid)["Uid"].split()[0] == "0"


def test_user_none_keeps_children_as_started(start_daemon):
    daemon = start_daemon(workers=1, extra=("--user", "none"))
    pid = daemon.children_by_comm()["fanoutd-w0"]
    assert proc_status(pid)["Uid"].split()[0] == "0"


def test_killed_proxy_is_replaced_and_workers_reconnect(injector, start_daemon, subscribe):
    """SIGKILL the proxy: a new one binds the endpoint, the unprivileged workers (who
    cannot reconnect to root's ipc socket themselves) are replaced, and the subscriber,
    reconnected, receives every frame injected afterwards."""
    daemon = start_daemon(workers=2, fanout="lb")
    sub = subscribe(daemon)
    old = daemon.children_by_comm()
    os.kill(old["fanoutd-proxy"], signal.SIGKILL)
    for name in ("fanoutd-proxy", "fanoutd-w0", "fanoutd-w1"):
        wait_replaced(daemon, name, old[name])
    daemon.wait_ready()
    sub.wait_hello(timeout=10, detail=daemon.logs)  # the new proxy's welcome
    total = 200
    injector.send_all(netlab.numbered_frame(i) for i in range(total))
    want = {netlab.frame_id(i) for i in range(total)}
    sub.collect(netlab.all_keys(want, lambda r: (r["src"], r["sport"])), timeout=15,
                detail=daemon.logs)
    assert "fanoutd-w0 restarts to reconnect to the new proxy" in daemon.logs()


def test_killed_supervisor_leaves_no_stopped_child(start_daemon):
    """SIGKILL the supervisor while a worker and the proxy are stopped (SIGSTOP): a
    stopped process acts on no signal but SIGKILL, so a gentler death signal would leave
    them there, stopped, holding a capture socket. Nothing of the daemon may be left."""
    daemon = start_daemon(workers=2)
    children = daemon.children_by_comm()
    for name in ("fanoutd-w0", "fanoutd-proxy"):
        os.kill(children[name], signal.SIGSTOP)
    netlab.wait_for(lambda: all(Path(f"/proc/{children[n]}/stat").read_text()
                                .rsplit(")", 1)[1].split()[0] == "T"
                                for n in ("fanoutd-w0", "fanoutd-proxy")),
                    5, "the worker and the proxy to be stopped")
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.proc.wait(timeout=10)
    netlab.wait_for(lambda: not netlab.session_processes(daemon.pid), 10,
                    "no process of the daemon left",
                    detail=lambda: f"{netlab.session_processes(daemon.pid)}\n{daemon.logs()}")
# --------------------------------------------------------------------------- proxy restarts

# A ring that holds what arrives while a new proxy waits for its subscribers: 64 blocks of
# 64 KiB, each closed when full (~450 small frames) rather than every 5 ms, so 20k frames/s
# over two workers fill about 22 blocks a second per worker.
HOLDING_RING = ("--block-count", "64", "--block-timeout", "50")


class ProxyKiller(threading.Thread):
    """SIGKILLs the proxy once `when` is set, from a thread: the subscriber must keep
    reading meanwhile (libzmq attaches a reconnected SUB's pipe, and sends its
    subscriptions, only while the application calls into the socket)."""

    def __init__(self, daemon: netlab.Daemon, when: threading.Event) -> None:
        super().__init__(daemon=True)
        self.target_daemon, self.when = daemon, when
        self.killed: int | None = None

    def run(self) -> None:
        if self.when.wait(30):
            self.killed = self.target_daemon.children_by_comm()["fanoutd-proxy"]
            os.kill(self.killed, signal.SIGKILL)

    def replaced(self) -> None:
        self.join(timeout=30)
        assert self.killed is not None, "the proxy was not killed"
        wait_replaced(self.target_daemon, "fanoutd-proxy", self.killed)


def test_killed_proxy_loses_nothing_for_a_subscriber_back_within_the_grace(injector,
                                                                          start_daemon):
    """SIGKILL the proxy under traffic: its successor passes nothing on until the
    subscriber (which waits 300-600 ms before reconnecting, ZMQ_RECONNECT_IVL) is back,
    the workers hold their blocks meanwhile and publish again those the dead proxy had
    taken: the subscriber receives every frame (some twice), and no loss is counted."""
    daemon = start_daemon(workers=2, fanout="lb", extra=HOLDING_RING)
    with netlab.Subscriber(daemon.endpoint, reconnect_ivl_ms=300) as sub:
        sub.wait_hello(timeout=10, detail=daemon.logs)
        total = 30_000
        with netlab.Pump(injector, total, mark=total // 3) as pump:
            killer = ProxyKiller(daemon, pump.reached)
            killer.start()
            cap = assert_every_frame_delivered(sub, daemon, total)
        killer.replaced()
    # The newest blocks the dead proxy had passed on were published again.
    again = len(cap.batches) - len({(b["worker"], b["seq"]) for b in cap.batches})
    assert again > 0, "no batch was published again after the proxy died"
    m = daemon.metrics()
    assert netlab.metric_sum(m, "fanoutd_proxy_restarts_total") == 1
    assert netlab.metric_sum(m, "fanoutd_restart_unwatched_batches_total") == 0
    for name in ("fanoutd_kernel_drops_total", "fanoutd_publish_drops_total",
                 "fanoutd_subscriber_overflows_total"):
        assert netlab.metric_sum(m, name) == 0, (name, daemon.logs())
    assert "1 of the 1 subscribers of the previous proxy are back" in daemon.logs()


def test_loss_past_the_restart_grace_is_counted(injector, start_daemon):
    """A subscriber that reconnects only after the grace period (200 ms here) misses what
    the new proxy passed on meanwhile; the daemon counts those batches, at least as many
    as the subscriber lost."""
    with netlab.workdir() as wd:
        config = wd / "fanoutd.yaml"
        config.write_text("publish:\n  restart_grace_ms: 200\n")
        daemon = start_daemon(workers=2, fanout="lb", extra=(*HOLDING_RING, "-c", str(config)))
        with netlab.Subscriber(daemon.endpoint, reconnect_ivl_ms=1500) as sub:
            sub.wait_hello(timeout=10, detail=daemon.logs)
            total = 40_000
            with netlab.Pump(injector, total, mark=total // 5) as pump:
                killer = ProxyKiller(daemon, pump.reached)
                killer.start()
                sub.wait_hello(timeout=20, detail=daemon.logs)  # back, 1.5 to 3 s later
            killer.replaced()
            tail = range(total, total + 200)  # sent once it is back: all of it arrives
            injector.send_all(netlab.numbered_frame(i) for i in tail)
            want = {netlab.frame_id(i) for i in tail}
            cap = sub.collect(netlab.all_keys(want, lambda r: (r["src"], r["sport"])),
                              timeout=15, detail=daemon.logs)
        lost = 0
        for worker in (0, 1):
            seqs = {b["seq"] for b in cap.batches if b["worker"] == worker}
            lost += max(seqs) + 1 - len(seqs)
        m = daemon.metrics()
        unwatched = netlab.metric_sum(m, "fanoutd_restart_unwatched_batches_total")
        assert lost > 0, "the subscriber came back late but lost nothing"
        assert unwatched >= lost, (unwatched, lost, daemon.logs())
        for name in ("fanoutd_kernel_drops_total", "fanoutd_publish_drops_total"):
            assert netlab.metric_sum(m, name) == 0, (name, daemon.logs())
