"""`fanoutd relay`: sensors' batches over ZeroMQ, appended unchanged to a JetStream stream.

One asyncio loop. One task receives from every sensor (a SUB socket each, as
fanoutd.client does: the welcome, the batch topics, and the seq gaps per stream through
client.SeqTracker). Each batch is published to `fanoutd.<sensor>.<iface>.<worker>`
(jetstream.batch_subject) with Nats-Msg-Id sensor/iface/worker/epoch/seq, so that
JetStream stores a batch once however often it is sent: after a retry whose first try was
stored after all, after a sensor's proxy restart (its workers send their held blocks
again), or by a second relay of the same sensors.

A window of `max_in_flight` batches is out at once, each awaiting its acknowledgement
(PubAck; `duplicate` when JetStream had it). A publish that times out or finds no
responder (a member died, the stream is electing a leader, the connection moves to
another member) is sent again, with a growing pause, for up to `retry_seconds`; what still
fails then is counted (fanoutd_relay_batches_failed_total) and logged, never dropped
silently. Backpressure: while the window is full the relay stops reading the sensors; their
batches wait in its SUB sockets' queues, then in the sensor's proxy (its subscriber queue,
publish.subscriber_queue_bytes), and beyond that the sensor drops them, counted there
(fanoutd_subscriber_overflows_total) and seen here as seq gaps.

A single relay loses what its sensors publish while it is down (ZeroMQ keeps nothing for
a subscriber that is away): run two relays of the same sensors, on two machines, for none
lost; JetStream keeps one copy.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from zmq.utils import monitor as zmq_monitor

from fanoutd import exits, jetstream
from fanoutd.batch import Batch, StreamKey
from fanoutd.client import HANDSHAKE_EVENTS, SeqTracker, curve_keys, handshake_problem
from fanoutd.config import parse_host_port
from fanoutd.relay_config import RelayConfig
from fanoutd.systemd import Notifier
from fanoutd.wire import BATCH_TOPIC_PREFIX, HELLO

log = logging.getLogger("fanoutd")

RCVHWM = 10_000  # batches queued per sensor while the window is full
ACK_TIMEOUT_S = 5.0  # one try's wait for its PubAck
FIRST_PAUSE_S, LAST_PAUSE_S = 0.05, 2.0  # between tries: doubling from the first
STATUS_INTERVAL_S = 5.0  # how often systemd's status line is brought up to date


def _total(counter: Counter) -> float:
    """A labelled counter's sum over its labels."""
    return sum(sample.value for metric in counter.collect() for sample in metric.samples
               if sample.name.endswith("_total"))


class RelayMetrics:
    """The relay's own counters, in a registry of their own (the daemon's are metrics.py's).
    Per stream: sensor, iface and worker labels."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("sensor", "iface", "worker")

        def counter(name: str, text: str, by_stream: bool = True) -> Counter:
            return Counter(f"fanoutd_relay_{name}", text, labels if by_stream else (),
                           registry=self.registry)

        self.received = counter("batches_received", "batches received from the sensors")
        self.rows = counter("rows_received", "packet rows in the batches received")
        self.bytes = counter("bytes_received", "batch bytes received from the sensors")
        self.stored = counter("batches_stored", "batches JetStream acknowledged as stored")
        self.duplicates = counter("batches_duplicate", "batches JetStream acknowledged as "
                                  "stored already (same Nats-Msg-Id)")
        self.failed = counter("batches_failed", "batches not stored after every retry")
        self.gaps = counter("seq_gaps", "batches missing from a stream's seq, as received "
                            "here")
        self.retries = counter("publish_retries", "publishes sent again", by_stream=False)
        self.unreadable = counter("unreadable", "messages on a batch topic that are no batch "
                                  "this version reads", by_stream=False)
        self.reconnects = counter("nats_reconnects", "reconnections to the NATS cluster",
                                  by_stream=False)
        self.in_flight = Gauge("fanoutd_relay_in_flight", "batches sent and not yet "
                               "acknowledged", registry=self.registry)
        self.window = Gauge("fanoutd_relay_max_in_flight", "max_in_flight",
                            registry=self.registry)
        self.sensors_ready = Gauge("fanoutd_relay_sensors_ready", "sensors whose welcome "
                                   "arrived (subscriptions in effect)",
                                   registry=self.registry)
        self.connected = Gauge("fanoutd_relay_nats_connected", "1 while connected to a NATS "
                               "server", registry=self.registry)


    def touch(self, labels: tuple[str, str, str]) -> None:
        """Make a stream's counters exist (at 0), so that a rate of one starts at once."""
        for counter in (self.received, self.rows, self.bytes, self.stored, self.duplicates,
                        self.failed, self.gaps):
            counter.labels(*labels)


@dataclass
class _Pending:
    """One batch on its way to JetStream."""

    subject: str
    body: bytes
    msg_id: str
    labels: tuple[str, str, str]
    tries: int = 0
    started: float = field(default_factory=time.monotonic)


class Relay:
    def __init__(self, cfg: RelayConfig, metrics: RelayMetrics | None = None,
                 notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics or RelayMetrics()
        # systemd (Type=notify): READY once relaying, STATUS and WATCHDOG from a task of
        # their own (_tell_systemd), STOPPING; nothing without NOTIFY_SOCKET.
        self.notifier = notifier or Notifier()
        self.metrics.window.set(cfg.max_in_flight)
        self.stopping = asyncio.Event()
        self.tracker = SeqTracker(self._gap)
        self._names: dict[StreamKey, tuple[str, str, str]] = {}
        self._window = asyncio.Semaphore(cfg.max_in_flight)
        self._tasks: set[asyncio.Task] = set()
        self._ready: set[str] = set()
        self._refused: dict[str, str] = {}  # endpoint -> why its handshake last failed
        self._told_too_large = False
        self.nc: Any = None
        self.js: Any = None

    # -- running

    async def run(self) -> int:
        """Connect to the cluster, make sure of the stream, relay until stop(); the exit
        status."""
        nats = jetstream.require_nats()
        try:
            self.nc = await jetstream.connect(
                list(self.cfg.nats), "fanoutd-relay", connect_seconds=self.cfg.retry_seconds,
                on_event=self._connection_event,
                # while reconnecting, nats-py holds what is sent in a buffer of this size:
                # room for the whole window of the largest batches (8 MiB each)
                pending_size=max(self.cfg.max_in_flight, 8) * (8 << 20))
        except (TimeoutError, OSError, nats.errors.Error) as e:
            log.error("relay: no NATS server answered at %s within %d s: %s",
                      ",".join(self.cfg.nats), self.cfg.retry_seconds,
                      str(e) or type(e).__name__)
            return exits.UNAVAILABLE
        self.metrics.connected.set(1)
        try:
            self.js = self.nc.jetstream(timeout=ACK_TIMEOUT_S)
            try:
                info, created = await jetstream.ensure_stream(
                    self.js, self.cfg.stream, self.cfg.replicas, self.cfg.max_age_s,
                    self.cfg.max_bytes, wait_seconds=self.cfg.retry_seconds)
            except (TimeoutError, nats.errors.Error) as e:
                log.error("relay: cannot find or create stream %s: %s", self.cfg.stream,
                          str(e) or type(e).__name__)
                return exits.UNAVAILABLE
            c = info.config
            log.info("relay: %s stream %s (subjects %s, %s replicas, max age %s s, max "
                     "bytes %s); NATS max payload %d bytes",
                     "created" if created else "using", c.name, ",".join(c.subjects or ()),
                     c.num_replicas, c.max_age or "no limit",
                     c.max_bytes if c.max_bytes and c.max_bytes > 0 else "no limit",
                     self.nc.max_payload)
            await self._receive()
            await self._drain()
            return exits.OK
        finally:
            await self.nc.close()

    def stop(self) -> None:
        if not self.stopping.is_set():
            self.notifier.stopping()
        self.stopping.set()

    def _status(self) -> str:
        m = self.metrics
        return (f"{len(self._ready)}/{len(self.cfg.sources)} sensors subscribed, "
                f"{_total(m.stored):,.0f} batches stored, {_total(m.failed):,.0f} failed, "
                f"{len(self._tasks)} in flight; NATS "
                f"{'connected' if self.nc is not None and self.nc.is_connected else 'away'}")

    async def _tell_systemd(self) -> None:
        """The watchdog and the status line, from a task of their own: the receive loop
        waits as long as the window is full (NATS away: up to retry_seconds), which is
        no hang. What stops this task is a stuck event loop. The status line was just
        sent with READY."""
        next_status = time.monotonic() + STATUS_INTERVAL_S
        while True:
            self.notifier.watchdog(True)
            now = time.monotonic()
            if now >= next_status:
                self.notifier.status(self._status())
                next_status = now + STATUS_INTERVAL_S
            await asyncio.sleep(0.2)

    async def _drain(self) -> None:
        """After stop: let the batches in flight finish (each within retry_seconds)."""
        if self._tasks:
            log.info("relay: stopping; %d batches in flight", len(self._tasks))
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _connection_event(self, what: str) -> None:
        if what == "reconnected":
            self.metrics.reconnects.inc()
            self.metrics.connected.set(1)
            url = self.nc.connected_url
            log.info("relay: reconnected to NATS at %s", url.netloc if url else "?")
        else:
            self.metrics.connected.set(0)
            log.warning("relay: %s from NATS; trying the other servers", what)

    # -- the sensors

    async def _receive(self) -> None:
        ctx = zmq.asyncio.Context()
        poller = zmq.asyncio.Poller()
        endpoint_of: dict[Any, str] = {}
        monitored: dict[Any, str] = {}  # a SUB socket's handshake events -> its endpoint
        # The configuration checked the key files (relay_config._curve_problems).
        curve = (curve_keys(self.cfg.curve_server_key, self.cfg.curve_client_cert or None)
                 if self.cfg.curve_server_key else None)
        systemd: asyncio.Task | None = None
        try:
            for endpoint in self.cfg.sources:
                sock = ctx.socket(zmq.SUB)
                sock.setsockopt(zmq.RCVHWM, RCVHWM)
                sock.setsockopt(zmq.LINGER, 0)
                if curve is not None:
                    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve
                for topic in (BATCH_TOPIC_PREFIX, HELLO):  # HELLO last: docs/wire-format.md
                    sock.subscribe(topic)
                monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS)
                poller.register(monitor, zmq.POLLIN)
                monitored[monitor] = endpoint
                sock.connect(endpoint)
                poller.register(sock, zmq.POLLIN)
                endpoint_of[sock] = endpoint
            log.info("relay: subscribed to %s; storing into stream %s at %s",
                     ", ".join(self.cfg.sources), self.cfg.stream, ",".join(self.cfg.nats))
            self.notifier.ready(self._status())
            systemd = asyncio.create_task(self._tell_systemd())
            while not self.stopping.is_set():
                for sock, _ in await poller.poll(timeout=200):
                    if sock in monitored:
                        await self._handshakes(sock, monitored[sock], curve is not None)
                        continue
                    for _ in range(100):  # bounded: one busy sensor does not starve others
                        if self.stopping.is_set():
                            break
                        try:
                            frames = await sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        await self._take(endpoint_of[sock], frames)
        finally:
            if systemd is not None:
                systemd.cancel()
            for sock in endpoint_of:
                sock.disable_monitor()
                sock.close()
            for monitor in monitored:
                monitor.close()
            ctx.term()

    async def _handshakes(self, monitor: Any, endpoint: str, curve: bool) -> None:
        """Say why a sensor refused the relay (a CURVE key it does not admit, CURVE on one
        side only), once until a handshake with it succeeds; ZeroMQ keeps retrying."""
        while True:
            try:
                event = await zmq_monitor.recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if self._refused.pop(endpoint, None) is not None:
                    log.info("relay: %s: handshake succeeded", endpoint)
            elif endpoint not in self._refused:
                self._refused[endpoint] = handshake_problem(event["event"], event["value"],
                                                            curve)
                log.warning("relay: %s: %s; retrying", endpoint, self._refused[endpoint])

    async def _take(self, endpoint: str, frames: list[zmq.Frame]) -> None:
        if len(frames) == 1:
            if frames[0].bytes == HELLO and endpoint not in self._ready:
                self._ready.add(endpoint)
                self.metrics.sensors_ready.set(len(self._ready))
                log.info("relay: %s: subscribed", endpoint)
            return
        topic = frames[0].bytes
        if len(frames) != 2 or not topic.startswith(BATCH_TOPIC_PREFIX):
            return
        body = frames[1].bytes
        try:
            batch = Batch.from_message(topic, body, endpoint)
        except ValueError:
            self.metrics.unreadable.inc()
            return
        sensor = batch.sensor_name or _host_of(endpoint)  # older daemons name none
        labels = (sensor, batch.iface, str(batch.worker))
        if batch.key not in self._names:  # a new stream: its counters exist from 0
            self._names[batch.key] = labels
            self.metrics.touch(labels)
        self.tracker.observe(batch.key, batch.seq, batch.epoch)
        m = self.metrics
        m.received.labels(*labels).inc()
        m.rows.labels(*labels).inc(batch.n)
        m.bytes.labels(*labels).inc(len(body))
        pending = _Pending(jetstream.batch_subject(sensor, batch.iface, batch.worker), body,
                           jetstream.message_id(sensor, batch.iface, batch.worker,
                                                batch.epoch, batch.seq), labels)
        await self._window.acquire()  # full: stop reading until an acknowledgement
        m.in_flight.inc()
        task = asyncio.create_task(self._store(pending))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _gap(self, key: StreamKey, missing: int) -> None:
        labels = self._names.get(key, (key.sensor, key.iface, str(key.worker)))
        self.metrics.gaps.labels(*labels).inc(missing)
        log.warning("relay: %s %s worker %s: %d batches missing (seq gap)", *labels, missing)

    # -- JetStream

    async def _store(self, p: _Pending) -> None:
        """Publish p until JetStream acknowledges it or retry_seconds pass."""
        nats = jetstream.require_nats()
        retryable = (TimeoutError, nats.errors.TimeoutError,
                     nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError,
                     nats.js.errors.ServiceUnavailableError, nats.js.errors.ServerError,
                     nats.errors.ConnectionReconnectingError,
                     nats.errors.OutboundBufferLimitError, nats.errors.StaleConnectionError)
        pause = FIRST_PAUSE_S
        deadline = p.started + self.cfg.retry_seconds
        headers = {"Nats-Msg-Id": p.msg_id}
        m = self.metrics
        try:
            while True:
                p.tries += 1
                try:
                    ack = await self.js.publish(p.subject, p.body, timeout=ACK_TIMEOUT_S,
                                                headers=headers)
                except retryable as e:
                    if time.monotonic() + pause >= deadline:
                        self._failed(p, f"no acknowledgement after {p.tries} tries in "
                                        f"{self.cfg.retry_seconds} s: "
                                        f"{str(e) or type(e).__name__}")
                        return
                    m.retries.inc()
                    log.debug("relay: %s: try %d: %s", p.msg_id, p.tries,
                              str(e) or type(e).__name__)
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, LAST_PAUSE_S)
                    continue
                except nats.errors.MaxPayloadError:
                    self._failed(p, f"{len(p.body)} bytes, more than the NATS servers' "
                                    f"max_payload ({self.nc.max_payload})", too_large=True)
                    return
                except (nats.errors.Error, nats.js.errors.APIError) as e:
                    self._failed(p, f"refused: {e}")
                    return
                (m.duplicates if ack.duplicate else m.stored).labels(*p.labels).inc()
                return
        finally:
            m.in_flight.dec()
            self._window.release()

    def _failed(self, p: _Pending, reason: str, too_large: bool = False) -> None:
        self.metrics.failed.labels(*p.labels).inc()
        log.error("relay: batch %s not stored: %s", p.msg_id, reason)
        if too_large and not self._told_too_large:
            self._told_too_large = True
            log.error("relay: raise max_payload in the NATS servers' configuration above "
                      "the sensors' ring.block_size + 4096 (docs: README, Many sensors, "
                      "many consumers)")


def _host_of(endpoint: str) -> str:
    """A name for a sensor whose batches carry none: its endpoint's host (or path)."""
    rest = endpoint.partition("://")[2]
    if endpoint.startswith("tcp://"):
        try:
            return parse_host_port(rest)[0]
        except ValueError:
            pass
    return rest or endpoint


def run_relay(cfg: RelayConfig) -> int:
    """`fanoutd relay`: serve metrics, relay until SIGTERM or SIGINT; the exit status."""
    try:
        jetstream.require_nats()
    except jetstream.MissingNats as e:
        log.error("fanoutd relay: %s", e)
        return exits.UNAVAILABLE
    metrics = RelayMetrics()
    host, port = parse_host_port(cfg.metrics)
    try:
        start_http_server(port, host, registry=metrics.registry)
    except OSError as e:
        log.error("relay: cannot serve metrics on %s: %s", cfg.metrics, e.strerror or e)
        return exits.UNAVAILABLE
    log.info("relay: metrics on http://%s/metrics (host %s)", cfg.metrics,
             socket.gethostname())

    async def main() -> int:
        relay = Relay(cfg, metrics)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, relay.stop)
        return await relay.run()

    return asyncio.run(main())
