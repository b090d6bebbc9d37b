"""Subscriber API: connect to one or many fanoutd publish endpoints and read packet batches.

    from fanoutd.client import Subscriber
    with Subscriber(["tcp://sensor-a:7440", "tcp://sensor-b:7440"]) as sub:
        for rec in sub.records():
            print(rec.sensor, rec.worker, rec.proto, rec.src_ip, rec.sport, rec.dst_ip, rec.dport)

`records()` yields `Record`s: attribute access to every wire field plus conversions on
demand (`src_ip`, `time`, `tcp_flags_text`, ...). `packets()` yields plain dicts and
`batches()` whole `Batch`es.

Loss accounting is per stream, a `StreamKey` (sensor, iface, worker), where the sensor is
the endpoint string the batch came from: each endpoint has its own SUB socket, so two
sensors that both capture on `eth0` with a worker 0 are told apart. `lost[key]` counts
batches missing from the stream's `seq` sequence (dropped at a high-water mark),
`duplicates` counts batches seen again (re-sent after a worker was replaced), `restarts[key]`
counts rings replaced (a `seq` of 0 after higher values: daemon restart, reload, interface
re-created). Pass `on_gap=callback` to hear of each gap as it is found.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import msgpack
import zmq

HELLO = b"fanoutd.hello"
DEFAULT_ENDPOINT = "tcp://127.0.0.1:7440"

# The row fields of wire format version 1 (docs/wire-format.md). A Record returns None
# for one of these that a batch does not carry; other names must be in the batch's fields.
V1_FIELDS = ("ts_ns", "len", "caplen", "ifindex", "rxhash", "pkttype", "eth_dst", "eth_src",
             "ethertype", "vlan", "src", "dst", "proto", "ttl", "sport", "dport", "tcp_flags",
             "icmp_type", "icmp_code", "frag", "err")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class StreamKey(NamedTuple):
    """One worker's batch stream on one sensor: what `seq` counts along."""

    sensor: str  # the endpoint the batches came from
    iface: str
    worker: int


class StreamCounts(dict):
    """{StreamKey: count}. For code written when streams were keyed by (iface, worker),
    such a pair is also answered, with the sum over sensors (`lost[("eth0", 0)]`,
    `lost.get(("eth0", 0), 0)`, `("eth0", 0) in lost`)."""

    def _pair_total(self, key: tuple) -> int | None:
        found = [v for k, v in self.items() if (k.iface, k.worker) == tuple(key)]
        return sum(found) if found else None

    def __missing__(self, key: Any) -> int:
        total = self._pair_total(key) if isinstance(key, tuple) and len(key) == 2 else None
        if total is None:
            raise KeyError(key)
        return total

    def __contains__(self, key: object) -> bool:
        if dict.__contains__(self, key):
            return True
        return isinstance(key, tuple) and len(key) == 2 and self._pair_total(key) is not None

    def get(self, key: Any, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default


@dataclass(frozen=True)
class Batch:
    """One published batch (one ring block of one worker)."""

    topic: str
    iface: str
    worker: int
    seq: int
    fields: list[str]
    packets: list[list]
    sensor: str = ""  # the endpoint it came from
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", {name: i for i, name in enumerate(self.fields)})

    @property
    def key(self) -> StreamKey:
        return StreamKey(self.sensor, self.iface, self.worker)

    def rows(self) -> Iterator[dict[str, Any]]:
        """Each packet as {field: value}, plus iface, worker and seq of its batch."""
        for row in self.packets:
            pkt = dict(zip(self.fields, row, strict=False))
            pkt["iface"] = self.iface
            pkt["worker"] = self.worker
            pkt["seq"] = self.seq
            yield pkt

    def records(self) -> Iterator[Record]:
        """Each packet as a Record (no copy: a Record reads the batch's row)."""
        for row in self.packets:
            yield Record(self, row)


class Record:
    """One captured packet: a view on a row of a batch, with conversions on demand.

    Every wire field is an attribute (`rec.sport`, `rec.proto`, `rec.ts_ns`, ...), also
    fields this library does not know, read through the batch's `fields`; a version 1
    field the batch does not carry is None. `rec["sport"]` and `rec.get("sport")` work
    too. Raw values are as on the wire (addresses are bytes); the properties below convert.
    """

    __slots__ = ("_batch", "_row")

    def __init__(self, batch: Batch, row: list) -> None:
        self._batch = batch
        self._row = row

    # -- where it came from

    @property
    def sensor(self) -> str:
        """The endpoint the packet's batch came from."""
        return self._batch.sensor

    @property
    def iface(self) -> str:
        return self._batch.iface

    @property
    def worker(self) -> int:
        return self._batch.worker

    @property
    def seq(self) -> int:
        """The `seq` of the packet's batch."""
        return self._batch.seq

    @property
    def key(self) -> StreamKey:
        return self._batch.key

    # -- wire fields

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not a wire field; also keeps copy/pickle from recursing
            raise AttributeError(name)
        i = self._batch.index.get(name)
        if i is not None:
            return self._row[i] if i < len(self._row) else None
        if name in V1_FIELDS:
            return None
        raise AttributeError(f"no field {name!r} in this record "
                             f"(fields: {', '.join(self._batch.fields)})")

    def __getitem__(self, name: str) -> Any:
        if name in ("iface", "worker", "seq", "sensor"):
            return getattr(self, name)
        try:
            return self.__getattr__(name)
        except AttributeError:
            raise KeyError(name) from None

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default

    @property
    def fields(self) -> list[str]:
        """The wire field names of this record, in wire order."""
        return self._batch.fields

    # -- conversions

    @property
    def src_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        return _ip(self.get("src"))

    @property
    def dst_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        return _ip(self.get("dst"))

    @property
    def eth_src_mac(self) -> str | None:
        return format_mac(self.get("eth_src"))

    @property
    def eth_dst_mac(self) -> str | None:
        return format_mac(self.get("eth_dst"))

    @property
    def time(self) -> datetime | None:
        """Capture time as an aware datetime in UTC (microsecond precision; ts_ns has
        the nanoseconds)."""
        ts = self.get("ts_ns")
        return None if ts is None else _EPOCH + timedelta(microseconds=ts // 1000)

    @property
    def tcp_flags_text(self) -> str:
        """TCP flags in tcpdump's letters ("S", "S.", "F.", ...); "" when not TCP."""
        return format_tcp_flags(self.get("tcp_flags"))

    def as_dict(self, raw: bool = False) -> dict[str, Any]:
        """Every field plus iface, worker, seq and sensor. JSON-ready (MAC and IP addresses
        as text, other bytes as hex) unless raw, which keeps the wire values."""
        out = dict(zip(self._batch.fields, self._row, strict=False))
        out.update(iface=self.iface, worker=self.worker, seq=self.seq, sensor=self.sensor)
        return out if raw else to_json_ready(out)

    def to_json(self) -> str:
        """as_dict() as one line of compact JSON."""
        return json.dumps(self.as_dict(), separators=(",", ":"))

    def __repr__(self) -> str:
        return f"Record({self.as_dict()!r})"


class SeqTracker:
    """Follows the `seq` of each stream and counts what is missing.

    For each StreamKey: the first batch sets the start; seq = last + 1 is the normal case;
    a jump is a gap (the batches in between were lost); seq 0 after a higher value is a
    replaced ring (restart), not a gap; any other seq at or below the last one is a
    duplicate. After a restart, batches of the old ring may still arrive for a moment:
    ones numbered above the old ring's last seq are taken as its late batches, not as a
    gap of the new ring, until the new ring's seq passes that number.
    """

    def __init__(self, on_gap: Callable[[StreamKey, int], None] | None = None) -> None:
        self.on_gap = on_gap
        self.last: dict[StreamKey, int] = {}
        self.lost: dict[StreamKey, int] = StreamCounts()
        self.restarts: dict[StreamKey, int] = StreamCounts()
        self.duplicates = 0
        self._old_last: dict[StreamKey, int] = {}  # the replaced ring's last seq

    def observe(self, key: StreamKey, seq: int) -> int:
        """Account for one batch; return how many batches are missing before it."""
        last = self.last.get(key)
        if last is None:
            self.last[key] = seq
            return 0
        old = self._old_last.get(key)
        if seq == 0 and last > 0:
            self._old_last[key] = last
            self.last[key] = 0
            self.restarts[key] = self.restarts.get(key, 0) + 1
            return 0
        if seq == last + 1:
            self.last[key] = seq
            if old is not None and seq > old:
                del self._old_last[key]  # the new ring caught up: no telling them apart
            return 0
        if old is not None and seq > old:  # a late batch of the replaced ring
            self._old_last[key] = seq
            return self._gap(key, seq - old - 1)
        if seq > last:
            self.last[key] = seq
            return self._gap(key, seq - last - 1)
        self.duplicates += 1
        return 0

    def _gap(self, key: StreamKey, missing: int) -> int:
        if missing > 0:
            self.lost[key] = self.lost.get(key, 0) + missing
            if self.on_gap is not None:
                self.on_gap(key, missing)
        return missing


class Subscriber:
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
        curve = self._curve_keys(curve_server_key, curve_client_cert) if curve_server_key \
            else None
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
                sock.connect(ep)
                self.poller.register(sock, zmq.POLLIN)
        except BaseException:
            self.close()
            raise
        self.sock = next(iter(self._endpoint_of))  # the first endpoint's socket
        self.hellos = 0
        self.ready: set[str] = set()  # endpoints whose welcome message arrived
        self.tracker = SeqTracker(on_gap)
        self._pending: deque[Batch] = deque()

    @staticmethod
    def _curve_keys(server_key: str, client_cert: str | None) -> tuple[bytes, bytes, bytes]:
        import zmq.auth

        server_public, _ = zmq.auth.load_certificate(server_key)
        if client_cert is None:  # an ephemeral identity: fine when any client is admitted
            public, secret = zmq.curve_keypair()
        else:
            public, secret = zmq.auth.load_certificate(client_cert)
            if secret is None:
                raise ValueError(f"{client_cert} holds no secret key (use NAME.key_secret)")
        return server_public, public, secret

    # -- accounting, kept as attributes for compatibility

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
            sock.close()

    def wait_ready(self, timeout: float = 5.0) -> bool:
        """Wait for every endpoint's welcome message: from then on nothing published is
        missed for lack of a subscription. Batches that arrive meanwhile are kept for
        batches()/records()/packets(). False if `timeout` seconds pass first."""
        deadline = time.monotonic() + timeout
        while len(self.ready) < len(self.endpoints):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._receive(left)
        return True

    def batches(self, timeout: float | None = None) -> Iterator[Batch]:
        """Yield batches as they come; stop after `timeout` seconds with nothing (None: never)."""
        while True:
            while self._pending:
                yield self._pending.popleft()
            if not self._receive(timeout):  # only with a timeout
                return

    def records(self, timeout: float | None = None) -> Iterator[Record]:
        """Yield every packet as a Record; `timeout` as in batches()."""
        for batch in self.batches(timeout):
            yield from batch.records()

    def packets(self, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Yield every packet as a dict (Batch.rows); `timeout` as in batches()."""
        for batch in self.batches(timeout):
            yield from batch.rows()

    def _receive(self, timeout: float | None) -> bool:
        """Wait up to `timeout` seconds (None: forever) for messages and take in what is
        waiting on every socket. False when nothing arrived in time."""
        events = self.poller.poll(None if timeout is None else max(0, int(timeout * 1000)))
        for sock, _ in events:
            for _ in range(1000):  # bounded, so one busy sensor cannot starve the others
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._take(self._endpoint_of[sock], frames)
        return bool(events)

    def _take(self, endpoint: str, frames: list[bytes]) -> None:
        if len(frames) == 1:
            if frames[0] == HELLO:
                self.hellos += 1
                self.ready.add(endpoint)
            return
        if len(frames) != 2 or not frames[0].startswith(b"pkt."):
            return
        body = msgpack.unpackb(frames[1], raw=False)
        batch = Batch(frames[0].decode(), body["iface"], body["worker"], body["seq"],
                      body["fields"], body["packets"], endpoint)
        self.tracker.observe(batch.key, batch.seq)
        self._pending.append(batch)


def _ip(raw: bytes | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if raw is None:
        return None
    try:
        return ipaddress.ip_address(raw)
    except ValueError:  # neither 4 nor 16 bytes
        return None


def format_mac(raw: bytes | None) -> str | None:
    return None if raw is None else raw.hex(":")


def format_ip(raw: bytes | None) -> str | None:
    ip = _ip(raw)
    if ip is None:
        return None if raw is None else raw.hex()
    return str(ip)


TCP_FLAG_LETTERS = ((0x01, "F"), (0x02, "S"), (0x04, "R"), (0x08, "P"), (0x10, "."),
                    (0x20, "U"), (0x40, "E"), (0x80, "W"), (0x100, "N"))


def format_tcp_flags(flags: int | None) -> str:
    """tcpdump's notation: S for SYN, . for ACK, ..."""
    if flags is None:
        return ""
    return "".join(letter for bit, letter in TCP_FLAG_LETTERS if flags & bit) or "none"


def to_json_ready(pkt: dict[str, Any]) -> dict[str, Any]:
    """A packet dict with addresses as text, for JSON output."""
    out = dict(pkt)
    for key in ("eth_src", "eth_dst"):
        if key in out:
            out[key] = format_mac(out[key])
    for key in ("src", "dst"):
        if key in out:
            out[key] = format_ip(out[key])
    return {k: (v.hex() if isinstance(v, bytes) else v) for k, v in out.items()}
