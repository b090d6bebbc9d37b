"""Process model: named children, clean exit on SIGTERM/SIGINT, a killed worker is replaced."""

import os
import re
import signal
from collections import Counter

import frames as F
import netlab
import pytest

pytestmark = pytest.mark.integration

CHILDREN = {"fanoutd-w0", "fanoutd-w1", "fanoutd-proxy"}


def wait_children(daemon: netlab.Daemon, timeout: float = 10) -> dict[str, int]:
    """{comm: pid} once the supervisor has every expected child."""
    def found() -> dict[str, int] | None:
        daemon.check_running()
        kids = daemon.children_by_comm()
        return kids if set(kids) >= CHILDREN else None
    return netlab.wait_for(found, timeout, f"children {sorted(CHILDREN)}",
                           detail=lambda: f"children now: {daemon.children_by_comm()}\n"
                                          f"{daemon.logs()}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_named_children_and_clean_exit(start_daemon, sig):
    daemon = start_daemon(workers=2, fanout="hash")
    kids = wait_children(daemon)
    everyone = [daemon.pid, *netlab.proc_descendants(daemon.pid)]
    idents = {pid: netlab.proc_identity(pid) for pid in everyone}
    names = {pid: netlab.proc_comm(pid) for pid in everyone}

    status = daemon.stop(sig, timeout=10)

    assert status == 0, f"exit status {status} after {sig.name}\n{daemon.logs()}"
    alive = {pid: names[pid] for pid, ident in idents.items()
             if ident and netlab.proc_alive(ident)}
    assert not alive, f"still running after the supervisor exited: {alive} (children {kids})"
    assert "Traceback" not in daemon.logs(), daemon.logs()


def test_the_proxys_zeromq_thread_never_preempts_it_and_workers_have_none(start_daemon):
    """The proxy's ZeroMQ I/O thread runs SCHED_BATCH (publish.batch_context), its main
    thread as started; a worker hands its batches over through shared memory
    (outbox.py) and runs no thread besides its own."""
    daemon = start_daemon(workers=2, fanout="hash")
    kids = wait_children(daemon)
    for name in sorted(CHILDREN):
        pid = kids[name]
        policies = {}
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                policies[f.read().strip()] = os.sched_getscheduler(int(tid))
        if name == "fanoutd-proxy":
            assert policies.get("ZMQbg/IO/0") == os.SCHED_BATCH, (name, policies)
        else:
            assert list(policies) == [name], policies
        assert policies[name] == os.SCHED_OTHER, (name, policies)


def test_killed_worker_is_replaced_and_delivery_continues(injector, start_daemon, subscribe):
    daemon = start_daemon(workers=2, fanout="lb")
    sub = subscribe(daemon)
    before = {20000 + i: F.udp4_frame(sport=20000 + i) for i in range(40)}
    injector.send_all(before.values())
    sub.collect(netlab.all_keys(set(before), lambda r: r["sport"]), timeout=10,
                detail=daemon.logs)

    old = wait_children(daemon)["fanoutd-w0"]
    os.kill(old, signal.SIGKILL)

    def replaced() -> int | None:
        daemon.check_running()
        new = daemon.children_by_comm().get("fanoutd-w0")
        return new if new not in (None, old) else None
    netlab.wait_for(replaced, 15, f"a new fanoutd-w0 (old pid {old})", interval=0.1,
                    detail=daemon.logs)
    daemon.wait_ready(timeout=15)

    after = {30000 + i: F.udp4_frame(sport=30000 + i) for i in range(60)}
    injector.send_all(after.values())
    want = set(before) | set(after)
    cap = sub.collect(netlab.all_keys(want, lambda r: r["sport"]), timeout=15,
                      detail=daemon.logs)

    # A replaced worker may re-send its last batch with the same seq (wire-format.md):
    # deduplicate on (worker, seq) before counting frames.
    unique = {}
    for batch in cap.batches:
        unique.setdefault((batch["worker"], batch["seq"]), batch)
    counts = Counter(dict(zip(b["fields"], row, strict=True))["sport"]
                     for b in unique.values() for row in b["packets"])
    dupes = {p: n for p, n in counts.items() if n > 1}
    assert not dupes, f"frames delivered twice in distinct batches: {dupes}"
    assert set(counts) == want, f"missing {sorted(want - set(counts))[:10]}"
    assert Counter(r["worker"] for r in cap.rows if r["sport"] in after)[0] > 0, \
        "the replacement fanoutd-w0 delivered nothing under lb"
    for worker in (0, 1):
        seqs = sorted(s for w, s in unique if w == worker)
        assert seqs == list(range(len(seqs))), f"worker {worker} seq gaps: {seqs}"


def test_start_line_timestamps_and_exit_summary(injector, start_daemon, subscribe):
    """What a tcpdump user expects on a terminal: each line timed, the start-up line names
    the endpoints and says "1 worker", and the exit says what was captured and dropped."""
    daemon = start_daemon(workers=1)
    sub = subscribe(daemon)
    injector.send_all(F.udp4_frame(sport=40000 + i) for i in range(25))
    sub.collect(netlab.at_least(25), timeout=10, detail=daemon.logs)
    netlab.wait_for(lambda: netlab.metric_sum(daemon.metrics(),
                                              "fanoutd_kernel_packets_total") >= 25,
                    10, "the kernel's count", detail=daemon.logs)
    assert daemon.stop(signal.SIGTERM) == 0, daemon.logs()
    lines = daemon.stderr_text().splitlines()
    stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d fanoutd\[\d+\]: ")
    assert lines and all(stamp.match(line) for line in lines), lines
    start = next(line for line in lines if "capturing on cap0:" in line)
    assert ": 1 worker, fanout hash" in start, start
    assert f"publishing on {daemon.endpoint}" in start, start
    assert f"metrics on http://127.0.0.1:{daemon.metrics_port}/metrics" in start, start
    # How many blocks the 25 frames filled depends on timing; the packets do not.
    assert re.search(r"cap0: 25 packets received by the kernel, 0 packets dropped by the "
                     r"kernel, 25 packets decoded, [1-9]\d* batch(es)? published$", lines[-1]), \
        lines[-1]
