"""Kernel ring statistics reach /metrics: packets counted, nothing dropped, every worker."""

import frames as F
import netlab
import pytest

pytestmark = pytest.mark.integration

N = 150


def test_kernel_counters_count_injected_frames(ns, injector, start_daemon):
    daemon = start_daemon(workers=2, fanout="lb")
    injector.send_all(F.udp4_frame(src=f"10.7.0.{i % 250 + 1}", sport=21000 + i)
                      for i in range(N))

    def counted() -> dict | None:
        m = daemon.try_metrics()
        total = netlab.metric_sum(m or {}, "fanoutd_kernel_packets_total", interface="cap0")
        return m if total >= N else None

    m = netlab.wait_for(counted, 10, f"sum of fanoutd_kernel_packets_total >= {N}",
                        interval=0.2, detail=daemon.logs)
    for name in ("fanoutd_kernel_packets_total", "fanoutd_kernel_drops_total",
                 "fanoutd_kernel_freezes_total"):
        workers = {dict(lbl).get("worker")
                   for lbl in netlab.samples(m, name, interface="cap0")}
        assert workers == {"0", "1"}, f"{name}: worker labels {workers}, want 0 and 1"
    drops = netlab.metric_sum(m, "fanoutd_kernel_drops_total", interface="cap0")
    assert drops == 0, f"kernel drops {drops} for {N} frames"
    assert m[("fanoutd_workers_up", frozenset({("interface", "cap0")}))] == 2
