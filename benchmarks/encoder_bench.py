"""The C encoder alone: CPU per packet to turn one ring block into one batch, on blocks of
crafted frames, with the cache warm (no ring, no kernel, no ZeroMQ).

    .venv/bin/python benchmarks/encoder_bench.py [--baseline REV] [--runs 7]

--baseline REV builds fanoutd/_fastpath.c as it is at git revision REV (with setup.py's
flags) and times it in the same process, round by round beside the working tree's, so
that the ratio is not at the mercy of a noisy machine. Prints, per traffic mix and
format: the median ns/packet, its spread over the runs, and the median of the per-round
ratios (this tree / baseline).
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import statistics
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path

import frames as f  # tests/frames.py: frame builders and the TPACKET_V3 block layout

from fanoutd import wire
from fanoutd.encoder import _fastpath
from fanoutd.memory import keep_large_allocations

REPO = Path(__file__).resolve().parent.parent
SOURCE = "fanoutd/_fastpath.c"
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]  # setup.py's
BLOCK_BYTES = 1 << 19  # the default ring.block_size
FORMAT_NAMES = {version: name for name, version in wire.FORMATS.items()}


def mixes() -> dict[str, list[bytes]]:
    """Traffic mixes, each a cycle of frames repeated to fill a block."""
    return {
        "udp4-64B": [f.udp4_frame(payload=b"\x00" * 18)],
        "tcp4": [f.tcp4_frame(sport=40000 + i, dport=443, flags=0x10) for i in range(4)],
        "mixed": list(f.CORPUS),
    }


def block_of(cycle: list[bytes]) -> tuple[bytes, int, int]:
    """As many frames of the cycle as a default block holds (at least one)."""
    ring_frames, used, i = [], 0, 0
    while True:
        frame = cycle[i % len(cycle)]
        need = f.tpacket_align(f.TP_MAC + len(frame))
        if used + need > BLOCK_BYTES - 64 and ring_frames:
            break
        ring_frames.append(f.RingFrame(frame))
        used += need
        i += 1
    block, first, num = f.tpacket3_block(ring_frames)
    return block, first, num


def build_baseline(rev: str, workdir: Path):
    """fanoutd/_fastpath.c at `rev`, compiled and loaded as a module of its own."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{SOURCE}"], check=True,
                            capture_output=True).stdout
    c_file = workdir / "_fastpath.c"
    c_file.write_bytes(source)
    so = workdir / ("_fastpath" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(["gcc", *CFLAGS, "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}",
                    str(c_file), "-o", str(so)], check=True)
    loader = importlib.machinery.ExtensionFileLoader("_fastpath", str(so))
    spec = importlib.util.spec_from_file_location("_fastpath", so, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def time_encoder(encode, block: bytes, first: int, num: int, prefix: bytes,
                 seconds: float) -> float:
    """ns per packet, encoding the block over and over for about `seconds`."""
    errors: dict = {}
    encode(block, first, num, 0, errors, prefix, 1)  # warm the caches and the buffers
    loops, start = 0, time.perf_counter_ns()
    deadline = start + int(seconds * 1e9)
    while (now := time.perf_counter_ns()) < deadline:
        for _ in range(10):
            encode(block, first, num, 0, errors, prefix, 1)
        loops += 10
    return (now - start) / (loops * num)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", metavar="REV",
                    help="also time the C encoder of this git revision")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=0.5, help="per encoder, mix and run")
    args = ap.parse_args()
    if _fastpath is None:
        raise SystemExit("fanoutd._fastpath is not built: nothing to time")
    keep_large_allocations()  # as a worker does: batches come from the heap
    encoders = {"tree": _fastpath}
    with tempfile.TemporaryDirectory(prefix="fo-encbench-") as tmp:
        if args.baseline:
            encoders["baseline"] = build_baseline(args.baseline, Path(tmp))
        fields = tuple(field.name for field in wire.fields_for(0))
        print(f"C encoder, {args.runs} runs x {args.seconds} s per mix"
              + (f"; baseline {args.baseline}" if args.baseline else ""))
        print(f"{'mix':<10} {'format':<8} {'pkts/block':>10} "
              + " ".join(f"{name + ' ns/pkt':>22}" for name in encoders)
              + (f" {'tree/baseline':>14}" if args.baseline else ""))
        for mix, cycle in mixes().items():
            block, first, num = block_of(cycle)
            for version, fn in ((wire.COLUMNS_VERSION, "encode_columns"),
                                (wire.ROWS_VERSION, "encode_batch")):
                prefix = wire.batch_prefix(version, "eth0", 0, 1, fields)
                times: dict[str, list[float]] = {name: [] for name in encoders}
                for _ in range(args.runs):
                    for name, module in encoders.items():
                        times[name].append(time_encoder(getattr(module, fn), block, first,
                                                        num, prefix, args.seconds))
                cells = []
                for name in encoders:
                    t = times[name]
                    cells.append(f"{statistics.median(t):8.1f} ({min(t):.1f}-{max(t):.1f})")
                line = f"{mix:<10} {FORMAT_NAMES[version]:<8} {num:>10} " + " ".join(
                    f"{c:>22}" for c in cells)
                if args.baseline:
                    ratios = [a / b for a, b in zip(times["tree"], times["baseline"], strict=True)]
                    line += f" {statistics.median(ratios):14.3f}"
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
