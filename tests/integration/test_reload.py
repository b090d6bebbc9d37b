"""SIGHUP reloads the configuration: a valid file is applied without dropping capture
(worker count, ring geometry), an invalid one is rejected with its reason while the daemon
keeps running on the old configuration."""

import os
import signal
import time

import frames as F
import netlab
import pytest
import yaml
from configkeys import int_keys, merged, nested

pytestmark = pytest.mark.integration

RING = "ring: {block_size: 65536, block_count: 64, block_timeout_ms: 5}\n"


def workers_running(daemon: netlab.Daemon) -> list[str]:
    return sorted(k for k in daemon.children_by_comm() if k.startswith("fanoutd-w"))


def reload(daemon: netlab.Daemon, config, text: str) -> None:
    config.write_text(text)
    os.kill(daemon.pid, signal.SIGHUP)


def collect_all(sub: netlab.Subscriber, daemon: netlab.Daemon, total: int) -> None:
    want = {netlab.frame_id(i) for i in range(total)}

    def detail() -> str:
        m = daemon.metrics()
        return (f"kernel drops {netlab.metric_sum(m, 'fanoutd_kernel_drops_total')}, "
                f"packets {netlab.metric_sum(m, 'fanoutd_kernel_packets_total')}, "
                f"publish drops {netlab.metric_sum(m, 'fanoutd_publish_drops_total')}\n"
                f"{daemon.logs()}")

    sub.collect(netlab.all_keys(want, lambda r: (r["src"], r["sport"])), timeout=15,
                detail=detail)


@pytest.fixture
def config_daemon(ns, start_daemon, subscribe):
    """A 2-worker lb daemon driven by a config file in the test's workdir."""
    with netlab.workdir() as wd:
        config = wd / "fanoutd.yaml"
        config.write_text(f"workers: 2\nfanout: {{mode: lb}}\n{RING}")
        daemon = start_daemon(workers=2, config=config)
        yield daemon, config, subscribe(daemon)


def test_worker_count_changes_without_losing_frames(config_daemon, injector):
    """Frames flow while the worker count goes 2 -> 3 -> 1: every frame arrives, the
    slots are added and removed, workers_up follows."""
    daemon, config, sub = config_daemon
    total = 30_000
    with netlab.Pump(injector, total, mark=total // 3) as pump:
        assert pump.reached.wait(30)
        reload(daemon, config, f"workers: 3\nfanout: {{mode: lb}}\n{RING}")
        netlab.wait_for(lambda: workers_running(daemon) == ["fanoutd-w0", "fanoutd-w1",
                                                            "fanoutd-w2"], 15, "3 workers",
                        detail=daemon.logs)
        reload(daemon, config, f"workers: 1\nfanout: {{mode: lb}}\n{RING}")
        netlab.wait_for(lambda: workers_running(daemon) == ["fanoutd-w0"], 15, "1 worker",
                        detail=daemon.logs)
    collect_all(sub, daemon, total)
    daemon.workers = 1
    daemon.wait_ready()
    # Slots 1 and 2 are gone, and their counters with them: only the drops can be summed.
    assert netlab.metric_sum(daemon.metrics(), "fanoutd_kernel_drops_total") == 0
    assert daemon.logs().count("reloaded the configuration (changed: workers)") == 2


def test_ring_geometry_changes_without_losing_frames(config_daemon, injector):
    daemon, config, sub = config_daemon
    total = 20_000
    with netlab.Pump(injector, total, mark=total // 2) as pump:
        assert pump.reached.wait(30)
        reload(daemon, config, "workers: 2\nfanout: {mode: lb}\n"
                               "ring: {block_size: 131072, block_count: 32, "
                               "block_timeout_ms: 5}\n")
        netlab.wait_for(lambda: "reloaded the configuration (changed: ring)" in daemon.logs(),
                        15, "the reload", detail=daemon.logs)
    collect_all(sub, daemon, total)
    daemon.wait_ready()
    assert_counted(daemon, total)


def assert_counted(daemon: netlab.Daemon, total: int) -> None:
    """No kernel drop, and the kernel counts of the replaced rings were kept: a packet may
    reach both an old and a new ring in the instant the two overlap, never neither."""
    m = daemon.metrics()
    assert netlab.metric_sum(m, "fanoutd_kernel_drops_total") == 0
    assert total <= netlab.metric_sum(m, "fanoutd_kernel_packets_total") <= total * 1.01


@pytest.mark.parametrize("text, words", [
    ("workers: 0\n", "workers: must be between 1 and 256"),
    ("ring: {block_size: 1000}\n", "ring.block_size: must be a positive multiple"),
    ("workers: [2\n", "YAML syntax error at line 2"),
    ("user: nosuchuser0\n", "user: no such user 'nosuchuser0'"),
    ("publish: {curve: {clients_dir: /tmp}}\n", "publish.curve.clients_dir: needs"),
])
def test_an_invalid_file_is_rejected_and_capture_goes_on(config_daemon, injector, text,
                                                         words):
    daemon, config, sub = config_daemon
    before = daemon.children_by_comm()
    reload(daemon, config, text)
    netlab.wait_for(lambda: "reload rejected" in daemon.logs(), 10, "the rejection",
                    detail=daemon.logs)
    line = next(x for x in daemon.logs().splitlines() if "reload rejected" in x)
    assert words in line, line
    assert daemon.children_by_comm() == before  # nothing was touched
    injector.send_all(netlab.numbered_frame(i) for i in range(100))
    collect_all(sub, daemon, 100)
    assert "Traceback" not in daemon.logs()


def test_log_level_alone_restarts_nothing(config_daemon):
    daemon, config, _ = config_daemon
    before = daemon.children_by_comm()
    reload(daemon, config, f"workers: 2\nfanout: {{mode: lb}}\n{RING}log: {{level: debug}}\n")
    netlab.wait_for(lambda: "reloaded the configuration (changed: log)" in daemon.logs(), 10,
                    "the reload", detail=daemon.logs)
    assert daemon.children_by_comm() == before


TOO_LARGE = (2**40, 2**64)  # beyond every bound (the largest: 2**34 bytes of queue)
BASE = {"workers": 2, "fanout": {"mode": "lb"},
        "ring": {"block_size": 65536, "block_count": 64, "block_timeout_ms": 5}}


@pytest.mark.parametrize("value", TOO_LARGE)
def test_check_config_refuses_every_too_large_number(ns, value):
    """Each integer key set too large: check-config exits 78 with one line naming the key
    and its bound, no traceback (publish.sndhwm: 3000000000 used to pass, and `run` then
    died of an OverflowError)."""
    with netlab.workdir() as wd:
        config = wd / "fanoutd.yaml"
        for key in int_keys():
            config.write_text(yaml.safe_dump(merged(BASE, nested(key, value))))
            res = netlab.run_cli(ns, "check-config", "-c", str(config), "--interface", "cap0")
            lines = res.stderr.splitlines()
            assert res.returncode == 78, (key, res.returncode, res.stdout, res.stderr)
            assert len(lines) == 1 and lines[0].startswith(f"fanoutd: {key}: "), (key, lines)
            assert lines[0].endswith(f"got {value}"), lines


def test_a_reload_with_a_too_large_number_is_rejected(config_daemon, injector):
    """Each integer key set too large in turn, by reload: each is rejected, naming the key;
    the daemon keeps running on its configuration (a sndhwm too large for ZeroMQ used to
    kill the restarted proxy again and again, and the daemon with it: exit 70)."""
    daemon, config, sub = config_daemon
    before = daemon.children_by_comm()
    for n, key in enumerate(int_keys(), 1):
        reload(daemon, config, yaml.safe_dump(merged(BASE, nested(key, TOO_LARGE[0]))))

        def rejected(n=n) -> list[str]:
            daemon.check_running()
            found = [x for x in daemon.stderr_text().splitlines() if "reload rejected" in x]
            return found if len(found) >= n else []
        line = netlab.wait_for(rejected, 10, f"the rejection of {key}", detail=daemon.logs)[-1]
        assert f"previous configuration: {key}: " in line, line
    assert daemon.children_by_comm() == before  # nothing was touched
    injector.send_all(netlab.numbered_frame(i) for i in range(100))
    collect_all(sub, daemon, 100)
    assert "Traceback" not in daemon.stderr_text()


def test_a_storm_of_reloads_loses_nothing(config_daemon, injector):
    """40 SIGHUPs 30 ms apart, alternating 2 and 3 workers, under traffic: every numbered
    frame arrives (one may arrive twice: the old and new rings overlap for an instant),
    and the daemon logs nothing alarming. A worker told to drain before it had installed
    its SIGUSR1 handler used to die of it, and its ring was closed as if drained."""
    daemon, config, sub = config_daemon
    total = 60_000
    texts = [f"workers: {n}\nfanout: {{mode: lb}}\n{RING}" for n in (3, 2)]
    with netlab.Pump(injector, total, mark=5_000) as pump:
        assert pump.reached.wait(30)
        for i in range(40):
            staged = config.with_suffix(".new")  # the daemon must never read half a file
            staged.write_text(texts[i % 2])
            os.replace(staged, config)
            os.kill(daemon.pid, signal.SIGHUP)
            time.sleep(0.03)  # the storm's rhythm, not a wait
    want = {netlab.frame_id(i) for i in range(total)}

    def missing() -> str:
        seen = {(r["src"], r["sport"]) for r in sub.capture.rows}
        return f"{len(want - seen)} frames missing\n{daemon.logs()}"
    sub.collect(netlab.all_keys(want, lambda r: (r["src"], r["sport"])), timeout=60,
                detail=missing)
    netlab.wait_for(lambda: workers_running(daemon) == ["fanoutd-w0", "fanoutd-w1"], 30,
                    "2 workers and no old one draining", detail=daemon.logs)
    daemon.check_running()
    text = daemon.stderr_text()
    assert text.count("reloaded the configuration (changed: workers)") >= 5  # not all queued
    alarming = [line for line in text.splitlines()
                if any(w in line for w in ("WARNING", "ERROR", "Traceback", "killed"))]
    assert not alarming, "\n".join(alarming[:20])


def test_an_old_worker_that_dies_while_draining_is_replaced(config_daemon, injector):
    """A worker told to drain its old ring that dies instead (here SIGKILLed, stopped
    before it could drain) does not take the ring's blocks with it: that is logged and
    counted, and another worker drains the ring, so every frame still arrives."""
    daemon, config, sub = config_daemon
    old = daemon.children_by_comm()["fanoutd-w0"]
    os.kill(old, signal.SIGSTOP)  # what lb gives it stays in its ring
    try:
        injector.send_all(netlab.numbered_frame(i) for i in range(200))
        reload(daemon, config, f"workers: 3\nfanout: {{mode: lb}}\n{RING}")
        netlab.wait_for(lambda: "reloaded the configuration" in daemon.stderr_text(), 10,
                        "the reload", detail=daemon.logs)
    finally:
        os.kill(old, signal.SIGKILL)
    collect_all(sub, daemon, 200)
    assert ("fanoutd-w0 was killed by SIGKILL while draining its old ring; starting "
            "another worker to drain it") in daemon.stderr_text()
    netlab.wait_for(lambda: workers_running(daemon) == ["fanoutd-w0", "fanoutd-w1",
                                                        "fanoutd-w2"], 15,
                    "3 workers and no old one draining", detail=daemon.logs)
    daemon.workers = 3
    daemon.wait_ready()  # the slot's new worker, not the one draining its old ring
    m = daemon.metrics()
    assert netlab.metric_sum(m, "fanoutd_worker_restarts_total", worker="0") == 1
    assert netlab.metric_sum(m, "fanoutd_worker_restarts_total") == 1


def test_a_reload_whose_capture_part_fails_is_reported_and_tried_again(ns, config_daemon,
                                                                       injector):
    """The new capture settings cannot be applied (the fanout group is someone else's):
    the reload says it is incomplete, not "reloaded"; capture goes on as before, on the
    settings that run; the same file reloaded again is tried again, not "unchanged", and
    applies once it can."""
    daemon, config, sub = config_daemon
    before = daemon.children_by_comm()
    wanted = f"workers: 2\nfanout: {{mode: lb, group_id: 77}}\n{RING}"

    def incomplete(n: int) -> bool:
        return daemon.stderr_text().count("reload incomplete: the new capture settings "
                                          "of cap0 could not be applied") >= n
    with netlab.fanout_holder(ns, 77):
        reload(daemon, config, wanted)
        netlab.wait_for(lambda: incomplete(1), 10, "the failure", detail=daemon.logs)
        assert "cannot capture on cap0 with the new settings: fanout group 77" \
            in daemon.stderr_text()
        assert daemon.children_by_comm() == before  # the same workers, the same rings
        injector.send_all(netlab.numbered_frame(i) for i in range(200))
        collect_all(sub, daemon, 200)
        os.kill(daemon.pid, signal.SIGHUP)  # the same file again
        netlab.wait_for(lambda: incomplete(2), 10, "the second try", detail=daemon.logs)
        assert daemon.children_by_comm() == before
    os.kill(daemon.pid, signal.SIGHUP)  # the group is free now
    netlab.wait_for(lambda: "reloaded the configuration (changed: fanout)"
                    in daemon.stderr_text(), 15, "the reload", detail=daemon.logs)
    daemon.wait_ready()
    injector.send_all(netlab.numbered_frame(i) for i in range(200, 400))
    collect_all(sub, daemon, 400)
    text = daemon.stderr_text()
    assert "fanout lb (group 77)" in text
    assert "unchanged" not in text and "Traceback" not in text


def test_a_reload_of_an_overridden_top_level_key(config_daemon):
    """With interfaces entries that set a key themselves, changing the top-level key
    changes no capture: the configuration in force is the same, the daemon goes on."""
    daemon, config, _ = config_daemon
    entry = "interfaces:\n  - interface: cap0\n    filter: udp\n"
    reload(daemon, config, f"workers: 2\nfanout: {{mode: lb}}\n{RING}{entry}")
    netlab.wait_for(lambda: "reloaded the configuration (changed: filter)"
                    in daemon.stderr_text(), 15, "the first reload", detail=daemon.logs)
    before = netlab.wait_for(lambda: (kids := daemon.children_by_comm()) and not any(
        name.endswith("-old") for name in kids) and kids, 15, "the old workers to drain")
    reload(daemon, config, f"workers: 2\nfanout: {{mode: lb}}\n{RING}filter: tcp\n{entry}")
    netlab.wait_for(lambda: "reload: the configuration is unchanged" in daemon.stderr_text(),
                    15, "the second reload", detail=daemon.logs)
    daemon.check_running()
    assert daemon.children_by_comm() == before
    assert "Traceback" not in daemon.stderr_text()


def test_a_new_tunnel_depth_moves_the_capture_to_new_workers(config_daemon, injector):
    """tunnel_depth is a worker's from its fork on: a reload to 0 puts the capture on new
    workers, whose batches no longer decode through VXLAN."""
    daemon, config, sub = config_daemon

    def vxlan(sport: int) -> bytes:
        inner = F.eth(F.MAC_A, F.MAC_B, 0x0800, F.ipv4("10.0.0.1", "10.0.0.2", 6,
                                                       F.tcp(443, 51000)))
        return F.vxlan_frame(5001, inner, sport=sport)

    def row_of(sport: int) -> dict:
        sub.collect(netlab.all_keys({sport}, lambda r: r["sport"]), detail=daemon.logs)
        return next(r for r in sub.capture.rows if r["sport"] == sport)

    injector.send(vxlan(50001))
    before = row_of(50001)
    assert (before["tunnel"], before["tunnel_id"], before["inner_sport"]) == ("vxlan", 5001,
                                                                             443)
    reload(daemon, config, f"workers: 2\nfanout: {{mode: lb}}\n{RING}tunnel_depth: 0\n")
    netlab.wait_for(lambda: "reloaded the configuration (changed: tunnel_depth)"
                    in daemon.stderr_text(), 15, "the reload", detail=daemon.logs)
    netlab.wait_for(lambda: (kids := daemon.children_by_comm()) and not any(
        name.endswith("-old") for name in kids), 15, "the old workers to drain",
        detail=daemon.logs)
    daemon.wait_ready()
    injector.send(vxlan(50002))
    after = row_of(50002)
    assert after.get("tunnel") is None and after.get("inner_sport") is None, after
    assert (after["proto"], after["dport"]) == (17, 4789)
