"""The wire format, and the only place that knows it (docs/wire-format.md).

Every message a subscriber sees is [topic, msgpack map] or the one-frame welcome. Packet
batches come in two versions:

- version 1, rows: `fields` (the column names) and `packets` (one list per frame);
- version 2, columns: per field one little-endian buffer laid out as Apache Arrow lays out
  that column, so a subscriber wraps it without copying (numpy, pyarrow, polars) and builds
  O(columns) objects per batch instead of O(rows x fields).

The worker's batches are made in C (fanoutd/_fastpath.c); the encoders here are the
reference it is tested against byte for byte, and the fallback when it is not built.
Readers (fanoutd.client) take both versions.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

# --- topics and the welcome ---------------------------------------------------------------

BATCH_TOPIC_PREFIX = b"pkt."
STATS_TOPIC = b"stats"
HELLO = b"fanoutd.hello"  # one frame, sent once a subscription to it is in effect
SUBSCRIBE_HELLO = b"\x01" + HELLO  # that subscription, as an XPUB receives it

ROWS_VERSION = 1
COLUMNS_VERSION = 2
FORMATS = {"columns": COLUMNS_VERSION, "rows": ROWS_VERSION}  # publish.format
STATS_VERSION = 1


def stats_message(iface: str, workers: list[dict[str, Any]], version: str,
                  ts_ns: int, proxy: dict[str, Any] | None = None) -> dict[str, Any]:
    """The body of a `stats` message: one interface's per-worker reports and the
    publisher's own counters (named as the Prometheus metrics without the fanoutd_
    prefix, built by metrics.py)."""
    body = {"v": STATS_VERSION, "iface": iface, "ts_ns": ts_ns, "version": version,
            "workers_up": sum(bool(w["up"]) for w in workers), "workers": workers}
    if proxy is not None:
        body["publisher"] = proxy
    return body


# A batch is never larger than max_batch_bytes(its ring block) (tests/test_wire.py fills
# blocks with the frames that encode largest): each frame takes at least 96 bytes of its
# block (header and alignment) and every row, payload included, encodes in at most 17/16
# of what its frame takes in the block (a version 1 row of a frame cut after 14 bytes
# comes closest, with its nil tunnel fields); BATCH_OVERHEAD covers the batch's header.
# Subscriber queues are sized by it (publish.subscriber_queue_bytes).
BATCH_OVERHEAD = 4096


def max_batch_bytes(block_size: int) -> int:
    """The most bytes a batch of one ring block of block_size bytes encodes in."""
    return block_size + block_size // 16 + BATCH_OVERHEAD


def batch_topic(iface: str, worker: int) -> bytes:
    return b"%s%s.%d" % (BATCH_TOPIC_PREFIX, iface.encode(), worker)


# --- the fields -----------------------------------------------------------------------------

# Who stamped a packet: the NIC, the kernel on receive, or the packet socket on delivery.
TS_SOURCES = ("hardware", "software", "fallback")
# Why decoding stopped early (the `err` field); the order is the dictionary's.
ERROR_REASONS = (
    "truncated-ethernet",
    "truncated-vlan",
    "truncated-llc",
    "truncated-arp",
    "truncated-ipv4",
    "bad-ipv4-header",
    "bad-ipv4-length",
    "truncated-ipv6",
    "bad-ipv6-header",
    "truncated-ipv6-ext",
    "truncated-tcp",
    "bad-tcp-header",
    "truncated-udp",
    "truncated-sctp",
    "truncated-dccp",
    "truncated-icmp",
    "truncated-icmpv6",
    # Tunnel headers (added later, so appended: codes stay stable). An inner header that
    # is cut short gives the same reason as the outer one would, with `tunnel` set.
    "truncated-pppoe",
    "truncated-mpls",
    "truncated-gre",
    "truncated-vxlan",
    "truncated-geneve",
    "truncated-arista",
)
# The encapsulations decoded through (the `tunnel` field); the order is the dictionary's.
TUNNELS = ("pppoe", "mpls", "gre", "vxlan", "geneve", "ipip")


@dataclass(frozen=True)
class Field:
    """A field of a row, and how version 2 lays out its column.

    layout is one of: "fixed" (little-endian values of `fmt`), "bool" (a bitmap),
    "fixed_binary" (`width` bytes per value), "binary" (int32 offsets + bytes),
    "list" (int32 offsets + little-endian `fmt` values), "dictionary" (int8 codes into
    `dictionary`).
    """

    name: str
    arrow: str  # the Arrow type, as docs/wire-format.md names it
    layout: str
    nullable: bool
    fmt: str = ""  # struct format of one value (fixed and list layouts)
    width: int = 0  # bytes per value (fixed_binary)
    dictionary: tuple[str, ...] = ()
    # Version 2 leaves the column out of a batch in which it is nil in every row (the
    # tunnel fields: most traffic has none); a reader takes an absent column as all nil.
    optional: bool = False


FIELD_TABLE = (
    Field("ts_ns", "timestamp[ns, UTC]", "fixed", False, fmt="q"),
    Field("ts_src", "dictionary<int8, utf8>", "dictionary", False, dictionary=TS_SOURCES),
    Field("len", "uint32", "fixed", False, fmt="I"),
    Field("caplen", "uint32", "fixed", False, fmt="I"),
    Field("ifindex", "int32", "fixed", False, fmt="i"),
    Field("rxhash", "uint32", "fixed", False, fmt="I"),
    Field("pkttype", "uint8", "fixed", False, fmt="B"),
    Field("eth_dst", "fixed_size_binary[6]", "fixed_binary", True, width=6),
    Field("eth_src", "fixed_size_binary[6]", "fixed_binary", True, width=6),
    Field("ethertype", "uint16", "fixed", True, fmt="H"),
    Field("vlan", "list<uint16>", "list", False, fmt="H"),
    Field("src", "binary", "binary", True),
    Field("dst", "binary", "binary", True),
    Field("proto", "uint8", "fixed", True, fmt="B"),
    Field("ttl", "uint8", "fixed", True, fmt="B"),
    Field("sport", "uint16", "fixed", True, fmt="H"),
    Field("dport", "uint16", "fixed", True, fmt="H"),
    Field("tcp_flags", "uint16", "fixed", True, fmt="H"),
    Field("icmp_type", "uint8", "fixed", True, fmt="B"),
    Field("icmp_code", "uint8", "fixed", True, fmt="B"),
    Field("frag", "bool", "bool", False),
    Field("err", "dictionary<int8, utf8>", "dictionary", True, dictionary=ERROR_REASONS),
    # What a tunnel carries (docs/wire-format.md, "Tunnels"): set only for a frame that
    # went through one, and then the fields above still describe the outer packet.
    Field("tunnel", "dictionary<int8, utf8>", "dictionary", True, dictionary=TUNNELS,
          optional=True),
    Field("tunnel_id", "uint32", "fixed", True, fmt="I", optional=True),
    Field("inner_eth_dst", "fixed_size_binary[6]", "fixed_binary", True, width=6,
          optional=True),
    Field("inner_eth_src", "fixed_size_binary[6]", "fixed_binary", True, width=6,
          optional=True),
    Field("inner_src", "binary", "binary", True, optional=True),
    Field("inner_dst", "binary", "binary", True, optional=True),
    Field("inner_proto", "uint8", "fixed", True, fmt="B", optional=True),
    Field("inner_sport", "uint16", "fixed", True, fmt="H", optional=True),
    Field("inner_dport", "uint16", "fixed", True, fmt="H", optional=True),
    Field("inner_tcp_flags", "uint16", "fixed", True, fmt="H", optional=True),
)
TUNNEL_FIELDS = tuple(f.name for f in FIELD_TABLE if f.optional)  # the optional fields
# With payload_bytes > 0, rows end with one more field.
PAYLOAD = Field("payload", "binary", "binary", True)

FIELDS = tuple(f.name for f in FIELD_TABLE)
PAYLOAD_FIELD = PAYLOAD.name
FIELD_BY_NAME = {f.name: f for f in (*FIELD_TABLE, PAYLOAD)}


def fields_for(payload_bytes: int) -> tuple[Field, ...]:
    """The fields of a batch: every row field, and payload when asked for."""
    return (*FIELD_TABLE, PAYLOAD) if payload_bytes else FIELD_TABLE


# --- batch headers --------------------------------------------------------------------------


def batch_prefix(version: int, iface: str, worker: int, epoch: int,
                 fields: Sequence[str] = FIELDS, *, sensor: str = "") -> bytes:
    """The msgpack map of a batch up to the keys that change with each batch.

    Version 1 continues with "seq", then "packets"; version 2 with "seq", "n", then
    "columns" (rows_body/columns_body, and the C encoder, write those). The C encoder
    copies this prefix as it is, so a key added here reaches both encoders.
    """
    if version == ROWS_VERSION:
        head = ("v", ROWS_VERSION, "sensor", sensor, "iface", iface, "worker", worker,
                "epoch", epoch, "fields", list(fields))
        entries = 8
    else:
        head = ("v", COLUMNS_VERSION, "sensor", sensor, "iface", iface, "worker", worker,
                "epoch", epoch)
        entries = 8  # and seq, n, columns
    return bytes((0x80 | entries,)) + b"".join(_pack(x) for x in head)


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def rows_body(prefix: bytes, seq: int, rows: list[list]) -> bytes:
    """A version 1 batch: prefix, seq, then the rows as msgpack arrays."""
    return b"".join((prefix, _pack("seq"), _pack(seq), _pack("packets"), _pack(rows)))


LEN_MAX = 0xFFFFFFFF  # len and caplen are uint32 columns; no real frame comes near


def columns_body(prefix: bytes, seq: int, rows: list[list], payload_bytes: int) -> bytes:
    """A version 2 batch made of decoded rows (decode.decode_block): prefix, seq, n, then
    one column per field, in field order, but for optional fields nil in every row."""
    columns = {}
    for i, f in enumerate(fields_for(payload_bytes)):
        values = [row[i] for row in rows]
        if f.optional and all(v is None for v in values):
            continue
        if f.name in ("len", "caplen"):
            values = [min(v, LEN_MAX) for v in values]
        columns[f.name] = encode_column(f, values)
    return b"".join((prefix, _pack("seq"), _pack(seq), _pack("n"), _pack(len(rows)),
                     _pack("columns"), _pack(columns)))


# --- version 2 columns ----------------------------------------------------------------------

def bitmap(bits: Sequence[bool]) -> bytes:
    """Arrow's bitmap: bit i of byte i // 8 (least significant first) is bits[i]."""
    out = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        if bit:
            out[i >> 3] |= 1 << (i & 7)
    return bytes(out)


def _validity(values: Sequence[Any]) -> bytes | None:
    """The validity bitmap of a nullable column; None (no buffer) when nothing is null,
    as Arrow allows."""
    if all(v is not None for v in values):
        return None
    return bitmap([v is not None for v in values])


def _offsets(lengths: Sequence[int]) -> bytes:
    ends, total = [0], 0
    for n in lengths:
        total += n
        ends.append(total)
    return struct.pack(f"<{len(ends)}i", *ends)


def encode_column(f: Field, values: Sequence[Any]) -> dict[str, Any]:
    """One field's values (decode.py's row values, None for nil) as a version 2 column."""
    validity = _validity(values) if f.nullable else None
    column: dict[str, Any] = {"type": f.arrow, "validity": validity}
    if f.layout == "fixed":
        column["values"] = struct.pack(f"<{len(values)}{f.fmt}",
                                       *(0 if v is None else v for v in values))
    elif f.layout == "bool":
        column["values"] = bitmap(values)
    elif f.layout == "fixed_binary":
        column["values"] = b"".join(bytes(f.width) if v is None else v for v in values)
    elif f.layout == "binary":
        column["offsets"] = _offsets([0 if v is None else len(v) for v in values])
        column["values"] = b"".join(v for v in values if v is not None)
    elif f.layout == "list":
        column["offsets"] = _offsets([len(v) for v in values])
        items = [item for v in values for item in v]
        column["values"] = struct.pack(f"<{len(items)}{f.fmt}", *items)
    else:  # dictionary
        code = {name: i for i, name in enumerate(f.dictionary)}
        column["values"] = bytes(0 if v is None else code[v] for v in values)
        column["dictionary"] = list(f.dictionary)
    return column


def decode_column(column: dict[str, Any], n: int) -> list[Any]:
    """A version 2 column back to Python values (None for nil), from its type alone: the
    plain-Python reader, for records() and for fields this library does not know. The
    buffers may be bytes or memoryviews; binary values come out as bytes."""
    arrow = column["type"]
    values = column["values"]
    validity = column.get("validity")
    if arrow == "bool":
        out: list[Any] = [bool(values[i >> 3] >> (i & 7) & 1) for i in range(n)]
    elif arrow.startswith("fixed_size_binary["):
        width = int(arrow[len("fixed_size_binary["):-1])
        out = [bytes(values[i * width:(i + 1) * width]) for i in range(n)]
    elif arrow == "binary":
        ends = memoryview(column["offsets"]).cast("i") if n else [0]
        out = [bytes(values[ends[i]:ends[i + 1]]) for i in range(n)]
    elif arrow.startswith("list<"):
        item = memoryview(values).cast(ARROW_FORMATS[arrow[5:-1]]).tolist()
        ends = memoryview(column["offsets"]).cast("i") if n else [0]
        out = [item[ends[i]:ends[i + 1]] for i in range(n)]
    elif arrow.startswith("dictionary<"):
        names = column["dictionary"]
        out = [names[code] for code in values[:n]]
    else:
        out = memoryview(values).cast(ARROW_FORMATS[arrow]).tolist()
    if validity is not None:
        out = [v if validity[i >> 3] >> (i & 7) & 1 else None for i, v in enumerate(out)]
    return out


# Arrow's fixed-width types and their struct/memoryview formats. The encoders pack
# little-endian explicitly; memoryview.cast reads in the machine's order, hence the check.
ARROW_FORMATS = {"int8": "b", "uint8": "B", "int16": "h", "uint16": "H", "int32": "i",
                 "uint32": "I", "int64": "q", "uint64": "Q", "timestamp[ns, UTC]": "q",
                 "float32": "f", "float64": "d"}
if sys.byteorder != "little":  # pragma: no cover - Linux capture hosts are little-endian
    raise ImportError("fanoutd.wire reads columns with the machine's byte order, which "
                      "must be little-endian")
