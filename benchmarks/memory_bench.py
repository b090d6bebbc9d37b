"""Memory benchmark: the proxy's and the worker's memory besides the ring, by subscribers.

    sudo .venv/bin/python benchmarks/memory_bench.py                # ~1 minute, prints the table
    sudo .venv/bin/python benchmarks/memory_bench.py --write-docs   # also docs/performance.md

Everything happens inside a network namespace this script creates (a unique name) on the
veth pair inj0 <-> cap0 that exists only there. For each number of subscribers N
(--subscribers) and each kind of subscriber, a fresh `fanoutd run` (one worker, the
default ring) captures cap0, and N subscriber processes (fanoutd.client.Subscriber)
connect to it:

* `reading`: they read every batch as it comes (counting its rows), so they keep up;
* `stalled`: they connect, get the welcome message, and never read again, with a small
  receive queue (--stalled-rcvhwm), so what they do not read waits in the daemon, in the
  proxy's queue for that subscriber (publish.subscriber_queue_bytes bounds it); all of
  them stall at the same batch;
* `staggered` (only with --kinds): subscriber i reads i x 64 batches, one queue's worth
  more than the one before it, then stalls like a stalled one: each holds other batches.

The proxy's and the worker's memory (/proc: VmRSS less the ring's resident pages, VmHWM,
RssAnon) is read with the N subscribers connected before any traffic (idle), then trafgen
sends --packets 64-byte frames at full speed (bounded in count and by --seconds), and once
the worker has decoded them all and the reading subscribers have everything (a bounded
poll), the memory is read again, with the daemon's /metrics (subscriber overflows). Then
each subscriber that stalled reads what waited for it (its backlog: its queue in the
proxy, the socket's buffers, its own receive queue), they all disconnect, and the proxy's
memory is read once more: what comes back.

Every process this script starts (trafgen, the daemon, the subscribers) is killed and the
namespace deleted on exit, also on Ctrl-C or SIGTERM. Needs root and trafgen.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import netlab  # tests/netlab.py: namespace, daemon, metrics, /proc helpers
from capture_report import DEFAULT_MARKDOWN, environment, write_between
from capture_tools import RING_MIB, Sent, run_trafgen, start_fanoutd, trafgen_config
from proc_accounting import EXIT_STATUSES, BenchError, proc_memory, run_benchmark

from fanoutd.client import Subscriber
from fanoutd.config import PublishConfig, RingConfig
from fanoutd.publish import FreedMemory

KINDS = ("reading", "stalled", "staggered")
DEFAULT_KINDS = ("reading", "stalled")
STAGGER = 64  # a staggered subscriber i stalls after i x this many batches (a queue is 63)
READING_RCVHWM = 1_000_000  # a reading subscriber never drops a batch itself
QUIET_S = 0.5  # settled: nothing new decoded or received for this long, and all received
STUCK_S = 3.0  # ... or nothing at all moved for this long (a subscriber lost batches)
LEFT_S = 1.0  # after the subscribers left: the proxy's memory unchanged for this long
BACK_KIB = 2048  # the proxy's memory is back when within this of what it was idle
DOCS_BEGIN = "<!-- memory_bench:begin -->"
DOCS_END = "<!-- memory_bench:end -->"
QUEUE_LOG = re.compile(r"each subscriber's queue holds at most (\d+) batches")
QUEUE_MIB = PublishConfig().subscriber_queue_bytes / 2**20


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Measure the memory of fanoutd's proxy and worker (besides the ring) "
                    "with 0..N subscribers that read, or that stall, inside a private "
                    "network namespace. Needs root and trafgen.",
        epilog=EXIT_STATUSES)
    p.add_argument("--subscribers", default="0,1,4,16",
                   help="comma-separated numbers of subscribers (default: %(default)s; the "
                        "daemon admits publish.max_subscribers, 32)")
    p.add_argument("--kinds", default=",".join(DEFAULT_KINDS),
                   help="comma-separated, from " + ", ".join(KINDS) + " (default: "
                        "%(default)s; staggered: subscriber i reads i x 64 batches, then "
                        "stalls, so that each holds other batches)")
    p.add_argument("--packets", type=int, default=1_000_000,
                   help="64-byte frames trafgen sends per measurement (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=20.0,
                   help="trafgen is stopped after this long even if --packets were not all "
                        "sent (default: %(default)s)")
    p.add_argument("--runs", type=int, default=1,
                   help="repetitions of every (kind, N); the table shows the median "
                        "(default: %(default)s)")
    p.add_argument("--stalled-rcvhwm", type=int, default=2,
                   help="a stalled subscriber's receive queue, in batches (default: "
                        "%(default)s): what it does not read waits in the daemon")
    p.add_argument("--settle-timeout", type=float, default=60.0,
                   help="after the burst, wait at most this long for the worker to decode "
                        "and the reading subscribers to receive it all (default: "
                        "%(default)s)")
    p.add_argument("--fanoutd-args", default="", metavar="ARGS",
                   help="more options for every `fanoutd run` (default: none)")
    p.add_argument("--write-docs", action="store_true",
                   help="write the table into --markdown, between its memory_bench markers")
    p.add_argument("--markdown", type=Path, default=DEFAULT_MARKDOWN,
                   help="Markdown file for --write-docs (default: docs/performance.md)")
    args = p.parse_args(argv)
    try:
        args.subscribers = [int(n) for n in args.subscribers.split(",") if n.strip()]
    except ValueError:
        p.error(f"--subscribers: comma-separated integers, got {args.subscribers!r}")
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not args.subscribers or any(not 0 <= n <= 32 for n in args.subscribers):
        p.error("--subscribers: every number must be between 0 and 32")
    if not args.kinds or any(k not in KINDS for k in args.kinds):
        p.error("--kinds: choose from " + ", ".join(KINDS))
    if args.runs < 1 or args.packets < 1 or args.seconds <= 0 or args.stalled_rcvhwm < 1:
        p.error("--runs, --packets, --seconds and --stalled-rcvhwm must be positive")
    return args


# --------------------------------------------------------------------------- subscribers


def subscriber_main(endpoint: str, rcvhwm: int, read_first: int | None, ctl: Connection,
                    rows, ready) -> None:
    """One subscriber process. It waits for the welcome message and sets `ready`, then
    receives batches, counting their rows into `rows` (a shared int): all of them
    (`read_first` None), or the first `read_first` ones, after which it stalls: it never
    touches its socket again until told to stop. On a message from `ctl` a stalled one
    first reads what waited for it (bounded: the batches are all sent by then); then it
    replies with what it counted and returns (its socket closes: it disconnects)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    got = batches = 0
    with Subscriber(endpoint, rcvhwm=rcvhwm) as sub:
        if not sub.wait_ready(timeout=15):
            return
        ready.set()
        while (read_first is None or batches < read_first) and not ctl.poll():
            for batch in sub.batches(timeout=0.05):
                got += batch.n
                batches += 1
                rows.value = got
                if ctl.poll() or batches == read_first:
                    break
        ctl.recv()
        backlog = backlog_bytes = 0
        if read_first is not None and batches == read_first:
            # What waited for it: its queue in the proxy, the socket's buffers and its own
            # receive queue (nothing new is published by now).
            while sub.sock.poll(500):
                topic, *body = sub.sock.recv_multipart()
                if topic.startswith(b"pkt.") and body:
                    backlog += 1
                    backlog_bytes += len(topic) + len(body[0])
        ctl.send({"rows": got, "batches": batches, "lost_batches": sum(sub.lost.values()),
                  "backlog": backlog, "backlog_bytes": backlog_bytes})


class Subscribers:
    """N subscriber processes of one kind, forked (this process runs no thread), each
    ended when `stack` closes if stop() did not end it before."""

    def __init__(self, endpoint: str, kind: str, n: int, stalled_rcvhwm: int,
                 stack: contextlib.ExitStack) -> None:
        ctx = mp.get_context("fork")
        self.kind = kind
        self.procs: list[mp.process.BaseProcess] = []
        self.ctls: list[Connection] = []
        self.rows = []
        readies = []
        rcvhwm = READING_RCVHWM if kind == "reading" else stalled_rcvhwm
        for i in range(n):
            read_first = {"reading": None, "stalled": 0, "staggered": i * STAGGER}[kind]
            ctl, child_ctl = ctx.Pipe()
            rows = ctx.Value("q", 0, lock=False)
            ready = ctx.Event()
            proc = ctx.Process(target=subscriber_main, name=f"bench-{kind}-{i}",
                               args=(endpoint, rcvhwm, read_first, child_ctl, rows, ready))
            proc.start()
            stack.callback(netlab.stop_child_process, proc)
            self.procs.append(proc)
            self.ctls.append(ctl)
            self.rows.append(rows)
            readies.append(ready)
        deadline = time.monotonic() + 30
        for i, ready in enumerate(readies):
            if not ready.wait(max(0.0, deadline - time.monotonic())):
                raise BenchError(f"subscriber {i} ({kind}) got no welcome message")

    def progress(self) -> list[int]:
        """Rows each subscriber that may still read received so far."""
        return [] if self.kind == "stalled" else [r.value for r in self.rows]

    def stop(self) -> list[dict]:
        """Tell every subscriber to stop, and collect what each counted; they exit
        (disconnecting) and are joined."""
        for ctl in self.ctls:
            ctl.send("stop")
        out = []
        for i, ctl in enumerate(self.ctls):
            if not ctl.poll(30):
                raise BenchError(f"subscriber {i} ({self.kind}) did not answer")
            out.append(ctl.recv())
        for proc in self.procs:
            netlab.stop_child_process(proc)
        return out


# --------------------------------------------------------------------------- one measurement


@dataclass
class Memory:
    """One process's memory, in KiB."""

    rss: int  # VmRSS less the ring's resident pages
    peak: int  # VmHWM (the highest VmRSS so far) less the ring's resident pages now
    anon: int  # RssAnon

    @classmethod
    def of(cls, pid: int) -> Memory:
        m = proc_memory(pid)
        return cls(m["VmRSS"] - m["ring"], m["VmHWM"] - m["ring"], m["RssAnon"])


@dataclass
class Result:
    """One (kind, N, run)."""

    kind: str
    subscribers: int
    run: int
    sent: Sent
    proxy_idle: Memory
    worker_idle: Memory
    proxy_after: Memory
    worker_after: Memory
    proxy_left: Memory  # once the subscribers disconnected
    overflows: int  # fanoutd_subscriber_overflows_total
    kernel_drops: int
    decoded: int
    batches: int
    publish_drops: int
    received: list[int]  # rows each reading subscriber got
    lost_batches: int  # seq gaps the subscribers saw, summed
    backlogs: list[int]  # bytes that waited for each subscriber that stalled
    queue_batches: int | None  # each subscriber's queue, as the proxy logged it
    settle_s: float

    @property
    def delivered(self) -> float | None:
        """The share of the decoded rows that the reading subscriber with the fewest got."""
        if not self.received or not self.decoded:
            return None
        return min(self.received) / self.decoded


def memory_of(daemon: netlab.Daemon) -> tuple[Memory, Memory]:
    """(the proxy's, the worker's) memory."""
    children = daemon.children_by_comm()
    try:
        return Memory.of(children["fanoutd-proxy"]), Memory.of(children["fanoutd-w0"])
    except KeyError:
        raise BenchError(f"no fanoutd-proxy or fanoutd-w0 among {sorted(children)}\n"
                         + daemon.logs()) from None


def metrics(daemon: netlab.Daemon) -> dict:
    m = daemon.try_metrics()
    if m is None:
        raise BenchError("fanoutd's /metrics did not answer\n" + daemon.logs())
    return m


def wait_subscribers(daemon: netlab.Daemon, n: int) -> None:
    """Until the proxy counts exactly n subscribers (bounded)."""
    netlab.wait_for(lambda: netlab.metric_sum(metrics(daemon), "fanoutd_subscribers") == n,
                    15, f"fanoutd_subscribers == {n}", interval=0.1, detail=daemon.logs)


def wait_settled(daemon: netlab.Daemon, subs: Subscribers, timeout: float) -> float:
    """Wait until the worker decoded the burst and the reading subscribers have all of it:
    nothing new for QUIET_S with every reading subscriber at the decoded count, or
    nothing at all for STUCK_S (a subscriber lost batches and will never get there).
    Bounded by `timeout`; returns the seconds waited."""
    start = since = time.monotonic()
    last: tuple | None = None
    while time.monotonic() - start < timeout:
        decoded = netlab.metric_sum(metrics(daemon), "fanoutd_packets_decoded_total")
        rows = subs.progress()
        now = time.monotonic()
        if (decoded, rows) != last:
            last, since = (decoded, rows), now
        quiet = now - since
        if quiet >= STUCK_S or (quiet >= QUIET_S and decoded and all(r >= decoded for r in rows)):
            break
        time.sleep(0.1)
    return time.monotonic() - start


def wait_back(pid: int, rss_kib: int, timeout: float) -> None:
    """Wait, at most `timeout` seconds, until the process's RSS is rss_kib or less."""
    deadline = time.monotonic() + timeout
    while Memory.of(pid).rss > rss_kib and time.monotonic() < deadline:
        time.sleep(0.5)


def wait_memory_stable(pid: int, timeout: float = 10.0) -> Memory:
    """A process's memory once its RSS did not change for LEFT_S (bounded)."""
    start = since = time.monotonic()
    last = Memory.of(pid)
    while time.monotonic() - start < timeout:
        time.sleep(0.1)
        cur = Memory.of(pid)
        if cur.rss != last.rss:
            last, since = cur, time.monotonic()
        elif time.monotonic() - since >= LEFT_S:
            break
    return last


def measure(ns: netlab.NetNS, conf: Path, kind: str, n: int, run: int,
            args: argparse.Namespace) -> Result:
    """A fresh daemon, N subscribers of `kind`, memory idle, one burst, memory after, the
    subscribers gone, the proxy's memory again."""
    with tempfile.TemporaryDirectory(prefix="fo-mb-") as d, contextlib.ExitStack() as stack:
        wd = Path(d)  # short: the ipc:// path limit
        daemon = start_fanoutd(ns, wd, stack, 1, args.fanoutd_args.split())
        subs = Subscribers(daemon.endpoint, kind, n, args.stalled_rcvhwm, stack)
        wait_subscribers(daemon, n)
        proxy_idle, worker_idle = memory_of(daemon)
        before = metrics(daemon)
        sent = run_trafgen(ns, conf, args.packets, args.seconds, wd / "trafgen.log")
        settle_s = wait_settled(daemon, subs, args.settle_timeout)
        proxy_after, worker_after = memory_of(daemon)
        after = metrics(daemon)
        counted = subs.stop()
        wait_subscribers(daemon, 0)
        # The proxy gives freed memory back at its stats ticks for a while after a
        # subscriber left (publish.FreedMemory), once libzmq has freed the queues.
        pid = daemon.children_by_comm()["fanoutd-proxy"]
        wait_back(pid, proxy_idle.rss + BACK_KIB, FreedMemory.LEAVING_WINDOW_S)
        proxy_left = wait_memory_stable(pid)
        queue = QUEUE_LOG.search(daemon.stderr_text())

    def diff(name: str) -> int:
        return int(netlab.metric_sum(after, name) - netlab.metric_sum(before, name))

    return Result(kind, n, run, sent, proxy_idle, worker_idle, proxy_after, worker_after,
                  proxy_left, diff("fanoutd_subscriber_overflows_total"),
                  diff("fanoutd_kernel_drops_total"), diff("fanoutd_packets_decoded_total"),
                  diff("fanoutd_batches_published_total"), diff("fanoutd_publish_drops_total"),
                  [c["rows"] for c in counted] if kind == "reading" else [],
                  sum(c["lost_batches"] for c in counted),
                  [c["backlog_bytes"] for c in counted if c["backlog"]],
                  int(queue[1]) if queue else None, settle_s)


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def progress_line(r: Result, runs: int) -> str:
    """One line per measurement as the benchmark goes, with what the table leaves out."""
    per_batch = r.decoded / r.batches if r.batches else 0
    backlog = (f", backlog of the {len(r.backlogs)} stalled: {mib(sum(r.backlogs) / 1024)} "
               f"MiB, largest {mib(max(r.backlogs) / 1024)}") if r.backlogs else ""
    return (f"  run {r.run}/{runs} {r.kind:<7} N={r.subscribers:<2}: sent {r.sent.packets:,} "
            f"at {r.sent.kpps:,.0f} kpps; kernel drops {r.kernel_drops:,}, decoded "
            f"{r.decoded:,} in {r.batches:,} batches ({per_batch:,.0f} rows each), publish "
            f"drops {r.publish_drops:,}, overflows {r.overflows:,}, subscribers' seq gaps "
            f"{r.lost_batches:,}{backlog}; proxy MiB rss/peak/anon idle {mib(r.proxy_idle.rss)}/"
            f"{mib(r.proxy_idle.peak)}/{mib(r.proxy_idle.anon)}, after "
            f"{mib(r.proxy_after.rss)}/{mib(r.proxy_after.peak)}/{mib(r.proxy_after.anon)}, "
            f"left {mib(r.proxy_left.rss)}/{mib(r.proxy_left.anon)}; worker idle "
            f"{mib(r.worker_idle.rss)}, after {mib(r.worker_after.rss)}/"
            f"{mib(r.worker_after.peak)}/{mib(r.worker_after.anon)}; settled in "
            f"{r.settle_s:.1f} s")


# --------------------------------------------------------------------------- report


COLUMNS = ("kind", "subscribers", "proxy idle MiB", "proxy after MiB", "proxy peak MiB",
           "proxy after they left MiB", "worker after MiB", "overflows", "delivered %",
           "largest backlog MiB")


def table_rows(results: list[Result], args: argparse.Namespace) -> list[list[str]]:
    """One row per (kind, N): the median of its runs."""
    rows = []
    for kind in args.kinds:
        for n in args.subscribers:
            rs = [r for r in results if r.kind == kind and r.subscribers == n]
            if not rs:
                continue

            def med(get, rs=rs) -> float:
                return statistics.median(get(r) for r in rs)

            shares = [r.delivered for r in rs if r.delivered is not None]
            backlogs = [max(r.backlogs) for r in rs if r.backlogs]
            rows.append([kind, str(n), mib(med(lambda r: r.proxy_idle.rss)),
                         mib(med(lambda r: r.proxy_after.rss)),
                         mib(med(lambda r: r.proxy_after.peak)),
                         mib(med(lambda r: r.proxy_left.rss)),
                         mib(med(lambda r: r.worker_after.rss)),
                         f"{med(lambda r: r.overflows):,.0f}",
                         f"{100 * statistics.median(shares):.1f}" if shares else "-",
                         mib(statistics.median(backlogs) / 1024) if backlogs else "-"])
    return rows


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.rjust(w) if i > 0 else c.ljust(w)
                       for i, (c, w) in enumerate(zip(COLUMNS, widths, strict=True)))]
    for row in rows:
        lines.append("  ".join(c.rjust(w) if i > 0 else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    return "\n".join(lines)


def facts(results: list[Result]) -> str:
    """One sentence: the subscriber queue the proxy sized and the batches' size."""
    queues = sorted({r.queue_batches for r in results if r.queue_batches})
    per_batch = statistics.median(r.decoded / r.batches for r in results if r.batches)
    kpps = statistics.median(r.sent.kpps for r in results)
    drops = sum(r.kernel_drops for r in results)
    queue = (f"each subscriber's queue held at most {'/'.join(map(str, queues))} batches "
             f"(the proxy's log: publish.subscriber_queue_bytes, {QUEUE_MIB:.0f} MiB by "
             f"default, over the ring's blocks, {RingConfig().block_size >> 10} KiB by "
             "default)") if queues else "the proxy logged no queue length"
    return (f"trafgen sent at {kpps:,.0f} kpps (median), {per_batch:,.0f} rows per batch, "
            f"{drops:,} kernel drops in all; {queue}.")


def markdown(rows: list[list[str]], results: list[Result], args: argparse.Namespace,
             command: str) -> str:
    env = environment()
    head = "| " + " | ".join(COLUMNS) + " |"
    align = "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|"
    return "\n".join([
        DOCS_BEGIN,
        "<!-- generated by benchmarks/memory_bench.py --write-docs: do not edit by hand -->",
        "",
        f"Measured on {env['date']}: {env['cpu']}, {env['cpus']} CPUs, Linux {env['kernel']}, "
        f"Python {env['python']}, fanoutd at commit {env['commit']}. Command: `{command}`. "
        f"Median of {args.runs} run(s); one worker with the default ring ({RING_MIB} MiB, "
        f"not counted), {args.packets:,} frames of 64 bytes per measurement; "
        f"{facts(results)}",
        "",
        head, align, *["| " + " | ".join(r) + " |" for r in rows],
        "",
        DOCS_END,
    ]) + "\n"


# --------------------------------------------------------------------------- main


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise BenchError("memory_bench.py needs root (network namespaces, AF_PACKET)")
    for tool in ("ip", "taskset", "trafgen"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found: apt-get install iproute2 util-linux "
                             "netsniff-ng")


def run(args: argparse.Namespace, command: str) -> int:
    check_prerequisites()
    results: list[Result] = []
    with contextlib.ExitStack() as stack:
        ns = stack.enter_context(netlab.NetNS(prefix="fo-mbench"))
        confdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fo-mbconf-")))
        conf = confdir / "udp64.cfg"
        conf.write_text(trafgen_config(64))
        print(f"namespace {ns.name}: {args.runs} run(s) x {args.kinds} x subscribers "
              f"{args.subscribers}, {args.packets:,} frames of 64 bytes each", flush=True)
        for run_no in range(1, args.runs + 1):
            for kind in args.kinds:
                for n in args.subscribers:
                    r = measure(ns, conf, kind, n, run_no, args)
                    print(progress_line(r, args.runs), flush=True)
                    results.append(r)
    rows = table_rows(results, args)
    print()
    print(f"memory benchmark: median of {args.runs} run(s); MiB besides the worker's "
          f"{RING_MIB} MiB ring (VmRSS less the ring's resident pages; peak: VmHWM less it)")
    print(text_table(rows))
    print(facts(results))
    if args.write_docs:
        write_between(args.markdown, DOCS_BEGIN, DOCS_END,
                      markdown(rows, results, args, command))
        print(f"wrote {args.markdown}")
    return 0



def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark("memory_bench.py", run, args, argv)


if __name__ == "__main__":
    sys.exit(main())
