"""Link changes never kill the daemon: down/up and delete/re-create of the captured
interface are logged once, counted, and capture resumes when the interface is back."""

import os
import signal
import subprocess

import frames as F
import netlab
import pytest

pytestmark = pytest.mark.integration


def link_events(daemon: netlab.Daemon) -> dict[str, float]:
    m = daemon.metrics()
    return {event: netlab.metric_sum(m, "fanoutd_link_events_total", event=event)
            for event in ("down", "up", "gone", "returned")}


def link_up(daemon: netlab.Daemon) -> float:
    return netlab.metric_sum(daemon.metrics(), "fanoutd_link_up")


def wait_events(daemon: netlab.Daemon, **want: int) -> None:
    netlab.wait_for(lambda: all(link_events(daemon)[e] == n for e, n in want.items()), 10,
                    f"link events {want}", detail=lambda: f"{link_events(daemon)}\n"
                                                          f"{daemon.logs()}")


def deliver(injector: netlab.Injector, sub: netlab.Subscriber, daemon: netlab.Daemon,
            base: int, n: int = 100) -> None:
    """Inject n frames with distinct source ports from `base`; all must arrive."""
    injector.send_all(F.udp4_frame(sport=base + i) for i in range(n))
    want = set(range(base, base + n))
    sub.collect(netlab.all_keys(want, lambda r: r["sport"]), timeout=10, detail=daemon.logs)


def test_down_and_up(ns, injector, start_daemon, subscribe):
    """cap0 goes down and up: one event each, the link gauge follows, workers keep running
    (the kernel re-links their sockets and fanout membership), and capture resumes."""
    daemon = start_daemon(workers=2, fanout="lb")
    sub = subscribe(daemon)
    workers = {k: v for k, v in daemon.children_by_comm().items() if k.startswith("fanoutd-w")}
    deliver(injector, sub, daemon, 1000)
    assert link_up(daemon) == 1

    ns.exec("ip", "link", "set", "cap0", "down")
    wait_events(daemon, down=1, up=0)
    assert link_up(daemon) == 0
    ns.exec("ip", "link", "set", "cap0", "up")
    wait_events(daemon, down=1, up=1)
    netlab.wait_for(lambda: link_up(daemon) == 1, 10, "link up again")

    deliver(injector, sub, daemon, 2000)
    assert {k: v for k, v in daemon.children_by_comm().items()
            if k.startswith("fanoutd-w")} == workers
    logs = daemon.logs()
    assert logs.count("cap0 went down") == 1, logs
    assert logs.count("cap0 is up again") == 1, logs
    assert netlab.metric_sum(daemon.metrics(), "fanoutd_worker_restarts_total") == 0


def test_deleted_and_recreated(ns, injector, start_daemon, subscribe):
    """cap0 is deleted (the veth pair goes): the daemon keeps running and waits; when a
    cap0 exists again it opens new sockets, rings and fanout group, and captures."""
    daemon = start_daemon(workers=2, fanout="lb")
    sub = subscribe(daemon)
    deliver(injector, sub, daemon, 1000)

    ns.exec("ip", "link", "del", "cap0")
    wait_events(daemon, gone=1)
    daemon.check_running()
    assert link_up(daemon) == 0

    ns.add_veth("inj0", "cap0")
    wait_events(daemon, gone=1, returned=1)
    daemon.wait_ready()
    with netlab.Injector(ns) as fresh:  # the old injector's inj0 is gone with the pair
        deliver(fresh, sub, daemon, 3000)
    logs = daemon.logs()
    assert logs.count("cap0 was deleted") == 1, logs
    assert logs.count("cap0 exists again") == 1, logs
    assert "Traceback" not in logs
    rows = [r for r in sub.capture.rows if r["sport"] >= 3000]
    assert {r["ifindex"] for r in rows} == {ns.ifindex("cap0")}


def ip_batch(ns: netlab.NetNS, commands: str) -> None:
    """Run `ip` commands in one process, microseconds apart."""
    subprocess.run(["ip", "-n", ns.name, "-batch", "-"], input=commands, text=True,
                   capture_output=True, timeout=60, check=True)


def test_fast_flaps_are_each_counted(ns, injector, start_daemon, subscribe):
    """30 down/up cycles of cap0 in a row, microseconds apart: each change is counted and
    logged, none missed and none twice; the link ends up, and capture goes on."""
    daemon = start_daemon(workers=1)
    sub = subscribe(daemon)
    ip_batch(ns, "link set cap0 down\nlink set cap0 up\n" * 30)

    wait_events(daemon, down=30, up=30, gone=0, returned=0)
    netlab.wait_for(lambda: link_up(daemon) == 1, 10, "link up after the flaps")
    logs = daemon.logs()
    assert daemon.stderr_text().count("cap0 went down") == 30, logs
    assert daemon.stderr_text().count("cap0 is up again") == 30, logs
    deliver(injector, sub, daemon, 1000)
    assert link_events(daemon) == {"down": 30, "up": 30, "gone": 0, "returned": 0}


def test_lost_notifications_are_resynchronised(ns, start_daemon):
    """The supervisor stopped (SIGSTOP) while cap0 flaps 2000 times: its notification
    queue overflows and most changes are lost. Resumed, it says so, reads the state again
    and counts consistently: nothing twice, and as many ups as downs but the last down,
    since cap0 ends down. Then one more up is counted as one."""
    daemon = start_daemon(workers=1)
    cycles = 2000
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        ip_batch(ns, "link set cap0 down\nlink set cap0 up\n" * cycles + "link set cap0 down\n")
    finally:
        os.kill(daemon.pid, signal.SIGCONT)

    netlab.wait_for(lambda: "link notifications were lost" in daemon.stderr_text(), 10,
                    "the supervisor to notice the lost notifications", detail=daemon.logs)
    netlab.wait_for(lambda: link_up(daemon) == 0, 10, "cap0 counted down at the end")
    events = link_events(daemon)
    assert 1 <= events["down"] <= cycles + 1, events
    assert events["down"] == events["up"] + 1, events
    assert events["gone"] == events["returned"] == 0, events
    assert daemon.stderr_text().count("link notifications were lost") == 1, daemon.logs()

    ns.exec("ip", "link", "set", "cap0", "up")
    wait_events(daemon, down=events["down"], up=events["up"] + 1)
    assert link_up(daemon) == 1
