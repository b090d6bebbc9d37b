"""The capture benchmark's report: one Measurement per burst summarised into the table
(medians over runs), the latency and memory lines, the Markdown for docs/performance.md
and its chart."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from capture_tools import FANOUTD_BLOCK_TIMEOUT_MS, RING_MIB, Counts, Sent

REPO = Path(__file__).resolve().parent.parent

DOCS_BEGIN = "<!-- capture_bench:begin -->"
DOCS_END = "<!-- capture_bench:end -->"


def markers(section: str) -> tuple[str, str]:
    """The markers of one generated section: the main one, or `--section NAME`'s."""
    if not section:
        return DOCS_BEGIN, DOCS_END
    return f"<!-- capture_bench:{section}:begin -->", f"<!-- capture_bench:{section}:end -->"
DEFAULT_MARKDOWN = REPO / "docs" / "performance.md"
DEFAULT_CHART = REPO / "docs" / "img" / "capture_bench.png"


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
    gen_ns: int = 0  # GEN_CPU's busy time during the burst, the subscriber's CPU taken out
    flows: int | None = None  # --flows: the burst's number of flows (None: a new one a frame)
    threads: dict[str, int] = field(default_factory=dict)  # cpu_ns by thread name
    switches: dict[str, int] = field(default_factory=dict)  # times on a CPU, by thread name

    @property
    def other_ns(self) -> int:
        """CPU time other processes took on CAP_CPU while the tool was measured (its busy
        time minus the tool's; ticks make it +-20 ms): what disturbed the figures."""
        return max(self.cap_busy_ns - self.cpu_ns, 0)

    @property
    def disturbed(self) -> bool:
        if self.tool == "none":  # nothing runs on CAP_CPU: what others do there is no harm
            return False
        return self.other_ns > max(50_000_000, self.cpu_ns // 10)

    @property
    def read(self) -> int:
        """Packets the tool took from the kernel: captured minus dropped."""
        return max(self.counts.kernel_packets - self.counts.kernel_drops, 0)

    @property
    def cpu_per_packet(self) -> float | None:
        return self.cpu_ns / self.read if self.read else None

    @property
    def gen_per_packet(self) -> float | None:
        """The generator's CPU per packet sent: trafgen and the kernel's receive path."""
        return self.gen_ns / self.sent.packets if self.sent.packets else None

    @property
    def packets_per_batch(self) -> float | None:
        batches = self.counts.notes.get("batches")
        return self.counts.notes.get("decoded", 0) / batches if batches else None

    @property
    def user_cpu_per_packet(self) -> float | None:
        if self.user_cpu_ns is None or not self.counts.delivered:
            return None
        return self.user_cpu_ns / self.counts.delivered



@dataclass
class Latency:
    """Injection-to-subscriber latency of fanoutd (1 worker) at a low rate."""

    rate: float  # achieved: frames sent / trafgen's sending time
    sent: int
    received: int
    p50_ms: float
    p99_ms: float
    max_ms: float



# --------------------------------------------------------------------------- summary


@dataclass
class Row:
    """The medians over runs for one (tool, size)."""

    tool: str
    size: int
    flows: int | None
    offered: float
    kpps: float
    kernel: float
    drops: float
    delivered: float
    cpu_ns: float | None
    cpu_min: float | None  # the spread of cpu_ns over the runs
    cpu_max: float | None
    ratio: float | None  # cpu_ns / tcpdump's in the same run (median over runs)
    kernel_ns: float | None  # generator ns/pkt minus the `none` tool's in the same run
    per_batch: float | None  # fanoutd: packets per batch
    balance: float | None  # fanoutd, several workers: the busiest one's share over a fair one
    user_ns: float | None
    rss_kib: float | None  # fanoutd: largest worker's VmRSS minus its ring
    anon_kib: float | None  # ... and its RssAnon
    proxy_kib: float | None = None  # the proxy's VmRSS

    @property
    def drop_pct(self) -> float:
        return 100 * self.drops / self.kernel if self.kernel else 0.0


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(results: list[Measurement], tools: list[str],
              cases: list[tuple[int, int | None]]) -> list[Row]:
    """One Row per (tool, frame size, flows): each figure the median of its runs; the
    ratio to tcpdump and the kernel's share (against `none`) are computed run by run (same
    run, same case) before taking the median."""
    by = {(m.tool, m.size, m.flows, m.run): m for m in results}
    rows = []
    for size, flows in cases:
        for tool in tools:
            ms = [m for m in results if m.tool == tool and m.size == size and m.flows == flows]
            if not ms:
                continue
            ratios, kernel = [], []
            for m in ms:
                base = by.get(("none", size, flows, m.run))
                if tool != "none" and base is not None and base.gen_per_packet is not None \
                        and m.gen_per_packet is not None:
                    kernel.append(m.gen_per_packet - base.gen_per_packet)
                ref = by.get(("tcpdump", size, flows, m.run))
                if ref is not None and ref.cpu_per_packet and m.cpu_per_packet:
                    ratios.append(m.cpu_per_packet / ref.cpu_per_packet)
            workers = [[w for w in m.memory if w["comm"] != "fanoutd-proxy"] for m in ms]
            mem = [max(w["VmRSS"] - w["ring"] for w in ws) for ws in workers if ws]
            anon = [max(w["RssAnon"] for w in ws) for ws in workers if ws]
            proxy = [w["VmRSS"] for m in ms for w in m.memory if w["comm"] == "fanoutd-proxy"]
            rows.append(Row(
                tool, size, flows,
                offered=median(m.sent.packets for m in ms),
                kpps=median(m.sent.kpps for m in ms),
                kernel=median(m.counts.kernel_packets for m in ms),
                drops=median(m.counts.kernel_drops for m in ms),
                delivered=median(m.counts.delivered for m in ms),
                cpu_ns=median(m.cpu_per_packet for m in ms),
                cpu_min=min((m.cpu_per_packet for m in ms if m.cpu_per_packet), default=None),
                cpu_max=max((m.cpu_per_packet for m in ms if m.cpu_per_packet), default=None),
                ratio=median(ratios) if tool != "tcpdump" else None,
                kernel_ns=median(kernel),
                per_batch=median(m.packets_per_batch for m in ms),
                balance=median(m.counts.notes.get("balance %") for m in ms),
                user_ns=median(m.user_cpu_per_packet for m in ms),
                rss_kib=median(mem), anon_kib=median(anon), proxy_kib=median(proxy)))
    return rows


COLUMNS = ("tool", "frame B", "flows", "offered", "kpps", "kernel pkts", "kernel drops", "drop %",
           "delivered", "pkts/batch", "CPU ns/pkt", "spread", "x tcpdump", "kernel ns/pkt",
           "subscriber ns/pkt", "busiest worker %")


def row_cells(r: Row) -> list[str]:
    """The table cells of one row, as text (the same for stdout and Markdown)."""
    def n(v: float | None) -> str:
        return "-" if v is None else f"{v:,.0f}"
    spread = "-" if r.cpu_min is None or r.cpu_max is None or r.cpu_min == r.cpu_max \
        else f"{r.cpu_min:,.0f}..{r.cpu_max:,.0f}"
    return [r.tool, str(r.size), n(r.flows), n(r.offered), n(r.kpps), n(r.kernel), n(r.drops),
            f"{r.drop_pct:.1f}", n(r.delivered), n(r.per_batch), n(r.cpu_ns), spread,
            "-" if r.ratio is None else f"{r.ratio:.2f}", n(r.kernel_ns), n(r.user_ns),
            n(r.balance)]


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
            + (f", proxy {r.proxy_kib / 1024:.1f} MiB" if r.proxy_kib else "")
            for r in rows if r.rss_kib is not None]


def is_hop(thread: str) -> bool:
    """A thread of the hop from a worker to the public endpoint: the proxy's. (A worker's
    writing into its outbox, fanoutd/outbox.py, is in its own thread's time.)"""
    return thread.startswith("fanoutd-proxy")


def thread_lines(results: list[Measurement]) -> list[str]:
    """One line per fanoutd (tool, size, flows): each thread's CPU ns per packet read
    (median over runs; threads below 1 ns/pkt left out), and the hop's share."""
    lines = []
    cases = sorted({(m.tool, m.size, m.flows or 0) for m in results if m.threads
                    and m.tool.startswith("fanoutd")}, key=lambda c: (c[1], c[2], c[0]))
    for tool, size, flows in cases:
        ms = [m for m in results if (m.tool, m.size, m.flows or 0) == (tool, size, flows)
              and m.read]
        if not ms:
            continue
        names = {name for m in ms for name in m.threads}
        per = {name: median(m.threads.get(name, 0) / m.read for m in ms) or 0.0
               for name in names}
        hop = median(sum(ns for name, ns in m.threads.items() if is_hop(name))
                     / max(sum(m.threads.values()), 1) for m in ms) or 0.0
        shown = sorted(((ns, name) for name, ns in per.items() if ns >= 1), reverse=True)
        case = f"{tool} {size} B" + (f" {flows:,} flows" if flows else "")
        switches = median(sum(m.switches.values()) / m.counts.notes["batches"] for m in ms
                          if m.switches and m.counts.notes.get("batches"))
        lines.append(f"{case}: " + ", ".join(f"{name} {ns:,.0f}" for ns, name in shown)
                     + f" ns/pkt; the hop (the proxy's threads) "
                       f"{100 * hop:.0f} % of the tree's CPU"
                     + (f"; {switches:.1f} context switches per batch, all threads"
                        if switches is not None else ""))
    return lines


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
             env: dict[str, str], chart: Path | None, command: str, note: str = "",
             threads: list[str] | None = None) -> str:
    """The generated part of docs/performance.md (between the markers)."""
    head = "| " + " | ".join(COLUMNS) + " |"
    align = "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|"
    body = ["| " + " | ".join(row_cells(r)) + " |" for r in rows]
    begin, end = markers(args.section)
    out = [begin,
           "<!-- generated by benchmarks/capture_bench.py --write-docs: do not edit by hand -->",
           "",
           f"## Results{': ' + args.section if args.section else ''}",
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
    if threads:
        out += ["**CPU by thread** (ns per packet read, median over runs; schedstat):", "",
                *[f"- {line}" for line in threads], ""]
    out.append(end)
    return "\n".join(out) + "\n"


def write_docs(path: Path, generated: str, section: str = "") -> None:
    """Put `generated` between the markers of `path` (the section's), keeping what is
    around them."""
    write_between(path, *markers(section), generated)


def write_between(path: Path, begin: str, end: str, generated: str) -> None:
    """Put `generated` (which starts with `begin` and ends with `end`) in place of what
    is between those markers of `path`, markers included, keeping what is around them; a
    file without them gets it appended, a missing file is created with a title."""
    old = path.read_text() if path.exists() else "# Performance\n\n"
    if begin in old and end in old:
        before = old.split(begin, 1)[0]
        after = old.split(end, 1)[1].lstrip("\n")
        new = before + generated + (("\n" + after) if after else "")
    else:
        new = old.rstrip("\n") + "\n\n" + generated
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def write_chart(path: Path, rows: list[Row], sizes: list[int], tools: list[str]) -> None:
    """Curves, one line per tool: CPU ns per packet read (log scale) and the share of
    offered packets delivered against the frame size; with several flow counts (--flows),
    also CPU ns per packet and the busiest worker's share against the number of flows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tools = [t for t in tools if t != "none"]  # the baseline captures nothing
    flow_counts = sorted({r.flows for r in rows if r.flows is not None})
    panels = 4 if len(flow_counts) > 1 else 2
    fig, grid = plt.subplots(panels // 2, 2, figsize=(11, 4.2 * panels // 2), squeeze=False)
    axes = list(grid.flat)
    ax_cpu, ax_del = axes[0], axes[1]
    first_flows = rows[0].flows if rows else None
    for tool in tools:
        by_size = sorted((r.size, r) for r in rows if r.tool == tool and r.flows == first_flows)
        if not by_size:
            continue
        xs = [size for size, _ in by_size]
        ax_cpu.plot(xs, [r.cpu_ns for _, r in by_size], marker="o", label=tool)
        ax_del.plot(xs, [100 * r.delivered / r.offered if r.offered else 0
                         for _, r in by_size], marker="o", label=tool)
    ax_cpu.set_yscale("log")
    ax_cpu.set_ylabel("CPU ns per packet read (log)")
    ax_cpu.set_title("Capture cost: the tool's whole process tree")
    ax_del.set_ylabel("% of offered packets")
    ax_del.set_ylim(0, 105)
    ax_del.set_title("Delivered (subscriber / written / callback)")
    for ax in (ax_cpu, ax_del):
        ax.set_xlabel("frame size, bytes")
        ax.set_xticks(sizes, [str(s) for s in sizes])
    if panels == 4:
        ax_flows, ax_bal = axes[2], axes[3]
        for tool in tools:
            by_flows = sorted((r.flows, r) for r in rows
                              if r.tool == tool and r.flows is not None and r.size == sizes[0])
            if not by_flows:
                continue
            xs = [f for f, _ in by_flows]
            ax_flows.plot(xs, [r.cpu_ns for _, r in by_flows], marker="o", label=tool)
            if any(r.balance for _, r in by_flows):
                ax_bal.plot(xs, [r.balance for _, r in by_flows], marker="o", label=tool)
        ax_flows.set_title(f"Cost against concurrent flows ({sizes[0]}-byte frames)")
        ax_flows.set_ylabel("CPU ns per packet read")
        ax_bal.set_title("Fan-out balance: the busiest worker")
        ax_bal.set_ylabel("% of a fair share (100 = even)")
        for ax in (ax_flows, ax_bal):
            ax.set_xscale("log")
            ax.set_xlabel("concurrent flows")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
