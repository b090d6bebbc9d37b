"""The hop from worker to subscriber, alone: CPU per batch of three transports.

    sudo .venv/bin/python benchmarks/hop_bench.py                 # about a minute
    sudo .venv/bin/python benchmarks/hop_bench.py --sizes 2000,200000 --runs 5

A worker process sends batches of random bytes at a fixed rate (a capture worker sends
one batch per ring block, ~100-500 a second); a subscriber receives them over TCP. What
lies between is the transport under test:

* `ipc`: fanoutd's design until the outbox (fanoutd/outbox.py): the worker PUSHes over
  ipc to a proxy process that PULLs and sends on its XPUB (without fanoutd's checks and
  acknowledgements: the bare ZeroMQ cost);
* `shm`: close to fanoutd's design since (without its checks): the worker copies each
  batch into a slot of shared memory and signals an eventfd; the proxy sends the slot on
  its XPUB and hands the slot back through another eventfd (fanoutd's outbox hands it
  back through a counter in the shared memory instead);
* `direct`: the worker sends on its own XPUB: no hop at all, the floor.

Every process's CPU time (all its threads: ZeroMQ's I/O thread included) comes from
wait4() when it exits, so ticks do not blur it. The worker and the proxy share CPU 1,
the subscriber runs on CPU 0, as in benchmarks/capture_bench.py. Everything runs in a
network namespace this script creates (loopback only) and deletes at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import statistics
import struct
import subprocess
import sys
import time
import uuid

import zmq

TRANSPORTS = ("ipc", "shm", "direct")
SLOTS = 16  # shm: batches in flight between worker and proxy
TOPIC = b"fanoutd.batch.bench.0"
PORT = 7440


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=1000, help="batches per run (default: 1000)")
    p.add_argument("--rate", type=float, default=200.0,
                   help="batches per second the worker sends (default: 200)")
    p.add_argument("--sizes", default="2000,200000",
                   help="comma-separated batch sizes in bytes (default: 2000,200000)")
    p.add_argument("--runs", type=int, default=3, help="runs of each case; the median is "
                   "shown with the spread (default: 3)")
    p.add_argument("--transports", default=",".join(TRANSPORTS),
                   help=f"comma-separated, from {', '.join(TRANSPORTS)} (default: all)")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.transports = args.transports.split(",")
    if any(t not in TRANSPORTS for t in args.transports):
        p.error(f"--transports: choose from {', '.join(TRANSPORTS)}")
    return args


# --------------------------------------------------------------------------- processes


def worker(transport: str, n: int, rate: float, size: int, shm: mmap.mmap,
           ready: int, done: int, ipc: str) -> None:
    ctx = zmq.Context()
    sock = None
    if transport == "ipc":
        sock = ctx.socket(zmq.PUSH)
        sock.connect(ipc)
    elif transport == "direct":
        sock = ctx.socket(zmq.XPUB)
        sock.bind(f"tcp://127.0.0.1:{PORT}")
        sock.recv()  # the subscription: the subscriber is there
    body = os.urandom(size)
    time.sleep(0.5)  # the subscriber connects through the proxy meanwhile
    in_flight = 0
    start = time.monotonic()
    for i in range(n):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if transport == "shm":
            while in_flight >= SLOTS:
                in_flight -= os.eventfd_read(done)
            at = (i % SLOTS) * (size + 8)
            struct.pack_into("<Q", shm, at, size)
            shm[at + 8:at + 8 + size] = body
            os.eventfd_write(ready, 1)
            in_flight += 1
        else:
            assert sock is not None
            sock.send_multipart((TOPIC, body))
    if sock is not None:
        sock.close(linger=5000)
    ctx.term()


def proxy(transport: str, n: int, size: int, shm: mmap.mmap, ready: int, done: int,
          ipc: str) -> None:
    ctx = zmq.Context()
    xpub = ctx.socket(zmq.XPUB)
    xpub.bind(f"tcp://127.0.0.1:{PORT}")
    poller = zmq.Poller()
    poller.register(xpub, zmq.POLLIN)
    pull = None
    if transport == "ipc":
        pull = ctx.socket(zmq.PULL)
        pull.bind(ipc)
        poller.register(pull, zmq.POLLIN)
    else:
        poller.register(ready, zmq.POLLIN)
    sent = 0
    view = memoryview(shm)
    while sent < n:
        events = dict(poller.poll(1000))
        if xpub in events:
            xpub.recv()
        if pull is not None and pull in events:
            while True:
                try:
                    frames = pull.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                xpub.send(frames[0], zmq.SNDMORE, copy=False)
                xpub.send(frames[1], copy=False)
                sent += 1
        elif ready in events:
            try:
                count = os.eventfd_read(ready)
            except BlockingIOError:
                continue
            for _ in range(count):
                at = (sent % SLOTS) * (size + 8)
                length, = struct.unpack_from("<Q", shm, at)
                xpub.send(TOPIC, zmq.SNDMORE)
                xpub.send(view[at + 8:at + 8 + length], copy=True)
                sent += 1
            os.eventfd_write(done, count)
    view.release()
    if pull is not None:
        pull.close()
    xpub.close(linger=5000)
    ctx.term()


def subscriber(n: int) -> None:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{PORT}")
    for _ in range(n):
        sub.recv_multipart(copy=False)
    ctx.destroy(linger=0)


def fork(cpu: int, fn, *args) -> int:
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.sched_setaffinity(0, {cpu})
            fn(*args)
            status = 0
        finally:
            os._exit(status)
    return pid


def one_run(transport: str, size: int, args: argparse.Namespace) -> dict[str, float]:
    """CPU seconds per batch of each process, for one run."""
    shm = mmap.mmap(-1, SLOTS * (size + 8))
    ready, done = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0)
    ipc = f"ipc:///tmp/fo-hop-{uuid.uuid4().hex[:8]}"
    pids = {"subscriber": fork(0, subscriber, args.batches)}
    if transport != "direct":
        pids["proxy"] = fork(1, proxy, transport, args.batches, size, shm, ready, done, ipc)
    pids["worker"] = fork(1, worker, transport, args.batches, args.rate, size, shm, ready,
                          done, ipc)
    cpu = {}
    deadline = time.monotonic() + args.batches / args.rate + 60
    try:
        while pids and time.monotonic() < deadline:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
            if pid == 0:
                time.sleep(0.05)
                continue
            name = next(k for k, v in pids.items() if v == pid)
            del pids[name]
            if status != 0:
                raise RuntimeError(f"{transport} {size} B: the {name} failed ({status})")
            cpu[name] = (usage.ru_utime + usage.ru_stime) / args.batches
        if pids:
            raise RuntimeError(f"{transport} {size} B: {', '.join(pids)} did not finish")
    finally:
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
                os.waitpid(pid, 0)
        os.close(ready)
        os.close(done)
    return cpu


def cell(runs: list[dict[str, float]], name: str) -> str:
    """Microseconds per batch: the median over runs, and [min..max]."""
    values = [r[name] * 1e6 for r in runs if name in r]
    if not values:
        return "-"
    return f"{statistics.median(values):,.0f} [{min(values):,.0f}..{max(values):,.0f}]"


def inside(args: argparse.Namespace) -> int:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    print(f"{args.batches:,} batches at {args.rate:,.0f}/s per run; CPU microseconds per "
          f"batch, median of {args.runs} run(s) [min..max]; the hop is worker + proxy")
    print(f"{'transport':<10}{'batch B':>9}  {'worker':>16}{'proxy':>16}{'hop':>16}"
          f"{'subscriber':>16}")
    for size in args.sizes:
        for transport in args.transports:
            runs = [one_run(transport, size, args) for _ in range(args.runs)]
            for run in runs:
                run["hop"] = run["worker"] + run.get("proxy", 0.0)
            cells = [cell(runs, name) for name in ("worker", "proxy", "hop", "subscriber")]
            print(f"{transport:<10}{size:>9,}  " + "".join(f"{c:>16}" for c in cells),
                  flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.inside:
        return inside(args)
    if os.geteuid() != 0:
        print("hop_bench.py needs root (a network namespace of its own)", file=sys.stderr)
        return 3
    ns = f"fo-hop-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        return subprocess.run(["ip", "netns", "exec", ns, sys.executable, __file__,
                               "--inside", *(argv if argv is not None else sys.argv[1:])],
                              check=False).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    sys.exit(main())
