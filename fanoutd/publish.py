"""ZeroMQ: the worker's batch publisher and the proxy that fronts the public endpoint.

Workers push their batches to the proxy over ipc in the runtime directory; the proxy's
XPUB binds the public endpoint, so subscribers connect to one address whatever the worker
count. Every message a subscriber sees is [topic, msgpack body] (docs/wire-format.md).

Worker -> proxy is PUSH/PULL rather than PUB/XSUB because a PUB socket silently discards
what it sends before the proxy's subscription reaches it (every new or replaced worker,
every proxy restart), which would lose batches at the very moments a worker is replaced.
PUSH queues them until the proxy is there. Sends are NOBLOCK, so a full queue (the
high-water mark) refuses the batch instead of stalling capture, and the worker counts it;
`seq` shows subscribers the gap. How the proxy acknowledges what it passed on, and why a
worker holds each block until then: holding.py.

The public XPUB keeps ZeroMQ's per-subscriber drop at a full queue, so one slow subscriber
never holds back the others; the proxy bounds that queue in bytes and counts what it
drops. It applies every subscription itself (manual mode), so it refuses topics it never
publishes, sends the welcome to the connection that asked for it only, and closes
connections past the limits. After a restart it passes nothing on until the subscribers
of the proxy it replaced are back, or publish.restart_grace_ms is over (StartGate).
"""

import contextlib
import logging
import os
import signal
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import monitor as zmq_monitor

from fanoutd import __version__, exits, privileges, wire
from fanoutd.config import MAX_WORKERS, CurveConfig
from fanoutd.memory import release_freed_memory
from fanoutd.proctitle import set_process_name
from fanoutd.slotstats import ProxyStats, RingTable, StatsTable, publisher_report, worker_reports
from fanoutd.wire import BATCH_TOPIC_PREFIX, HELLO, STATS_TOPIC, batch_topic, max_batch_bytes

ENVELOPE = struct.Struct("<HQ")  # ring id, kernel block seq: worker -> proxy only

log = logging.getLogger("fanoutd.proxy")


def batch_context() -> zmq.Context:
    """A ZeroMQ context for the worker or the proxy: one I/O thread, run as SCHED_BATCH.

    Each batch the caller hands over wakes the I/O thread; as a normal thread it would
    preempt the caller on its CPU at once (a context switch there and another back),
    though the caller is about to sleep anyway. A SCHED_BATCH thread never preempts on
    waking (the scheduler's wake-up preemption is for SCHED_NORMAL only): it runs on the
    other CPU if that is idle, or when the caller sleeps. Measured: ~22 % fewer context
    switches per batch over both processes, docs/performance.md."""
    ctx = zmq.Context(1)
    ctx.set(zmq.THREAD_SCHED_POLICY, os.SCHED_BATCH)
    return ctx


class BatchPublisher:
    """A worker's PUSH socket towards the proxy."""

    def __init__(self, ctx: zmq.Context, endpoint: str, iface: str, worker: int, ring_id: int,
                 sndhwm: int, block_size: int) -> None:
        self.send_buffer = 2 * max_batch_bytes(block_size)
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
            message = zmq_monitor.recv_monitor_message(self.monitor)
            self.connected = message["event"] == zmq.EVENT_CONNECTED
            if self.connected:
                _widen_send_buffer(message["value"], self.send_buffer)
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
        """Send the batch of ring block block_seq (made by encoder.BlockEncoder) behind
        its envelope (holding.py); False when the high-water mark refused it.

        Sent as a copy: ZeroMQ's zero-copy send frees the object through pyzmq's
        garbage-collector thread, a thread wake-up per batch that costs more than the copy.
        """
        envelope = ENVELOPE.pack(self.ring_id, block_seq)
        try:
            self.sock.send_multipart((envelope, self.topic, body), flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def close(self, linger_ms: int | None = None) -> None:
        """linger_ms: how long to try to deliver what is queued (None: LINGER, 2 s)."""
        self.sock.disable_monitor()
        self.monitor.close()
        self.sock.close(linger=linger_ms)


def _widen_send_buffer(fd: int, size: int) -> None:
    """Let the kernel queue `size` bytes on the worker's connection to the proxy (two of
    the largest batches), where the default (net.core.wmem_default, 208 KiB) holds about
    one: a batch that does not fit wakes the worker's I/O thread again for the rest, once
    the proxy has read. libzmq sets no buffer size on ipc connections itself; fd is the
    connection's (the monitor's connected event names it). The worker is still root
    here: SO_SNDBUFFORCE, else (no CAP_NET_ADMIN, as under the systemd unit)
    SO_SNDBUF, which the kernel caps at net.core.wmem_max."""
    with socket.socket(fileno=os.dup(fd)) as conn:
        try:
            conn.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, size)
        except PermissionError:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)  # asm-generic/socket.h


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


# ---------------------------------------------------------------------------- subscribers

# The longest message a subscriber may send: a subscription is a topic (at most ~25 bytes
# for anything published), and the CURVE handshake's largest command (INITIATE) is under
# 300 bytes. libzmq drops a connection that sends a longer one.
MAX_INCOMING_BYTES = 512
SUBSCRIBER_RCVHWM = 100  # subscriptions queued from one connection before it must wait
UNWATCHED_WINDOW_S = 60.0  # after a restart, how long missing subscribers are waited for
INGRESS_QUEUE_BYTES = 16 << 20  # what the proxy queues from each worker, at most


def subscription_topics(topic: bytes, interfaces: list[bytes]) -> tuple[bytes, ...] | None:
    """What a subscription to `topic` is applied as: the topic itself when it is a prefix
    of a topic the proxy publishes (pkt.IF.N for the interfaces and worker indexes, stats),
    `pkt.` and `stats` for the empty prefix (everything but the welcome, which goes only
    to the connection that asks for it), None when nothing published would ever match it.
    The welcome itself (fanoutd.hello) is not a subscription: see Subscribers.message."""
    if topic == b"":
        return (BATCH_TOPIC_PREFIX, STATS_TOPIC)
    if STATS_TOPIC.startswith(topic) or BATCH_TOPIC_PREFIX.startswith(topic):
        return (topic,)
    for iface in interfaces:
        stem = BATCH_TOPIC_PREFIX + iface + b"."
        if stem.startswith(topic):
            return (topic,)
        if topic.startswith(stem) and _worker_number_prefix(topic[len(stem):]):
            return (topic,)
    return None


def _worker_number_prefix(text: bytes) -> bool:
    """Whether text starts some worker index, 0 .. MAX_WORKERS - 1, in decimal."""
    if not text.isdigit() or (len(text) > 1 and text[0] == ord("0")):
        return False
    return len(text) < len(str(MAX_WORKERS - 1)) or int(text) < MAX_WORKERS


@dataclass
class _Connection:
    applied: Counter = field(default_factory=Counter)  # topic -> subscriptions needing it
    subscriptions: int = 0  # subscribe messages less unsubscribe ones
    closed: bool = False


@dataclass
class SubscriptionChange:
    """What the proxy does for one message from a subscriber's connection: subscribe and
    unsubscribe that connection (ZMQ_XPUB_MANUAL applies them to the connection the
    message came from), send it the welcome."""

    subscribe: list[bytes] = field(default_factory=list)
    unsubscribe: list[bytes] = field(default_factory=list)
    welcome: bool = False


class Subscribers:
    """The subscriber connections of the public endpoint, by file descriptor, with the
    limits that bound the proxy's memory: connections (publish.max_subscribers, refused
    at once), subscriptions per connection (publish.max_subscriptions: the connection is
    closed beyond it; libzmq keeps every subscription a connection sends until the
    connection ends, applied or not) and topics (only those that match something
    published are applied). Each refusal is counted in `stats`.

    A connection is known by its file descriptor from the socket monitor's accepted
    event to its disconnected one; each message names its connection's descriptor in
    its metadata (ZMQ_SRCFD). A message from a descriptor not known (the connection has
    ended; its last messages can come after its disconnected event) is ignored: libzmq
    too forgets a connection's subscriptions when it ends. `close` shuts a connection
    down by its descriptor. (Not a ZAP refusal: libzmq's SUB never reconnects after a
    failed handshake, while it does after a lost connection, so a subscriber turned away
    because the proxy was full gets in once there is room.)"""

    def __init__(self, interfaces: list[bytes], max_connections: int,
                 max_subscriptions: int, stats: ProxyStats,
                 close: Callable[[int], None]) -> None:
        self.interfaces = interfaces
        self.max_connections = max_connections
        self.max_subscriptions = max_subscriptions
        self.stats = stats
        self.close = close
        self.connections: dict[int, _Connection] = {}
        self.refused: set[int] = set()  # shut down at once, not yet disconnected

        self.subscribed = 0  # connections with a subscription applied: the subscribers

    def _count(self) -> None:
        self.subscribed = sum(1 for c in self.connections.values()
                              if c.applied and not c.closed)
        self.stats["subscribers"] = self.subscribed

    def knows(self, fd: int | None) -> bool:
        return fd is not None and (fd in self.connections or fd in self.refused)

    def accepted(self, fd: int) -> None:
        self.connections.pop(fd, None)  # a descriptor used again: a new connection
        if len(self.connections) >= self.max_connections:
            self.stats.add("connections_refused")
            self.refused.add(fd)
            self.close(fd)
            return
        self.connections[fd] = _Connection()

    def disconnected(self, fd: int) -> None:
        self.refused.discard(fd)
        if self.connections.pop(fd, None) is not None:
            self._count()

    def message(self, fd: int | None, message: bytes) -> SubscriptionChange:
        """A (un)subscription message from connection fd (None: from libzmq itself, for a
        connection that has ended), as the XPUB hands it up."""
        change = SubscriptionChange()
        conn = self.connections.get(fd) if fd is not None else None
        if conn is None or conn.closed or not message or message[0] > 1:
            return change  # not from a live connection, or not a subscription
        topic, subscribe = message[1:], message[0] == 1
        if subscribe:
            conn.subscriptions += 1
            if conn.subscriptions > self.max_subscriptions:
                log.warning("closed a subscriber connection that sent more than %d "
                            "subscriptions (publish.max_subscriptions)",
                            self.max_subscriptions)
                self.stats.add("subscribers_closed")
                conn.closed = True
                self.close(fd)
                self._count()
                return change
        else:
            conn.subscriptions = max(0, conn.subscriptions - 1)
        if topic == HELLO:
            change.welcome = subscribe
            return change
        topics = subscription_topics(topic, self.interfaces)
        if topics is None:
            if subscribe:
                self.stats.add("subscriptions_refused")
            return change
        for t in topics:
            if subscribe:
                conn.applied[t] += 1
                if conn.applied[t] == 1:
                    change.subscribe.append(t)
            elif conn.applied[t] > 0:
                conn.applied[t] -= 1
                if conn.applied[t] == 0:
                    del conn.applied[t]
                    change.unsubscribe.append(t)
        self._count()
        return change


def shut_down(fd: int) -> None:
    """End the connection on fd (a socket libzmq's I/O thread owns): its engine sees the
    end of the stream, closes the socket and ends the connection's pipe, which frees the
    subscriptions libzmq keeps for it."""
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
        sock.shutdown(socket.SHUT_RDWR)


class StartGate:
    """After a restart the proxy passes nothing on (and acknowledges nothing, so workers
    hold their blocks) until the subscribers of the previous proxy are back: as many as it
    had, or restart_grace_s after the start, whichever comes first. A subscriber that
    reconnects within the grace period misses nothing. What is forwarded afterwards while
    fewer are back is counted (unwatched), for UNWATCHED_WINDOW_S at most: a subscriber
    not back by then is taken to have left.

    Once open, the workers publish at once everything they held: for the grace period
    again (catching_up), a subscriber's full queue holds the proxy back rather than losing
    batches for that subscriber (ZeroMQ writes them to it more slowly than the proxy can
    queue them)."""

    def __init__(self, expected: int, grace_s: float, now: float) -> None:
        self.expected = expected
        self.grace_s = grace_s
        self.deadline = now + grace_s
        self.opened_at: float | None = None
        self.started = now

    def try_open(self, subscribers: int, now: float) -> bool:
        if self.opened_at is None and (subscribers >= self.expected or now >= self.deadline):
            self.opened_at = now
        return self.opened_at is not None

    def catching_up(self, now: float) -> bool:
        return (self.expected > 0 and self.opened_at is not None
                and now - self.opened_at < self.grace_s)

    def unwatched(self, subscribers: int, now: float) -> bool:
        """Whether a batch forwarded now misses a subscriber of the previous proxy."""
        return (subscribers < self.expected and self.opened_at is not None
                and now - self.opened_at < UNWATCHED_WINDOW_S)


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


# ---------------------------------------------------------------------------- the proxy


@dataclass(frozen=True)
class ProxyPlan:
    backend: str  # ipc endpoint the workers push to
    frontend: str  # the public endpoint
    sndhwm: int  # the workers' queues to the proxy, in batches; caps subscriber queues too
    subscriber_queue_bytes: int  # each subscriber's queue, at most (see subscriber_hwm())
    max_subscribers: int
    max_subscriptions: int
    restart_grace_s: float
    stats_interval_s: float
    user: str | None  # drop to this user once both endpoints are bound
    curve: CurveConfig


def subscriber_hwm(queue_bytes: int, block_size: int, sndhwm: int) -> int:
    """A subscriber's queue in messages, from its budget in bytes: what fits of the
    largest message the proxy sends (a batch is never larger than
    wire.max_batch_bytes(its ring block), tests/test_wire.py), and at most sndhwm (0: no
    such cap)."""
    fitting = max(1, queue_bytes // (max_batch_bytes(block_size) + MESSAGE_OVERHEAD))
    return min(fitting, sndhwm) if sndhwm else fitting


MESSAGE_OVERHEAD = 256  # the topic frame and ZeroMQ's bookkeeping of a queued message


class Proxy:
    """PULL (ipc, from the workers) -> XPUB (the public endpoint).

    The XPUB runs in manual mode (ZMQ_XPUB_MANUAL): each subscription reaches the proxy,
    which applies it to the connection it came from, or refuses it (Subscribers). With
    ZMQ_XPUB_NODROP, a send fails (EAGAIN) when a subscriber's queue is full; the batch is
    then counted as dropped for a subscriber and sent again without NODROP, so the others
    still get it (which subscriber is not visible through an XPUB).
    """

    def __init__(self, ctx: zmq.Context, plan: ProxyPlan, rings: RingTable,
                 stats: ProxyStats, interfaces: list[str]) -> None:
        self.rings = rings
        self.stats = stats
        self.authenticator: _Authenticator | None = None
        self.plan = plan
        self.pull = ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.xpub = ctx.socket(zmq.XPUB)
        self._size_queues()
        _bind(self.pull, plan.backend, "runtime_dir")
        self.xpub.setsockopt(zmq.RCVHWM, SUBSCRIBER_RCVHWM)
        self.xpub.setsockopt(zmq.MAXMSGSIZE, MAX_INCOMING_BYTES)
        self.xpub.setsockopt(zmq.LINGER, 1000)
        self.xpub.setsockopt(zmq.XPUB_MANUAL, 1)
        self.xpub.setsockopt(zmq.XPUB_NODROP, 1)
        if plan.curve is not None and plan.curve.secret_key_file is not None:
            self._serve_curve(ctx, plan.curve)
        self.monitor = self.xpub.get_monitor_socket(zmq.EVENT_ACCEPTED
                                                    | zmq.EVENT_DISCONNECTED)
        _bind(self.xpub, plan.frontend, "publish.endpoint")
        self.subscribers = Subscribers([i.encode() for i in interfaces],
                                       plan.max_subscribers, plan.max_subscriptions, stats,
                                       shut_down)
        expected = stats["subscribers"]  # what the previous proxy had, if any
        stats["subscribers"] = 0
        self.gate = StartGate(expected, plan.restart_grace_s, time.monotonic())
        self.poller = zmq.Poller()
        self.poller.register(self.xpub, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self._pids: dict[str, int] = {}  # Peer-Address -> pid
        self.warnings = RateLimitedLog()
        self._waiting: list[zmq.Frame] | None = None  # a batch waiting for room (catch-up)
        self._ingress = False  # the workers' socket is polled
        self._try_open(time.monotonic())  # at once, unless subscribers are to come back

    def _size_queues(self) -> None:
        """Each subscriber's queue, in messages, from its budget in bytes and the largest
        batch, that of the largest ring block at the proxy's start; set before any
        connection, and never again: a new HWM applied to a connection's pipe in use can
        leave its writer waiting for good (libzmq 4.3 tells the writer how far the reader
        got only every low-water-mark messages, and the mark moves with the HWM), so after
        a reload to larger blocks the length holds until the proxy is restarted."""
        self.block_size = self.stats["block_size"]
        # What a worker has sent waits in its own queue rather than here: the proxy takes
        # in as fast as it passes on, unless it is stalled.
        self.pull.setsockopt(zmq.RCVHWM, subscriber_hwm(INGRESS_QUEUE_BYTES, self.block_size,
                                                        self.plan.sndhwm))
        self.subscriber_hwm = subscriber_hwm(self.plan.subscriber_queue_bytes,
                                             self.block_size, self.plan.sndhwm)
        self.xpub.setsockopt(zmq.SNDHWM, self.subscriber_hwm)

    def log_queue_size(self) -> None:
        log.info("each subscriber's queue holds at most %d batches (publish.sndhwm, "
                 "publish.subscriber_queue_bytes, ring blocks of %d bytes)",
                 self.subscriber_hwm, self.block_size)

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
        """Take in subscriber connections and subscriptions, then forward what the workers
        sent (once the start-up gate is open), without copying the frames, and tell each
        ring's worker which blocks were passed on."""
        now = time.monotonic()
        if self.gate.opened_at is None:
            timeout_ms = max(0, min(timeout_ms, int((self.gate.deadline - now) * 1000) + 1))
        if self._waiting is not None:
            timeout_ms = min(timeout_ms, 1)
        events = dict(self.poller.poll(timeout_ms))
        if self.monitor in events:
            self._connections()
        if self.xpub in events:
            self._subscriptions()
        if self.gate.opened_at is None:
            self._try_open(time.monotonic())
        if self._waiting is not None:
            frames, self._waiting = self._waiting, None
            self._pass_on(frames, time.monotonic())
        if self.pull in events and self._waiting is None:
            # Bounded, so the caller's loop keeps its pace. Asking for the socket's events
            # costs a third of the zmq.Again a receive raises when nothing is left.
            for _ in range(1000):
                if not self.pull.get(zmq.EVENTS) & zmq.POLLIN:
                    break
                frames = self.pull.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                self._forward(frames)
                if self._waiting is not None:
                    break

    def _try_open(self, now: float) -> None:
        subscribers = self.subscribers.subscribed
        if not self.gate.try_open(subscribers, now):
            return
        if self.gate.expected:
            log.info("passing batches on: %d of the %d subscribers of the previous proxy "
                     "are back after %.1f s", subscribers, self.gate.expected,
                     now - self.gate.started)
        self._take_in(True)
        self.stats["forwarding"] = 1  # workers take new blocks again

    def _take_in(self, on: bool) -> None:
        """Poll the workers' socket, or leave what they send waiting in their queues."""
        if on and not self._ingress:
            self.poller.register(self.pull, zmq.POLLIN)
        elif not on and self._ingress:
            self.poller.unregister(self.pull)
        self._ingress = on

    def _connections(self) -> None:
        while True:
            try:
                event = zmq_monitor.recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_ACCEPTED:
                self.subscribers.accepted(event["value"])
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.subscribers.disconnected(event["value"])

    def _subscriptions(self) -> None:
        for _ in range(1000):  # bounded, like forwarding
            try:
                message = self.xpub.recv(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                fd: int | None = message.get(zmq.SRCFD)
            except zmq.ZMQError:  # no metadata: libzmq's own, for an ended connection
                fd = None
            if fd is not None and fd < 0:
                fd = None
            if fd is not None and not self.subscribers.knows(fd):
                self._connections()  # its accepted event was sent before it: take it in
            change = self.subscribers.message(fd, message.bytes)
            # Manual mode: these act on the connection the message just received came
            # from (libzmq forgets it when that connection ends: they are then no-ops).
            for topic in change.subscribe:
                self.xpub.setsockopt(zmq.SUBSCRIBE, topic)
            for topic in change.unsubscribe:
                self.xpub.setsockopt(zmq.UNSUBSCRIBE, topic)
            if change.welcome:
                # Subscribed for the moment it takes to send it: no other connection has
                # a subscription that matches the welcome (subscription_topics), so it
                # reaches the one that asked, and only once per request.
                self.xpub.setsockopt(zmq.SUBSCRIBE, HELLO)
                self._send((HELLO,))
                self.xpub.setsockopt(zmq.UNSUBSCRIBE, HELLO)

    def _forward(self, frames: list[zmq.Frame]) -> None:
        reason = self._rejected(frames)
        if reason is not None:
            self.stats.add(f"rejected:{reason}")
            self.warnings.warn(reason, "dropped a message on the workers' socket: %s",
                               REJECTED_BECAUSE[reason])
            return
        self._pass_on(frames, time.monotonic())

    def _pass_on(self, frames: list[zmq.Frame], now: float) -> None:
        """Send a checked batch to the subscribers and tell its worker. While catching up
        after a restart, a full subscriber queue makes it wait (and the batches behind
        it) instead."""
        gate = self.gate
        catching_up = bool(gate.expected) and gate.catching_up(now)
        if not self._send(frames[1:], wait=catching_up):
            if catching_up:
                self._waiting = frames
                self._take_in(False)
                return
            self.stats.add("subscriber_overflows")
        if not self._ingress:
            self._take_in(True)
        if gate.expected and gate.unwatched(self.subscribers.subscribed, now):
            self.stats.add("restart_unwatched")
        ring_id, block_seq = ENVELOPE.unpack(frames[0].buffer)
        if block_seq > self.rings.forwarded[ring_id]:  # the acknowledgement (holding.py)
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

    def _send(self, frames: tuple | list, wait: bool = False) -> bool:
        """Send to every matching subscriber. False when a subscriber's queue was full:
        with wait, nothing was sent (try again later); else the others got the message,
        that subscriber lost it."""
        try:
            self._send_parts(frames)
            return True
        except zmq.Again:
            if wait:
                return False
        self.xpub.setsockopt(zmq.XPUB_NODROP, 0)
        try:
            self._send_parts(frames)
        finally:
            self.xpub.setsockopt(zmq.XPUB_NODROP, 1)
        return False

    def _send_parts(self, parts: tuple | list) -> None:
        """send_multipart, without its flag arithmetic on enums (~3 us a batch). With
        NODROP a refusal comes at the first part: the others go where it went."""
        last = len(parts) - 1
        for i, part in enumerate(parts):
            self.xpub.send(part, _MORE_NOBLOCK if i < last else _NOBLOCK, copy=False)

    def send_stats(self, topic: bytes, body: bytes) -> None:
        self._send((topic, body))

    def close(self) -> None:
        self.xpub.disable_monitor()
        self.monitor.close()
        self.pull.close()
        self.xpub.close()
        if self.authenticator is not None:
            self.authenticator.stop()


_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)

REJECTED_BECAUSE = {
    "malformed": "not a batch of a ring in use",
    "sender": "sent by a process that is not the ring's worker",
    "topic": "not on the ring's topic",
}


class FreedMemory:
    """When the proxy gives freed memory back (memory.release_freed_memory): at every
    stats tick for LEAVING_WINDOW_S after a subscriber left (libzmq frees its queue some
    seconds later, after the connection has ended: ~10 s in benchmarks/memory_bench.py),
    and every TRIM_INTERVAL_S anyway (a queue that filled and drained again)."""

    LEAVING_WINDOW_S = 30.0
    TRIM_INTERVAL_S = 30.0

    def __init__(self, subscribers: int, now: float) -> None:
        self.subscribers = subscribers
        self.window_end = now
        self.next = now + self.TRIM_INTERVAL_S

    def due(self, subscribers: int, now: float) -> bool:
        if subscribers < self.subscribers:
            self.window_end = now + self.LEAVING_WINDOW_S
        self.subscribers = subscribers
        if now < self.window_end or now >= self.next:
            self.next = now + self.TRIM_INTERVAL_S
            return True
        return False


def run_proxy(plan: ProxyPlan, ready_fd: int, tables: list[tuple[str, StatsTable]],
              rings: RingTable, stats: ProxyStats) -> int:
    """The proxy process's main. Binds both endpoints and writes b"ok" (or the reason it
    could not) to ready_fd, drops privileges, then forwards batches (telling each ring's
    worker, through `rings`, what it passed on) and publishes the slots' counters and its
    own on the `stats` topic every stats_interval_s."""
    set_process_name("fanoutd-proxy")
    stopping = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    privileges.handlers_installed()  # blocked since the fork (supervisor._spawn)
    ctx = batch_context()
    try:
        proxy = Proxy(ctx, plan, rings, stats, [iface for iface, _ in tables])
        if plan.user:
            privileges.become(plan.user)
    except (BindError, privileges.PrivilegeError, OSError) as e:
        os.write(ready_fd, str(e).encode())
        ctx.destroy(linger=0)
        return exits.BOOT_FAILED
    os.write(ready_fd, b"ok")
    os.close(ready_fd)
    proxy.log_queue_size()
    next_stats = time.monotonic()
    supervisor = os.getppid()
    trim = FreedMemory(stats["subscribers"], time.monotonic())
    try:
        while not stopping and os.getppid() == supervisor:  # no orphan outlives it
            proxy.run_once(200)
            if time.monotonic() >= next_stats:
                for iface, table in tables:  # one message per interface
                    body = wire.stats_message(iface, worker_reports(table), __version__,
                                              time.time_ns(), publisher_report(stats))
                    body = msgpack.packb(body, use_bin_type=True)
                    proxy.send_stats(STATS_TOPIC, body)
                next_stats = time.monotonic() + plan.stats_interval_s
                if trim.due(stats["subscribers"], time.monotonic()):
                    release_freed_memory()
        # The workers stop first and flush to us; pass on what they sent.
        for _ in range(10):
            proxy.run_once(20)
    finally:
        proxy.close()
        ctx.term()
    return 0
