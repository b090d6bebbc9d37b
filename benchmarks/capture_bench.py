"""Capture benchmark: fanoutd against tcpdump and scapy on the same trafgen burst.

    sudo .venv/bin/python benchmarks/capture_bench.py                # about 3 minutes
    sudo .venv/bin/python benchmarks/capture_bench.py --write-docs   # also docs/performance.md

Everything happens inside a network namespace this script creates (a unique name) on the
veth pair inj0 <-> cap0 that exists only there. trafgen (netsniff-ng) writes UDP/IPv4
frames of many flows on inj0 from CPU 0, to a MAC address that is not cap0's and with no
IP address configured, so nothing answers; each burst is bounded in count (--packets) and
in time (--seconds). On CPU 1 one capture tool at a time reads cap0:

* fanoutd with 1 and with 2 workers, and a subscriber process (fanoutd.client.Subscriber,
  pinned to CPU 0 beside trafgen) draining the published stream (version 2 batches,
  counting each batch's rows);
* tcpdump -w /dev/null;
* scapy's sniff(), counting packets in a callback, bounded in time.

For each tool and frame size it reports the packets offered, captured by the kernel into
the tool's socket(s), dropped by the kernel (ring or socket buffer full) and delivered
(to fanoutd's subscriber, written by tcpdump, counted by scapy's callback), and the CPU
time of the tool's whole process tree per packet it read, from /proc: the median of
--runs runs, and fanoutd's cost as a multiple of tcpdump's measured in the same run. It
then measures the latency from injection to the subscriber at 1,000 packets/s, and each
worker's memory. --write-docs writes the tables and a chart into docs/performance.md and
docs/img/capture_bench.png.

Every process this script starts (trafgen, the daemon, the subscriber, tcpdump, scapy) is
killed and the namespace deleted in a `finally`, also on Ctrl-C or SIGTERM. Needs root,
trafgen, tcpdump and the `bench` extra (matplotlib, scapy): pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import datetime
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import netlab  # noqa: E402  (tests/netlab.py: namespace, daemon, metrics, /proc helpers)

from fanoutd.client import Subscriber  # noqa: E402
from fanoutd.config import RingConfig  # noqa: E402

GEN_CPU = 0  # trafgen (it pins its one sending process to CPU 0 itself) and the subscriber
CAP_CPU = 1  # every capture tool
# fanoutdN: N workers, version 2 batches (columns, the default); fanoutd1-rows: one worker
# publishing version 1 (rows), to compare the daemon's cost of the two formats;
# fanoutd1-top: one worker, and examples/top_talkers.py's work as the subscriber.
TOOLS = ("fanoutd1", "fanoutd2", "fanoutd1-rows", "fanoutd1-top", "tcpdump", "scapy")
DST_MAC = "02:00:00:00:00:b2"  # not cap0's address: the frames are captured, then discarded
CLK_TCK = os.sysconf("SC_CLK_TCK")
NS_PER_TICK = 1_000_000_000 // CLK_TCK
QUIET_S = 0.5  # drained: the tool used at most QUIET_TICKS of CPU and delivered nothing new
QUIET_TICKS = 1  # ... in this long
RING_MIB = RingConfig().geometry.size >> 20  # each fanoutd worker's default ring
TCPDUMP_BUFFER_KIB = RING_MIB * 1024  # tcpdump -B: the same ring size
FANOUTD_BLOCK_TIMEOUT_MS = 10  # fanoutd's default ring.block_timeout_ms (not passed)
DOCS_BEGIN = "<!-- capture_bench:begin -->"
DOCS_END = "<!-- capture_bench:end -->"
DEFAULT_MARKDOWN = REPO / "docs" / "performance.md"
DEFAULT_CHART = REPO / "docs" / "img" / "capture_bench.png"
EXIT_FAILED = 3


class BenchError(RuntimeError):
    """The benchmark itself could not run (a tool did not start, trafgen failed...)."""


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; every option has a default, so a bare run is the full benchmark."""
    p = argparse.ArgumentParser(
        description="Benchmark fanoutd's capture against tcpdump and scapy inside a private "
                    "network namespace: trafgen bursts of many UDP flows on CPU 0, one "
                    "capture tool at a time on CPU 1. Needs root, trafgen and tcpdump.",
        epilog="Exit status: 0 done, 2 usage error, 3 the benchmark could not run, "
               "130 interrupted.")
    p.add_argument("--runs", type=int,
                   help="runs of every (tool, frame size) burst; the table shows the median "
                        "(default: 3)")
    p.add_argument("--packets", type=int,
                   help="frames trafgen sends per burst (default: 3000000)")
    p.add_argument("--seconds", type=float, default=10.0,
                   help="a burst ends after this long even if --packets were not all sent "
                        "(default: %(default)s)")
    p.add_argument("--sizes", default="64,512",
                   help="comma-separated frame sizes in bytes, as captured (no FCS on a "
                        "veth), 60-1500 (default: %(default)s)")
    p.add_argument("--tools", default=",".join(TOOLS),
                   help="comma-separated, from " + ", ".join(TOOLS) + " (default: all)")
    p.add_argument("--latency-seconds", type=float,
                   help="length of the latency measurement at --latency-rate, 0 to skip "
                        "(default: 5)")
    p.add_argument("--latency-rate", type=int, default=1000,
                   help="packets/s of the latency measurement (default: %(default)s)")
    p.add_argument("--retries", type=int, default=2,
                   help="measure a burst again, up to this many times, when other processes "
                        "used the capture CPU during it (over 50 ms and 10 %% of the tool's "
                        "own CPU); one still disturbed is kept and flagged "
                        "(default: %(default)s)")
    p.add_argument("--settle-timeout", type=float, default=30.0,
                   help="after a burst, wait at most this long for the tool to drain what "
                        "it holds (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run, for the test suite: --runs 1, --packets 5000 and "
                        "--latency-seconds 1 unless given; its figures mean nothing")
    p.add_argument("--write-docs", action="store_true",
                   help="write the Markdown tables into --markdown (between the "
                        "capture_bench markers, keeping the rest) and the chart into --chart")
    p.add_argument("--markdown", type=Path, default=DEFAULT_MARKDOWN,
                   help="Markdown file for --write-docs (default: docs/performance.md)")
    p.add_argument("--chart", type=Path, default=DEFAULT_CHART,
                   help="PNG chart for --write-docs (default: docs/img/capture_bench.png)")
    p.add_argument("--scapy-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--iface", default="cap0", help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.scapy_child:
        return args
    defaults = {"runs": 1, "packets": 5_000, "latency_seconds": 1.0} if args.quick else \
        {"runs": 3, "packets": 3_000_000, "latency_seconds": 5.0}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes: comma-separated integers, got {args.sizes!r}")
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if not args.sizes or any(not 60 <= s <= 1500 for s in args.sizes):
        p.error("--sizes: every size must be between 60 and 1500 bytes")
    if not args.tools or any(t not in TOOLS for t in args.tools):
        p.error(f"--tools: choose from {', '.join(TOOLS)}")
    if args.retries < 0:
        p.error("--retries must be 0 or more")
    if args.runs < 1 or args.packets < 1 or args.seconds <= 0 or args.latency_rate < 1 \
            or args.latency_seconds < 0:
        p.error("--runs, --packets, --seconds and --latency-rate must be positive, "
                "--latency-seconds 0 or more")
    return args


# --------------------------------------------------------------------------- /proc


Ident = tuple[int, int]  # (pid, start time): a recycled pid is never taken for another


@dataclass(frozen=True)
class ProcCpu:
    """CPU time of one process, read two ways from /proc."""

    ticks: int  # utime + stime of all its threads, exited ones included (/proc/PID/stat)
    threads: dict[int, int]  # tid -> ns on CPU of each live thread (task/TID/schedstat)


def proc_cpu(pid: int) -> tuple[Ident, ProcCpu] | None:
    """(identity, CPU time) of a process; None once it is gone."""
    try:
        rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        tids = os.listdir(f"/proc/{pid}/task")
    except (OSError, IndexError):
        return None
    threads = {}
    for tid in tids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            threads[int(tid)] = int(
                Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return (pid, int(rest[19])), ProcCpu(int(rest[11]) + int(rest[12]), threads)


def cpu_snapshot(roots: Iterable[int]) -> dict[Ident, ProcCpu]:
    """CPU time of every process in the trees under `roots` (each root and all its
    descendants), keyed by identity."""
    snap: dict[Ident, ProcCpu] = {}
    for root in roots:
        for pid in [root, *netlab.proc_descendants(root)]:
            got = proc_cpu(pid)
            if got is not None:
                snap[got[0]] = got[1]
    return snap


def snapshot_ticks(snap: dict[Ident, ProcCpu]) -> int:
    return sum(c.ticks for c in snap.values())


def cpu_delta_ns(before: dict[Ident, ProcCpu],
                 after: dict[Ident, ProcCpu]) -> tuple[int, int]:
    """(CPU ns used between the snapshots, processes that vanished in between).

    Per process, the sum over its threads of the scheduler's own runtime (schedstat,
    nanoseconds): utime + stime are the same time cut into 10 ms clock ticks, too
    coarse for a tool that uses a few hundred ms per burst. When one of its threads
    exited in between (its time is then missing from the live threads' sum), the tick
    figure is used instead. A process that appeared in between counts whole; one that
    vanished could not be read again and counts nothing (reported, never silent)."""
    total = 0
    for ident, a in after.items():
        b = before.get(ident, ProcCpu(0, {}))
        if b.threads.keys() <= a.threads.keys():
            total += sum(ns - b.threads.get(tid, 0) for tid, ns in a.threads.items())
        else:
            total += (a.ticks - b.ticks) * NS_PER_TICK
    return total, len(before.keys() - after.keys())


def cpu_busy(cpu: int) -> tuple[int, int]:
    """(busy ns, steal ns) of one CPU so far, from its line in /proc/stat: busy is user,
    nice, system, irq and softirq time (whoever ran); steal is time the hypervisor gave
    to another guest."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            v = [int(x) for x in line.split()[1:]]
            return (v[0] + v[1] + v[2] + v[5] + v[6]) * NS_PER_TICK, v[7] * NS_PER_TICK
    raise BenchError(f"no cpu{cpu} line in /proc/stat")


def proc_memory(pid: int) -> dict[str, int]:
    """A process's memory in KiB: VmRSS and RssAnon (/proc/PID/status), and `ring`, the
    resident size of its packet-socket mappings (`socket:[inode]` in /proc/PID/smaps:
    the TPACKET ring, kernel memory mapped in)."""
    out = {"VmRSS": 0, "RssAnon": 0, "ring": 0}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                out[key] = int(value.split()[0])
    with contextlib.suppress(OSError):
        in_socket = False
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                in_socket = line.rstrip().endswith("]") and " socket:[" in line
            elif in_socket and line.startswith("Rss:"):
                out["ring"] += int(line.split()[1])
    return out


# --------------------------------------------------------------------------- traffic


def trafgen_config(size: int) -> str:
    """A trafgen packet configuration: one Ethernet/IPv4/UDP frame of `size` bytes whose
    IPv4 source (10.0.x.y, 65,536 values) and UDP source port (1024-65535) step by one per
    frame and whose destination port is random (1-1023): a new flow nearly every frame.
    trafgen fills in the lengths and checksums."""
    payload = size - 14 - 20 - 8
    return ("{\n"
            f"  eth(da={DST_MAC}, sa={netlab.INJ_MAC}),\n"
            "  ipv4(sa=10.0.0.0, sa[2:2]=dinc(0, 65535), da=192.0.2.2, ttl=64),\n"
            "  udp(sp=dinc(1024, 65535), dp=drnd(1, 1023)),\n"
            f"  fill(0x00, {payload})\n"
            "}\n")


@dataclass
class Sent:
    """What one trafgen run sent."""

    packets: int  # inj0's tx_packets difference: frames that left trafgen's ring
    seconds: float  # trafgen's own sending time (from its summary), else wall time
    reached_cap0: int  # cap0's rx_packets difference
    veth_drops: int  # inj0 tx_dropped + cap0 rx_dropped differences: lost before capture

    @property
    def kpps(self) -> float:
        return self.packets / max(self.seconds, 1e-9) / 1000


def link_counters(ns: netlab.NetNS) -> dict[str, int]:
    """inj0's and cap0's packet counters, from `ip -s -j link` inside the namespace."""
    links = json.loads(netlab._run("ip", "-n", ns.name, "-s", "-j", "link", "show"))
    out = {}
    for link in links:
        for direction in ("rx", "tx"):
            for key in ("packets", "dropped"):
                out[f"{link['ifname']}.{direction}_{key}"] = link["stats64"][direction][key]
    return out


def run_trafgen(ns: netlab.NetNS, conf: Path, count: int, seconds: float, log: Path,
                rate: int | None = None) -> Sent:
    """Send `count` frames on inj0 inside the namespace, at full speed (TX_RING with the
    qdisc bypass, trafgen's default) or paced at `rate` packets/s, and wait for trafgen
    to finish. Pacing uses --gap (sendto, one frame every 1/rate s): trafgen's --rate
    sends its frames as one burst per second, which would measure a burst, not a rate.
    trafgen gets SIGINT after `seconds` (it then stops and reports) and SIGKILL 5 s
    later. One sending process (--cpus 1), which trafgen pins to CPU 0;
    --no-sock-mem and --notouch-irq keep it from changing the host's socket memory
    defaults or IRQ affinities."""
    argv = ["taskset", "-c", str(GEN_CPU), "ip", "netns", "exec", ns.name, "trafgen",
            "--dev", "inj0", "--conf", str(conf), "--num", str(count), "--cpus", "1",
            "--no-sock-mem", "--notouch-irq"]
    if rate:
        argv += ["--gap", f"{max(1, round(1e6 / rate))}us"]
    before = link_counters(ns)
    start = time.monotonic()
    with open(log, "wb") as out, managed_process(argv, stdout=out,
                                                 stderr=subprocess.STDOUT) as proc:
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            stop_group(proc, signal.SIGINT, grace=5)
    wall = time.monotonic() - start
    text = log.read_text(errors="replace")
    if proc.returncode not in (0, -signal.SIGINT, 130):
        raise BenchError(f"trafgen failed ({proc.returncode}):\n{text[-2000:]}")
    after = link_counters(ns)
    diff = {k: after[k] - before.get(k, 0) for k in after}
    m = re.search(r"(\d+) sec, (\d+) usec on CPU", text)
    return Sent(packets=diff["inj0.tx_packets"],
                seconds=int(m[1]) + int(m[2]) / 1e6 if m else wall,
                reached_cap0=diff["cap0.rx_packets"],
                veth_drops=diff["inj0.tx_dropped"] + diff["cap0.rx_dropped"])


# --------------------------------------------------------------------------- processes


@contextlib.contextmanager
def managed_process(argv: list[str], **kw) -> Iterator[subprocess.Popen]:
    """Popen in a session of its own, whose whole process group is SIGKILLed on exit
    (also on an exception or Ctrl-C), so nothing it started outlives the benchmark."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True,
                            cwd=REPO, env=netlab.base_env(), **kw)
    try:
        yield proc
    finally:
        stop_group(proc, signal.SIGKILL, grace=10)


def stop_group(proc: subprocess.Popen, sig: int, grace: float) -> None:
    """Send `sig` to the process group of `proc` (its session) and wait up to `grace`
    seconds for it to exit; then SIGKILL whatever is left of the group and wait (bounded)
    until no process of its session is alive, a forked child (trafgen's sender) too."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the leader if it hung, or an orphaned child
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(netlab.WaitTimeout):  # killed; wait until reaped, bounded
        netlab.wait_for(lambda: not session_members(proc.pid), min(grace, 3.0),
                        "the processes of a stopped tool to be gone", interval=0.02)


def session_members(sid: int) -> list[int]:
    """Every process of session `sid` still in the process table, zombies included (a
    SIGKILLed child re-parented to init stays listed until init reaps it)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                rest = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                if int(rest[3]) == sid:
                    found.append(int(entry))
    return found


def wait_for_text(path: Path, pattern: str, proc: subprocess.Popen, timeout: float,
                  what: str) -> None:
    """Poll a log file until `pattern` appears (bounded); fail fast if `proc` exited."""
    def seen() -> bool:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited ({proc.returncode}):\n"
                             + path.read_text(errors="replace")[-2000:])
        return re.search(pattern, path.read_text(errors="replace")) is not None
    try:
        netlab.wait_for(seen, timeout, what)
    except netlab.WaitTimeout as e:
        raise BenchError(f"{e}:\n{path.read_text(errors='replace')[-2000:]}") from None


# --------------------------------------------------------------------------- subscriber


def top_talkers_module():
    """examples/top_talkers.py, imported from its file (examples/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("top_talkers",
                                                  REPO / "examples" / "top_talkers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def subscriber_main(endpoint: str, ctl: Connection, progress, ready, latency: bool,
                    top_talkers: bool = False) -> None:
    """The subscriber process: drain fanoutd's stream, counting rows, until told to stop.

    Pinned to GEN_CPU (beside trafgen) so the capture CPU holds nothing but the tool
    measured. `progress` (a shared int) is the number of rows received, for the parent's
    drain check; `ready` is set once the publisher's welcome message arrived. With
    `latency`, also records for each row time.time_ns() at the batch's arrival minus the
    row's ts_ns (the kernel's capture time). With `top_talkers`, each batch also goes
    through examples/top_talkers.py's work: grouped by source into its sliding window,
    whose top 10 is computed every second. On a message from `ctl` it replies with what
    it counted and returns.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.sched_setaffinity(0, {GEN_CPU})
    rows = batches = 0
    lat = array.array("q")
    if top_talkers:
        top = top_talkers_module()
        window = top.SlidingWindow(10.0, 1.0, ["src"])
        next_top = time.monotonic() + 1
    with Subscriber(endpoint, rcvhwm=1_000_000) as sub:
        if not sub.wait_ready(timeout=10):
            ctl.send(None)
            return
        ready.set()
        while not ctl.poll():
            for batch in sub.batches(timeout=0.05):
                if latency:
                    now = time.time_ns()
                    lat.extend((now - batch.columns()["ts_ns"]).tolist())
                rows += batch.n
                batches += 1
                if top_talkers and batch.n:
                    now = time.monotonic()
                    window.add(top.batch_totals(batch, ["src"]), now)
                    if now >= next_top:
                        window.expire(now)
                        window.top(10)
                        next_top = now + 1
                progress.value = rows
                if ctl.poll():
                    break
        ctl.recv()
        ctl.send({"rows": rows, "batches": batches, "lost_batches": sum(sub.lost.values()),
                  "latency_ns": lat})


# --------------------------------------------------------------------------- tools


@dataclass
class Counts:
    """A tool's own account of one burst."""

    kernel_packets: int  # the kernel's tp_packets: passed to the tool's socket(s), drops included
    kernel_drops: int  # tp_drops: dropped because the ring / socket buffer was full
    delivered: int  # fanoutd: rows the subscriber got; tcpdump: packets captured; scapy: callbacks
    notes: dict[str, int] = field(default_factory=dict)


class Tool:
    """One capture tool for one burst: a context manager that starts it on CAP_CPU
    (__enter__ returns once it is capturing) and kills every process of it on exit.

    cost_roots(): processes whose trees are the tool's CPU cost; user_roots(): processes
    that are the user's cost, reported apart (fanoutd's subscriber); progress(): a number
    that changes while the tool still delivers; begin()/end(): the tool's counters around
    the burst (end() may stop the tool to read them); memory(): per-worker memory.
    """

    name = ""
    min_settle_s = 0.3  # the least time to wait after the burst before calling it drained

    def __init__(self, ns: netlab.NetNS, workdir: Path, args: argparse.Namespace) -> None:
        self.ns, self.workdir, self.args = ns, workdir, args
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> Tool:
        try:
            self.start()
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def start(self) -> None:
        raise NotImplementedError

    def cost_roots(self) -> list[int]:
        raise NotImplementedError

    def user_roots(self) -> list[int]:
        return []

    def progress(self) -> int:
        return 0

    def begin(self) -> None:
        pass

    def end(self) -> Counts:
        raise NotImplementedError

    def memory(self) -> list[dict[str, int]]:
        return []


class FanoutdTool(Tool):
    """`fanoutd run` on cap0 with N workers, its default ring and fanout (RING_MIB per
    worker, 10 ms block timeout, hash), plus a subscriber process draining the stream."""

    def __init__(self, ns: netlab.NetNS, workdir: Path, args: argparse.Namespace,
                 workers: int, latency: bool = False, wire_format: str = "columns",
                 top_talkers: bool = False) -> None:
        super().__init__(ns, workdir, args)
        self.name = f"fanoutd{workers}" + ("-rows" if wire_format == "rows" else "") + (
            "-top" if top_talkers else "")
        self.workers = workers
        self.wire_format = wire_format
        self.top_talkers = top_talkers
        self.latency = latency
        self.result: dict | None = None

    def start(self) -> None:
        (self.workdir / "run").mkdir(exist_ok=True)
        d = netlab.Daemon(self.ns, self.workdir, workers=self.workers)
        d.argv = ["taskset", "-c", str(CAP_CPU), "ip", "netns", "exec", self.ns.name,
                  sys.executable, "-m", "fanoutd", "run", "--interface", "cap0",
                  "--workers", str(self.workers), "--format", self.wire_format,
                  "--publish", d.endpoint,
                  "--metrics", f"127.0.0.1:{d.metrics_port}",
                  "--runtime-dir", str(self.workdir / "run")]
        self.daemon = d
        self.stack.callback(d.kill)
        d.start()
        try:
            d.wait_ready(timeout=30)
        except netlab.WaitTimeout as e:
            raise BenchError(str(e)) from None
        ctx = mp.get_context("fork")  # this process runs no thread: fork is safe
        self.ctl, child_ctl = ctx.Pipe()
        self.rows = ctx.Value("q", 0, lock=False)
        ready = ctx.Event()
        self.sub = ctx.Process(target=subscriber_main, name="bench-subscriber",
                               args=(d.endpoint, child_ctl, self.rows, ready, self.latency,
                                     self.top_talkers))
        self.sub.start()
        self.stack.callback(netlab.stop_child_process, self.sub)
        if not ready.wait(15):
            raise BenchError("the subscriber got no welcome message\n" + d.logs())

    def cost_roots(self) -> list[int]:
        return [self.daemon.pid]  # the supervisor; its descendants: proxy and workers

    def user_roots(self) -> list[int]:
        return [self.sub.pid]

    def progress(self) -> int:
        return self.rows.value

    def _metrics(self) -> dict:
        m = self.daemon.try_metrics()
        if m is None:
            raise BenchError("fanoutd's /metrics did not answer\n" + self.daemon.logs())
        return m

    def begin(self) -> None:
        self.before = self._metrics()

    def end(self) -> Counts:
        after = self._metrics()

        def diff(name: str) -> int:
            return int(netlab.metric_sum(after, name) - netlab.metric_sum(self.before, name))

        if self.daemon.proc is None or self.daemon.proc.poll() is not None:
            raise BenchError("fanoutd exited during the burst\n" + self.daemon.logs())
        self.ctl.send(b"stop")
        if not self.ctl.poll(30):
            raise BenchError("the subscriber did not report back")
        self.result = self.ctl.recv()
        if self.result is None:
            raise BenchError("the subscriber got no welcome message")
        return Counts(diff("fanoutd_kernel_packets_total"), diff("fanoutd_kernel_drops_total"),
                      self.result["rows"],
                      {"decoded": diff("fanoutd_packets_decoded_total"),
                       "publish drops": diff("fanoutd_publish_drops_total"),
                       "batches lost": self.result["lost_batches"]})

    def memory(self) -> list[dict[str, int]]:
        return [proc_memory(pid) for comm, pid in sorted(self.daemon.children_by_comm().items())
                if re.fullmatch(r"fanoutd-w\d+", comm)]


class TcpdumpTool(Tool):
    """tcpdump -i cap0 -w /dev/null -n -B TCPDUMP_BUFFER_KIB (a TPACKET_V3 ring of the size of one
    fanoutd worker's); its counters are the lines it prints on SIGINT."""

    name = "tcpdump"
    min_settle_s = 1.2  # libpcap retires a partly filled ring block after 1 s

    def start(self) -> None:
        self.log = self.workdir / "tcpdump.log"
        argv = ["taskset", "-c", str(CAP_CPU), "ip", "netns", "exec", self.ns.name,
                "tcpdump", "-i", "cap0", "-w", "/dev/null", "-n", "-B", str(TCPDUMP_BUFFER_KIB)]
        with open(self.log, "wb") as err:
            self.proc = self.stack.enter_context(
                managed_process(argv, stdout=subprocess.DEVNULL, stderr=err))
        wait_for_text(self.log, r"listening on cap0", self.proc, 15, "tcpdump to listen")

    def cost_roots(self) -> list[int]:
        return [self.proc.pid]

    def end(self) -> Counts:
        stop_group(self.proc, signal.SIGINT, grace=10)
        text = self.log.read_text(errors="replace")

        def count(what: str) -> int:
            m = re.search(rf"(\d+) packets? {what}", text)
            if m is None:
                raise BenchError(f"tcpdump printed no '{what}' line:\n{text[-2000:]}")
            return int(m[1])

        return Counts(count("received by filter"), count("dropped by kernel"),
                      count("captured"))


class ScapyTool(Tool):
    """scapy's sniff() on cap0 in a child process (this script with --scapy-child),
    counting packets in a callback (store=False), bounded by a timeout; the kernel
    counters are PACKET_STATISTICS of scapy's own socket."""

    name = "scapy"

    def start(self) -> None:
        self.log = self.workdir / "scapy.out"
        timeout = self.args.seconds + self.args.settle_timeout + 10  # bounded on its own too
        argv = ["taskset", "-c", str(CAP_CPU), "ip", "netns", "exec", self.ns.name,
                sys.executable, str(Path(__file__).resolve()), "--scapy-child",
                "--iface", "cap0", "--timeout", str(timeout)]
        with open(self.log, "wb") as out, open(self.workdir / "scapy.err", "wb") as err:
            self.proc = self.stack.enter_context(managed_process(argv, stdout=out, stderr=err))
        wait_for_text(self.log, r"^ready$", self.proc, 60, "scapy to start sniffing")

    def cost_roots(self) -> list[int]:
        return [self.proc.pid]

    def end(self) -> Counts:
        stop_group(self.proc, signal.SIGINT, grace=10)
        for line in reversed(self.log.read_text(errors="replace").splitlines()):
            if line.startswith("{"):
                r = json.loads(line)
                return Counts(r["tp_packets"], r["tp_drops"], r["callbacks"])
        err = (self.workdir / "scapy.err").read_text(errors="replace")
        raise BenchError(f"scapy reported nothing ({self.proc.returncode}):\n{err[-2000:]}")


def scapy_child(iface: str, timeout: float) -> int:
    """The scapy process (run inside the namespace): sniff until SIGINT or `timeout`,
    then print one JSON line with its callback count and its socket's PACKET_STATISTICS
    (read once before sniffing, which resets them)."""
    import struct

    from scapy.all import conf, sniff

    sol_packet, packet_statistics = 263, 6
    sock = conf.L2listen(iface=iface)
    sock.ins.getsockopt(sol_packet, packet_statistics, 8)  # reset the kernel's counters
    callbacks = 0

    def count(_pkt: object) -> None:
        nonlocal callbacks
        callbacks += 1

    print("ready", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        sniff(opened_socket=sock, prn=count, store=False, timeout=timeout)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tp_packets, tp_drops = struct.unpack("II", sock.ins.getsockopt(
        sol_packet, packet_statistics, 8))
    # tp_packets counts the dropped ones too (as for fanoutd and tcpdump)
    print(json.dumps({"callbacks": callbacks, "tp_packets": tp_packets, "tp_drops": tp_drops}),
          flush=True)
    return 0


def make_tool(name: str, ns: netlab.NetNS, workdir: Path, args: argparse.Namespace) -> Tool:
    if name.startswith("fanoutd"):
        workers, _, fmt = name.removeprefix("fanoutd").partition("-")
        return FanoutdTool(ns, workdir, args, workers=int(workers),
                           wire_format="rows" if fmt == "rows" else "columns",
                           top_talkers=fmt == "top")
    return {"tcpdump": TcpdumpTool, "scapy": ScapyTool}[name](ns, workdir, args)


# --------------------------------------------------------------------------- one burst


@dataclass
class Measurement:
    """One tool, one frame size, one run."""

    tool: str
    size: int
    run: int
    sent: Sent
    counts: Counts
    cpu_ns: int  # the tool's process trees, from just before the burst to drained
    user_cpu_ns: int | None  # the subscriber's (fanoutd only)
    drain_s: float
    cap_busy_ns: int  # CAP_CPU's busy time over the same span, whoever used it
    steal_ns: int  # CAP_CPU's steal time over the same span
    vanished: int  # processes of the tool that exited during the burst (not counted)
    memory: list[dict[str, int]]

    @property
    def other_ns(self) -> int:
        """CPU time other processes took on CAP_CPU while the tool was measured (its busy
        time minus the tool's; ticks make it +-20 ms): what disturbed the figures."""
        return max(self.cap_busy_ns - self.cpu_ns, 0)

    @property
    def disturbed(self) -> bool:
        return self.other_ns > max(50_000_000, self.cpu_ns // 10)

    @property
    def read(self) -> int:
        """Packets the tool took from the kernel: captured minus dropped."""
        return max(self.counts.kernel_packets - self.counts.kernel_drops, 0)

    @property
    def cpu_per_packet(self) -> float | None:
        return self.cpu_ns / self.read if self.read else None

    @property
    def user_cpu_per_packet(self) -> float | None:
        if self.user_cpu_ns is None or not self.counts.delivered:
            return None
        return self.user_cpu_ns / self.counts.delivered


def wait_drained(tool: Tool, timeout: float) -> float:
    """Wait until the tool has finished with what it holds: at least tool.min_settle_s
    after the burst, and then QUIET_S seconds in which its processes (subscriber
    included) used at most QUIET_TICKS of CPU and its progress() did not move.
    Bounded by `timeout`; returns the seconds waited."""
    roots = tool.cost_roots() + tool.user_roots()
    start = since = time.monotonic()
    base = (snapshot_ticks(cpu_snapshot(roots)), tool.progress())
    while time.monotonic() - start < timeout:
        time.sleep(0.1)
        now = time.monotonic()
        cur = (snapshot_ticks(cpu_snapshot(roots)), tool.progress())
        if cur[0] - base[0] > QUIET_TICKS or cur[1] != base[1]:
            base, since = cur, now
        elif now - since >= QUIET_S and now - start >= tool.min_settle_s:
            break
    return time.monotonic() - start


def measure(ns: netlab.NetNS, tool_name: str, size: int, run: int, conf: Path,
            args: argparse.Namespace) -> Measurement:
    """Start the tool, take its counters and CPU, send one burst, wait until the tool
    drained it, take them again, stop the tool. CPU is read before the tool is stopped
    (end() may stop it), so every process is alive at both readings."""
    with tempfile.TemporaryDirectory(prefix="fo-cb-") as d:  # short: ipc:// path limit
        wd = Path(d)
        with make_tool(tool_name, ns, wd, args) as tool:
            tool.begin()
            cost0 = cpu_snapshot(tool.cost_roots())
            user0 = cpu_snapshot(tool.user_roots())
            busy0 = cpu_busy(CAP_CPU)
            sent = run_trafgen(ns, conf, args.packets, args.seconds, wd / "trafgen.log")
            drain_s = wait_drained(tool, args.settle_timeout)
            busy1 = cpu_busy(CAP_CPU)
            cost1 = cpu_snapshot(tool.cost_roots())
            user1 = cpu_snapshot(tool.user_roots())
            memory = tool.memory()
            counts = tool.end()
    cpu_ns, vanished = cpu_delta_ns(cost0, cost1)
    user_ns = cpu_delta_ns(user0, user1)[0] if user0 else None
    return Measurement(tool_name, size, run, sent, counts, cpu_ns, user_ns, drain_s,
                       busy1[0] - busy0[0], busy1[1] - busy0[1], vanished, memory)


def progress_line(m: Measurement, runs: int) -> str:
    """One line per burst as the benchmark goes, with the details the table leaves out."""
    c = m.counts
    notes = "".join(f", {k} {v:,}" for k, v in c.notes.items())
    user = f", subscriber CPU {m.user_cpu_ns / 1e9:.2f} s" if m.user_cpu_ns is not None else ""
    gone = f", {m.vanished} process(es) exited mid-burst (not counted)" if m.vanished else ""
    return (f"  run {m.run}/{runs} {m.size:>4} B {m.tool:<8}: offered {m.sent.packets:,} at "
            f"{m.sent.kpps:,.0f} kpps (reached cap0 {m.sent.reached_cap0:,}, veth drops "
            f"{m.sent.veth_drops:,}); kernel {c.kernel_packets:,}, drops {c.kernel_drops:,}, "
            f"delivered {c.delivered:,}{notes}; CPU {m.cpu_ns / 1e9:.2f} s{user}{gone}; "
            f"drained in {m.drain_s:.1f} s; others on CPU {CAP_CPU} {m.other_ns / 1e9:.2f} s, "
            f"steal {m.steal_ns / 1e9:.2f} s" + ("  [DISTURBED]" if m.disturbed else ""))


def disturbance_note(results: list[Measurement], retried: int) -> str:
    """One sentence on how much other processes used the capture CPU during the bursts
    kept (`retried`: bursts measured again because they were disturbed)."""
    worst = max(results, key=lambda m: m.other_ns, default=None)
    if worst is None:
        return ""
    bad = sum(m.disturbed for m in results)
    steal = max(m.steal_ns for m in results)
    text = (f"Other processes used CPU {CAP_CPU} for at most {worst.other_ns / 1e6:,.0f} ms "
            f"during a burst (CPU {CAP_CPU}'s busy time minus the tool's), hypervisor steal "
            f"at most {steal / 1e6:,.0f} ms; {retried} disturbed burst(s) were measured again")
    if bad:
        text += (f"; {bad} of the {len(results)} bursts kept were still disturbed (over 50 ms "
                 "and over 10 % of the tool's own CPU): take their figures with care")
    return text + "."


# --------------------------------------------------------------------------- latency


@dataclass
class Latency:
    """Injection-to-subscriber latency of fanoutd (1 worker) at a low rate."""

    rate: float  # achieved: frames sent / trafgen's sending time
    sent: int
    received: int
    p50_ms: float
    p99_ms: float
    max_ms: float


def measure_latency(ns: netlab.NetNS, conf: Path, args: argparse.Namespace) -> Latency:
    """Send rate x seconds frames at `args.latency_rate` (trafgen's paced sendto mode)
    to fanoutd with 1 worker; each row's latency is its arrival at the subscriber
    (time.time_ns()) minus its ts_ns (the kernel's capture time, CLOCK_REALTIME)."""
    count = max(1, int(args.latency_rate * args.latency_seconds))
    with tempfile.TemporaryDirectory(prefix="fo-cb-") as d:
        wd = Path(d)
        with FanoutdTool(ns, wd, args, workers=1, latency=True) as tool:
            tool.begin()
            sent = run_trafgen(ns, conf, count, args.latency_seconds * 2 + 5,
                               wd / "trafgen.log", rate=args.latency_rate)
            wait_drained(tool, args.settle_timeout)
            tool.end()
            lat = sorted(tool.result["latency_ns"])
    if not lat:
        raise BenchError("the latency run delivered nothing")

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] / 1e6

    return Latency(sent.kpps * 1000, sent.packets, len(lat), pct(0.50), pct(0.99),
                   lat[-1] / 1e6)


# --------------------------------------------------------------------------- summary


@dataclass
class Row:
    """The medians over runs for one (tool, size)."""

    tool: str
    size: int
    offered: float
    kpps: float
    kernel: float
    drops: float
    delivered: float
    cpu_ns: float | None
    ratio: float | None  # cpu_ns / tcpdump's in the same run (median over runs)
    user_ns: float | None
    rss_kib: float | None  # fanoutd: largest worker's VmRSS minus its ring
    anon_kib: float | None  # ... and its RssAnon

    @property
    def drop_pct(self) -> float:
        return 100 * self.drops / self.kernel if self.kernel else 0.0


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(results: list[Measurement], tools: list[str], sizes: list[int]) -> list[Row]:
    """One Row per (tool, size): each figure the median of its runs; the ratio to tcpdump
    is computed run by run (same run, same size) before taking the median."""
    by = {(m.tool, m.size, m.run): m for m in results}
    rows = []
    for size in sizes:
        for tool in tools:
            ms = [m for m in results if m.tool == tool and m.size == size]
            if not ms:
                continue
            ratios = []
            for m in ms:
                ref = by.get(("tcpdump", size, m.run))
                if ref is not None and ref.cpu_per_packet and m.cpu_per_packet:
                    ratios.append(m.cpu_per_packet / ref.cpu_per_packet)
            mem = [max(w["VmRSS"] - w["ring"] for w in m.memory) for m in ms if m.memory]
            anon = [max(w["RssAnon"] for w in m.memory) for m in ms if m.memory]
            rows.append(Row(
                tool, size,
                offered=median(m.sent.packets for m in ms),
                kpps=median(m.sent.kpps for m in ms),
                kernel=median(m.counts.kernel_packets for m in ms),
                drops=median(m.counts.kernel_drops for m in ms),
                delivered=median(m.counts.delivered for m in ms),
                cpu_ns=median(m.cpu_per_packet for m in ms),
                ratio=median(ratios) if tool != "tcpdump" else None,
                user_ns=median(m.user_cpu_per_packet for m in ms),
                rss_kib=median(mem), anon_kib=median(anon)))
    return rows


COLUMNS = ("tool", "frame B", "offered", "kpps", "kernel pkts", "kernel drops", "drop %",
           "delivered", "CPU ns/pkt", "x tcpdump", "subscriber ns/pkt")


def row_cells(r: Row) -> list[str]:
    """The table cells of one row, as text (the same for stdout and Markdown)."""
    def n(v: float | None) -> str:
        return "-" if v is None else f"{v:,.0f}"
    return [r.tool, str(r.size), n(r.offered), n(r.kpps), n(r.kernel), n(r.drops),
            f"{r.drop_pct:.1f}", n(r.delivered), n(r.cpu_ns),
            "-" if r.ratio is None else f"{r.ratio:.2f}", n(r.user_ns)]


def text_table(rows: list[Row]) -> str:
    """The plain-text table: right-aligned columns, tool left-aligned."""
    cells = [list(COLUMNS)] + [row_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                  enumerate(zip(line, widths, strict=True)))
        for line in cells)


def memory_lines(rows: list[Row]) -> list[str]:
    """One line per fanoutd (tool, size) with worker memory."""
    return [f"{r.tool} {r.size} B: largest worker {r.rss_kib / 1024:.1f} MiB resident "
            f"besides its ring (RssAnon {r.anon_kib / 1024:.1f} MiB)"
            for r in rows if r.rss_kib is not None]


def latency_text(lat: Latency) -> str:
    return (f"p50 {lat.p50_ms:.2f} ms, p99 {lat.p99_ms:.2f} ms, max {lat.max_ms:.2f} ms "
            f"({lat.received:,} of {lat.sent:,} packets at {lat.rate:,.0f} packets/s, fanoutd "
            f"1 worker; its block timeout is {FANOUTD_BLOCK_TIMEOUT_MS} ms)")


def latency_line(lat: Latency) -> str:
    return "latency injection -> subscriber: " + latency_text(lat)


# --------------------------------------------------------------------------- docs


def environment() -> dict[str, str]:
    """What the figures were measured on: date, CPU, kernel, the fanoutd commit."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True,
                           check=False)
        return r.stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no", "--", "fanoutd"):
        commit += " with uncommitted changes to fanoutd/"
    return {"date": datetime.date.today().isoformat(), "cpu": cpu,
            "cpus": str(os.cpu_count()), "kernel": platform.release(), "commit": commit,
            "python": platform.python_version()}


def markdown(rows: list[Row], lat: Latency | None, args: argparse.Namespace,
             env: dict[str, str], chart: Path | None, command: str, note: str = "") -> str:
    """The generated part of docs/performance.md (between the markers)."""
    head = "| " + " | ".join(COLUMNS) + " |"
    align = "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|"
    body = ["| " + " | ".join(row_cells(r)) + " |" for r in rows]
    out = [DOCS_BEGIN,
           "<!-- generated by benchmarks/capture_bench.py --write-docs: do not edit by hand -->",
           "",
           "## Results",
           "",
           f"Measured on {env['date']}: {env['cpu']}, {env['cpus']} CPUs, Linux "
           f"{env['kernel']}, Python {env['python']}, fanoutd at commit {env['commit']}.",
           f"Command: `{command}`. Median of {args.runs} run(s) of "
           f"{args.packets:,} frames per burst.",
           "",
           head, align, *body, ""]
    if note:
        out += [note, ""]
    if chart is not None:
        out += [f"![CPU per packet and share delivered, by tool and frame size]({chart})", ""]
    if lat is not None:
        out += [f"**Latency**, injection to subscriber: {latency_text(lat)}.", ""]
    mem = memory_lines(rows)
    if mem:
        out += ["**Worker memory** (VmRSS minus the ring's resident pages; each worker also "
                f"maps its {RING_MIB} MiB ring):", "", *[f"- {line}" for line in mem], ""]
    out.append(DOCS_END)
    return "\n".join(out) + "\n"


def write_docs(path: Path, generated: str) -> None:
    """Put `generated` between the markers of `path`, keeping what is around them; a
    file without markers gets it appended, a missing file is created with a title."""
    old = path.read_text() if path.exists() else "# Performance\n\n"
    if DOCS_BEGIN in old and DOCS_END in old:
        before = old.split(DOCS_BEGIN, 1)[0]
        after = old.split(DOCS_END, 1)[1].lstrip("\n")
        new = before + generated + (("\n" + after) if after else "")
    else:
        new = old.rstrip("\n") + "\n\n" + generated
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def write_chart(path: Path, rows: list[Row], sizes: list[int], tools: list[str]) -> None:
    """Two panels: CPU ns per packet read (log scale) and the share of offered packets
    delivered, one bar per tool, grouped by frame size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_cpu, ax_del) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(len(tools), 1)
    by = {(r.tool, r.size): r for r in rows}
    for i, tool in enumerate(tools):
        xs = [j + (i - (len(tools) - 1) / 2) * width for j in range(len(sizes))]
        cpu = [(by[(tool, s)].cpu_ns or 0) if (tool, s) in by else 0 for s in sizes]
        dlv = [100 * by[(tool, s)].delivered / by[(tool, s)].offered
               if (tool, s) in by and by[(tool, s)].offered else 0 for s in sizes]
        ax_cpu.bar(xs, cpu, width, label=tool)
        ax_del.bar(xs, dlv, width, label=tool)
        for x, v in zip(xs, cpu, strict=True):
            if v:
                ax_cpu.annotate(f"{v:,.0f}", (x, v), ha="center", va="bottom", fontsize=7)
    for ax in (ax_cpu, ax_del):
        ax.set_xticks(range(len(sizes)), [f"{s}-byte frames" for s in sizes])
        ax.grid(axis="y", alpha=0.3)
    ax_cpu.set_yscale("log")
    ax_cpu.set_ylabel("CPU ns per packet read (log)")
    ax_cpu.set_title("Capture cost: the tool's whole process tree")
    ax_del.set_ylabel("% of offered packets")
    ax_del.set_ylim(0, 105)
    ax_del.set_title("Delivered (subscriber / written / callback)")
    ax_del.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def check_prerequisites(args: argparse.Namespace) -> None:
    """Fail early, with one clear line, when something the run needs is missing."""
    if os.geteuid() != 0:
        raise BenchError("capture_bench.py needs root (network namespaces, AF_PACKET)")
    for tool in ("ip", "taskset", "trafgen", *(("tcpdump",) if "tcpdump" in args.tools else ())):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found: apt-get install iproute2 util-linux "
                             "netsniff-ng tcpdump")
    if os.cpu_count() is None or os.cpu_count() < 2:
        raise BenchError("needs 2 CPUs: the generator on CPU 0, the capture on CPU 1")
    needed = ["matplotlib"] if args.write_docs else []
    needed += ["scapy"] if "scapy" in args.tools else []
    for module in needed:
        try:
            __import__(module)
        except ImportError:
            raise BenchError(f"{module} is not installed: pip install -e '.[bench]'") from None


def run(args: argparse.Namespace, command: str) -> int:
    """Build the namespace, run every burst and the latency measurement, print (and
    write) the results; tear everything down in any case."""
    check_prerequisites(args)
    os.sched_setaffinity(0, {GEN_CPU})  # this script's own polling stays off CAP_CPU
    results: list[Measurement] = []
    retried = 0
    lat = None
    with contextlib.ExitStack() as stack:
        ns = stack.enter_context(netlab.NetNS(prefix="fo-cbench"))
        confdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fo-cbconf-")))
        confs = {}
        for size in args.sizes:
            confs[size] = confdir / f"udp{size}.cfg"
            confs[size].write_text(trafgen_config(size))
        print(f"namespace {ns.name}: trafgen on CPU {GEN_CPU} -> inj0 -> cap0, capture on "
              f"CPU {CAP_CPU}; {args.runs} run(s) x sizes {args.sizes} x {args.tools}, "
              f"{args.packets:,} frames per burst", flush=True)
        for run_no in range(1, args.runs + 1):
            for size in args.sizes:
                for tool in args.tools:
                    for attempt in range(args.retries + 1):
                        m = measure(ns, tool, size, run_no, confs[size], args)
                        again = m.disturbed and attempt < args.retries
                        print(progress_line(m, args.runs)
                              + (": measuring it again" if again else ""), flush=True)
                        if not again:
                            break
                        retried += 1
                    results.append(m)
        if args.latency_seconds > 0:
            lat_conf = confs.get(64) or confdir / "udp64.cfg"
            if not lat_conf.exists():
                lat_conf.write_text(trafgen_config(64))
            lat = measure_latency(ns, lat_conf, args)
    rows = summarize(results, args.tools, args.sizes)
    print()
    print(f"capture benchmark: median of {args.runs} run(s), {args.packets:,} frames per "
          "burst; CPU ns/pkt = the tool's process tree (proxy and workers included, "
          "subscriber not) per packet read from the kernel")
    print(text_table(rows))
    for line in memory_lines(rows):
        print("memory " + line)
    note = disturbance_note(results, retried)
    if note:
        print(note)
    if lat is not None:
        print(latency_line(lat))
    if args.write_docs:
        env = environment()
        md_dir = args.markdown.resolve().parent
        chart_rel = Path(os.path.relpath(args.chart.resolve(), md_dir))
        write_chart(args.chart, rows, args.sizes, args.tools)
        write_docs(args.markdown, markdown(rows, lat, args, env, chart_rel, command, note))
        print(f"wrote {args.markdown} and {args.chart}")
    return 0


def interrupt(signum: int, frame: object) -> None:
    """Ctrl-C or SIGTERM: stop the run, and ignore both from now on so that a second one
    cannot cut the clean-up (the `finally` blocks and exit stacks) short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.scapy_child:
        return scapy_child(args.iface, args.timeout)
    command = "sudo .venv/bin/python benchmarks/capture_bench.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        return run(args, command.strip())
    except KeyboardInterrupt:
        print("\ninterrupted: everything was stopped and the namespace deleted",
              file=sys.stderr)
        return 130
    except (BenchError, netlab.WaitTimeout, OSError) as e:
        print(f"capture_bench: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
