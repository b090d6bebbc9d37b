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
TOOLS = ("fanoutd1", "fanoutd2", "tcpdump", "scapy")
SIZES = (64, 512)
NUMBER = r"(?:-|-?[\d,]+(?:\.\d+)?)"  # a figure as printed (a difference may be < 0); "-": n/a

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
        [sys.executable, str(SCRIPT), "--quick", "--write-docs", "--markdown", str(md),
         "--chart", str(png)],
        capture_output=True, text=True, timeout=240, cwd=ROOT, stdin=subprocess.DEVNULL,
        check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, md, png


def table_rows(stdout: str) -> dict[tuple[str, int], list[str]]:
    """{(tool, size): cells} from the table printed at the end."""
    rows = {}
    for line in stdout.splitlines():
        cells = line.split()
        if cells and cells[0] in TOOLS and len(cells) == 14 and cells[1].isdigit():
            rows[(cells[0], int(cells[1]))] = cells
    return rows


def test_table_has_a_row_of_figures_per_tool_and_size(quick_run):
    stdout, _, _ = quick_run
    rows = table_rows(stdout)
    assert set(rows) == {(t, s) for t in TOOLS for s in SIZES}, stdout
    for (tool, _size), cells in rows.items():
        for cell in cells[2:]:
            assert re.fullmatch(NUMBER, cell), (tool, cells)
        offered, kernel = (int(c.replace(",", "")) for c in (cells[2], cells[4]))
        assert offered > 0 and kernel > 0, cells  # the burst was sent and captured
        assert cells[9] != "-", cells  # CPU ns/pkt
        assert (cells[11] == "-") == (tool == "tcpdump"), cells  # the ratio to tcpdump


def test_latency_and_memory_figures(quick_run):
    stdout, _, _ = quick_run
    assert re.search(r"^latency injection -> subscriber: p50 [\d.]+ ms, p99 [\d.]+ ms, "
                     r"max [\d.]+ ms", stdout, re.M), stdout
    for tool in ("fanoutd1", "fanoutd2"):
        for size in SIZES:
            assert re.search(rf"^memory {tool} {size} B: largest worker [\d.]+ MiB resident "
                             r"besides its ring \(RssAnon [\d.]+ MiB\)", stdout, re.M), stdout


def test_writes_the_markdown_and_the_chart(quick_run):
    _, md, png = quick_run
    text = md.read_text()
    assert "<!-- capture_bench:begin -->" in text and "<!-- capture_bench:end -->" in text
    assert "| tool | frame B | offered |" in text
    # every fanoutd tool (the 7 fanoutd* of capture_tools.TOOLS) at both sizes
    assert sum(1 for line in text.splitlines() if line.startswith("| fanoutd")) == 14
    assert "](img/chart.png)" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
