#!/usr/bin/env python3
"""Top talkers: the sources (or flows) that sent the most over the last few seconds.

An example subscriber built on fanoutd.client. It reads one or several sensors, counts
bytes and packets per source address (or per flow) in a sliding window, and prints the
top N every few seconds. It works on whole columns, never on a packet or a key at a time:
each batch is grouped by its key columns in pyarrow (Batch.to_arrow()), each bucket of
the window keeps those grouped tables (merged into one when the bucket closes), and the
top N is one more group-by over the window. So it keeps up with a stream where nearly
every packet is a new source. Needs pyarrow (pip install 'fanoutd[arrow]').

    python examples/top_talkers.py --endpoint tcp://sensor-a:7440 \\
        --endpoint tcp://sensor-b:7440 --window 10 --top 10 --refresh 2

    top 10 sources by bytes over the last 10 s, 2 sensors, 12:00:02
           bytes   packets  source
       1,234,560       860  192.0.2.7
         456,000       300  2001:db8::1
    ...

With CURVE: --curve-server-key server.key --curve-client-cert alice.key_secret (see the
README). `--once SECONDS` prints one table after that many seconds and exits;
`--iterations N` stops after N tables; `--json` prints each table as one JSON object.
"""

import argparse
import ipaddress
import json
import os
import sys
import time
from collections import deque
from datetime import datetime

# A batch's buffers lie where they were received, not 8-byte aligned; pyarrow's group-by
# engine copies such a buffer rather than warn about it on every batch.
os.environ.setdefault("ACERO_ALIGNMENT_HANDLING", "reallocate")

import pyarrow as pa
import pyarrow.compute as pc

from fanoutd.client import DEFAULT_ENDPOINT, Batch, Subscriber, format_mac

FLOW_COLUMNS = ("proto", "src", "dst", "sport", "dport")
PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp6", 132: "sctp"}
Key = tuple  # (src,) or (proto, src, dst, sport, dport), addresses as bytes


class SlidingWindow:
    """Bytes and packets per key over the last `window` seconds, as pyarrow tables.

    Grouped batches go into buckets `resolution` seconds long; a bucket is merged into one
    table (a group-by) when the next one starts, and leaves the window once all of it is
    older than the window, so memory follows the keys per bucket, not the rate.
    """

    def __init__(self, window: float, resolution: float, keys: list[str]) -> None:
        self.window = window
        self.resolution = resolution
        self.keys = keys
        self.buckets: deque[tuple[float, list[pa.Table]]] = deque()  # start, tables

    def _merge(self, tables: list[pa.Table]) -> pa.Table:
        merged = pa.concat_tables(tables).group_by(self.keys, use_threads=False).aggregate(
            [("bytes", "sum"), ("packets", "sum")])
        return merged.rename_columns([*self.keys, "bytes", "packets"])

    def add(self, totals: pa.Table, now: float) -> None:
        """One batch's totals: its key columns, `bytes` and `packets`."""
        if not self.buckets or now >= self.buckets[-1][0] + self.resolution:
            if self.buckets and len(self.buckets[-1][1]) > 1:  # the bucket closes
                self.buckets[-1][1][:] = [self._merge(self.buckets[-1][1])]
            self.buckets.append((now, []))
        self.buckets[-1][1].append(totals)

    def expire(self, now: float) -> None:
        while self.buckets and self.buckets[0][0] + self.resolution <= now - self.window:
            self.buckets.popleft()

    def top(self, n: int) -> list[tuple[Key, int, int]]:
        """[(key, bytes, packets)], most bytes first (then most packets)."""
        tables = [t for _, bucket in self.buckets for t in bucket]
        if not tables:
            return []
        ranked = self._merge(tables).sort_by([("bytes", "descending"),
                                              ("packets", "descending")]).slice(0, n)
        keys = zip(*(ranked[k].to_pylist() for k in self.keys), strict=True)
        return list(zip(keys, ranked["bytes"].to_pylist(), ranked["packets"].to_pylist(),
                        strict=True))


def batch_totals(batch: Batch, keys: list[str]) -> pa.Table:
    """One batch grouped by its key columns: the keys, `bytes` and `packets`. Frames
    without an IP address (ARP aside) are keyed by their MACs, which are 6 bytes long
    where addresses are 4 or 16, so the two cannot be confused."""
    table = pa.Table.from_batches([batch.to_arrow()])
    for name, mac in (("src", "eth_src"), ("dst", "eth_dst")):
        if name in keys:
            column = pc.if_else(pc.is_valid(table[name]), table[name],
                                pc.cast(table[mac], pa.binary()))
            table = table.set_column(table.schema.get_field_index(name), name, column)
    grouped = table.group_by(keys, use_threads=False).aggregate([("len", "sum"),
                                                                 ("len", "count")])
    return grouped.rename_columns([*keys, "bytes", "packets"])


def address(raw: bytes | None) -> str:
    if raw is None:
        return "-"
    if len(raw) == 6:
        return format_mac(raw) or "-"
    return str(ipaddress.ip_address(raw))


def key_text(key: Key) -> str:
    """A source, or protocol source[:port] > destination[:port]."""
    if len(key) == 1:
        return address(key[0]) + (" (non-IP)" if len(key[0]) == 6 else "")
    proto, src, dst, sport, dport = key
    if len(src) == 6:
        return f"{address(src)} > {address(dst)} (non-IP)"
    name = PROTO_NAMES.get(proto, str(proto))
    if sport is None:
        return f"{name} {address(src)} > {address(dst)}"
    return f"{name} {address(src)}:{sport} > {address(dst)}:{dport}"


def show(window: SlidingWindow, args: argparse.Namespace, sub: Subscriber) -> None:
    top = window.top(args.top)
    lost = sum(sub.lost.values())
    if args.json:
        print(json.dumps({"time": datetime.now().astimezone().isoformat(),
                          "window_s": args.window, "by": args.by, "lost_batches": lost,
                          "top": [{"key": key_text(k), "bytes": b, "packets": p}
                                  for k, b, p in top]}), flush=True)
        return
    what = "sources" if args.by == "src" else "flows"
    sensors = f"{len(sub.endpoints)} sensor{'s' * (len(sub.endpoints) > 1)}"
    print(f"top {args.top} {what} by bytes over the last {args.window:g} s, {sensors}, "
          f"{time.strftime('%H:%M:%S')}" + (f", {lost} batches lost" if lost else ""))
    print(f"{'bytes':>14}  {'packets':>8}  {'source' if args.by == 'src' else 'flow'}")
    for key, nbytes, packets in top:
        print(f"{nbytes:>14,}  {packets:>8,}  {key_text(key)}")
    print(flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoint", action="append", metavar="ENDPOINT",
                   help=f"a sensor's publish endpoint; repeat for several "
                        f"(default {DEFAULT_ENDPOINT})")
    p.add_argument("--window", type=float, default=10.0, metavar="SECONDS",
                   help="count over the last SECONDS (default %(default)s)")
    p.add_argument("--top", type=int, default=10, metavar="N", help="rows (default %(default)s)")
    p.add_argument("--refresh", type=float, default=2.0, metavar="SECONDS",
                   help="print every SECONDS (default %(default)s)")
    p.add_argument("--by", choices=("src", "flow"), default="src",
                   help="count per source address or per flow (default %(default)s)")
    p.add_argument("--json", action="store_true", help="each table as one JSON object")
    p.add_argument("--once", type=float, metavar="SECONDS",
                   help="print one table SECONDS after subscribing, then exit")
    p.add_argument("--iterations", type=int, default=0, metavar="N",
                   help="exit after N tables (default: run until interrupted)")
    p.add_argument("--curve-server-key", metavar="FILE", help="the publisher's NAME.key")
    p.add_argument("--curve-client-cert", metavar="FILE", help="this client's NAME.key_secret")
    args = p.parse_args(argv)

    endpoints = args.endpoint or [DEFAULT_ENDPOINT]
    keys = ["src"] if args.by == "src" else list(FLOW_COLUMNS)
    window = SlidingWindow(args.window, min(1.0, args.window / 10), keys)
    with Subscriber(endpoints, curve_server_key=args.curve_server_key,
                    curve_client_cert=args.curve_client_cert) as sub:
        if sub.wait_ready(5):
            print(f"top_talkers: listening on {', '.join(endpoints)}", file=sys.stderr,
                  flush=True)
        else:
            print("top_talkers: no answer yet from "
                  f"{', '.join(e for e in endpoints if e not in sub.ready)}; still trying",
                  file=sys.stderr, flush=True)
        next_print = time.monotonic() + (args.once if args.once is not None else args.refresh)
        printed = 0
        while True:
            # A whole batch at a time (they share an arrival time), then look at the clock.
            for batch in sub.batches(timeout=0.1):
                now = time.monotonic()
                if batch.n:
                    window.add(batch_totals(batch, keys), now)
                if now >= next_print:
                    break
            now = time.monotonic()
            if now < next_print:
                continue
            window.expire(now)
            show(window, args, sub)
            printed += 1
            if args.once is not None or (args.iterations and printed >= args.iterations):
                return 0
            next_print += args.refresh


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
