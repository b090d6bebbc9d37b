#!/usr/bin/env python3
"""The relay's benchmark: one fanoutd worker capturing trafgen's full rate (64-byte
frames) in a private network namespace, `fanoutd relay` storing its batches into a
3-replica JetStream stream of a 3-node nats-server cluster on loopback, then a
JetStreamSubscriber reading them back; and the end-to-end latency, sensor to JetStream
consumer, at a paced 1 kpps.

    sudo .venv/bin/python benchmarks/relay_bench.py [--packets N] [--seconds S] ...

Prints rows/s and batches/s through the relay (received from the sensor, acknowledged by
JetStream) and from the stream to the consumer, what was lost where (kernel drops,
the sensor's subscriber queue, seq gaps the relay saw, failed stores), the stream's bytes
per row, and the latency percentiles. Everything it starts (namespace, daemon, servers,
relay) is stopped and removed on the way out. Traffic never leaves the namespace; the
NATS servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]

import natslab  # noqa: E402  (tests/natslab.py: the cluster and the relay process)
import netlab  # noqa: E402
from capture_tools import run_trafgen, trafgen_config  # noqa: E402
from proc_accounting import BenchError  # noqa: E402

from fanoutd.client import JetStreamSubscriber  # noqa: E402
from fanoutd.config import RingConfig  # noqa: E402

BLOCK_TIMEOUT_MS = RingConfig().block_timeout_ms  # the daemon's default, as run here


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Exit status: 0 done, 3 the benchmark could not run.")
    p.add_argument("--packets", type=int, default=3_000_000,
                   help="frames trafgen sends at full rate (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=10.0,
                   help="the full-rate burst ends after this long (default: %(default)s)")
    p.add_argument("--latency-seconds", type=float, default=10.0,
                   help="length of the latency run (default: %(default)s)")
    p.add_argument("--latency-rate", type=int, default=1000,
                   help="packets/s of the latency run (default: %(default)s)")
    p.add_argument("--max-in-flight", type=int, default=64,
                   help="the relay's window (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 20000 packets, a 2 s latency run; figures mean nothing")
    args = p.parse_args(argv)
    if args.quick:
        args.packets, args.seconds, args.latency_seconds = 20_000, 5.0, 2.0
    return args


def relay_totals(relay: natslab.Relay) -> dict[str, float]:
    m = relay.metrics()
    names = ("batches_received", "rows_received", "bytes_received", "batches_stored",
             "batches_duplicate", "batches_failed", "seq_gaps")
    return {n: m.get(f"fanoutd_relay_{n}_total", 0.0) for n in names}


def watch_relay(relay: natslab.Relay, until_quiet: float, limit: float) -> list[tuple]:
    """(time, totals) every 0.2 s until nothing has changed for until_quiet seconds after
    at least one batch (or limit seconds)."""
    samples = []
    start = time.monotonic()
    last_change = start
    previous = None
    while time.monotonic() - start < limit:
        now, totals = time.monotonic(), relay_totals(relay)
        samples.append((now, totals))
        key = (totals["batches_received"], totals["batches_stored"],
               totals["batches_duplicate"], totals["batches_failed"])
        if key != previous:
            previous, last_change = key, now
        elif key[0] > 0 and now - last_change >= until_quiet:
            break
        time.sleep(0.2)
    return samples


def rate(samples: list[tuple], name: str) -> tuple[float, float]:
    """(total, per second over the span in which it grew: from the last sample before
    it grew to the first at its final value, so the span is never too short)."""
    initial, final = samples[0][1][name], samples[-1][1][name]
    if final == initial:
        return 0.0, 0.0
    first = max(t for t, s in samples if s[name] == initial)
    last = min(t for t, s in samples if s[name] == final)
    return final - initial, (final - initial) / max(last - first, 1e-3)


def daemon_totals(daemon: netlab.Daemon) -> dict[str, float]:
    m = daemon.metrics()
    return {n: netlab.metric_sum(m, f"fanoutd_{n}_total") for n in (
        "kernel_packets", "kernel_drops", "packets_decoded", "batches_published",
        "publish_drops", "subscriber_overflows")}


def consume_all(servers: list[str], idle: float) -> tuple[int, int, float, int]:
    """Read the whole stream with a new durable: (batches, rows, seconds from the first
    batch to the last, redelivered)."""
    batches = rows = 0
    first = last = 0.0
    with JetStreamSubscriber(servers, durable="bench", fetch=64) as sub:
        for batch in sub.batches(timeout=idle):
            now = time.monotonic()
            first = first or now
            last = now
            batches += 1
            rows += batch.n
        redelivered = sub.redelivered
    return batches, rows, max(last - first, 1e-3), redelivered


class LatencyReader(threading.Thread):
    """A consumer of new batches: each row's latency is its arrival here (time.time_ns())
    minus ts_ns, the kernel's capture time."""

    def __init__(self, servers: list[str]) -> None:
        super().__init__(daemon=True)
        self.servers, self.latency_ns, self.stop = servers, [], threading.Event()
        self.ready = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with JetStreamSubscriber(self.servers, deliver="new", fetch=8) as sub:
                self.ready.set()
                for batch in sub.batches(timeout=0.5):
                    now = time.time_ns()
                    self.latency_ns += [now - ts for ts in batch.column("ts_ns")]
                    if self.stop.is_set():
                        break
                while not self.stop.is_set():
                    for batch in sub.batches(timeout=0.5):
                        now = time.time_ns()
                        self.latency_ns += [now - ts for ts in batch.column("ts_ns")]
                    if self.stop.is_set():
                        break
        except BaseException as e:  # reported by the main thread
            self.error = e
            self.ready.set()


def percentile(values: list[int], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] / 1e6


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise BenchError("relay_bench.py needs root (network namespaces, AF_PACKET)")
    for tool in ("ip", "taskset", "trafgen"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found: ./scripts/install.sh --test")
    reason = natslab.have_nats()
    if reason:
        raise BenchError(reason)


def run(args: argparse.Namespace) -> int:
    check_prerequisites()
    with contextlib.ExitStack() as stack:
        wd = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fo-rb-")))
        ns = stack.enter_context(netlab.NetNS(prefix="fo-rbench"))
        cluster = stack.enter_context(natslab.NatsCluster(size=3, replicas=3))
        g = RingConfig()
        daemon = stack.enter_context(netlab.Daemon(ns, wd, workers=1, extra=[
            "--block-size", str(g.block_size), "--block-count", str(g.block_count),
            "--block-timeout", str(g.block_timeout_ms), "--sensor", "bench"]))
        daemon.wait_ready()
        relay = stack.enter_context(natslab.Relay(
            wd, [daemon.endpoint], cluster, extra=["--max-in-flight",
                                                  str(args.max_in_flight)]))
        relay.wait_ready()
        conf = wd / "frame64.cfg"
        conf.write_text(trafgen_config(64))

        print(f"relay_bench: 1 worker (ring {g.block_count} x {g.block_size >> 10} KiB, "
              f"block timeout {g.block_timeout_ms} ms) -> relay (window "
              f"{args.max_in_flight}) -> stream {cluster.stream}, 3 replicas on 3 "
              f"nats-server {cluster_version(cluster)} on loopback; 2 CPUs shared by all "
              f"of it and the generator; this machine is noisy (other jobs share it)",
              flush=True)
        before = daemon_totals(daemon)
        watcher: list[list[tuple]] = []
        thread = threading.Thread(target=lambda: watcher.append(
            watch_relay(relay, until_quiet=3.0, limit=args.seconds + 180)), daemon=True)
        thread.start()
        sent = run_trafgen(ns, conf, args.packets, args.seconds, wd / "trafgen.log")
        thread.join(timeout=args.seconds + 200)
        samples = watcher[0]
        after = daemon_totals(daemon)
        d = {k: after[k] - before[k] for k in after}
        rows, rows_s = rate(samples, "rows_received")
        batches, batches_s = rate(samples, "batches_received")
        stored, stored_s = rate(samples, "batches_stored")
        t = samples[-1][1]
        bytes_per_batch = t["bytes_received"] / max(t["batches_received"], 1)
        print(f"generator: {sent.packets:,} frames of 64 bytes at {sent.kpps:,.0f} kpps; "
              f"cap0 got {sent.reached_cap0:,}, veth drops {sent.veth_drops:,}")
        print(f"sensor: {d['kernel_packets']:,.0f} packets passed by the kernel, "
              f"{d['kernel_drops']:,.0f} kernel drops, {d['packets_decoded']:,.0f} decoded, "
              f"{d['batches_published']:,.0f} batches published, {d['publish_drops']:,.0f} "
              f"dropped at the publish high-water mark, {d['subscriber_overflows']:,.0f} "
              f"dropped for the relay (its queue in the proxy full)")
        print(f"through the relay: {rows:,.0f} rows in {batches:,.0f} batches received "
              f"({rows_s:,.0f} rows/s, {batches_s:,.1f} batches/s, "
              f"{bytes_per_batch / 1024:,.0f} KiB per batch); {stored:,.0f} stored "
              f"({stored_s:,.1f} batches/s, {stored_s * bytes_per_batch / 1e6:,.1f} MB/s "
              f"into 3 replicas); {t['batches_duplicate']:,.0f} duplicates, "
              f"{t['batches_failed']:,.0f} failed, {t['seq_gaps']:,.0f} batches missing "
              f"(seq gaps)", flush=True)
        stream_bytes = stream_state(cluster)
        print(f"stream: {stream_bytes[0]:,} messages, {stream_bytes[1]:,} bytes per replica "
              f"= {stream_bytes[1] / max(rows, 1):,.1f} bytes per row (64-byte frames, no "
              f"payload)")
        n, r, secs, redelivered = consume_all(cluster.urls, idle=3.0)
        print(f"stream -> consumer: {r:,} rows in {n:,} batches in {secs:,.2f} s "
              f"({r / secs:,.0f} rows/s, {n / secs:,.1f} batches/s), {redelivered} "
              f"redelivered", flush=True)

        reader = LatencyReader(cluster.urls)
        reader.start()
        reader.ready.wait(timeout=30)
        if reader.error:
            raise BenchError(f"latency reader: {reader.error}")
        count = int(args.latency_rate * args.latency_seconds)
        lat_sent = run_trafgen(ns, conf, count, args.latency_seconds * 2 + 5,
                               wd / "trafgen-latency.log", rate=args.latency_rate)
        netlab.wait_for(lambda: len(reader.latency_ns) >= lat_sent.reached_cap0, 30,
                        "the latency run's rows at the consumer")
        reader.stop.set()
        reader.join(timeout=10)
        lat = sorted(reader.latency_ns)
        target = BLOCK_TIMEOUT_MS + 20
        p99 = percentile(lat, 0.99)
        print(f"latency sensor -> JetStream consumer at {lat_sent.kpps * 1000:,.0f} pps: "
              f"{len(lat):,} rows, p50 {percentile(lat, 0.50):.1f} ms, p99 {p99:.1f} ms, "
              f"max {lat[-1] / 1e6:.1f} ms (target p99 <= block timeout {BLOCK_TIMEOUT_MS} "
              f"+ 20 = {target} ms: {'met' if p99 <= target else 'NOT met'})", flush=True)
    return 0


def cluster_version(cluster: natslab.NatsCluster) -> str:
    import subprocess

    out = subprocess.run([cluster.binary, "--version"], capture_output=True, text=True,
                         timeout=10, check=False).stdout
    return out.strip().split()[-1] if out.strip() else "?"


def stream_state(cluster: natslab.NatsCluster) -> tuple[int, int]:
    async def state() -> tuple[int, int]:
        from fanoutd import jetstream

        nc = await jetstream.connect(cluster.urls, "relay_bench")
        try:
            s = (await nc.jetstream().stream_info(cluster.stream)).state
            return s.messages, s.bytes
        finally:
            await nc.close()
    return cluster.run(state())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except BenchError as e:
        print(f"relay_bench: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
