"""A received batch of packet summaries, in either wire-format version, and its packets.

A version 2 batch (columns) is read in place: `columns()` wraps each column in a numpy
array without copying it where Arrow's layout allows, `to_arrow()` makes a
`pyarrow.RecordBatch` of the same buffers, `to_polars()` a polars DataFrame. `records()`
gives one light `Record` per packet; it reads a field through that field's column, which
is turned into Python values once per batch, when first read. Version 1 batches (rows)
answer the same calls. numpy, pyarrow and polars are optional (`pip install
fanoutd[arrow]`): records(), rows() and column() need none of them.

Optional fields (wire.Field.optional: the tunnel fields) are part of every batch as read
here: a version 2 batch leaves out the column of one that is nil in all its rows, and a
batch of a daemon older than the field does not have it; either way the field is in
`fields` and reads as null in every row, through every call (None in records, all-null
arrays in to_arrow), so that every batch of one daemon has the same fields and schema.
"""

from __future__ import annotations

import ipaddress
import json
import struct
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import msgpack

from fanoutd import wire

try:  # buffers stay where they were received: bins become memoryviews, not copies
    from fanoutd._fastpath import arrow_capsules, unpack
except ImportError:  # not built: msgpack, which copies each bin, and pyarrow per column
    arrow_capsules = None

    def unpack(body: bytes | memoryview) -> Any:
        return msgpack.unpackb(body, raw=False)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
WIRE_FIELDS = frozenset(wire.FIELD_BY_NAME)  # a Record answers None for one a batch lacks
_WIRE_RANK = {name: i for i, name in enumerate(wire.FIELD_BY_NAME)}  # payload last
_fields_cache: dict[tuple[str, ...], list[str]] = {}


def with_optional_fields(carried: list[str]) -> list[str]:
    """The fields a batch is read with: the ones it carries, in their order, and every
    optional field it lacks, each right after the last carried known field that comes
    before it on the wire (before all of them when none does)."""
    key = tuple(carried)
    cached = _fields_cache.get(key)
    if cached is None:
        cached = list(carried)
        for name in wire.TUNNEL_FIELDS:  # the optional fields
            if name in cached:
                continue
            rank = _WIRE_RANK[name]
            at = 0
            for i, have in enumerate(cached):
                if _WIRE_RANK.get(have, rank) < rank:
                    at = i + 1
            cached.insert(at, name)
        if len(_fields_cache) >= 256:  # a hostile stream of field lists: stay bounded
            _fields_cache.clear()
        _fields_cache[key] = cached
    return list(cached)


class StreamKey(NamedTuple):
    """One worker's batch stream on one sensor: what `seq` counts along."""

    sensor: str  # the endpoint the batches came from
    iface: str
    worker: int


class Batch:
    """One published batch: one ring block of one worker.

    `v` is its wire-format version; `fields` its field names: those it carries
    (`carried`, in wire order) and the optional ones it lacks (null in every row, see
    the module's docstring); `n` its packet count. For version 2 `raw_columns` are its
    columns as sent (docs/wire-format.md); `packets` are its rows in `fields` order (for
    version 1, as sent when it carries every field).
    """

    def __init__(self, topic: str, iface: str, worker: int, seq: int,
                 fields: list[str] | None = None, packets: list[list] | None = None,
                 sensor: str = "", epoch: int | None = None,
                 raw_columns: dict[str, dict] | None = None, n: int | None = None) -> None:
        self.topic = topic
        self.iface = iface
        self.worker = worker
        self.seq = seq
        self.sensor = sensor  # the endpoint it came from (a JetStream subscriber: the name)
        self.sensor_name: str | None = None  # the name it carries; None from older daemons
        self.epoch = epoch  # None from daemons older than the field
        self.raw_columns = raw_columns
        self._rows_sent: list[list] = []
        if raw_columns is not None:
            self.v = wire.COLUMNS_VERSION
            self.carried = list(raw_columns)
            self.n = n or 0
        else:
            self.v = wire.ROWS_VERSION
            self.carried = list(fields or [])
            self._rows_sent = list(packets or [])
            self.n = len(self._rows_sent)
        self.fields = with_optional_fields(self.carried)
        self.index = {name: i for i, name in enumerate(self.fields)}
        self._position = {name: i for i, name in enumerate(self.carried)}  # in a row sent
        # Version 1 rows as sent serve as `packets` when they hold every field.
        self._packets: list[list] | None = (self._rows_sent if raw_columns is None
                                            and len(self.fields) == len(self.carried)
                                            else None)
        self._values: dict[str, list] = {}  # column name -> Python values, once read
        self._rows_checked = False

    @classmethod
    def from_message(cls, topic: bytes | str, body: bytes | memoryview | dict,
                     sensor: str = "") -> Batch:
        """A batch from a message's two frames (the body as bytes, a buffer, or already
        unpacked). ValueError when it is not a batch of a version this library reads."""
        if not isinstance(body, dict):
            try:
                body = unpack(body)
            except (ValueError, msgpack.UnpackException) as e:
                raise ValueError(f"not msgpack: {e}") from None
        topic = topic.decode() if isinstance(topic, bytes) else topic
        version = body.get("v") if isinstance(body, dict) else None
        if version not in (wire.ROWS_VERSION, wire.COLUMNS_VERSION):
            raise ValueError(f"wire-format version {version!r} is not one this library "
                             f"reads")
        try:
            args = (topic, body["iface"], body["worker"], body["seq"])
            if version == wire.COLUMNS_VERSION:
                batch = cls(*args, sensor=sensor, epoch=body.get("epoch"),
                            raw_columns=body["columns"], n=body["n"])
            else:
                batch = cls(*args, body["fields"], body["packets"], sensor, body.get("epoch"))
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a fanoutd batch: {e!r}") from None
        name = body.get("sensor")
        batch.sensor_name = name if isinstance(name, str) else None
        return batch

    def __repr__(self) -> str:
        return (f"Batch(v={self.v}, sensor={self.sensor!r}, iface={self.iface!r}, "
                f"worker={self.worker}, epoch={self.epoch}, seq={self.seq}, n={self.n})")

    def __len__(self) -> int:
        return self.n

    @property
    def key(self) -> StreamKey:
        return StreamKey(self.sensor, self.iface, self.worker)

    # -- plain Python

    def column(self, name: str) -> list[Any]:
        """One field's values as a Python list (None for a null), read once per batch;
        all None for an optional field the batch lacks. KeyError for a name not in
        `fields`."""
        values = self._values.get(name)
        if values is None:
            if self.raw_columns is not None and name in self.raw_columns:
                values = wire.decode_column(self.raw_columns[name], self.n)
            elif self.raw_columns is None and name in self._position:
                i = self._position[name]
                values = [row[i] if i < len(row) else None for row in self._rows_sent]
            elif name in self.index:  # an optional field it lacks
                self._check_rows()
                values = [None] * self.n
            else:
                raise KeyError(name)
            self._values[name] = values
        return values

    def absent(self, name: str) -> bool:
        """Whether `name` is an optional field this batch lacks (null in every row)."""
        return name in self.index and name not in self._position

    def _check_rows(self) -> None:
        """Before making null columns of n rows: n must be no more than a column it
        carries holds (a hostile n would otherwise take all memory). ValueError if not."""
        if self.raw_columns is None or not self.n or self._rows_checked:
            return
        most = 0
        for col in self.raw_columns.values():
            values = col.get("values") if isinstance(col, dict) else None
            try:
                most = max(most, len(values) * 8)  # a bool column: n bits
            except TypeError:
                continue
        if self.n > most:
            raise ValueError(f"n = {self.n} is more rows than its columns hold")
        self._rows_checked = True

    @property
    def packets(self) -> list[list]:
        """The rows, in `fields` order (made from the columns for version 2, and for a
        version 1 batch that lacks an optional field)."""
        if self._packets is None:
            self._packets = [list(r) for r in zip(*(self.column(f) for f in self.fields),
                                                  strict=True)] if self.n else []
        return self._packets

    def rows(self) -> Iterator[dict[str, Any]]:
        """Each packet as {field: value}, plus iface, worker and seq of its batch."""
        for row in self.packets:
            pkt = dict(zip(self.fields, row, strict=False))
            pkt["iface"] = self.iface
            pkt["worker"] = self.worker
            pkt["seq"] = self.seq
            yield pkt

    def records(self) -> Iterator[Record]:
        """Each packet as a Record, a view on the batch (no copy of its values)."""
        for i in range(self.n):
            yield Record(self, i)

    # -- columnar

    def columns(self, masked: bool = False) -> Mapping[str, Any]:
        """The columns as numpy arrays, made when first looked up (a Mapping), one for
        every name in `fields`.

        Fixed-width fields are views of the batch's buffers (no copy): a null there reads
        as 0 unless `masked`, which makes numpy masked arrays of the nullable ones.
        MAC addresses are (n, 6) uint8 views; `ts_src`, `err` and `tunnel` arrays of str
        ("" for a null); `frag` bool; `src`, `dst`, `inner_src`, `inner_dst`, `payload`
        and `vlan` object arrays of bytes or lists (None for a null). `valid(name)` is a
        field's validity (None: no null). An optional field the batch lacks is all null
        in that same way: zeros (all masked when `masked`), "" or None, and
        `valid(name)` all False.
        """
        return _NumpyColumns(self, masked)

    def valid(self, name: str) -> Any:
        """A bool numpy array, True where the field has a value; None when all do."""
        np = _need("numpy")
        if self.absent(name):
            return np.zeros(self.n, bool)
        if self.raw_columns is None:
            values = self.column(name)
            return None if None not in values else np.array([v is not None for v in values])
        validity = self.raw_columns[name]["validity"]
        if validity is None:
            return None
        bits = np.unpackbits(np.frombuffer(validity, np.uint8), bitorder="little")
        return bits[:self.n].astype(bool)

    def to_arrow(self) -> Any:
        """A pyarrow.RecordBatch, one column per name in `fields` (names as on the wire),
        wrapping the batch's buffers without copying them (version 2). An optional field
        the batch lacks is an all-null column of its type, so the batches of one daemon
        have one schema (they concatenate, and `fanoutd save` writes them to one file).
        Fields of a type this library does not know are left out. ValueError when a
        column's buffers do not hold what its type and the row count say (a damaged or
        hostile batch)."""
        pa = _need("pyarrow")
        if self.raw_columns is None:
            return self._rows_to_arrow(pa)
        columns = self.raw_columns
        if len(self.fields) != len(self.carried):
            self._check_rows()
            columns = {name: columns[name] if name in columns
                       else _null_column(wire.FIELD_BY_NAME[name], self.n)
                       for name in self.fields}
        if arrow_capsules is not None:  # one C call: the Arrow C data interface
            return pa.record_batch(_ArrowExport(arrow_capsules(columns, self.n)))
        arrays, names = [], []
        for name, col in columns.items():
            try:
                array = _arrow_array(pa, col, self.n)
                if array is not None:  # from the network: check it all, as the C path does
                    array.validate(full=True)
            except (pa.ArrowException, KeyError, TypeError) as e:
                raise ValueError(f"column {name}: {e}") from None
            if array is not None:
                arrays.append(array)
                names.append(name)
        return pa.RecordBatch.from_arrays(arrays, names=names)

    def _rows_to_arrow(self, pa: Any) -> Any:
        arrays, names = [], []
        for name in self.fields:
            f = wire.FIELD_BY_NAME.get(name)
            arrow_type = _arrow_type(pa, f.arrow) if f else None
            arrays.append(pa.array(self.column(name), type=arrow_type))
            names.append(name)
        return pa.RecordBatch.from_arrays(arrays, names=names)

    def to_polars(self) -> Any:
        """A polars DataFrame of to_arrow() (dictionary columns become Categorical)."""
        pl = _need("polars")
        return pl.from_arrow(self.to_arrow())


class _ArrowExport:
    """The Arrow PyCapsule protocol over a (schema, array) capsule pair."""

    def __init__(self, capsules: tuple[Any, Any]) -> None:
        self.capsules = capsules

    def __arrow_c_array__(self, requested_schema: Any = None) -> tuple[Any, Any]:
        return self.capsules


class _NumpyColumns(Mapping):
    def __init__(self, batch: Batch, masked: bool) -> None:
        self._batch = batch
        self._masked = masked
        self._made: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        array = self._made.get(name)
        if array is None:
            if name not in self._batch.index:
                raise KeyError(name)
            array = self._made[name] = _numpy_column(self._batch, name, self._masked)
        return array

    def __iter__(self) -> Iterator[str]:
        return iter(self._batch.fields)

    def __len__(self) -> int:
        return len(self._batch.fields)


def _numpy_column(batch: Batch, name: str, masked: bool) -> Any:
    np = _need("numpy")
    n = batch.n
    col = None if batch.raw_columns is None else batch.raw_columns.get(name)
    arrow = col["type"] if col is not None else getattr(wire.FIELD_BY_NAME.get(name),
                                                         "arrow", "")
    if col is None and batch.absent(name) and arrow in wire.ARROW_FORMATS:
        batch._check_rows()
        array = np.zeros(n, np.dtype(wire.ARROW_FORMATS[arrow]))
    elif col is None:  # version 1, or an optional field it lacks: from the Python values
        values = batch.column(name)
        fmt = wire.ARROW_FORMATS.get(arrow)
        if fmt is not None:
            array = np.array([0 if v is None else v for v in values], np.dtype(fmt))
        elif arrow == "bool":
            array = np.array(values, bool)
        elif arrow.startswith("dictionary<"):
            array = np.array(["" if v is None else v for v in values], str)
        elif arrow.startswith("fixed_size_binary["):
            width = int(arrow[len("fixed_size_binary["):-1])
            array = np.frombuffer(b"".join(bytes(width) if v is None else v for v in values),
                                  np.uint8).reshape(n, width)
        else:
            array = np.empty(n, object)
            array[:] = values
    elif arrow in wire.ARROW_FORMATS:
        array = np.frombuffer(col["values"], np.dtype(wire.ARROW_FORMATS[arrow]), n)
    elif arrow == "bool":
        array = np.unpackbits(np.frombuffer(col["values"], np.uint8),
                              bitorder="little")[:n].astype(bool)
    elif arrow.startswith("fixed_size_binary["):
        width = int(arrow[len("fixed_size_binary["):-1])
        array = np.frombuffer(col["values"], np.uint8, n * width).reshape(n, width)
    elif arrow.startswith("dictionary<"):
        names = np.array(col["dictionary"] or [""], str)
        array = names[np.frombuffer(col["values"], np.int8, n)]
        if col["validity"] is not None:
            array = np.where(batch.valid(name), array, "")
    else:  # binary, lists: Python objects
        array = np.empty(n, object)
        array[:] = batch.column(name)
    if masked:
        valid = batch.valid(name)
        if valid is not None:
            mask = ~valid if array.ndim == 1 else np.repeat(~valid[:, None], array.shape[1], 1)
            array = np.ma.masked_array(array, mask=mask)
    return array


_ARROW_TYPES = {
    "uint8": lambda pa: pa.uint8(), "uint16": lambda pa: pa.uint16(),
    "uint32": lambda pa: pa.uint32(), "uint64": lambda pa: pa.uint64(),
    "int8": lambda pa: pa.int8(), "int16": lambda pa: pa.int16(),
    "int32": lambda pa: pa.int32(), "int64": lambda pa: pa.int64(),
    "float32": lambda pa: pa.float32(), "float64": lambda pa: pa.float64(),
    "timestamp[ns, UTC]": lambda pa: pa.timestamp("ns", tz="UTC"),
    "bool": lambda pa: pa.bool_(), "binary": lambda pa: pa.binary(),
    "fixed_size_binary[6]": lambda pa: pa.binary(6),
    # items never null: as _fastpath.arrow_capsules exports lists, so both paths and
    # version 1 batches make one schema
    "list<uint16>": lambda pa: pa.list_(pa.field("item", pa.uint16(), nullable=False)),
    "dictionary<int8, utf8>": lambda pa: pa.dictionary(pa.int8(), pa.utf8()),
}


# pyarrow types and dictionaries, made once: making them costs more than wrapping a column.
_arrow_type_cache: dict[str, Any] = {}
_arrow_dictionary_cache: dict[tuple[str, ...], Any] = {}


def _arrow_type(pa: Any, name: str) -> Any:
    arrow_type = _arrow_type_cache.get(name)
    if arrow_type is None:
        if name in _ARROW_TYPES:
            arrow_type = _ARROW_TYPES[name](pa)
        elif name.startswith("fixed_size_binary["):
            arrow_type = pa.binary(int(name[len("fixed_size_binary["):-1]))
        else:
            return None
        _arrow_type_cache[name] = arrow_type
    return arrow_type


# The version 2 columns of all-null optional fields (_null_column): made once for at least
# _null_rows rows, over one buffer of zero bytes, and shared by every batch of up to that
# many rows (a column's buffers may be longer than its rows need).
_null_columns: dict[str, dict[str, Any]] = {}
_null_rows = 0


def _null_column(f: wire.Field, n: int) -> dict[str, Any]:
    """A version 2 column of (at least) n nulls of field f, as a daemon would send it:
    validity all 0, values 0, every offset 0."""
    global _null_rows
    if n > _null_rows:
        _null_columns.clear()
        _null_rows = max(n, 2 * _null_rows, 1 << 12)
    column = _null_columns.get(f.name)
    if column is None:
        rows = _null_rows
        width = {"fixed": struct.calcsize(f.fmt or "B"), "fixed_binary": f.width,
                 "binary": 4, "list": 4}.get(f.layout, 1)
        zeros = memoryview(bytes((rows + 1) * width))
        column = {"type": f.arrow, "validity": zeros[:(rows + 7) // 8]}
        if f.layout in ("binary", "list"):
            column["offsets"] = zeros[:4 * (rows + 1)]
            column["values"] = zeros[:0]
        elif f.layout == "bool":
            column["values"] = zeros[:(rows + 7) // 8]
        else:
            column["values"] = zeros[:rows * width]
        if f.layout == "dictionary":
            column["dictionary"] = list(f.dictionary)
        _null_columns[f.name] = column
    return column


def _arrow_array(pa: Any, col: dict, n: int) -> Any:
    """One version 2 column as a pyarrow Array over its buffers; None for an unknown type."""
    arrow_type = _arrow_type(pa, col["type"])
    if arrow_type is None:
        return None
    validity = None if col.get("validity") is None else pa.py_buffer(col["validity"])
    values = pa.py_buffer(col["values"])
    if pa.types.is_dictionary(arrow_type):
        key = tuple(col["dictionary"])
        dictionary = _arrow_dictionary_cache.get(key)
        if dictionary is None:
            dictionary = _arrow_dictionary_cache[key] = pa.array(key, pa.utf8())
        return pa.DictionaryArray.from_buffers(arrow_type, n, [validity, values], dictionary)
    if pa.types.is_list(arrow_type):
        item_type = arrow_type.value_type
        items = pa.Array.from_buffers(item_type, len(col["values"]) // item_type.byte_width,
                                      [None, values])
        return pa.Array.from_buffers(arrow_type, n, [validity, pa.py_buffer(col["offsets"])],
                                     children=[items])
    if "offsets" in col:
        return pa.Array.from_buffers(arrow_type, n, [validity, pa.py_buffer(col["offsets"]),
                                                     values])
    return pa.Array.from_buffers(arrow_type, n, [validity, values])


def _need(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"{module} is needed for this: pip install 'fanoutd[arrow]'") \
            from None


class Record:
    """One captured packet: a view on one row of a batch, with conversions on demand.

    Every wire field is an attribute (`rec.sport`, `rec.proto`, `rec.ts_ns`, ...), also
    fields this library does not know, read through the batch's `fields`; a known field
    the batch does not carry is None. `rec["sport"]` and `rec.get("sport")` work too. Raw
    values are as on the wire (addresses are bytes); the properties below convert.
    """

    __slots__ = ("_batch", "_i")

    def __init__(self, batch: Batch, i: int) -> None:
        self._batch = batch
        self._i = i

    def _field(self, name: str) -> Any:
        batch = self._batch
        if name in batch.index:
            return batch.column(name)[self._i]
        if name in WIRE_FIELDS:
            return None
        raise AttributeError(f"no field {name!r} in this record "
                             f"(fields: {', '.join(batch.fields)})")

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
    def epoch(self) -> int | None:
        return self._batch.epoch

    @property
    def key(self) -> StreamKey:
        return self._batch.key

    # -- wire fields (the known ones are properties, below; others come here)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not a wire field; also keeps copy/pickle from recursing
            raise AttributeError(name)
        return self._field(name)

    def __getitem__(self, name: str) -> Any:
        if name in ("iface", "worker", "seq", "sensor", "epoch"):
            return getattr(self, name)
        try:
            return self._field(name)
        except AttributeError:
            raise KeyError(name) from None

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default

    @property
    def fields(self) -> list[str]:
        """The wire field names of this record, in wire order: its batch's `fields`
        (with the optional ones it lacks, which are None)."""
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
    def inner_src_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The source address of the packet inside a tunnel (None without one)."""
        return _ip(self.get("inner_src"))

    @property
    def inner_dst_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        return _ip(self.get("inner_dst"))

    @property
    def inner_eth_src_mac(self) -> str | None:
        return format_mac(self.get("inner_eth_src"))

    @property
    def inner_eth_dst_mac(self) -> str | None:
        return format_mac(self.get("inner_eth_dst"))

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

    @property
    def inner_tcp_flags_text(self) -> str:
        """The same of inner_tcp_flags (a TCP packet inside a tunnel)."""
        return format_tcp_flags(self.get("inner_tcp_flags"))

    def as_dict(self, raw: bool = False) -> dict[str, Any]:
        """Every field plus iface, worker, seq and sensor. JSON-ready (MAC and IP addresses
        as text, other bytes as hex) unless raw, which keeps the wire values."""
        out = {name: self._field(name) for name in self._batch.fields}
        out.update(iface=self.iface, worker=self.worker, seq=self.seq, sensor=self.sensor)
        return out if raw else to_json_ready(out)

    def to_json(self) -> str:
        """as_dict() as one line of compact JSON."""
        return json.dumps(self.as_dict(), separators=(",", ":"))

    def __repr__(self) -> str:
        return f"Record({self.as_dict()!r})"


def _field_property(name: str) -> property:
    def get(self: Record) -> Any:
        batch = self._batch
        values = batch._values.get(name)
        if values is None:
            if name not in batch.index:
                return None
            values = batch.column(name)
        return values[self._i]
    get.__doc__ = f"The packet's `{name}` (docs/wire-format.md)."
    return property(get)


for _name in wire.FIELD_BY_NAME:  # plain properties: much faster than __getattr__
    setattr(Record, _name, _field_property(_name))


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
    for key in ("eth_src", "eth_dst", "inner_eth_src", "inner_eth_dst"):
        if key in out:
            out[key] = format_mac(out[key])
    for key in ("src", "dst", "inner_src", "inner_dst"):
        if key in out:
            out[key] = format_ip(out[key])
    return {k: (v.hex() if isinstance(v, bytes) else v) for k, v in out.items()}


class BatchSource:
    """records() and packets() over a subscriber's batches(): Subscriber (ZeroMQ) and
    JetStreamSubscriber (NATS) yield the same Batch objects."""

    def batches(self, timeout: float | None = None) -> Iterator[Batch]:
        raise NotImplementedError

    def records(self, timeout: float | None = None) -> Iterator[Record]:
        """Yield every packet as a Record; `timeout` as in batches()."""
        for batch in self.batches(timeout):
            yield from batch.records()

    def packets(self, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Yield every packet as a dict (Batch.rows); `timeout` as in batches()."""
        for batch in self.batches(timeout):
            yield from batch.rows()
