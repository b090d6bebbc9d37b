"""Kernel ring statistics reach /metrics: packets counted, nothing dropped, every worker."""

import os
import urllib.error
import urllib.request

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


def get(daemon: netlab.Daemon, path: str) -> tuple[int, str]:
    """(status, body) of GET path on the daemon's metrics port, from inside its namespace."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    url = f"http://127.0.0.1:{daemon.metrics_port}{path}"
    with netlab.in_netns(daemon.ns.name):
        try:
            with opener.open(url, timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()


def test_metrics_only_on_their_path_with_process_metrics(start_daemon):
    """/metrics (with or without a query) answers; any other path is a 404 that says where
    the metrics are. The standard process_* metrics describe the supervisor."""
    daemon = start_daemon(workers=1)
    for path in ("/", "/favicon.ico", "/metricsx", "/metrics/x", "/debug"):
        status, body = get(daemon, path)
        assert status == 404 and "/metrics" in body, (path, status, body)
    status, body = get(daemon, "/metrics?name[]=fanoutd_workers_up")
    assert status == 200
    m = netlab.parse_metrics(get(daemon, "/metrics")[1])
    assert m[("process_cpu_seconds_total", frozenset())] > 0
    assert m[("process_resident_memory_bytes", frozenset())] > 1 << 20
    start = m[("process_start_time_seconds", frozenset())]
    clock_ticks = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        boot = next(float(line.split()[1]) for line in f if line.startswith("btime"))
    with open(f"/proc/{daemon.pid}/stat") as f:
        started = boot + int(f.read().rsplit(")", 1)[1].split()[19]) / clock_ticks
    assert abs(start - started) < 2, (start, started)
