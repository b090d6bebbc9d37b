"""The capture benchmark's traffic and tools: trafgen bursts, and each capture tool
(fanoutd with its subscriber process, tcpdump, scapy) started, measured and stopped."""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import netlab  # tests/netlab.py: namespace, daemon, metrics, /proc helpers
from proc_accounting import (
    BenchError,
    managed_process,
    proc_memory,
    stop_group,
    wait_for_text,
)

from fanoutd.client import Subscriber
from fanoutd.config import RingConfig

REPO = Path(__file__).resolve().parent.parent

GEN_CPU = 0  # trafgen (it pins its one sending process to CPU 0 itself) and the subscriber
CAP_CPU = 1  # every capture tool
# fanoutdN: N workers, version 2 batches (columns, the default); fanoutd1-rows: one worker
# publishing version 1 (rows), to compare the daemon's cost of the two formats;
# fanoutd1-top: one worker, and examples/top_talkers.py's work as the subscriber;
# fanoutd1-lb, fanoutd1-lb-rxhash, fanoutd1-norxhash: one worker in fanout mode lb or
# hash with ring.rxhash off or on, to measure what the flow hash costs the kernel; none:
# nothing captures, the baseline of the kernel's share (the generator's CPU per packet).
TOOLS = ("fanoutd1", "fanoutd2", "fanoutd1-rows", "fanoutd1-top", "fanoutd1-lb",
         "fanoutd1-lb-rxhash", "fanoutd1-norxhash", "tcpdump", "scapy", "none")
DST_MAC = "02:00:00:00:00:b2"  # not cap0's address: the frames are captured, then discarded
RING_MIB = RingConfig().geometry.size >> 20  # each fanoutd worker's default ring
TCPDUMP_BUFFER_KIB = RING_MIB * 1024  # tcpdump -B: the same ring size
FANOUTD_BLOCK_TIMEOUT_MS = 10  # fanoutd's default ring.block_timeout_ms (not passed)


# --------------------------------------------------------------------------- traffic


def flow_fields(flows: int) -> tuple[int, int]:
    """(source addresses, source ports) that make `flows` or a few more distinct flows
    when both step by one per frame: the address cycles through up to 65,536 values, the
    port through an odd number of values (coprime with the address's 2**k cycle, so the
    pairs do not repeat before addresses x ports frames)."""
    if flows <= 65536:
        return flows, 1
    ports = -(-flows // 65536)
    return 65536, ports + (ports % 2 == 0)


def trafgen_config(size: int, flows: int | None = None) -> str:
    """A trafgen packet configuration: one Ethernet/IPv4/UDP frame of `size` bytes whose
    IPv4 source (10.0.x.y, 65,536 values) and UDP source port (1024-65535) step by one per
    frame and whose destination port is random (1-1023): a new flow nearly every frame.
    With `flows`, exactly that many flows (see flow_fields) cycle, to port 53. trafgen
    fills in the lengths and checksums."""
    payload = size - 14 - 20 - 8
    if flows is None:
        sa, ports = "sa=10.0.0.0, sa[2:2]=dinc(0, 65535)", "sp=dinc(1024, 65535), dp=drnd(1, 1023)"
    else:
        n_addr, n_port = flow_fields(flows)
        sa = f"sa=10.0.0.0, sa[2:2]=dinc(0, {n_addr - 1})" if n_addr > 1 else "sa=10.0.0.1"
        sport = f"dinc(1024, {1024 + n_port - 1})" if n_port > 1 else "1024"
        ports = f"sp={sport}, dp=53"
    return ("{\n"
            f"  eth(da={DST_MAC}, sa={netlab.INJ_MAC}),\n"
            f"  ipv4({sa}, da=192.0.2.2, ttl=64),\n"
            f"  udp({ports}),\n"
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


class NoneTool(Tool):
    """Nothing captures: the generator's CPU per packet without any tool is the baseline
    that each tool's kernel share is measured against."""

    name = "none"

    def start(self) -> None:
        pass

    def cost_roots(self) -> list[int]:
        return []

    def end(self) -> Counts:
        return Counts(0, 0, 0)


def start_fanoutd(ns: netlab.NetNS, workdir: Path, stack: contextlib.ExitStack,
                  workers: int, extra: list[str]) -> netlab.Daemon:
    """`fanoutd run` on cap0 inside the namespace, pinned to CAP_CPU, with `workers`
    workers, the default ring and fanout, and `extra` options; killed when `stack`
    closes. Returns once every worker is up."""
    (workdir / "run").mkdir(exist_ok=True)
    d = netlab.Daemon(ns, workdir, workers=workers)
    d.argv = ["taskset", "-c", str(CAP_CPU), "ip", "netns", "exec", ns.name,
              sys.executable, "-m", "fanoutd", "run", "--interface", "cap0",
              "--workers", str(workers), "--publish", d.endpoint,
              "--metrics", f"127.0.0.1:{d.metrics_port}",
              "--runtime-dir", str(workdir / "run"), *extra]
    stack.callback(d.kill)
    d.start()
    try:
        d.wait_ready(timeout=30)
    except netlab.WaitTimeout as e:
        raise BenchError(str(e)) from None
    return d


class FanoutdTool(Tool):
    """`fanoutd run` on cap0 with N workers, its default ring and fanout (RING_MIB per
    worker, 10 ms block timeout, hash) unless `fanout` or `rxhash` say otherwise, plus a
    subscriber process draining the stream."""

    def __init__(self, ns: netlab.NetNS, workdir: Path, args: argparse.Namespace,
                 workers: int, latency: bool = False, wire_format: str = "columns",
                 top_talkers: bool = False, fanout: str | None = None,
                 rxhash: bool | None = None, name: str | None = None) -> None:
        super().__init__(ns, workdir, args)
        self.name = name or f"fanoutd{workers}" + ("-rows" if wire_format == "rows" else "") + (
            "-top" if top_talkers else "")
        self.fanout, self.rxhash = fanout, rxhash
        self.workers = workers
        self.wire_format = wire_format
        self.top_talkers = top_talkers
        self.latency = latency
        self.result: dict | None = None

    def start(self) -> None:
        extra = ["--format", self.wire_format]
        if self.fanout is not None:
            extra += ["--fanout", self.fanout]
        if self.rxhash is not None:
            extra += ["--rxhash", str(self.rxhash).lower()]
        d = self.daemon = start_fanoutd(self.ns, self.workdir, self.stack, self.workers,
                                        extra + self.args.fanoutd_args.split())
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
        per_worker = {}
        for labels, value in netlab.samples(after, "fanoutd_packets_decoded_total").items():
            worker = dict(labels)["worker"]
            before = netlab.metric_sum(self.before, "fanoutd_packets_decoded_total",
                                       worker=worker)
            per_worker[worker] = value - before
        total = sum(per_worker.values())
        # The busiest worker's share over a fair one: 1.00 is a perfect balance.
        balance = {"balance %": round(100 * max(per_worker.values()) * len(per_worker) / total)
                   } if total and len(per_worker) > 1 else {}
        return Counts(diff("fanoutd_kernel_packets_total"), diff("fanoutd_kernel_drops_total"),
                      self.result["rows"],
                      {"decoded": diff("fanoutd_packets_decoded_total"),
                       "batches": diff("fanoutd_batches_published_total"),
                       "publish drops": diff("fanoutd_publish_drops_total"),
                       "batches lost": self.result["lost_batches"], **balance})

    def memory(self) -> list[dict[str, int]]:
        return [{"comm": comm, **proc_memory(pid)}
                for comm, pid in sorted(self.daemon.children_by_comm().items())
                if re.fullmatch(r"fanoutd-(w\d+|proxy)", comm)]


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
    """scapy's sniff() on cap0 in a child process (capture_bench.py --scapy-child),
    counting packets in a callback (store=False), bounded by a timeout; the kernel
    counters are PACKET_STATISTICS of scapy's own socket."""

    name = "scapy"

    def start(self) -> None:
        self.log = self.workdir / "scapy.out"
        timeout = self.args.seconds + self.args.settle_timeout + 10  # bounded on its own too
        argv = ["taskset", "-c", str(CAP_CPU), "ip", "netns", "exec", self.ns.name,
                sys.executable, str(Path(__file__).with_name("capture_bench.py")), "--scapy-child",
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


# The variants that measure the flow hash: (fanout mode, ring.rxhash).
HASH_VARIANTS = {"fanoutd1-lb": ("lb", False), "fanoutd1-lb-rxhash": ("lb", True),
                 "fanoutd1-norxhash": ("hash", False)}


def make_tool(name: str, ns: netlab.NetNS, workdir: Path, args: argparse.Namespace) -> Tool:
    if name in HASH_VARIANTS:
        fanout, rxhash = HASH_VARIANTS[name]
        return FanoutdTool(ns, workdir, args, workers=1, fanout=fanout, rxhash=rxhash,
                           name=name)
    if name.startswith("fanoutd"):
        workers, _, fmt = name.removeprefix("fanoutd").partition("-")
        return FanoutdTool(ns, workdir, args, workers=int(workers),
                           wire_format="rows" if fmt == "rows" else "columns",
                           top_talkers=fmt == "top")
    return {"tcpdump": TcpdumpTool, "scapy": ScapyTool, "none": NoneTool}[name](
        ns, workdir, args)

