"""benchmarks/capture_bench.py keeps working: a --quick run produces all its figures.

It asserts only that every figure is there and parses, never a timing or a rate: the
machine running the tests may be slow or busy. The run is bounded (a few thousand frames
per burst, inside a private network namespace the script creates and deletes).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "capture_bench.py"
TOOLS = ("none", "fanoutd1", "fanoutd2", "tcpdump", "scapy")
SIZES = (64, 512)
NUMBER = r"(?:-|-?[\d,]+(?:\.\d+)?)"  # a figure as the table prints it; "-" when n/a
SPREAD = r"(?:-|[\d,]+\.\.[\d,]+)"  # min..max over the runs; "-" for one run
# The table's columns, as capture_report.COLUMNS names them.
COLUMNS = ("tool", "frame B", "flows", "offered", "kpps", "kernel pkts", "kernel drops",
           "drop %", "delivered", "pkts/batch", "CPU ns/pkt", "spread", "x tcpdump",
           "kernel ns/pkt", "subscriber ns/pkt", "busiest worker %")
COL = {name: i for i, name in enumerate(COLUMNS)}

pytestmark = [
    pytest.mark.integration,
    pytest.mark.bench,
    pytest.mark.skipif(os.geteuid() != 0, reason="the benchmark needs root"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in ("trafgen", "tcpdump", "ip",
                                                             "taskset")),
                       reason="the benchmark needs trafgen (netsniff-ng), tcpdump, ip, taskset"),
    pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the benchmark needs 2 CPUs"),
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One --quick run with --write-docs into a temporary directory, shared by the tests."""
    pytest.importorskip("scapy", reason="the bench extra: pip install -e '.[bench]'")
    pytest.importorskip("matplotlib", reason="the bench extra: pip install -e '.[bench]'")
    out = tmp_path_factory.mktemp("bench")
    md, png = out / "performance.md", out / "img" / "chart.png"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--tools", ",".join(TOOLS), "--write-docs",
         "--markdown", str(md), "--chart", str(png)],
        capture_output=True, text=True, timeout=240, cwd=ROOT, stdin=subprocess.DEVNULL,
        check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, md, png


def table_rows(stdout: str) -> dict[tuple[str, int], list[str]]:
    """{(tool, size): cells} from the table printed at the end."""
    rows = {}
    for line in stdout.splitlines():
        cells = line.split()
        if cells and cells[0] in TOOLS and len(cells) == len(COLUMNS) and cells[1].isdigit():
            rows[(cells[0], int(cells[1]))] = cells
    return rows


def test_table_has_a_row_of_figures_per_tool_and_size(quick_run):
    stdout, _, _ = quick_run
    rows = table_rows(stdout)
    assert set(rows) == {(t, s) for t in TOOLS for s in SIZES}, stdout
    for (tool, _size), cells in rows.items():
        for name, cell in zip(COLUMNS[2:], cells[2:], strict=True):
            assert re.fullmatch(SPREAD if name == "spread" else NUMBER, cell), (tool, cells)
        offered, kernel = (int(cells[COL[c]].replace(",", "")) for c in ("offered", "kernel pkts"))
        assert offered > 0, cells  # the burst was sent ...
        if tool == "none":  # ... and, but for the baseline, captured
            assert kernel == 0 and cells[COL["CPU ns/pkt"]] == "-", cells
            continue
        assert kernel > 0, cells
        assert cells[COL["CPU ns/pkt"]] != "-", cells
        assert cells[COL["kernel ns/pkt"]] != "-", cells  # measured against `none`
        assert (cells[COL["x tcpdump"]] == "-") == (tool == "tcpdump"), cells
        fanoutd = tool.startswith("fanoutd")
        assert (cells[COL["pkts/batch"]] != "-") == fanoutd, cells
        assert (cells[COL["busiest worker %"]] != "-") == (tool == "fanoutd2"), cells


def test_latency_and_memory_figures(quick_run):
    stdout, _, _ = quick_run
    assert re.search(r"^latency injection -> subscriber: p50 [\d.]+ ms, p99 [\d.]+ ms, "
                     r"max [\d.]+ ms", stdout, re.M), stdout
    for tool in ("fanoutd1", "fanoutd2"):
        for size in SIZES:
            assert re.search(rf"^memory {tool} {size} B: largest worker [\d.]+ MiB resident "
                             r"besides its ring \(RssAnon [\d.]+ MiB\), proxy [\d.]+ MiB",
                             stdout, re.M), stdout
            # CPU by thread: the worker's main thread at least, the hop's share, and the
            # context switches per batch
            assert re.search(rf"^threads {tool} {size} B: .*\bfanoutd-w0 [\d,]+\b.* ns/pkt; "
                             r"the hop \(.*\) \d+ % of the tree's CPU; [\d.]+ context "
                             r"switches per batch, all threads$", stdout, re.M), stdout


def test_writes_the_markdown_and_the_chart(quick_run):
    _, md, png = quick_run
    text = md.read_text()
    assert "<!-- capture_bench:begin -->" in text and "<!-- capture_bench:end -->" in text
    assert "| " + " | ".join(COLUMNS) + " |" in text
    # every fanoutd tool run at both sizes
    assert sum(1 for line in text.splitlines() if line.startswith("| fanoutd")) == 4
    assert "](img/chart.png)" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
