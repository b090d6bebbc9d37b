"""CPU time, memory and process groups from /proc, for the capture benchmark: what each
tool's process tree spent, by pid and start time so a recycled pid is never counted."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import netlab  # tests/netlab.py: namespace, daemon, metrics, /proc helpers

REPO = Path(__file__).resolve().parent.parent

CLK_TCK = os.sysconf("SC_CLK_TCK")
NS_PER_TICK = 1_000_000_000 // CLK_TCK


class BenchError(RuntimeError):
    """The benchmark itself could not run (a tool did not start, trafgen failed...)."""


# --------------------------------------------------------------------------- /proc


Ident = tuple[int, int]  # (pid, start time): a recycled pid is never taken for another


@dataclass(frozen=True)
class ProcCpu:
    """CPU time of one process, read two ways from /proc."""

    ticks: int  # utime + stime of all its threads, exited ones included (/proc/PID/stat)
    threads: dict[int, int]  # tid -> ns on CPU of each live thread (task/TID/schedstat)
    names: dict[int, str] = field(default_factory=dict)  # tid -> "process/thread" name
    # tid -> times each live thread was put on a CPU (schedstat's third field): its
    # context switches in, wake-ups and preemptions alike
    slices: dict[int, int] = field(default_factory=dict)


def proc_cpu(pid: int) -> tuple[Ident, ProcCpu] | None:
    """(identity, CPU time) of a process; None once it is gone."""
    try:
        rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        tids = os.listdir(f"/proc/{pid}/task")
    except (OSError, IndexError):
        return None
    threads, names, slices = {}, {}, {}
    comm = _comm(pid, pid)
    for tid in tids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
            threads[int(tid)], slices[int(tid)] = int(stat[0]), int(stat[2])
            names[int(tid)] = comm if int(tid) == pid else f"{comm}/{_comm(pid, int(tid))}"
    return (pid, int(rest[19])), ProcCpu(int(rest[11]) + int(rest[12]), threads, names,
                                         slices)


def _comm(pid: int, tid: int) -> str:
    try:
        return Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    except OSError:
        return "?"


def cpu_by_thread(before: dict[Ident, ProcCpu], after: dict[Ident, ProcCpu],
                  what: str = "threads") -> dict[str, int]:
    """CPU ns used between the snapshots (what="slices": times put on a CPU), by thread
    name ("fanoutd-w0", "fanoutd-proxy/ZMQbg/IO/0"): threads of one name in several
    processes add up. Threads that exited in between are missing (cpu_delta_ns counts
    their CPU time by ticks)."""
    out: dict[str, int] = {}
    for ident, a in after.items():
        b = getattr(before.get(ident, ProcCpu(0, {})), what)
        for tid, value in getattr(a, what).items():
            name = a.names.get(tid, "?")
            out[name] = out.get(name, 0) + value - b.get(tid, 0)
    return out


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
    """A process's memory in KiB: VmRSS, VmHWM (the peak of VmRSS) and RssAnon
    (/proc/PID/status), and `ring`, the resident size of its packet-socket mappings
    (`socket:[inode]` in /proc/PID/smaps: the TPACKET ring, kernel memory mapped in)."""
    out = {"VmRSS": 0, "VmHWM": 0, "RssAnon": 0, "ring": 0}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon"):
                out[key] = int(value.split()[0])
    with contextlib.suppress(OSError):
        in_socket = False
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                in_socket = line.rstrip().endswith("]") and " socket:[" in line
            elif in_socket and line.startswith("Rss:"):
                out["ring"] += int(line.split()[1])
    return out



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


# --------------------------------------------------------------------------- entry point

EXIT_FAILED = 3  # the run itself failed (not a figure that fell short)
# run_benchmark's statuses, for a benchmark's --help (argparse's epilog)
EXIT_STATUSES = ("Exit status: 0 done, 2 usage error, 3 the benchmark could not run, "
                 "130 interrupted.")


def interrupt(signum: int, frame: object) -> None:
    """Ctrl-C or SIGTERM: stop the run, and ignore both from now on so that a second one
    cannot cut the clean-up (the `finally` blocks and exit stacks) short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def run_benchmark(script: str, run: Callable[[object, str], int], args: object,
                  argv: list[str] | None) -> int:
    """A benchmark's main: run(args, the command line as typed) with Ctrl-C and SIGTERM
    stopping it cleanly (130), and its failures one line on stderr (EXIT_FAILED)."""
    command = f"sudo .venv/bin/python benchmarks/{script} " + " ".join(
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
        print(f"{script.removesuffix('.py')}: {e}", file=sys.stderr)
        return EXIT_FAILED
