"""Soak fanoutd: numbered frames at a bounded rate, workers (and the proxy) SIGKILLed at
random, then count.

    sudo .venv/bin/python benchmarks/soak.py --seconds 60 --workers 2 --rate 20000 \\
        --kill-every 5 --kill-proxy-every 10

Everything happens inside a network namespace this script creates (a unique name) on the
veth pair inj0 <-> cap0 that exists only there: frames are written raw on inj0 and the
daemon captures on cap0. Nothing is sent on an interface of the root namespace, the
number of frames is bounded (rate x seconds) and so is every wait. The daemon and the
namespace are removed in a `finally`, also on Ctrl-C or SIGTERM.

Frame n carries its number twice: in its Ethernet source address (02:f0 + n as 32 bits)
and in its IPv4 source address (10.0.0.0 + n mod 2**24). A subscriber process counts how
often each number arrives, so the summary can say exactly which frames were delivered,
delivered twice, or never. The exit status is 1 when a frame was lost while the kernel
dropped nothing, or more frames were lost than the kernel and the veth dropped (a loss
fanoutd did not account for: unless the publisher counted batches lost to a subscriber
after a proxy restart or at a full queue), 3 when the run itself failed.

Not run in CI: it needs root, takes a while and loads both CPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import multiprocessing as mp
import os
import random
import re
import signal
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import frames as F  # tests/frames.py: frame builders
import netlab  # tests/netlab.py: namespace, injector, daemon, metrics

from fanoutd.client import Subscriber

ID_PREFIX = b"\x02\xf0"  # frames.mac(n): a locally administered MAC that carries n
IP_SRC_OFFSET = 14 + 12
UDP_SPORT_OFFSET = 14 + 20
EXIT_UNACCOUNTED_LOSS = 1
EXIT_RUN_FAILED = 3


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; every option has a default, so a bare run is a short soak."""
    p = argparse.ArgumentParser(
        description="Soak fanoutd inside a private network namespace: inject numbered "
                    "frames at a bounded rate, SIGKILL random workers, and report what "
                    "the subscriber received against what was sent and what the daemon "
                    "counted.",
        epilog="Exit status: 0 no unaccounted loss, 1 a frame was lost while the kernel "
               "dropped nothing, or more were lost than the kernel and the veth dropped, "
               "3 the run failed (daemon did not start or died), 130 interrupted.")
    p.add_argument("--seconds", type=float, default=20.0,
                   help="how long to inject frames (default: %(default)s)")
    p.add_argument("--rate", type=int, default=20_000,
                   help="frames per second to inject, at most (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2,
                   help="fanoutd worker processes (default: %(default)s)")
    p.add_argument("--fanout", choices=("lb", "hash"), default="lb",
                   help="fanout mode: lb round robin, hash by flow (default: %(default)s)")
    p.add_argument("--kill-every", type=float, default=5.0, metavar="S",
                   help="SIGKILL a random worker about every S seconds, jittered by "
                        "+-50%%; 0 never (default: %(default)s)")
    p.add_argument("--kill-proxy-every", type=float, default=0.0, metavar="S",
                   help="SIGKILL the proxy about every S seconds, jittered by +-50%%; 0 "
                        "never (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1,
                   help="seed of the kill schedule's random numbers (default: %(default)s)")
    p.add_argument("--block-size", type=int, default=1 << 20, metavar="BYTES",
                   help="ring block size per worker (default: %(default)s)")
    p.add_argument("--block-count", type=int, default=64, metavar="N",
                   help="ring blocks per worker (default: %(default)s)")
    p.add_argument("--block-timeout", type=int, default=10, metavar="MS",
                   help="ring block retire timeout; the ring covers a dead worker for about "
                        "block-count x this at low rates (default: %(default)s)")
    p.add_argument("--settle-timeout", type=float, default=30.0, metavar="S",
                   help="after injecting, wait at most this long for delivery to finish "
                        "(default: %(default)s)")
    p.add_argument("--quiet", type=float, default=2.0, metavar="S",
                   help="delivery has settled once nothing new arrived for this long with "
                        "every worker up (default: %(default)s)")
    args = p.parse_args(argv)
    if (args.seconds <= 0 or args.rate <= 0 or args.workers < 1 or args.kill_every < 0
            or args.kill_proxy_every < 0):
        p.error("--seconds and --rate must be positive, --workers at least 1, "
                "--kill-every and --kill-proxy-every 0 or more")
    if args.seconds * args.rate >= 1 << 32:
        p.error("--seconds x --rate must stay below 2**32 frames (the numbering space)")
    return args


# --------------------------------------------------------------------------- frames


def frame_template() -> bytearray:
    """A 60-byte Ethernet/IPv4/UDP frame to MAC_B (never cap0's own address, so the
    kernel captures it and then discards it: nothing in the namespace replies)."""
    frame = F.ipv4_frame("10.0.0.0", "192.0.2.2", 17, F.udp(1024, 2000, b"\x00" * 18),
                         eth_src=F.mac(0))
    assert len(frame) == 60
    return bytearray(frame)


def stamp(frame: bytearray, n: int) -> None:
    """Write number n into the frame: source MAC, IPv4 source and UDP source port."""
    struct.pack_into("!I", frame, 8, n)  # bytes 8..11: the last 4 of the source MAC
    struct.pack_into("!I", frame, IP_SRC_OFFSET, 0x0A000000 | (n & 0xFFFFFF))
    struct.pack_into("!H", frame, UDP_SPORT_OFFSET, 1024 + n % 60000)


def frame_number(eth_src: bytes | None, ip_src: bytes | None) -> int | None:
    """The number a row carries, or None for a frame this script did not send (or one
    whose two copies of the number disagree)."""
    if not eth_src or eth_src[:2] != ID_PREFIX or not ip_src or len(ip_src) != 4:
        return None
    n = int.from_bytes(eth_src[2:], "big")
    if int.from_bytes(ip_src[1:], "big") != n & 0xFFFFFF:
        return None
    return n


# --------------------------------------------------------------------------- subscriber


@dataclass
class Delivery:
    """What the subscriber process saw, sent back to the parent at the end."""

    rows: int = 0
    unique: int = 0  # distinct frame numbers received
    foreign_rows: int = 0  # rows that carry no number of ours
    batches: int = 0
    counts: bytearray = field(default_factory=bytearray)  # counts[n]: copies of frame n
    seqs: dict[int, dict[int, int]] = field(default_factory=dict)  # worker -> seq -> copies


def subscriber_main(endpoint: str, ctl: Connection, progress, ready) -> None:
    """The subscriber process: count every received row by its number until told to stop.

    Runs in its own process so decoding batches never competes with the injector for the
    GIL. `progress` (a shared int) is the number of distinct frame numbers received, for
    the parent's settle check; `ready` is set once the publisher's welcome message
    arrived. On b"stop" from `ctl` it sends the Delivery back through `ctl` and returns.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    got = Delivery()
    with Subscriber(endpoint, rcvhwm=1_000_000) as sub:
        if not sub.wait_ready(timeout=10):
            ctl.send(None)
            return
        ready.set()
        while True:
            for batch in sub.batches(timeout=0.05):
                count_batch(got, batch.worker, batch.seq, batch.fields, batch.packets)
                progress.value = got.unique
                if ctl.poll():
                    break
            if ctl.poll() and ctl.recv() == b"stop":
                break
    ctl.send(got)


def count_batch(got: Delivery, worker: int, seq: int, fields: list[str],
                packets: list[list]) -> None:
    """Add one batch to the tallies: its (worker, seq) and each row's frame number."""
    per_worker = got.seqs.setdefault(worker, {})
    per_worker[seq] = per_worker.get(seq, 0) + 1
    got.batches += 1
    got.rows += len(packets)
    i_mac, i_src = fields.index("eth_src"), fields.index("src")
    counts = got.counts
    for row in packets:
        n = frame_number(row[i_mac], row[i_src])
        if n is None:
            got.foreign_rows += 1
            continue
        if n >= len(counts):
            counts.extend(bytes(max(n + 1 - len(counts), 1 << 16)))
        if counts[n] == 0:
            got.unique += 1
        if counts[n] < 255:
            counts[n] += 1


# --------------------------------------------------------------------------- injection


@dataclass
class Plan:
    """The traffic and kill schedule of one run."""

    seconds: float
    rate: int
    kill_every: float
    rng: random.Random
    kill_proxy_every: float = 0.0
    kills: list[tuple[float, str]] = field(default_factory=list)  # (t, fanoutd-wN or -proxy)
    sent: int = 0
    send_retries: int = 0
    elapsed: float = 0.0


def inject_and_kill(plan: Plan, injector: netlab.Injector, daemon: netlab.Daemon) -> None:
    """Send numbered frames at plan.rate for plan.seconds, SIGKILLing a worker on schedule.

    Pacing: before each short sleep, send as many frames as are due by now (at most a
    burst of 2 ms worth), so the rate never exceeds plan.rate and the total never exceeds
    rate x seconds. An injector that falls behind stops one second after the planned end
    all the same. One thread does both jobs: no GIL contention, no locking.
    """
    frame = frame_template()
    total = int(plan.seconds * plan.rate)
    burst = max(1, plan.rate // 500)
    start = time.monotonic()
    end = start + plan.seconds + 1.0
    next_kill = start + next_kill_delay(plan) if plan.kill_every else float("inf")
    next_proxy_kill = (start + next_kill_delay(plan, plan.kill_proxy_every)
                       if plan.kill_proxy_every else float("inf"))
    sock = injector.sock
    while plan.sent < total and (now := time.monotonic()) < end:
        due = min(total, int((now - start) * plan.rate) + 1, plan.sent + burst)
        while plan.sent < due:
            stamp(frame, plan.sent)
            try:
                sock.send(frame)
            except OSError as e:  # a full socket buffer: retry the same frame shortly
                if e.errno not in (errno.ENOBUFS, errno.EAGAIN):
                    raise
                plan.send_retries += 1
                time.sleep(0.0005)
                continue
            plan.sent += 1
        if now >= next_kill:
            kill_random_worker(plan, daemon, now - start)
            next_kill = now + next_kill_delay(plan)
        if now >= next_proxy_kill:
            kill_child(plan, daemon, "fanoutd-proxy", now - start)
            next_proxy_kill = now + next_kill_delay(plan, plan.kill_proxy_every)
        time.sleep(0.001)
    plan.elapsed = time.monotonic() - start


def next_kill_delay(plan: Plan, every: float | None = None) -> float:
    """The time to the next kill: every (kill_every), jittered uniformly by +-50%."""
    return (plan.kill_every if every is None else every) * plan.rng.uniform(0.5, 1.5)


def kill_random_worker(plan: Plan, daemon: netlab.Daemon, t: float) -> None:
    """SIGKILL one of the supervisor's running worker children (fanoutd-wN), chosen at
    random; none is killed when every worker is between death and replacement."""
    workers = {comm: pid for comm, pid in daemon.children_by_comm().items()
               if comm.startswith("fanoutd-w")}
    if not workers:
        return
    kill_child(plan, daemon, plan.rng.choice(sorted(workers)), t)


def kill_child(plan: Plan, daemon: netlab.Daemon, comm: str, t: float) -> None:
    """SIGKILL the supervisor's child named comm, if it runs."""
    pid = daemon.children_by_comm().get(comm)
    if pid is None or netlab.proc_comm(pid) != comm:  # not there, or its pid was reused
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
        plan.kills.append((t, comm))


# --------------------------------------------------------------------------- settling


def wait_settled(daemon: netlab.Daemon, workers: int, sent: int, progress,
                 timeout: float, quiet: float) -> tuple[float, str]:
    """Wait until delivery is over; return (seconds waited, why it stopped waiting).

    Over means: every frame sent has arrived at least once (then a short extra wait
    catches late duplicates), or nothing new arrived for `quiet` seconds while every
    worker is up (a worker in restart backoff still has frames in its ring, so its
    absence is never taken for the end). Bounded by `timeout`.
    """
    start = time.monotonic()
    last_seen, last_change = progress.value, start
    while (now := time.monotonic()) - start < timeout:
        seen = progress.value
        if seen != last_seen:
            last_seen, last_change = seen, now
        if seen >= sent:
            time.sleep(min(0.5, quiet))
            return time.monotonic() - start, "every frame arrived"
        if now - last_change >= quiet:
            m = daemon.try_metrics()
            if m is not None and netlab.metric_sum(m, "fanoutd_workers_up") == workers:
                return now - start, f"nothing new for {quiet:g} s, all workers up"
        time.sleep(0.1)
    return time.monotonic() - start, f"gave up after {timeout:g} s"


# --------------------------------------------------------------------------- report


def veth_drops(ns: netlab.NetNS) -> int:
    """Frames the veth pair itself dropped (inj0 tx + cap0 rx): they never reached the
    daemon's sockets, so neither the kernel's tp_drops nor fanoutd counts them."""
    total = 0
    for ifname, key in (("inj0", "tx_dropped"), ("cap0", "rx_dropped")):
        with contextlib.suppress(OSError, ValueError):
            total += int(ns.exec("cat", f"/sys/class/net/{ifname}/statistics/{key}"))
    return total


def lost_batches(seqs: dict[int, dict[int, int]]) -> tuple[int, int]:
    """(batches missing from the seq sequences, batches received more than once)."""
    missing = dup = 0
    for per_worker in seqs.values():
        if per_worker:
            missing += max(per_worker) + 1 - len(per_worker)
            dup += sum(1 for c in per_worker.values() if c > 1)
    return missing, dup


def summarize(args: argparse.Namespace, plan: Plan, got: Delivery, metrics: dict,
              veth: int, settle: tuple[float, str], daemon_log: str,
              daemon_running: bool) -> int:
    """Print the summary and return the exit status."""
    def total(name: str) -> int:
        return int(netlab.metric_sum(metrics, name))

    counts = bytes(got.counts[:plan.sent]).ljust(plan.sent, b"\x00")  # copies of frame n
    lost = counts.count(0)
    delivered_unique = plan.sent - lost
    duplicated = plan.sent - lost - counts.count(1)
    beyond = len(got.counts[plan.sent:]) - got.counts[plan.sent:].count(0)  # never sent
    missing_batches, dup_batches = lost_batches(got.seqs)
    kernel_drops = total("fanoutd_kernel_drops_total")
    delays = [float(d) for d in re.findall(r"restarting in ([0-9.]+) s", daemon_log)]
    first_lost = counts.find(0)
    publish_drops = total("fanoutd_publish_drops_total")
    unaccounted = lost - kernel_drops - veth  # a frame the kernel dropped is lost for sure
    # Batches the publisher counted as lost to a subscriber (after a proxy restart, at a
    # full queue): their frames are accounted for, though not one by one.
    publisher_lost = (total("fanoutd_restart_unwatched_batches_total")
                      + total("fanoutd_subscriber_overflows_total"))

    def line(label: str, value: object, note: str = "") -> None:
        text = f"{value:,}" if isinstance(value, int) else str(value)
        print(f"  {label:<34} {text:>12}{('  ' + note) if note else ''}")

    print(f"fanoutd soak: {args.seconds:g} s at {args.rate:,} frames/s, {args.workers} "
          f"workers, fanout {args.fanout}, ring {args.block_count} x {args.block_size:,} B, "
          f"block timeout {args.block_timeout} ms, "
          + (f"a SIGKILL every ~{args.kill_every:g} s (seed {args.seed})" if args.kill_every
             else "no kills")
          + (f", the proxy's every ~{args.kill_proxy_every:g} s" if args.kill_proxy_every
             else ""))
    line("frames sent", plan.sent, f"in {plan.elapsed:.1f} s, "
         f"{plan.sent / max(plan.elapsed, 1e-9):,.0f}/s, {plan.send_retries} send retries")
    line("children SIGKILLed", len(plan.kills),
         " ".join(f"{c.removeprefix('fanoutd-')}@{t:.1f}s" for t, c in plan.kills[:12])
         + (" ..." if len(plan.kills) > 12 else ""))
    line("kernel packets", total("fanoutd_kernel_packets_total"))
    line("kernel drops", kernel_drops)
    line("kernel freezes", total("fanoutd_kernel_freezes_total"))
    line("veth drops (never captured)", veth)
    line("decoded", total("fanoutd_packets_decoded_total"))
    line("decode errors", total("fanoutd_decode_errors_total"))
    line("blocks skipped", total("fanoutd_blocks_skipped_total"))
    line("batches published", total("fanoutd_batches_published_total"))
    line("publish drops", publish_drops)
    line("worker restarts", total("fanoutd_worker_restarts_total"),
         f"longest restart delay {max(delays, default=0):g} s")
    line("proxy restarts", total("fanoutd_proxy_restarts_total"))
    line("batches unwatched after restarts", total("fanoutd_restart_unwatched_batches_total"))
    line("subscriber queue overflows", total("fanoutd_subscriber_overflows_total"))
    line("batches received", got.batches, f"{got.rows:,} rows")
    line("frames delivered (unique)", delivered_unique)
    line("frames duplicated", duplicated, f"delivered more than once; {dup_batches:,} "
         "batches received twice")
    line("frames lost", lost, "" if first_lost < 0 else f"sent but never delivered; "
         f"first #{first_lost}")
    line("frames lost beyond drops", max(0, unaccounted), "lost - kernel drops - veth drops")
    line("batches lost (seq gaps)", missing_batches)
    line("foreign rows", got.foreign_rows + beyond, "rows not matching a frame sent")
    print(f"  settled after {settle[0]:.1f} s: {settle[1]}")
    if not daemon_running:
        print("FAIL: the daemon was not running at the end\n" + daemon_log[-2000:])
        return EXIT_RUN_FAILED
    overflows = total("fanoutd_subscriber_overflows_total")
    if unaccounted > 0 and publisher_lost:
        # A full queue is counted once per run of batches it loses: no exact check then.
        if not overflows and missing_batches > publish_drops + publisher_lost:
            print(f"FAIL: {missing_batches:,} batches missing, {publish_drops:,} publish "
                  f"drops and {publisher_lost:,} batches unwatched after proxy restarts")
            return EXIT_UNACCOUNTED_LOSS
        print(f"OK: {lost:,} frames lost: the kernel dropped {kernel_drops:,}, and the "
              f"publisher counted {publisher_lost:,} batches lost to the subscriber (after "
              f"a proxy restart or at a full queue)")
        return 0
    if lost and kernel_drops == 0:
        print(f"FAIL: {lost:,} frames lost while the kernel dropped none "
              f"(veth drops {veth:,}, publish drops {publish_drops:,})")
        return EXIT_UNACCOUNTED_LOSS
    if unaccounted > 0:
        print(f"FAIL: {unaccounted:,} of the {lost:,} frames lost are beyond the kernel's "
              f"{kernel_drops:,} drops and the veth's {veth:,} (publish drops "
              f"{publish_drops:,})")
        return EXIT_UNACCOUNTED_LOSS
    if lost:
        print(f"OK: {lost:,} frames lost, all of them dropped by the kernel (ring full)"
              + (" or the veth" if veth else ""))
    else:
        print("OK: every frame sent was delivered")
    return 0


# --------------------------------------------------------------------------- main


def raise_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM ends the run like Ctrl-C, so the finally blocks clean up."""
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """Build the lab, run the soak, print the summary; tear everything down in any case."""
    ctx = mp.get_context("fork")  # before any thread exists in this process
    parent_ctl, child_ctl = ctx.Pipe()
    progress = ctx.Value("q", 0, lock=False)
    ready = ctx.Event()
    sub_proc = None
    with contextlib.ExitStack() as stack:
        try:
            ns = stack.enter_context(netlab.NetNS(prefix="fo-soak"))
            wd = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fo-soak-")))
            (wd / "run").mkdir()
            extra = ("--block-size", str(args.block_size),
                     "--block-count", str(args.block_count),
                     "--block-timeout", str(args.block_timeout),
                     "--runtime-dir", str(wd / "run"))
            daemon = netlab.Daemon(ns, wd, workers=args.workers, fanout=args.fanout,
                                   extra=extra)
            stack.callback(daemon.kill)  # runs before the namespace is deleted
            print(f"namespace {ns.name}: starting {' '.join(daemon.argv[4:])}", flush=True)
            daemon.start()
            daemon.wait_ready(timeout=30)

            sub_proc = ctx.Process(target=subscriber_main, name="soak-subscriber",
                                   args=(daemon.endpoint, child_ctl, progress, ready))
            sub_proc.start()
            stack.callback(netlab.stop_child_process, sub_proc)
            if not ready.wait(15):
                print("the subscriber got no welcome message\n" + daemon.logs())
                return EXIT_RUN_FAILED

            plan = Plan(args.seconds, args.rate, args.kill_every, random.Random(args.seed),
                        args.kill_proxy_every)
            with netlab.Injector(ns) as injector:
                inject_and_kill(plan, injector, daemon)
            settle = wait_settled(daemon, args.workers, plan.sent, progress,
                                  args.settle_timeout, args.quiet)
            daemon_running = daemon.proc is not None and daemon.proc.poll() is None
            metrics = daemon.try_metrics() or {}
            parent_ctl.send(b"stop")
            if not parent_ctl.poll(30):
                print("the subscriber did not report back")
                return EXIT_RUN_FAILED
            got = parent_ctl.recv()
            return summarize(args, plan, got, metrics, veth_drops(ns), settle,
                             daemon.stderr_text(), daemon_running)
        except KeyboardInterrupt:
            print("\ninterrupted: cleaning up", file=sys.stderr)
            return 130
        except (netlab.WaitTimeout, RuntimeError, OSError) as e:
            print(f"soak failed: {e}", file=sys.stderr)
            return EXIT_RUN_FAILED
        finally:  # clean-up (the stack unwinding) must not be cut short by another signal
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("soak.py needs root (network namespaces, AF_PACKET): run it with sudo",
              file=sys.stderr)
        return EXIT_RUN_FAILED
    signal.signal(signal.SIGTERM, raise_on_sigterm)
    try:
        return run(args)
    except KeyboardInterrupt:  # a second Ctrl-C during clean-up
        return 130


if __name__ == "__main__":
    sys.exit(main())
