"""Subscriber API: connect to one or many fanoutd publish endpoints and read packet batches.

    from fanoutd.client import Subscriber
    with Subscriber(["tcp://sensor-a:7440", "tcp://sensor-b:7440"]) as sub:
        for rec in sub.records():
            print(rec.sensor, rec.worker, rec.proto, rec.src_ip, rec.sport, rec.dst_ip, rec.dport)

`batches()` yields whole `Batch`es (fanoutd.batch), in either wire-format version: read
them as numpy columns (`columns()`), a pyarrow RecordBatch (`to_arrow()`), a polars
DataFrame (`to_polars()`) or Records. `records()` yields `Record`s: attribute access to
every wire field plus conversions on demand (`src_ip`, `time`, `tcp_flags_text`, ...).
`packets()` yields plain dicts.

Loss accounting is per stream, a `StreamKey` (sensor, iface, worker), where the sensor is
the endpoint string the batch came from: each endpoint has its own SUB socket, so two
sensors that both capture on `eth0` with a worker 0 are told apart. `lost[key]` counts
batches missing from the stream's `seq` sequence (dropped at a high-water mark),
`duplicates` counts batches seen again (re-sent after a worker was replaced), `restarts[key]`
counts rings replaced (a new `epoch`, with `seq` from 0: daemon restart, reload, interface
re-created). Pass `on_gap=callback` to hear of each gap as it is found.

`JetStreamSubscriber` (fanoutd.jetstream_client) reads the same batches from a NATS
JetStream stream that `fanoutd relay` fills, shared between processes by a durable name.

`refused[endpoint]` says why an endpoint's handshake failed (the publisher did not admit
this client's CURVE key, the server key is wrong, CURVE on one side only): ZeroMQ itself
would only keep quiet, or keep retrying.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import zmq
from zmq.utils import monitor as zmq_monitor

from fanoutd.batch import (
    Batch,
    BatchSource,
    Record,
    StreamKey,
    format_ip,
    format_mac,
    format_tcp_flags,
    to_json_ready,
)
from fanoutd.jetstream_client import JetStreamSubscriber
from fanoutd.wire import BATCH_TOPIC_PREFIX, HELLO

__all__ = ["Batch", "JetStreamSubscriber", "Record", "SeqTracker", "StreamKey", "Subscriber",
           "format_ip", "format_mac", "format_tcp_flags", "to_json_ready"]

DEFAULT_ENDPOINT = "tcp://127.0.0.1:7440"

# Socket monitor events that tell whether an endpoint let this client in.
HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                     | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class SeqTracker:
    """Follows the `seq` of each stream and counts what is missing.

    For each StreamKey: the first batch sets the start; seq = last + 1 is the normal case;
    a jump is a gap (the batches in between were lost); any other seq at or below the
    last one is a duplicate. A new `epoch` is a replaced ring (a restart, not a gap): its
    seq starts again from 0, so batches before the first one seen of it were lost.
    Batches of the replaced ring may still arrive for a moment; they are counted against
    that ring. Batches without an epoch (daemons older than the field) take seq 0 after a
    higher value as the restart.
    """

    def __init__(self, on_gap: Callable[[StreamKey, int], None] | None = None) -> None:
        self.on_gap = on_gap
        self.last: dict[StreamKey, int] = {}
        self.lost: dict[StreamKey, int] = {}
        self.restarts: dict[StreamKey, int] = {}
        self.duplicates = 0
        self._epoch: dict[StreamKey, int | None] = {}  # the current ring's epoch
        self._old: dict[StreamKey, tuple[int | None, int]] = {}  # (epoch, last seq) replaced

    def observe(self, key: StreamKey, seq: int, epoch: int | None = None) -> int:
        """Account for one batch; return how many batches are missing before it."""
        last = self.last.get(key)
        if last is None:
            self.last[key], self._epoch[key] = seq, epoch
            return 0
        if epoch is None:
            return self._observe_without_epoch(key, seq, last)
        if epoch == self._epoch[key]:
            return self._next(key, seq, last)
        old = self._old.get(key)
        if old is not None and old[0] == epoch:  # a late batch of the replaced ring
            if seq <= old[1]:
                self.duplicates += 1
                return 0
            self._old[key] = (epoch, seq)
            return self._gap(key, seq - old[1] - 1)
        self._old[key] = (self._epoch[key], last)  # a new ring
        self._epoch[key], self.last[key] = epoch, seq
        self.restarts[key] = self.restarts.get(key, 0) + 1
        return self._gap(key, seq)  # its batches before this one

    def _next(self, key: StreamKey, seq: int, last: int) -> int:
        if seq > last:
            self.last[key] = seq
            return self._gap(key, seq - last - 1)
        self.duplicates += 1
        return 0

    def _observe_without_epoch(self, key: StreamKey, seq: int, last: int) -> int:
        old = self._old.get(key)
        if seq == 0 and last > 0:
            self._old[key] = (None, last)
            self.last[key] = 0
            self.restarts[key] = self.restarts.get(key, 0) + 1
            return 0
        if seq == last + 1:
            self.last[key] = seq
            if old is not None and seq > old[1]:
                del self._old[key]  # the new ring caught up: no telling them apart
            return 0
        if old is not None and seq > old[1]:  # a late batch of the replaced ring
            self._old[key] = (None, seq)
            return self._gap(key, seq - old[1] - 1)
        return self._next(key, seq, last)

    def _gap(self, key: StreamKey, missing: int) -> int:
        if missing > 0:
            self.lost[key] = self.lost.get(key, 0) + missing
            if self.on_gap is not None:
                self.on_gap(key, missing)
        return missing


def curve_keys(server_key: str, client_cert: str | None) -> tuple[bytes, bytes, bytes]:
    """(server public, client public, client secret) for a CURVE SUB socket: the
    publisher's public key file (`fanoutd keygen` writes NAME.key) and this client's
    secret key file (NAME.key_secret), or a new key pair when client_cert is None (an
    ephemeral identity, which a publisher with clients_dir refuses). OSError or
    ValueError for a file that is missing or holds no such key."""
    import zmq.auth

    server_public, _ = zmq.auth.load_certificate(server_key)
    if client_cert is None:
        public, secret = zmq.curve_keypair()
    else:
        public, secret = zmq.auth.load_certificate(client_cert)
        if secret is None:
            raise ValueError(f"{client_cert} holds no secret key (use NAME.key_secret)")
    return server_public, public, secret


def key_file_problem(path: str, secret: bool) -> str | None:
    """Why `path` is not a key file `fanoutd keygen` wrote (with its secret key, if
    secret), or None: for the flags and settings that name one."""
    import zmq.auth

    if not os.path.isfile(path):
        return f"cannot read {path}: no such file"
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except OSError as e:
        return f"cannot read {path}: {e.strerror or e}"
    except ValueError as e:
        return f"{path}: not a key file of fanoutd keygen ({e})"
    if secret and secret_key is None:
        return f"{path} holds no secret key (use the NAME.key_secret file)"
    if not public:
        return f"{path} holds no public key"
    return None


class Subscriber(BatchSource):
    """Reads fanoutd's batches from one or many endpoints (sensors).

    One SUB socket per endpoint, polled together, so every batch is known to come from its
    endpoint (`Batch.sensor`, `Record.sensor`) and `seq` gaps are counted per
    (sensor, iface, worker). See the module docstring for `lost`, `duplicates`, `restarts`
    and `on_gap`.
    """

    def __init__(self, endpoint: str | Iterable[str] = DEFAULT_ENDPOINT,
                 topics: tuple[bytes, ...] = (b"pkt.",), rcvhwm: int = 10000,
                 context: zmq.Context | None = None, curve_server_key: str | None = None,
                 curve_client_cert: str | None = None,
                 on_gap: Callable[[StreamKey, int], None] | None = None) -> None:
        """endpoint: one endpoint or several (e.g. one per sensor); each is connected
        on its own socket. rcvhwm: each socket's receive high-water mark, in messages:
        beyond it ZeroMQ drops batches, which shows as gaps.
        curve_server_key: the publisher's public key file (`fanoutd keygen` writes
        NAME.key), the same for every endpoint; curve_client_cert: this client's secret
        key file (NAME.key_secret), which the publisher must know
        (publish.curve.clients_dir) unless it admits any client.
        on_gap(key, missing): called, while receiving, for each gap found."""
        self.endpoints = [endpoint] if isinstance(endpoint, str) else list(endpoint)
        if not self.endpoints:
            raise ValueError("no endpoint to connect to")
        self.ctx = context or zmq.Context.instance()
        self.poller = zmq.Poller()
        self._endpoint_of: dict[zmq.Socket, str] = {}
        self._monitors: dict[zmq.Socket, zmq.Socket] = {}  # SUB socket -> its monitor
        self._monitored: dict[zmq.Socket, str] = {}  # monitor socket -> endpoint
        self.curve = curve_server_key is not None
        curve = curve_keys(curve_server_key, curve_client_cert) if self.curve else None
        try:
            for ep in self.endpoints:
                sock = self.ctx.socket(zmq.SUB)
                self._endpoint_of[sock] = ep
                sock.setsockopt(zmq.RCVHWM, rcvhwm)
                sock.setsockopt(zmq.LINGER, 0)
                if curve is not None:
                    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve
                for topic in (*topics, HELLO):  # HELLO last: see docs/wire-format.md
                    sock.subscribe(topic)
                monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS)
                self._monitors[sock] = monitor
                self._monitored[monitor] = ep
                sock.connect(ep)
                self.poller.register(sock, zmq.POLLIN)
                self.poller.register(monitor, zmq.POLLIN)
        except BaseException:
            self.close()
            raise
        self.sock = next(iter(self._endpoint_of))  # the first endpoint's socket
        self.unreadable = 0  # messages on a batch topic that are no batch this library reads
        self.ready: set[str] = set()  # endpoints whose welcome message arrived
        self.refused: dict[str, str] = {}  # endpoint -> why its last handshake failed
        self.tracker = SeqTracker(on_gap)
        self._pending: deque[Batch] = deque()

    # -- the accounting of every stream, read from the tracker

    @property
    def lost(self) -> dict[StreamKey, int]:
        """Batches missing per stream."""
        return self.tracker.lost

    @property
    def duplicates(self) -> int:
        return self.tracker.duplicates

    @property
    def restarts(self) -> dict[StreamKey, int]:
        """Rings replaced per stream (seq back to 0)."""
        return self.tracker.restarts

    @property
    def last_seq(self) -> dict[StreamKey, int]:
        return self.tracker.last

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for sock in self._endpoint_of:
            if sock.closed:  # closed already: close() may be called again
                continue
            monitor = self._monitors.get(sock)
            if monitor is not None:  # first, or the monitor's inproc name stays taken
                sock.disable_monitor()
                monitor.close()
            sock.close()

    def wait_ready(self, timeout: float = 5.0) -> bool:
        """Wait for every endpoint's welcome message: from then on nothing published is
        missed for lack of a subscription. Batches that arrive meanwhile are kept for
        batches()/records()/packets(). False if `timeout` seconds pass first, or once
        every endpoint not ready has refused this client (see `refused`)."""
        deadline = time.monotonic() + timeout
        endpoints = set(self.endpoints)
        while not endpoints <= self.ready:
            left = deadline - time.monotonic()
            if left <= 0 or endpoints <= self.ready | set(self.refused):
                return False
            self._poll(left)
        return True

    def batches(self, timeout: float | None = None) -> Iterator[Batch]:
        """Yield batches as they come; stop after `timeout` seconds with nothing (None: never)."""
        while True:
            while self._pending:
                yield self._pending.popleft()
            if not self._receive(timeout):  # only with a timeout
                return

    def _receive(self, timeout: float | None) -> bool:
        """Wait up to `timeout` seconds (None: forever) for messages and take in what is
        waiting on every socket. False when no message arrived in time (handshake events
        are taken in meanwhile, but they are not messages)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            got = self._poll(left)
            if got is not None:
                return got
            if left == 0:
                return False

    def _poll(self, timeout: float | None) -> bool | None:
        """One poll of every socket: True when messages were taken in, None when only
        handshake events were, False when nothing came within timeout seconds."""
        events = self.poller.poll(None if timeout is None else int(timeout * 1000))
        messages = False
        for sock, _ in events:
            if sock in self._monitored:
                self._handshakes(sock)
                continue
            messages = True
            for _ in range(1000):  # bounded, so one busy sensor cannot starve the others
                try:
                    # No copy into bytes: the batch is unpacked from ZeroMQ's own buffer.
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._take(self._endpoint_of[sock], frames)
        return True if messages else None if events else False

    def _handshakes(self, monitor: zmq.Socket) -> None:
        """Take in an endpoint's handshake events: a failure says why in `refused`."""
        endpoint = self._monitored[monitor]
        while True:
            try:
                event = zmq_monitor.recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.refused.pop(endpoint, None)
            else:
                self.refused[endpoint] = handshake_problem(event["event"], event["value"],
                                                           self.curve)

    def _take(self, endpoint: str, frames: list[zmq.Frame]) -> None:
        if len(frames) == 1:
            if frames[0].bytes == HELLO:
                self.ready.add(endpoint)
            return
        topic = frames[0].bytes
        if len(frames) != 2 or not topic.startswith(BATCH_TOPIC_PREFIX):
            return
        try:
            batch = Batch.from_message(topic, frames[1].buffer, endpoint)
        except ValueError:
            self.unreadable += 1  # a newer wire version, or not a batch at all
            return
        self.tracker.observe(batch.key, batch.seq, batch.epoch)
        self._pending.append(batch)


def handshake_problem(event: int, value: int, curve: bool) -> str:
    """Why a handshake failed, from a socket monitor event, for a client that uses CURVE
    (curve) or not."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (f"the CURVE handshake failed: the publisher does not admit this client's "
                f"key (status {value})")
    if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        return ("the publisher does not use CURVE" if curve else
                "the publisher requires CURVE: its public key and a client key are needed")
    if curve:  # the publisher could not decrypt what this client sent
        return "the CURVE handshake failed: the server key is not the publisher's"
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:  # before its greeting was read
        return "the handshake failed: the publisher hung up (does it require CURVE?)"
    return f"the handshake failed (ZMTP error 0x{value:x})"
