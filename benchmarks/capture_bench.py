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
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import netlab  # tests/netlab.py: namespace, daemon, metrics, /proc helpers
from capture_report import (
    DEFAULT_CHART,
    DEFAULT_MARKDOWN,
    Latency,
    Measurement,
    environment,
    latency_line,
    markdown,
    memory_lines,
    summarize,
    text_table,
    thread_lines,
    write_chart,
    write_docs,
)
from capture_tools import (
    CAP_CPU,
    GEN_CPU,
    TOOLS,
    FanoutdTool,
    Tool,
    make_tool,
    run_trafgen,
    scapy_child,
    trafgen_config,
)
from proc_accounting import (
    EXIT_STATUSES,
    BenchError,
    cpu_busy,
    cpu_by_thread,
    cpu_delta_ns,
    cpu_snapshot,
    run_benchmark,
    snapshot_ticks,
)

QUIET_S = 0.5  # drained: the tool used at most QUIET_TICKS of CPU and delivered nothing new
QUIET_TICKS = 1  # ... in this long


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; every option has a default, so a bare run is the full benchmark."""
    p = argparse.ArgumentParser(
        description="Benchmark fanoutd's capture against tcpdump and scapy inside a private "
                    "network namespace: trafgen bursts of many UDP flows on CPU 0, one "
                    "capture tool at a time on CPU 1. Needs root, trafgen and tcpdump.",
        epilog=EXIT_STATUSES)
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
    p.add_argument("--flows", default="",
                   help="comma-separated numbers of concurrent flows (1 to 1,000,000): each "
                        "burst cycles through that many UDP flows, and the table gets a row "
                        "per flow count (default: a new flow nearly every frame)")
    p.add_argument("--fanoutd-args", default="", metavar="ARGS",
                   help="more options for every `fanoutd run` of the fanoutd tools, e.g. "
                        "'--block-size 2097152 --block-count 32' (default: none)")
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
    p.add_argument("--section", default="", metavar="NAME",
                   help="with --write-docs, write a section of its own (between the "
                        "capture_bench:NAME markers, titled 'Results: NAME'), so that "
                        "several runs (a curve over frame sizes, one over flows) each keep "
                        "theirs; use another --chart for it (default: the main section)")
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
    try:
        args.flows = [int(f.replace("_", "")) for f in args.flows.split(",") if f.strip()]
    except ValueError:
        p.error(f"--flows: comma-separated integers, got {args.flows!r}")
    if any(not 1 <= f <= 1_000_000 for f in args.flows):
        p.error("--flows: every count must be between 1 and 1000000")
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



# --------------------------------------------------------------------------- one burst


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
            gen0 = cpu_busy(GEN_CPU)
            sent = run_trafgen(ns, conf, args.packets, args.seconds, wd / "trafgen.log")
            gen1 = cpu_busy(GEN_CPU)
            user_burst = cpu_snapshot(tool.user_roots())
            drain_s = wait_drained(tool, args.settle_timeout)
            busy1 = cpu_busy(CAP_CPU)
            cost1 = cpu_snapshot(tool.cost_roots())
            user1 = cpu_snapshot(tool.user_roots())
            memory = tool.memory()
            counts = tool.end()
    cpu_ns, vanished = cpu_delta_ns(cost0, cost1)
    threads = cpu_by_thread(cost0, cost1)
    switches = cpu_by_thread(cost0, cost1, "slices")
    user_ns = cpu_delta_ns(user0, user1)[0] if user0 else None
    # CPU 0 during the burst: trafgen, the kernel's delivery it pays for (on a veth the
    # receive path runs in the sender's context), and the subscriber, which is taken out.
    gen_ns = gen1[0] - gen0[0] - (cpu_delta_ns(user0, user_burst)[0] if user0 else 0)
    return Measurement(tool_name, size, run, sent, counts, cpu_ns, user_ns, drain_s,
                       busy1[0] - busy0[0], busy1[1] - busy0[1], vanished, memory,
                       max(gen_ns, 0), threads=threads, switches=switches)


def progress_line(m: Measurement, runs: int) -> str:
    """One line per burst as the benchmark goes, with the details the table leaves out."""
    c = m.counts
    notes = "".join(f", {k} {v:,}" for k, v in c.notes.items())
    user = f", subscriber CPU {m.user_cpu_ns / 1e9:.2f} s" if m.user_cpu_ns is not None else ""
    gone = f", {m.vanished} process(es) exited mid-burst (not counted)" if m.vanished else ""
    flows = f" {m.flows:,} flows" if m.flows else ""
    return (f"  run {m.run}/{runs} {m.size:>4} B{flows} {m.tool:<8}: offered {m.sent.packets:,} at "
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
        flow_counts = args.flows or [None]
        for size in args.sizes:
            for flows in flow_counts:
                confs[size, flows] = confdir / f"udp{size}-{flows}.cfg"
                confs[size, flows].write_text(trafgen_config(size, flows))
        print(f"namespace {ns.name}: trafgen on CPU {GEN_CPU} -> inj0 -> cap0, capture on "
              f"CPU {CAP_CPU}; {args.runs} run(s) x sizes {args.sizes} x {args.tools}"
              + (f" x flows {args.flows}" if args.flows else "")
              + f", {args.packets:,} frames per burst", flush=True)
        for run_no in range(1, args.runs + 1):
            for size, flows in confs:
                for tool in args.tools:
                    for attempt in range(args.retries + 1):
                        m = measure(ns, tool, size, run_no, confs[size, flows], args)
                        m.flows = flows
                        again = m.disturbed and attempt < args.retries
                        print(progress_line(m, args.runs)
                              + (": measuring it again" if again else ""), flush=True)
                        if not again:
                            break
                        retried += 1
                    results.append(m)
        if args.latency_seconds > 0:
            lat_conf = confs.get((64, None)) or confdir / "udp64.cfg"
            if not lat_conf.exists():
                lat_conf.write_text(trafgen_config(64))
            lat = measure_latency(ns, lat_conf, args)
    rows = summarize(results, args.tools, list(confs))
    print()
    print(f"capture benchmark: median of {args.runs} run(s), {args.packets:,} frames per "
          "burst; CPU ns/pkt = the tool's process tree (proxy and workers included, "
          "subscriber not) per packet read from the kernel")
    print(text_table(rows))
    for line in memory_lines(rows):
        print("memory " + line)
    for line in thread_lines(results):
        print("threads " + line)
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
        write_docs(args.markdown, markdown(rows, lat, args, env, chart_rel, command, note,
                                               thread_lines(results)), args.section)
        print(f"wrote {args.markdown} and {args.chart}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.scapy_child:
        return scapy_child(args.iface, args.timeout)
    return run_benchmark("capture_bench.py", run, args, argv)


if __name__ == "__main__":
    sys.exit(main())
