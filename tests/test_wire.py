"""The wire format (fanoutd/wire.py): version 2 columns hold exactly decode.py's rows, in
Apache Arrow's layouts, as docs/wire-format.md specifies them."""

import re
from pathlib import Path

import frames as F
import msgpack
import pytest
from frames import CORPUS, TUNNEL_CORPUS, RingFrame, tpacket3_block, udp4_frame

from fanoutd import wire
from fanoutd.config import SENSOR_MAX
from fanoutd.decode import decode_block
from fanoutd.encoder import encode_columns_py, encode_rows_py

SPEC = Path(__file__).resolve().parent.parent / "docs" / "wire-format.md"
PAYLOAD = 24


def corpus_blocks():
    """The whole corpus in one block, then every truncation of every frame, a block each."""
    yield [RingFrame(f, sec=1_700_000_000, nsec=i, rxhash=i * 7919, ifindex=i,
                     pkttype=i % 5) for i, f in enumerate(CORPUS)]
    for frame in CORPUS:
        yield [RingFrame(frame[:cut], wire_len=len(frame)) for cut in range(len(frame) + 1)]


def columns_and_rows(frames, payload_bytes=PAYLOAD):
    block, first, num = tpacket3_block(frames)
    rows = decode_block(block, first, num, {}, payload_bytes)
    prefix = wire.batch_prefix(wire.COLUMNS_VERSION, "eth0", 1, 99, sensor="s1")
    body, _, _ = encode_columns_py(block, first, num, payload_bytes, {}, prefix, 5)
    return msgpack.unpackb(body), rows


def test_columns_hold_the_rows():
    for frames in corpus_blocks():
        batch, rows = columns_and_rows(frames)
        n = batch["n"]
        assert n == len(rows)
        names = [f.name for f in wire.fields_for(PAYLOAD)]
        present = [f.name for i, f in enumerate(wire.fields_for(PAYLOAD))
                   if not f.optional or any(r[i] is not None for r in rows)]
        assert list(batch["columns"]) == present  # an optional column only when not all nil
        for i, name in enumerate(names):
            if name in present:
                column = wire.decode_column(batch["columns"][name], n)
            else:
                column = [None] * n
            assert column == [r[i] for r in rows], name


def test_tunnel_columns_come_only_with_a_tunnelled_row():
    plain, _ = columns_and_rows([RingFrame(udp4_frame())], 0)
    assert not set(wire.TUNNEL_FIELDS) & set(plain["columns"])
    # PPPoE carries IP, not Ethernet: no inner MACs, so no columns for them
    mixed, _ = columns_and_rows([RingFrame(udp4_frame()), RingFrame(TUNNEL_CORPUS[0])], 0)
    assert set(wire.TUNNEL_FIELDS) & set(mixed["columns"]) == set(wire.TUNNEL_FIELDS) - {
        "inner_eth_dst", "inner_eth_src"}
    assert wire.decode_column(mixed["columns"]["tunnel"], 2) == [None, "pppoe"]


def test_batch_keys():
    batch, _ = columns_and_rows([RingFrame(udp4_frame())], 0)
    assert list(batch) == ["v", "sensor", "iface", "worker", "epoch", "seq", "n", "columns"]
    assert {k: batch[k] for k in ("v", "sensor", "iface", "worker", "epoch", "seq", "n")} == \
        {"v": 2, "sensor": "s1", "iface": "eth0", "worker": 1, "epoch": 99, "seq": 5, "n": 1}
    assert "payload" not in batch["columns"]
    rows_batch = msgpack.unpackb(wire.rows_body(
        wire.batch_prefix(wire.ROWS_VERSION, "eth0", 1, 99, sensor="s1"), 5, [[1, 2]]))
    assert rows_batch == {"v": 1, "sensor": "s1", "iface": "eth0", "worker": 1, "epoch": 99,
                          "fields": list(wire.FIELDS), "seq": 5, "packets": [[1, 2]]}


def test_a_column_without_nulls_has_no_validity_buffer():
    batch, _ = columns_and_rows([RingFrame(udp4_frame(sport=i)) for i in range(3)], 0)
    cols = batch["columns"]
    assert cols["sport"]["validity"] is None  # every row has a port
    assert cols["tcp_flags"]["validity"] == b"\x00"  # none has flags
    assert cols["tcp_flags"]["values"] == bytes(6)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 17])
def test_bitmaps_are_lsb_first_and_padded_with_zeros(n):
    bits = [i % 3 == 0 for i in range(n)]
    data = wire.bitmap(bits)
    assert len(data) == (n + 7) // 8
    for i, bit in enumerate(bits):
        assert bool(data[i // 8] >> (i % 8) & 1) == bit
    if n % 8:
        assert data[-1] >> (n % 8) == 0


def test_columns_are_arrow_arrays():
    """Each column, wrapped by pyarrow from its buffers alone (no copy), passes Arrow's own
    full validation and holds the row values: the layouts are Arrow's."""
    pa = pytest.importorskip("pyarrow")
    types = {"uint8": pa.uint8(), "uint16": pa.uint16(), "uint32": pa.uint32(),
             "int32": pa.int32(), "timestamp[ns, UTC]": pa.timestamp("ns", tz="UTC"),
             "bool": pa.bool_(), "fixed_size_binary[6]": pa.binary(6), "binary": pa.binary()}
    for frames in corpus_blocks():
        batch, rows = columns_and_rows(frames)
        n = batch["n"]
        for i, f in enumerate(wire.fields_for(PAYLOAD)):
            if f.name not in batch["columns"]:
                assert f.optional and all(r[i] is None for r in rows), f.name
                continue
            col = batch["columns"][f.name]
            validity = None if col["validity"] is None else pa.py_buffer(col["validity"])
            values = pa.py_buffer(col["values"])
            if f.layout == "list":
                items = pa.Array.from_buffers(pa.uint16(), len(col["values"]) // 2,
                                              [None, values])
                array = pa.Array.from_buffers(pa.list_(pa.uint16()), n,
                                              [validity, pa.py_buffer(col["offsets"])],
                                              children=[items])
            elif f.layout == "dictionary":
                array = pa.DictionaryArray.from_buffers(
                    pa.dictionary(pa.int8(), pa.utf8()), n, [validity, values],
                    pa.array(col["dictionary"], pa.utf8()))
            elif f.layout == "binary":
                array = pa.Array.from_buffers(pa.binary(), n, [
                    validity, pa.py_buffer(col["offsets"]), values])
            else:
                array = pa.Array.from_buffers(types[f.arrow], n, [validity, values])
            array.validate(full=True)
            if f.name == "ts_ns":  # nanoseconds: as integers, not datetimes
                array = array.cast(pa.int64())
            got = array.to_pylist()
            want = [r[i] for r in rows]
            assert got == want, f.name


def test_the_spec_names_every_key_a_batch_carries():
    text = SPEC.read_text().split("Keys every batch carries:", 1)[1].split("\n\n", 2)[1]
    documented = re.findall(r"^\| `(\w+)` \|", text, re.MULTILINE)
    head = msgpack.Unpacker()
    head.feed(wire.batch_prefix(wire.COLUMNS_VERSION, "eth0", 1, 99, sensor="s1"))
    entries = head.read_map_header()
    keys = [head.unpack() for _ in range(2 * entries - 6)][::2]  # up to seq, n, columns
    assert documented == [*keys, "seq"]


def test_the_spec_names_every_field_with_its_type():
    """docs/wire-format.md's field table gives each field the Arrow type wire.py uses."""
    text = SPEC.read_text().split("### Fields", 1)[1].split("\n### ", 1)[0]
    documented = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = line.split("|")
            for name in re.findall(r"`([^`]+)`", cells[1]):
                documented[name] = re.findall(r"`([^`]+)`", cells[2])[0]
    assert documented == {f.name: f.arrow for f in (*wire.FIELD_TABLE, wire.PAYLOAD)}


def test_the_spec_lists_every_type_it_uses():
    text = SPEC.read_text().split("### Version 2 columns", 1)[1].split("\n### ", 1)[0]
    for f in (*wire.FIELD_TABLE, wire.PAYLOAD):
        assert f"`{f.arrow}`" in text or f.arrow in ("uint8", "uint16", "uint32", "int32"), \
            f.arrow


def test_rows_and_columns_say_the_same():
    """The two versions of one block carry the same values."""
    frames = [RingFrame(f) for f in CORPUS]
    block, first, num = tpacket3_block(frames)
    rows_prefix = wire.batch_prefix(wire.ROWS_VERSION, "eth0", 0, 1)
    cols_prefix = wire.batch_prefix(wire.COLUMNS_VERSION, "eth0", 0, 1)
    v1 = msgpack.unpackb(encode_rows_py(block, first, num, 0, {}, rows_prefix, 0)[0])
    v2 = msgpack.unpackb(encode_columns_py(block, first, num, 0, {}, cols_prefix, 0)[0])
    for i, name in enumerate(v1["fields"]):
        assert wire.decode_column(v2["columns"][name], v2["n"]) == \
            [row[i] for row in v1["packets"]], name


def test_topics():
    assert wire.batch_topic("eth0", 12) == b"pkt.eth0.12"
    assert wire.batch_topic("eth0", 12).startswith(wire.BATCH_TOPIC_PREFIX)
    assert wire.SUBSCRIBE_HELLO == b"\x01fanoutd.hello"


# --------------------------------------------------------------------------- batch size

BLOCK = 65536
# Frames that encode largest for the ring bytes they take: the shortest the kernel
# delivers (an Ethernet header; an IPv4 type gives the row an error), IPv6 (addresses are
# the widest values), many VLAN tags, a payload as large as the frame, and the corpus.
LARGE_ROWS = [
    F.eth(F.MAC_B, F.MAC_A, 0x0800, b""),
    F.eth(F.MAC_B, F.MAC_A, 0x1234, b""),
    F.ipv6_frame("2001:db8::1", "2001:db8::2", 17, F.udp(65535, 65535)),
    F.ipv6_frame("2001:db8::1", "2001:db8::2", 17, F.udp(65535, 65535, b"x" * 16)),
    F.ipv6_frame("2001:db8::1", "2001:db8::2", 6, F.tcp(65535, 65535, 0xFFF)),
    F.eth(F.MAC_B, F.MAC_A, 0x0800, F.ipv4("1.2.3.4", "5.6.7.8", 17, F.udp(1, 2)),
          vlans=tuple((0x8100, 4095) for _ in range(30))),
    F.eth(F.MAC_B, F.MAC_A, 0x8100, b"\x0f\xff"),
    F.udp4_frame(payload=b"x" * 1400),
    *CORPUS,
]


@pytest.mark.parametrize("payload_bytes", [0, 64, 65535])
@pytest.mark.parametrize("version", [wire.ROWS_VERSION, wire.COLUMNS_VERSION])
def test_a_batch_is_never_larger_than_its_block_plus_the_overhead(version, payload_bytes):
    """Subscriber queues are sized in bytes by this bound (publish.subscriber_queue_bytes):
    a block packed with any one kind of frame, with every ring-header value at its widest,
    encodes in at most wire.max_batch_bytes(BLOCK) bytes."""
    encode = encode_rows_py if version == wire.ROWS_VERSION else encode_columns_py
    fields = tuple(f.name for f in wire.fields_for(payload_bytes))
    prefix = wire.batch_prefix(version, "x" * 15, 255, 2**64 - 1, fields,
                               sensor="\U0001f600" * SENSOR_MAX)  # 4 bytes each
    for frame in LARGE_ROWS:
        per_frame = F.tpacket_align(F.TP_MAC + len(frame))
        for tci in (None, 0xFFFF):
            frames = [RingFrame(frame, sec=2**32 - 1, nsec=999_999_999, wire_len=2**32 - 1,
                                rxhash=2**32 - 1, ifindex=2**31 - 1, pkttype=255,
                                vlan_tci=tci)] * ((BLOCK - 64) // per_frame)
            block, first, num = tpacket3_block(frames, tail=0)
            assert len(block) <= BLOCK
            body, _, _ = encode(block, first, num, payload_bytes, {}, prefix, 2**64 - 1)
            assert len(body) <= wire.max_batch_bytes(BLOCK), (frame.hex(), tci)
