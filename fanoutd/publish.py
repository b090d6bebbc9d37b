"""ZeroMQ: the worker's batch publisher and the proxy that fronts the public endpoint.

Workers push their batches to the proxy over ipc in the runtime directory; the proxy's
XPUB binds the public endpoint, so subscribers connect to one address whatever the worker
count. Every message a subscriber sees is [topic, msgpack body] (docs/wire-format.md).

Worker -> proxy is PUSH/PULL, not PUB/XSUB as first drawn in DESIGN.md: a PUB socket
silently discards what it sends before the proxy's subscription reaches it (every new or
replaced worker, every proxy restart), which would lose batches at the very moments a
worker is replaced. PUSH queues them until the proxy is there. Sends are NOBLOCK, so a full
queue (the high-water mark) refuses the batch instead of stalling capture, and the worker
counts it; `seq` shows subscribers the gap. Each message carries an envelope frame (ring
id, block seq) that the proxy checks (only the ring's worker may send for it, on its
topic) and strips: it reports back through the shared RingTable which blocks it has
passed on, and only then does the worker hand the block back to the kernel (see
worker.py).

The proxy's public XPUB keeps ZeroMQ's per-subscriber drop at the high-water mark, so one
slow subscriber never holds back the others.
"""

import logging
import os
import signal
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import msgpack
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import monitor as zmq_monitor

from fanoutd import privileges
from fanoutd.config import CurveConfig
from fanoutd.memory import keep_large_allocations
from fanoutd.metrics import stats_message
from fanoutd.proctitle import set_process_name
from fanoutd.slotstats import ProxyStats, RingTable, StatsTable
from fanoutd.wire import HELLO, STATS_TOPIC, SUBSCRIBE_HELLO, batch_topic

ENVELOPE = struct.Struct("<HQ")  # ring id, kernel block seq: worker -> proxy only
EXIT_BOOT_FAILED = 3

log = logging.getLogger("fanoutd.proxy")


class BatchPublisher:
    """A worker's PUSH socket towards the proxy."""

    def __init__(self, ctx: zmq.Context, endpoint: str, iface: str, worker: int, ring_id: int,
                 sndhwm: int) -> None:
        self.iface = iface
        self.worker = worker
        self.ring_id = ring_id
        self.topic = batch_topic(iface, worker)
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, sndhwm)
        self.sock.setsockopt(zmq.LINGER, 2000)  # flush queued batches on a clean stop
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_CONNECTED
                                                    | zmq.EVENT_DISCONNECTED)
        self.connected = False
        self.sock.connect(endpoint)

    def _events(self, timeout_ms: int) -> None:
        while self.monitor.poll(timeout_ms):
            event = zmq_monitor.recv_monitor_message(self.monitor)["event"]
            self.connected = event == zmq.EVENT_CONNECTED
            timeout_ms = 0

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait until the connection to the proxy is up (a worker that drops privileges
        must connect first: the ipc socket is only root's)."""
        deadline = time.monotonic() + timeout_s
        while not self.connected and (left := deadline - time.monotonic()) > 0:
            self._events(int(left * 1000) + 1)
        return self.connected

    def lost_connection(self) -> bool:
        """True once the connection to the proxy has dropped (the proxy was replaced)."""
        self._events(0)
        return not self.connected

    def publish(self, block_seq: int, body: bytes) -> bool:
        """Send the batch of ring block block_seq (made by encoder.BlockEncoder); False
        when the high-water mark refused it.

        Towards the proxy the message has an envelope frame first (ring id, block_seq), so
        the proxy can tell the worker which blocks it has passed on; subscribers never see
        it. Sent as a copy: ZeroMQ's zero-copy send frees the object through pyzmq's
        garbage-collector thread, a thread wake-up per batch that costs more than the copy.
        """
        envelope = ENVELOPE.pack(self.ring_id, block_seq)
        try:
            self.sock.send_multipart((envelope, self.topic, body), flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close()
        self.sock.close()


class BindError(Exception):
    """An endpoint could not be bound; the message names its key and the reason."""


def _bind(sock: zmq.Socket, endpoint: str, key: str) -> None:
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as e:
        raise BindError(f"{key}: cannot bind {endpoint}: {e.strerror}") from None


class RefusalLog:
    """Warns of the subscribers the publisher refuses: once per client (address, key)
    and reason, again only after repeat_s (a refused client may retry all day), and at
    most `burst` warnings per `period_s`, so that a flood of refusals cannot fill the
    journal; how many were held back is told with the next warning."""

    def __init__(self, burst: int = 10, period_s: float = 60.0, repeat_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.period_s, self.repeat_s, self.clock = burst, period_s, repeat_s, clock
        self.refused_total = 0  # every refusal, logged or not
        self.held = 0  # clients not logged because of the rate limit, since the last warning
        self._warned: dict[tuple[str, str, str], float] = {}  # client -> when, oldest first
        self._window_start = float("-inf")
        self._window_warnings = 0

    def refused(self, address: str, client_key: str, reason: str) -> None:
        self.refused_total += 1
        now = self.clock()
        client = (address, client_key, reason)
        if now - self._warned.get(client, float("-inf")) < self.repeat_s:
            return
        if now - self._window_start >= self.period_s:
            self._window_start, self._window_warnings = now, 0
        if self._window_warnings >= self.burst:
            self.held += 1
            return
        self._window_warnings += 1
        self._warned.pop(client, None)
        self._warned[client] = now
        if len(self._warned) > 4096:  # bounded: forget the client warned of longest ago
            del self._warned[next(iter(self._warned))]
        held = (f" ({self.held} more refused clients were not logged, at most {self.burst} "
                f"per {self.period_s:g} s)" if self.held else "")
        self.held = 0
        log.warning("refused subscriber from %s, CURVE client key %s: %s%s",
                    address or "an unknown address", client_key, reason, held)


class _Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler thread, admitting the CURVE keys in clients_dir (any key
    without it) and logging the clients it refuses, with their address."""

    def __init__(self, ctx: zmq.Context, clients_dir: str | None) -> None:
        super().__init__(ctx)
        self.clients_dir = clients_dir
        # Loaded now, before privileges are dropped: z85 public keys.
        self.admitted = set(zmq.auth.load_certificates(clients_dir)) if clients_dir else None
        self.refusals = RefusalLog()
        self._address = ""

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # The key check (callback) is not told the client's address: remember it here.
        self._address = msg[3].decode(errors="replace") if len(msg) > 3 else ""
        await super().handle_zap_message(msg)

    def callback(self, domain: str, key: bytes) -> bool:
        """The credentials provider of configure_curve_callback: admit key or not."""
        if self.admitted is None or key in self.admitted:
            return True
        self.refusals.refused(self._address, key.decode(errors="replace"),
                              f"its key is not in {self.clients_dir}")
        return False


class RateLimitedLog:
    """At most one warning per key every period_s, telling how many were held back."""

    def __init__(self, period_s: float = 60.0) -> None:
        self.period_s = period_s
        self._last: dict[str, float] = {}
        self._held: Counter = Counter()

    def warn(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, float("-inf")) < self.period_s:
            self._held[key] += 1
            return
        self._last[key] = now
        held = self._held.pop(key, 0)
        suffix = f" ({held} more since the last warning)" if held else ""
        log.warning(message + suffix, *args)


class Proxy:
    """PULL (ipc, from the workers) -> XPUB (the public endpoint)."""

    def __init__(self, ctx: zmq.Context, backend: str, frontend: str, sndhwm: int,
                 rings: RingTable, stats: ProxyStats, curve: CurveConfig | None = None) -> None:
        self.rings = rings
        self.stats = stats
        self._pids: dict[str, int] = {}  # Peer-Address -> pid
        self.warnings = RateLimitedLog()
        self.authenticator: _Authenticator | None = None
        self.pull = ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, sndhwm)
        self.pull.setsockopt(zmq.LINGER, 0)
        _bind(self.pull, backend, "runtime_dir")
        self.xpub = ctx.socket(zmq.XPUB)
        self.xpub.setsockopt(zmq.SNDHWM, sndhwm)
        self.xpub.setsockopt(zmq.LINGER, 1000)
        # Every subscription reaches run_once (verbose), so a subscription to HELLO can be
        # answered with a HELLO once it is in effect (see run_once).
        self.xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        if curve is not None and curve.secret_key_file is not None:
            self._serve_curve(ctx, curve)
        _bind(self.xpub, frontend, "publish.endpoint")
        self.poller = zmq.Poller()
        self.poller.register(self.pull, zmq.POLLIN)
        self.poller.register(self.xpub, zmq.POLLIN)

    def _serve_curve(self, ctx: zmq.Context, curve: CurveConfig) -> None:
        """Encrypt the public endpoint with CURVE; with clients_dir, admit only the
        clients whose public keys are there (ZeroMQ's ZAP, run by pyzmq's authenticator
        thread) and log the others."""
        public, secret = zmq.auth.load_certificate(curve.secret_key_file)
        self.authenticator = _Authenticator(ctx, curve.clients_dir)
        self.authenticator.start()
        self.authenticator.configure_curve_callback(
            domain="*", credentials_provider=self.authenticator)
        self.xpub.curve_secretkey = secret
        self.xpub.curve_publickey = public
        self.xpub.curve_server = True

    def run_once(self, timeout_ms: int) -> None:
        """Forward what is waiting, without copying the frames, and tell each ring's
        worker which blocks were passed on."""
        events = dict(self.poller.poll(timeout_ms))
        if self.pull in events:
            for _ in range(1000):  # bounded, so the caller's loop keeps its pace
                try:
                    frames = self.pull.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._forward(frames)
        if self.xpub in events:
            while True:
                try:
                    message = self.xpub.recv(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                # XPUB hands a subscription up only once it is in its subscription tree:
                # a subscriber that subscribed to HELLO last (as fanoutd.client does) and
                # receives it knows that all its subscriptions are in effect. Others that
                # subscribed to HELLO get one more; they ignore it.
                if message == SUBSCRIBE_HELLO:
                    self.xpub.send(HELLO, flags=zmq.NOBLOCK)

    def _forward(self, frames: list[zmq.Frame]) -> None:
        reason = self._rejected(frames)
        if reason is not None:
            self.stats.add(f"rejected:{reason}")
            self.warnings.warn(reason, "dropped a message on the workers' socket: %s",
                               REJECTED_BECAUSE[reason])
            return
        self.xpub.send_multipart(frames[1:], copy=False)
        ring_id, block_seq = ENVELOPE.unpack(frames[0].buffer)
        if block_seq > self.rings.forwarded[ring_id]:
            self.rings.forwarded[ring_id] = block_seq

    def _rejected(self, frames: list[zmq.Frame]) -> str | None:
        """Why a message from the ipc socket is not a batch to forward, or None. Only the
        ring's worker may send for its ring: the process at the other end of the
        connection is the kernel's word (SO_PEERCRED, which libzmq reads when it accepts
        the connection and gives as Peer-Address, uid:gid:pid), and the supervisor names
        each ring's worker in the RingTable, out of the workers' reach."""
        if len(frames) != 3 or len(frames[0]) != ENVELOPE.size:
            return "malformed"
        ring_id, _ = ENVELOPE.unpack(frames[0].buffer)
        if ring_id >= self.rings.count or self.rings.pid[ring_id] == 0:
            return "malformed"
        if self._sender(frames[0]) != self.rings.pid[ring_id]:
            return "sender"
        if frames[1].bytes != self.rings.topic(ring_id):
            return "topic"
        return None

    def _sender(self, frame: zmq.Frame) -> int:
        """The pid of the process that sent frame (0 when unknown)."""
        try:
            address = frame.get("Peer-Address")
        except zmq.ZMQError:
            return 0
        pid = self._pids.get(address)
        if pid is None:
            tail = address.rsplit(":", 1)[-1]
            pid = int(tail) if tail.isdigit() else 0
            if len(self._pids) >= 4096:  # one entry per worker connection in practice
                self._pids.clear()
            self._pids[address] = pid
        return pid

    def send(self, topic: bytes, body: bytes) -> None:
        self.xpub.send_multipart((topic, body), flags=zmq.NOBLOCK)

    def close(self) -> None:
        self.pull.close()
        self.xpub.close()
        if self.authenticator is not None:
            self.authenticator.stop()


REJECTED_BECAUSE = {
    "malformed": "not a batch of a ring in use",
    "sender": "sent by a process that is not the ring's worker",
    "topic": "not on the ring's topic",
}


@dataclass(frozen=True)
class ProxyPlan:
    backend: str  # ipc endpoint the workers push to
    frontend: str  # the public endpoint
    sndhwm: int
    stats_interval_s: float
    user: str | None  # drop to this user once both endpoints are bound
    curve: CurveConfig


def run_proxy(plan: ProxyPlan, ready_fd: int, tables: list[tuple[str, StatsTable]],
              rings: RingTable, stats: ProxyStats) -> int:
    """The proxy process's main. Binds both endpoints and writes b"ok" (or the reason it
    could not) to ready_fd, drops privileges, then forwards batches (telling each ring's
    worker, through `rings`, what it passed on) and publishes the slots' counters and its
    own on the `stats` topic every stats_interval_s."""
    set_process_name("fanoutd-proxy")
    keep_large_allocations()  # batches pass through here too
    stopping = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    ctx = zmq.Context(1)
    try:
        proxy = Proxy(ctx, plan.backend, plan.frontend, plan.sndhwm, rings, stats,
                      plan.curve)
        if plan.user:
            privileges.become(plan.user)
    except (BindError, privileges.PrivilegeError, OSError) as e:
        os.write(ready_fd, str(e).encode())
        ctx.destroy(linger=0)
        return EXIT_BOOT_FAILED
    os.write(ready_fd, b"ok")
    os.close(ready_fd)
    next_stats = time.monotonic()
    supervisor = os.getppid()
    try:
        while not stopping and os.getppid() == supervisor:  # no orphan outlives it
            proxy.run_once(200)
            if time.monotonic() >= next_stats:
                for iface, table in tables:  # one message per interface
                    body = msgpack.packb(stats_message(iface, table, stats),
                                         use_bin_type=True)
                    proxy.send(STATS_TOPIC, body)
                next_stats = time.monotonic() + plan.stats_interval_s
        # The workers stop first and flush to us; pass on what they sent.
        for _ in range(10):
            proxy.run_once(20)
    finally:
        proxy.close()
        ctx.term()
    return 0
