"""ZeroMQ: the worker's batch publisher and the proxy that fronts the public endpoint.

Workers publish to the proxy over ipc in the runtime directory; the proxy's XPUB binds the
public endpoint, so subscribers connect to one address whatever the worker count. Every
message is [topic, msgpack body] (docs/wire-format.md).

Back-pressure: PUB sockets drop silently at the high-water mark. The worker sets
ZMQ_XPUB_NODROP so a full queue refuses the send instead (EAGAIN, never blocking, since we
send with NOBLOCK), which lets it count each dropped batch; `seq` shows subscribers the gap.
The proxy's own public XPUB keeps the default per-subscriber drop, so one slow subscriber
never holds back the others.
"""

import os
import signal
import time

import msgpack
import zmq

from fanoutd.decode import FIELDS
from fanoutd.metrics import stats_message
from fanoutd.proctitle import set_process_name

WIRE_VERSION = 1
HELLO = b"fanoutd.hello"
STATS_TOPIC = b"stats"
EXIT_BOOT_FAILED = 3


def batch_topic(iface: str, worker: int) -> bytes:
    return f"pkt.{iface}.{worker}".encode()


def encode_batch(iface: str, worker: int, seq: int, rows: list) -> bytes:
    return msgpack.packb({"v": WIRE_VERSION, "iface": iface, "worker": worker, "seq": seq,
                          "fields": FIELDS, "packets": rows}, use_bin_type=True)


class BatchPublisher:
    """A worker's PUB socket towards the proxy."""

    def __init__(self, ctx: zmq.Context, endpoint: str, iface: str, worker: int,
                 sndhwm: int) -> None:
        self.iface = iface
        self.worker = worker
        self.topic = batch_topic(iface, worker)
        self.sock = ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.SNDHWM, sndhwm)
        self.sock.setsockopt(zmq.XPUB_NODROP, 1)
        self.sock.setsockopt(zmq.LINGER, 2000)  # flush queued batches on a clean stop
        self.sock.connect(endpoint)

    def publish(self, seq: int, rows: list) -> bool:
        """Send one batch; False when the high-water mark refused it."""
        body = encode_batch(self.iface, self.worker, seq, rows)
        try:
            self.sock.send_multipart((self.topic, body), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        return True

    def close(self) -> None:
        self.sock.close()


class Proxy:
    """XSUB (ipc, from the workers) -> XPUB (the public endpoint)."""

    def __init__(self, ctx: zmq.Context, backend: str, frontend: str, sndhwm: int) -> None:
        self.xsub = ctx.socket(zmq.XSUB)
        self.xsub.setsockopt(zmq.RCVHWM, sndhwm)
        self.xsub.setsockopt(zmq.LINGER, 0)
        self.xsub.bind(backend)
        # Take everything from the workers whatever the subscribers want: batches then
        # never wait on subscription propagation, and the welcome message below is an
        # exact signal that a subscriber is live.
        self.xsub.send(b"\x01")
        self.xpub = ctx.socket(zmq.XPUB)
        self.xpub.setsockopt(zmq.SNDHWM, sndhwm)
        self.xpub.setsockopt(zmq.LINGER, 1000)
        self.xpub.setsockopt(zmq.XPUB_WELCOME_MSG, HELLO)
        self.xpub.bind(frontend)
        self.poller = zmq.Poller()
        self.poller.register(self.xsub, zmq.POLLIN)
        self.poller.register(self.xpub, zmq.POLLIN)

    def run_once(self, timeout_ms: int) -> None:
        """Forward what is waiting, without copying the frames."""
        events = dict(self.poller.poll(timeout_ms))
        if self.xsub in events:
            for _ in range(1000):  # bounded, so the caller's loop keeps its pace
                try:
                    frames = self.xsub.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self.xpub.send_multipart(frames, copy=False)
        if self.xpub in events:
            while True:  # subscription messages: upstream already takes everything
                try:
                    self.xpub.recv(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break

    def send(self, topic: bytes, body: bytes) -> None:
        self.xpub.send_multipart((topic, body), flags=zmq.NOBLOCK)

    def close(self) -> None:
        self.xsub.close()
        self.xpub.close()


def run_proxy(backend: str, frontend: str, sndhwm: int, ready_fd: int, iface: str,
              slots: list, stats_interval_s: float) -> int:
    """The proxy process's main. Writes b"ok" or the bind error to ready_fd, then forwards,
    and publishes the slots' counters on the `stats` topic every stats_interval_s."""
    set_process_name("fanoutd-proxy")
    stopping = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    ctx = zmq.Context(1)
    try:
        proxy = Proxy(ctx, backend, frontend, sndhwm)
    except zmq.ZMQError as e:
        os.write(ready_fd, f"publish.endpoint: cannot bind {frontend}: {e.strerror}".encode())
        ctx.destroy(linger=0)
        return EXIT_BOOT_FAILED
    os.write(ready_fd, b"ok")
    os.close(ready_fd)
    next_stats = time.monotonic()
    try:
        while not stopping:
            proxy.run_once(200)
            if time.monotonic() >= next_stats:
                body = msgpack.packb(stats_message(iface, slots), use_bin_type=True)
                proxy.send(STATS_TOPIC, body)
                next_stats = time.monotonic() + stats_interval_s
        # The workers stop first and flush to us; pass on what they sent.
        for _ in range(10):
            proxy.run_once(20)
    finally:
        proxy.close()
        ctx.term()
    return 0
