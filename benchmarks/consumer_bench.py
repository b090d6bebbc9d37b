"""Consumer benchmark: what a Python subscriber spends per packet, by wire format and API.

    sudo .venv/bin/python benchmarks/consumer_bench.py [--packets 300000] [--runs 5]

Real batches first: the daemon runs on the veth cap0 of a network namespace this script
creates (a unique name, deleted in a `finally`), once with `--format columns` (version 2)
and once with `--format rows` (version 1), and frames injected raw on inj0 (64-byte
IPv4/UDP, many flows, to a MAC address that is not cap0's) fill its ring blocks; a plain
ZeroMQ SUB socket records every message it publishes. Then, for each consumer, the
recorded messages are published again from a local ipc XPUB socket to a consumer process
pinned to one CPU, a fanoutd.client.Subscriber, which receives them and does its work; its
CPU time (user + system) divided by the rows is the figure, after one pass of warm-up.
Each consumer runs --runs times, interleaved; the median, min and max are printed.

Consumers (`v2` = version 2 batches, `v1` = version 1):
- v2 columns(): receive, Batch, sum of `len` through numpy (`columns()["len"].sum()`);
- v2 to_arrow(): receive, Batch, a pyarrow RecordBatch of every column;
- v2 to_polars(): the same as a polars DataFrame;
- v2 records(): receive, Batch, a Record per row reading one field (`rec.len`);
- v1 records(): the same on version 1 batches (what a subscriber paid before version 2);
- v2 receive only: the bare socket's receive and the batch's header (the floor of all);
- v1 unpack only: receive and msgpack.unpackb, nothing else (the floor of version 1).
It also prints the bytes on the wire per row of both versions, for 64-byte IPv4/UDP,
IPv4/TCP and IPv6/UDP frames with the flow hash (ring.rxhash true, as from a NIC that
hashes), and IPv4/UDP without it (rxhash 0, as ring.rxhash auto gives on a veth).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import frames as F
import msgpack
import netlab
import zmq

from fanoutd.batch import Batch
from fanoutd.client import Subscriber
from fanoutd.wire import SUBSCRIBE_HELLO

REPO = Path(__file__).resolve().parent.parent

CONSUMER_CPU = 1
REPLAY_CPU = 0  # the process publishing the recorded batches again, off the consumer's CPU
CONSUMERS = ("v2 receive only", "v2 columns()", "v2 to_arrow()", "v2 to_polars()",
             "v2 records()", "v1 records()", "v1 unpack only")
DST_MAC = bytes.fromhex("0200000000b2")  # not cap0's: captured, then discarded
DOCS_BEGIN = "<!-- consumer_bench:begin -->"
DOCS_END = "<!-- consumer_bench:end -->"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--packets", type=int, default=300_000,
                   help="frames injected per format (default %(default)s)")
    p.add_argument("--runs", type=int, default=5, help="runs per consumer (default 5)")
    p.add_argument("--write-docs", action="store_true",
                   help="write the results into docs/performance.md, between its "
                        "consumer_bench markers")
    p.add_argument("--repeat", type=int, default=5,
                   help="times the recorded batches are sent per run, after one pass that "
                        "warms the consumer up and is not counted (default %(default)s)")
    return p.parse_args(argv)


def frame(i: int, kind: str = "udp4") -> bytes:
    src = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
    if kind == "tcp4":
        body = F.tcp4_frame(src=src, sport=1024 + i % 60000, flags=0x10)
    elif kind == "udp6":
        body = F.eth(DST_MAC, F.MAC_A, 0x86DD, F.ipv6(f"2001:db8::{i & 0xFFFF:x}",
                                                       "2001:db8::1", 17,
                                                       F.udp(1024 + i % 60000, 53)))
    else:
        body = F.udp4_frame(src=src, sport=1024 + i % 60000)
    body = DST_MAC + body[6:]
    return body + bytes(max(0, 60 - len(body)))  # 64 bytes on the wire with the FCS


def record(fmt: str, packets: int, kind: str = "udp4",
           rxhash: str = "true") -> list[list[bytes]]:
    """Run the daemon with --format fmt, inject `packets` frames, return every batch
    message it published (topic, body). rxhash true: every row carries a flow hash, as
    from a NIC that hashes (on this veth, auto would leave it 0)."""
    with netlab.NetNS("fo-cb") as ns, netlab.workdir() as wd:
        # The default ring, with a long block timeout: blocks are handed over full, as
        # under load.
        config = wd / "fanoutd.yaml"
        config.write_text(f"workers: 1\npublish: {{format: {fmt}}}\n"
                          f"ring: {{block_timeout_ms: 200, rxhash: {rxhash}}}\n")
        with netlab.Daemon(ns, wd, workers=1, config=config) as daemon:
            daemon.wait_ready(30)
            ctx = zmq.Context()
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.RCVHWM, 0)
            sub.subscribe(b"pkt.")
            sub.subscribe(b"fanoutd.hello")
            sub.connect(daemon.endpoint)
            if not sub.poll(10_000) or sub.recv_multipart() != [b"fanoutd.hello"]:
                raise RuntimeError("no welcome from the daemon\n" + daemon.logs())
            messages: list[list[bytes]] = []
            rows = 0
            with netlab.Injector(ns) as inj:
                for n in range(packets):
                    inj.send(frame(n, kind))
                    while sub.poll(0):
                        msg = sub.recv_multipart()
                        rows += Batch.from_message(*msg).n
                        messages.append(msg)
            deadline = time.monotonic() + 10
            while rows < packets and time.monotonic() < deadline:
                if sub.poll(200):
                    msg = sub.recv_multipart()
                    rows += Batch.from_message(*msg).n
                    messages.append(msg)
            sub.close(0)
            ctx.term()
    if rows < packets:
        raise RuntimeError(f"{fmt}: {rows} of {packets} rows arrived")
    return messages


def consume(name: str, endpoint: str, warmup: int, count: int, warm, result) -> None:
    """The consumer process: a fanoutd.client.Subscriber on the replay endpoint. It takes
    `warmup` batches, says so (`warm`: the timed ones are sent only then, so none is
    received before the clock starts), then `count` more, timed, doing `name`'s work with
    each."""
    os.sched_setaffinity(0, {CONSUMER_CPU})
    import numpy  # noqa: F401  (imported before the clock starts, as a real consumer has)
    import polars  # noqa: F401
    import pyarrow  # noqa: F401

    total = rows = seen = 0
    start = 0.0
    with Subscriber(endpoint, rcvhwm=0) as sub:
        if name in ("v1 unpack only", "v2 receive only"):  # below the client
            while seen < warmup + count:
                frames = sub.sock.recv_multipart(copy=False)
                if len(frames) != 2:
                    continue
                if name == "v1 unpack only":
                    rows += len(msgpack.unpackb(frames[1].buffer)["packets"])
                else:  # the floor: ZeroMQ's receive, and the row count
                    rows += Batch.from_message(*frames).n
                seen += 1
                if seen == warmup:
                    warm.set()
                    rows, start = 0, time.process_time()
        else:
            for batch in sub.batches():
                rows += batch.n
                if name == "v2 columns()":
                    total += int(batch.columns()["len"].sum())
                elif name == "v2 to_arrow()":
                    total += batch.to_arrow().num_rows
                elif name == "v2 to_polars()":
                    total += batch.to_polars().height
                else:
                    for rec in batch.records():
                        total += rec.len
                seen += 1
                if seen == warmup:  # steady state: start the clock
                    warm.set()
                    rows, start = 0, time.process_time()
                if seen == warmup + count:
                    break
        result.put((time.process_time() - start, rows))


def run_consumer(name: str, messages: list[list[bytes]], repeat: int) -> float:
    """ns of the consumer's CPU per row, over `repeat` passes of the messages after one
    pass of warm-up. The messages go out of an XPUB socket, as the daemon's do, once the
    subscriber's subscriptions (its welcome subscription last) have arrived."""
    os.sched_setaffinity(0, {REPLAY_CPU})  # before the context: its I/O thread too
    with tempfile.TemporaryDirectory(prefix="fo-cb-") as d:
        endpoint = f"ipc://{d}/replay"
        ctx = zmq.Context()
        pub = ctx.socket(zmq.XPUB)
        pub.setsockopt(zmq.SNDHWM, 0)
        pub.bind(endpoint)
        mpctx = mp.get_context("fork")
        result = mpctx.Queue()
        warm = mpctx.Event()
        proc = mpctx.Process(target=consume, args=(name, endpoint, len(messages),
                                                   repeat * len(messages), warm, result))
        proc.start()
        try:
            while pub.poll(30_000) and pub.recv() != SUBSCRIBE_HELLO:
                pass
            for msg in messages:
                pub.send_multipart(msg)
            if not warm.wait(120):
                raise RuntimeError(f"{name}: the consumer did not warm up")
            for _ in range(repeat):
                for msg in messages:
                    pub.send_multipart(msg)
            seconds, rows = result.get(timeout=300)
        finally:
            netlab.stop_child_process(proc)
            pub.close(0)
            ctx.term()
    return seconds * 1e9 / rows


def wire_bytes(messages: list[list[bytes]]) -> float:
    rows = sum(Batch.from_message(*m).n for m in messages)
    return sum(len(m[1]) for m in messages) / rows


def markdown(results: dict[str, list[float]], sizes: list[tuple[str, float, float]],
             args: argparse.Namespace, per_batch: float) -> str:
    """The results as the Markdown docs/performance.md shows between its markers."""
    import platform
    import subprocess

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name")), platform.machine())
    base = statistics.median(results["v1 records()"])
    lines = [DOCS_BEGIN, "<!-- generated by benchmarks/consumer_bench.py --write-docs: do "
                         "not edit by hand -->", "",
             f"Measured on {time.strftime('%Y-%m-%d')}: {cpu}, {os.cpu_count()} CPUs, "
             f"Linux {platform.release()}, Python {platform.python_version()}, fanoutd at "
             f"commit {commit}. Command: `sudo .venv/bin/python benchmarks/consumer_bench.py "
             f"--packets {args.packets} --runs {args.runs} --write-docs`; "
             f"{per_batch:,.0f} rows per batch (64-byte IPv4/UDP frames, full blocks).", "",
             "| consumer | median ns/row | min | max | v1 records() / this |",
             "|:---|---:|---:|---:|---:|"]
    for name, values in results.items():
        med = statistics.median(values)
        lines.append(f"| {name} | {med:,.1f} | {min(values):,.1f} | {max(values):,.1f} | "
                     f"{base / med:,.1f} |")
    lines += ["", "Bytes on the wire per row (64-byte frames, full blocks; with the flow hash "
              "unless the row says rxhash 0):", "",
              "| frames | version 1 (rows) | version 2 (columns) |", "|:---|---:|---:|"]
    lines += [f"| {label} | {rows_b:.1f} | {cols_b:.1f} |" for label, rows_b, cols_b in sizes]
    return "\n".join([*lines, "", DOCS_END])


def write_docs(text: str) -> None:
    path = REPO / "docs" / "performance.md"
    doc = path.read_text()
    head, _, rest = doc.partition(DOCS_BEGIN)
    _, _, tail = rest.partition(DOCS_END)
    path.write_text(head + text + tail)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("consumer_bench: needs root (network namespaces, AF_PACKET)", file=sys.stderr)
        return 77
    print(f"recording {args.packets:,} frames per format from a real daemon ...", flush=True)
    recorded = {fmt: record(fmt, args.packets) for fmt in ("columns", "rows")}
    for fmt, msgs in recorded.items():
        rows = sum(Batch.from_message(*m).n for m in msgs)
        print(f"  {fmt}: {len(msgs)} batches, {rows / len(msgs):,.0f} rows per batch")
    per_batch = args.packets / len(recorded["columns"])
    results: dict[str, list[float]] = {name: [] for name in CONSUMERS}
    for run in range(args.runs):
        for name in CONSUMERS:
            msgs = recorded["columns" if name.startswith("v2") else "rows"]
            results[name].append(run_consumer(name, msgs, args.repeat))
        print(f"  run {run + 1}/{args.runs} done", flush=True)
    print(f"\nconsumer CPU per row (ns), {args.runs} runs, consumer on CPU {CONSUMER_CPU}:")
    print(f"{'consumer':<18} {'median':>8} {'min':>8} {'max':>8}")
    for name, values in results.items():
        print(f"{name:<18} {statistics.median(values):>8.1f} {min(values):>8.1f} "
              f"{max(values):>8.1f}")
    base = statistics.median(results["v1 records()"])
    for name in ("v2 columns()", "v2 to_arrow()", "v2 records()"):
        print(f"v1 records() / {name}: {base / statistics.median(results[name]):.1f}x")
    print("\nbytes on the wire per row (64-byte frames, full blocks):")
    sizes = [("IPv4/UDP", wire_bytes(recorded["rows"]), wire_bytes(recorded["columns"]))]
    n = min(args.packets, 50_000)
    for kind, label in (("tcp4", "IPv4/TCP"), ("udp6", "IPv6/UDP")):
        sizes.append((label, wire_bytes(record("rows", n, kind)),
                      wire_bytes(record("columns", n, kind))))
    # Without the flow hash (ring.rxhash auto on a veth: 0), a row of version 1 packs the
    # 0 in one byte where version 2's column keeps its 4.
    sizes.append(("IPv4/UDP, rxhash 0", wire_bytes(record("rows", n, "udp4", "false")),
                  wire_bytes(record("columns", n, "udp4", "false"))))
    for label, rows_b, cols_b in sizes:
        print(f"  {label}: rows {rows_b:.1f}, columns {cols_b:.1f}")
    if args.write_docs:
        write_docs(markdown(results, sizes, args, per_batch))
        print("wrote docs/performance.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
