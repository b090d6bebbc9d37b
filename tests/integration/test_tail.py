"""`fanoutd tail --json` prints one JSON object per line for captured frames."""

import subprocess
import sys
from datetime import UTC, datetime

import frames as F
import netlab
import pytest

pytestmark = pytest.mark.integration


def test_tail_json_prints_one_object_per_frame(ns, injector, start_daemon):
    daemon = start_daemon(workers=1)
    argv = ["ip", "netns", "exec", ns.name, sys.executable, "-m", "fanoutd", "tail",
            "--endpoint", daemon.endpoint, "--json"]
    env = {"PYTHONPATH": str(netlab.REPO), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, cwd=netlab.REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        out = netlab.LineReader(proc)

        def tail_logs() -> str:
            return f"tail stdout: {out.seen[-5:]}\n{daemon.logs()}"

        def sports() -> set:
            return {o.get("sport") for o in out.json_objects()}

        # tail skips the welcome message, so its subscription is proven live only by
        # output: inject a probe frame per poll until one comes out (bounded).
        probes = iter(range(60000, 60100))

        def probe_seen() -> bool:
            assert proc.poll() is None, f"tail exited {proc.returncode}: {proc.stderr.read()}"
            injector.send(F.udp4_frame(sport=next(probes), dport=9))
            return any(p in sports() for p in range(60000, 60100))

        netlab.wait_for(probe_seen, 15, "tail to print a probe frame", interval=0.25,
                        detail=tail_logs)

        want = {41000 + i: 42000 + i for i in range(20)}
        injector.send_all(F.udp4_frame(sport=s, dport=d) for s, d in want.items())
        netlab.wait_for(lambda: set(want) <= sports(), 10, "tail to print 20 frames",
                        detail=tail_logs)
        objs = [o for o in out.json_objects() if o.get("sport") in want]
        assert all(isinstance(o, dict) for o in out.json_objects())
        assert len(objs) == len(want), f"{len(objs)} lines for {len(want)} frames"
        for o in objs:
            assert o["dport"] == want[o["sport"]], o
            # Names and an ISO 8601 UTC time besides the numbers, to the nanosecond.
            assert (o["proto"], o["proto_name"], o["ethertype_name"]) == (17, "udp", "ipv4")
            seconds, ns = divmod(o["ts_ns"], 10**9)
            assert o["time"] == datetime.fromtimestamp(seconds, UTC).strftime(
                "%Y-%m-%dT%H:%M:%S") + f".{ns:09d}Z", o
    finally:
        proc.kill()
        proc.wait(timeout=10)
