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
from dataclasses import dataclass
from pathlib import Path

from capture_tools import FANOUTD_BLOCK_TIMEOUT_MS, RING_MIB, Counts, Sent

REPO = Path(__file__).resolve().parent.parent

DOCS_BEGIN = "<!-- capture_bench:begin -->"
DOCS_END = "<!-- capture_bench:end -->"
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

