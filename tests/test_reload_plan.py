"""What a reload changes (fanoutd/reload.py's plan, in_force and changes), from crafted
configurations: no daemon, no namespace. The integration tests (test_reload.py) check that
the daemon applies it."""

from dataclasses import replace

from fanoutd.config import (
    CaptureConfig,
    Config,
    FanoutConfig,
    LogConfig,
    MetricsConfig,
    PublishConfig,
    RingConfig,
    SupervisorConfig,
)
from fanoutd.reload import MetricsChange, ReloadPlan, changes, in_force, plan

CAP0 = CaptureConfig(interface="cap0", workers=2)
CAP1 = CaptureConfig(interface="cap1", workers=1)
BASE = Config(interfaces=(CAP0, CAP1), user="fanoutd")


def test_the_same_configuration_is_unchanged():
    assert plan(BASE, replace(BASE)) == ReloadPlan(unchanged=True)


def test_the_same_configuration_after_a_failed_reload_is_tried_again():
    todo = plan(BASE, BASE, retry={"cap1"})
    assert not todo.unchanged and todo.moved == ("cap1",)
    assert not todo.restart_proxy and todo.metrics is MetricsChange.NONE


def test_log_level_alone_moves_and_restarts_nothing():
    todo = plan(BASE, replace(BASE, log=LogConfig(level="debug")))
    assert todo == ReloadPlan(unchanged=False)
    assert changes(BASE, replace(BASE, log=LogConfig(level="debug"))) == ["log"]


def test_a_capture_setting_moves_that_capture_only():
    new = replace(BASE, interfaces=(replace(CAP0, workers=3), CAP1))
    todo = plan(BASE, new)
    assert (todo.moved, todo.added, todo.removed) == (("cap0",), (), ())
    assert not todo.restart_proxy
    assert changes(BASE, new) == ["workers"]


def test_ring_and_fanout_changes_move_the_capture():
    ring = replace(CAP1, ring=RingConfig(block_size=1 << 17))
    group = replace(CAP0, fanout=FanoutConfig(mode="lb", group_id=77))
    new = replace(BASE, interfaces=(group, ring))
    assert plan(BASE, new).moved == ("cap0", "cap1")
    assert changes(BASE, new) == ["fanout", "ring"]


def test_what_workers_see_moves_every_capture():
    """Workers learn the user and the wire format when forked: new workers for all."""
    for new in (replace(BASE, user=None),
                replace(BASE, publish=replace(BASE.publish, format="rows"))):
        todo = plan(BASE, new)
        assert todo.moved == ("cap0", "cap1") and todo.restart_proxy


def test_publish_settings_restart_the_proxy_only():
    for publish in (PublishConfig(endpoint="tcp://127.0.0.1:7441"),
                    PublishConfig(sndhwm=512), PublishConfig(max_subscribers=2)):
        todo = plan(BASE, replace(BASE, publish=publish))
        assert todo.restart_proxy and todo.moved == ()


def test_the_status_interval_restarts_the_proxy():
    new = replace(BASE, supervisor=SupervisorConfig(status_interval_ms=1000))
    assert plan(BASE, new).restart_proxy
    new = replace(BASE, supervisor=SupervisorConfig(heartbeat_timeout_ms=1000))
    assert plan(BASE, new) == ReloadPlan(unchanged=False)  # the supervisor's own setting


def test_interfaces_added_removed_and_reordered():
    cap2 = CaptureConfig(interface="cap2", workers=1)
    todo = plan(BASE, replace(BASE, interfaces=(CAP1, cap2)))
    assert (todo.removed, todo.added, todo.moved) == (("cap0",), ("cap2",), ())
    assert todo.restart_proxy  # its stats report names the interfaces
    reordered = plan(BASE, replace(BASE, interfaces=(CAP1, CAP0)))
    assert reordered.restart_proxy and reordered.moved == reordered.added == ()
    assert changes(BASE, replace(BASE, interfaces=(CAP0,))) == ["interfaces"]


def test_metrics_on_the_same_listener_are_reconfigured_elsewhere_rebound():
    tls = MetricsConfig(tls_cert_file="/etc/cert.pem", tls_key_file="/etc/key.pem")
    assert plan(BASE, replace(BASE, metrics=tls)).metrics is MetricsChange.RECONFIGURE
    moved = MetricsConfig(listen="127.0.0.1:9741")
    todo = plan(BASE, replace(BASE, metrics=moved))
    assert todo.metrics is MetricsChange.REBIND and not todo.restart_proxy


def test_in_force_is_what_runs():
    """A capture that could not take its new settings stays on the old ones in the
    configuration in force; one that could not be opened is not there."""
    cap2 = CaptureConfig(interface="cap2", workers=1)
    new = replace(BASE, interfaces=(replace(CAP0, workers=4), CAP1, cap2),
                  log=LogConfig(level="debug"))
    running = {"cap0": CAP0, "cap1": CAP1}  # cap0 failed to move, cap2 to open
    now = in_force(new, running)
    assert now.interfaces == (CAP0, CAP1) and now.log.level == "debug"
    assert changes(BASE, now) == ["log"]
    assert plan(now, new, retry={"cap0", "cap2"}).moved == ("cap0",)
    assert plan(now, new, retry={"cap0", "cap2"}).added == ("cap2",)


def test_tunnel_depth_moves_the_capture_as_payload_bytes_does():
    """What a worker's batches hold is fixed when it is forked: new rings and workers."""
    for changed in (replace(CAP0, tunnel_depth=0), replace(CAP0, payload_bytes=16)):
        new = replace(BASE, interfaces=(changed, CAP1))
        todo = plan(BASE, new)
        assert (todo.moved, todo.restart_proxy) == (("cap0",), False)
    assert changes(BASE, replace(BASE, interfaces=(replace(CAP0, tunnel_depth=3), CAP1))) \
        == ["tunnel_depth"]
