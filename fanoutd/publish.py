"""The worker's batch publisher and the proxy that fronts the public endpoint (ZeroMQ).

Workers hand their batches to the proxy through shared memory, an outbox each, handed
over on a socket in the runtime directory (outbox.py); the proxy's XPUB binds the public
endpoint, so subscribers connect to one address whatever the worker count. Every message
a subscriber sees is [topic, msgpack body] (docs/wire-format.md).

A batch waits in the outbox until the proxy is there to take it: a new or replaced
worker, a proxy restart lose nothing. A full outbox makes the worker wait, not drop: the
ring buffers meanwhile. How the proxy acknowledges what it passed on, and why a worker
holds each block until then: holding.py.

The public XPUB keeps ZeroMQ's per-subscriber drop at a full queue, so one slow subscriber
never holds back the others; the proxy bounds that queue in bytes and counts what it
drops. It applies every subscription itself (manual mode), so it refuses topics it never
publishes, sends the welcome to the connection that asked for it only, and closes
connections past the limits. After a restart it passes nothing on until the subscribers
of the proxy it replaced are back, or publish.restart_grace_ms is over (StartGate).
"""

import contextlib
import itertools
import logging
import os
import select
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

from fanoutd import __version__, exits, outbox, privileges, wire
from fanoutd.config import MAX_WORKERS, CurveConfig
from fanoutd.memory import release_freed_memory
from fanoutd.outbox import Inbox, Outbox, Rejected
from fanoutd.proctitle import set_process_name
from fanoutd.slotstats import ProxyStats, RingTable, StatsTable, publisher_report, worker_reports
from fanoutd.wire import BATCH_TOPIC_PREFIX, HELLO, STATS_TOPIC, batch_topic, max_batch_bytes

log = logging.getLogger("fanoutd.proxy")


def batch_context() -> zmq.Context:
    """The proxy's ZeroMQ context: one I/O thread, run as SCHED_BATCH.

    Each batch the proxy hands over wakes the I/O thread; as a normal thread it would
    preempt the proxy on its CPU at once (a context switch there and another back),
    though the proxy is about to sleep anyway. A SCHED_BATCH thread never preempts on
    waking (the scheduler's wake-up preemption is for SCHED_NORMAL only): it runs on the
    other CPU if that is idle, or when the proxy sleeps. Measured (when workers still had
    a context of their own): ~22 % fewer context switches per batch, docs/performance.md."""
    ctx = zmq.Context(1)
    ctx.set(zmq.THREAD_SCHED_POLICY, os.SCHED_BATCH)
    return ctx


class BatchPublisher:
    """A worker's outbox towards the proxy, and its connection to it (outbox.py)."""

    def __init__(self, endpoint: str, iface: str, worker: int, ring_id: int,
                 block_size: int) -> None:
        self.endpoint = endpoint
        self.iface = iface
        self.worker = worker
        self.ring_id = ring_id
        self.topic = batch_topic(iface, worker)
        self.outbox = Outbox(block_size)
        self.sock: socket.socket | None = None
        self._poll = select.poll()

    def wait_connected(self, timeout_s: float) -> bool:
        """Connect to the proxy and hand it the outbox (a worker that drops privileges
        must connect first: the proxy's socket is only root's); retried until timeout_s,
        for a proxy that is still starting."""
        deadline = time.monotonic() + timeout_s
        while self.sock is None:
            try:
                self.sock = outbox.connect(self.endpoint, self.outbox, self.ring_id,
                                           self.topic)
            except OSError as e:
                if time.monotonic() >= deadline:
                    log.error("worker %d: cannot connect to the proxy at %s: %s",
                              self.worker, self.endpoint, e.strerror)
                    return False
                time.sleep(0.01)
        self._poll.register(self.sock, select.POLLIN)  # the proxy never writes: its end
        return True

    def lost_connection(self) -> bool:
        """True once the connection to the proxy has ended (the proxy was replaced, or
        refused this worker's outbox)."""
        return self.sock is None or bool(self._poll.poll(0))

    def free_slot(self) -> memoryview | None:
        """Room for the next batch (encoder.BlockEncoder.encode_into writes it there), or
        None when the outbox is full: the proxy has yet to take the batches before."""
        return self.outbox.free_slot()

    def publish(self, block_seq: int, length: int) -> None:
        """The batch of ring block block_seq is the first `length` bytes of free_slot().
        The proxy hears of it at the next flush(): one wake-up for the batches of every
        block that was ready."""
        self.outbox.commit(block_seq, length, signal=False)

    def flush(self) -> None:
        """Wake the proxy for the batches published since the last flush, if any."""
        self.outbox.signal()

    def close(self) -> None:
        """The proxy takes what is in the outbox once the connection has ended."""
        if self.sock is not None:
            self.sock.close()
        self.outbox.close()


def widen_local_send_buffer(fd: int, size: int) -> None:
    """Let the kernel queue `size` bytes (two of the largest batches) to a subscriber on
    an ipc:// endpoint, where its default (net.core.wmem_default, 208 KiB) holds about
    one: a batch that does not fit wakes the proxy's I/O thread again for the rest, once
    the subscriber has read. libzmq sets no buffer size on ipc connections; TCP ones are
    left to the kernel's autotuning, which a fixed size would turn off. The kernel caps
    the size at net.core.wmem_max. fd is the connection's (the monitor names it)."""
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as conn:
        if conn.family == socket.AF_UNIX:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


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
    backend: str  # the path of the socket the workers hand their outboxes over on
    frontend: str  # the public endpoint
    sndhwm: int  # caps subscriber queues, in batches (publish.sndhwm)
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
    """The workers' outboxes (outbox.py) -> XPUB (the public endpoint).

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
        self.xpub = ctx.socket(zmq.XPUB)
        self._size_queues()
        try:
            self.listener = outbox.listen(plan.backend)
        except OSError as e:
            raise BindError(f"runtime_dir: cannot bind {plan.backend}: {e.strerror}") from None
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
        self.poller.register(self.listener.fileno(), zmq.POLLIN)
        # The workers' connections, by descriptor: the socket, and its outbox's id in
        # `inboxes` once the hello is taken. Outboxes by id, oldest first: a replaced
        # worker's batches go before its successor's; one stays after its connection
        # ended until what is in it is taken.
        self.connections: dict[int, tuple[socket.socket, int | None]] = {}
        self.inboxes: dict[int, Inbox] = {}
        self._inbox_ids = itertools.count()
        self.warnings = RateLimitedLog()
        self._waiting = False  # a batch waits for room in a subscriber's queue (catch-up)
        self._ingress = False  # the outboxes' eventfds are polled
        self._try_open(time.monotonic())  # at once, unless subscribers are to come back

    def _size_queues(self) -> None:
        """Each subscriber's queue, in messages, from its budget in bytes and the largest
        batch, that of the largest ring block at the proxy's start; set before any
        connection, and never again: a new HWM applied to a connection's pipe in use can
        leave its writer waiting for good (libzmq 4.3 tells the writer how far the reader
        got only every low-water-mark messages, and the mark moves with the HWM), so after
        a reload to larger blocks the length holds until the proxy is restarted."""
        self.block_size = self.stats["block_size"]
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
        """Take in subscriber connections and subscriptions and the workers' outboxes,
        then pass on what the workers wrote (once the start-up gate is open), and tell
        each ring's worker which blocks were passed on."""
        now = time.monotonic()
        if self.gate.opened_at is None:
            timeout_ms = max(0, min(timeout_ms, int((self.gate.deadline - now) * 1000) + 1))
        if self._waiting:
            timeout_ms = min(timeout_ms, 1)
        events = dict(self.poller.poll(timeout_ms))
        if self.monitor in events:
            self._connections()
        if self.xpub in events:
            self._subscriptions()
        if self.listener.fileno() in events:
            self._accept()
        for fd in [fd for fd in events if fd in self.connections]:
            self._worker_message(fd)
        if self.gate.opened_at is None:
            self._try_open(time.monotonic())
        if self.gate.opened_at is not None and (self._ingress or self._waiting):
            self._take_batches(events)

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
        """Wake up for the workers' signals, or leave what they write in their outboxes."""
        if on != self._ingress:
            for inbox in self.inboxes.values():
                if on:
                    self.poller.register(inbox.eventfd, zmq.POLLIN)
                else:
                    self.poller.unregister(inbox.eventfd)
        self._ingress = on

    # -- the workers' outboxes (outbox.py)

    def _accept(self) -> None:
        for _ in range(64):  # bounded; the socket is root's: only workers connect
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn.setblocking(False)
            self.connections[conn.fileno()] = (conn, None)
            self.poller.register(conn.fileno(), zmq.POLLIN)

    def _worker_message(self, fd: int) -> None:
        """A worker's hello, or the end of its connection (anything else ends it too)."""
        conn, inbox_id = self.connections[fd]
        if inbox_id is None:
            try:
                inbox = outbox.take_hello(conn, self._ring_pid, self._ring_topic)
            except Rejected as e:
                self._reject(e.reason, fd)
            except (OSError, ValueError, struct.error):
                self._reject("malformed", fd)
            else:
                inbox_id = next(self._inbox_ids)
                self.inboxes[inbox_id] = inbox
                self.connections[fd] = (conn, inbox_id)
                if self._ingress:
                    self.poller.register(inbox.eventfd, zmq.POLLIN)
            return
        self._end_connection(fd)
        if inbox_id in self.inboxes:  # else let go already: its worker was replaced
            self.inboxes[inbox_id].closing = True

    def _ring_pid(self, ring_id: int) -> int:
        return self.rings.pid[ring_id] if ring_id < self.rings.count else -1

    def _ring_topic(self, ring_id: int) -> bytes | None:
        if ring_id >= self.rings.count or not self.rings.pid[ring_id]:
            return None
        return self.rings.topic(ring_id)

    def _reject(self, reason: str, fd: int) -> None:
        self._count_rejected(reason, "refused a worker's connection")
        self._end_connection(fd)

    def _count_rejected(self, reason: str, what: str) -> None:
        self.stats.add(f"rejected:{reason}")
        self.warnings.warn(reason, "%s: %s", what, REJECTED_BECAUSE[reason])

    def _end_connection(self, fd: int) -> None:
        conn, _ = self.connections.pop(fd)
        self.poller.unregister(fd)
        conn.close()

    def _take_batches(self, events: dict) -> None:
        """Pass on what the outboxes hold, oldest outbox first, a bounded number each, so
        the caller's loop keeps its pace; let an outbox go once its connection has ended
        and it is empty."""
        self._waiting = False
        for inbox_id, inbox in list(self.inboxes.items()):
            if inbox.eventfd in events:
                inbox.clear_signal()  # before looking: a batch written later signals again
            stale = self.rings.pid[inbox.ring_id] != inbox.pid
            for _ in range(1000):
                got = inbox.next()
                if got is None:
                    break
                if got == "malformed":
                    self._count_rejected("malformed", "dropped a batch from a worker's outbox")
                elif not stale:  # else its worker was replaced: the ring's blocks were
                    seq, body = got  # held, and its successor publishes them again
                    try:
                        if not self._pass_on(inbox, seq, body):
                            return
                    finally:
                        body.release()  # a view of the slot: the worker's again
                inbox.done()
            if stale or (inbox.closing and inbox.empty()):
                if self._ingress:
                    self.poller.unregister(inbox.eventfd)
                inbox.close()
                del self.inboxes[inbox_id]

    def _pass_on(self, inbox: Inbox, seq: int, body: memoryview) -> bool:
        """Send a batch to the subscribers and tell its worker. While catching up after a
        restart, a full subscriber queue makes it wait (and the batches behind it)
        instead: False, and nothing was sent."""
        now = time.monotonic()
        gate = self.gate
        catching_up = bool(gate.expected) and gate.catching_up(now)
        if not self._send((inbox.topic, body), wait=catching_up):
            if catching_up:
                self._waiting = True
                self._take_in(False)
                return False
            self.stats.add("subscriber_overflows")
        if not self._ingress:
            self._take_in(True)
        if gate.expected and gate.unwatched(self.subscribers.subscribed, now):
            self.stats.add("restart_unwatched")
        if seq > self.rings.forwarded[inbox.ring_id]:  # the acknowledgement (holding.py)
            self.rings.forwarded[inbox.ring_id] = seq
        return True

    def _connections(self) -> None:
        while True:
            try:
                event = zmq_monitor.recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_ACCEPTED:
                widen_local_send_buffer(event["value"], 2 * max_batch_bytes(self.block_size))
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
        NODROP a refusal comes at the first part: the others go where it went. Copied:
        a batch is a view of its outbox slot, which is the worker's again once sent."""
        last = len(parts) - 1
        for i, part in enumerate(parts):
            self.xpub.send(part, _MORE_NOBLOCK if i < last else _NOBLOCK, copy=True)

    def send_stats(self, topic: bytes, body: bytes) -> None:
        self._send((topic, body))

    def close(self) -> None:
        self.xpub.disable_monitor()
        self.monitor.close()
        for conn, _ in self.connections.values():
            conn.close()
        for inbox in self.inboxes.values():
            inbox.close()
        self.listener.close()
        self.xpub.close()
        if self.authenticator is not None:
            self.authenticator.stop()


_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)

REJECTED_BECAUSE = {
    "malformed": "not an outbox (or a batch) of a ring in use",
    "sender": "from a process that is not the ring's worker",
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
