"""The C batch encoders return exactly what decode.py + wire.py return: the same bytes,
row count, wire bytes and error counts, for both wire-format versions (1: rows, 2:
columns), on every kind of frame, every truncation, and random and mutated blocks."""

import contextlib

import frames as F
import pytest
from frames import CORPUS, TUNNEL_CORPUS, RingFrame, tcp4_frame, tpacket3_block, udp4_frame
from hypothesis import given, settings
from hypothesis import strategies as st

from fanoutd import _linux, wire
from fanoutd.decode import MAX_TUNNEL_DEPTH
from fanoutd.encoder import BlockEncoder, _fastpath, encode_columns_py, encode_rows_py

pytestmark = pytest.mark.skipif(_fastpath is None, reason="fanoutd._fastpath is not built")
VERSIONS = (wire.ROWS_VERSION, wire.COLUMNS_VERSION)
PREFIX = {v: wire.batch_prefix(v, "eth0", 3, 2**60 + 5, ("any", "fields")) for v in VERSIONS}
PY = {wire.ROWS_VERSION: encode_rows_py, wire.COLUMNS_VERSION: encode_columns_py}


def c_encoder(version):
    return _fastpath.encode_batch if version == wire.ROWS_VERSION else _fastpath.encode_columns


def encode_c(version, block, first, num, payload_bytes, errors, seq=2**40 + 7, *depth):
    return c_encoder(version)(block, first, num, payload_bytes, errors, PREFIX[version], seq,
                              *depth)


def encode_py(version, block, first, num, payload_bytes, errors, seq=2**40 + 7, *depth):
    return PY[version](block, first, num, payload_bytes, errors, PREFIX[version], seq, *depth)


SAMPLES = CORPUS
DEPTHS = (0, 1, 2, MAX_TUNNEL_DEPTH)  # tunnel_depth: none, the default, nested, the most


def same(frames: list[RingFrame], payload_bytes: int, depths=(1,)) -> None:
    block, first, num = tpacket3_block(frames)
    for depth in depths:
        for version in VERSIONS:
            py_errors: dict = {}
            c_errors: dict = {}
            expected = encode_py(version, block, first, num, payload_bytes, py_errors,
                                 2**40 + 7, depth)
            got = encode_c(version, block, first, num, payload_bytes, c_errors, 2**40 + 7,
                           depth)
            assert got == expected, f"version {version}, tunnel_depth {depth}"
            assert c_errors == py_errors, f"version {version}, tunnel_depth {depth}"
            if version == wire.COLUMNS_VERSION:
                same_into(block, first, num, payload_bytes, depth, expected)


def same_into(block, first, num, payload_bytes, depth, expected) -> None:
    """encode_columns_into writes what encode_columns returns: straight into a roomy
    buffer, through a copy into one just large enough (its worst case does not fit);
    and refuses one a byte too small, leaving the error counts alone."""
    body, rows, wire_bytes = expected
    for room in (len(body) + (1 << 20), len(body)):
        buffer = bytearray(b"\xee" * (16 + room + 8))
        errors: dict = {}
        got = _fastpath.encode_columns_into(buffer, 16, block, first, num, payload_bytes,
                                            errors, PREFIX[wire.COLUMNS_VERSION],
                                            2**40 + 7, depth)
        assert got == (len(body), rows, wire_bytes)
        assert bytes(buffer[16:16 + len(body)]) == body
        assert buffer[:16] == b"\xee" * 16  # nothing before the offset
        if room == len(body):
            assert buffer[16 + len(body):] == b"\xee" * 8  # nor past the buffer's room
    errors = {}
    with pytest.raises(ValueError, match="outgrows"):
        _fastpath.encode_columns_into(bytearray(16 + len(body) - 1), 16, block, first, num,
                                      payload_bytes, errors, PREFIX[wire.COLUMNS_VERSION],
                                      2**40 + 7, depth)
    assert errors == {}


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("payload_bytes", [0, 3, 64, 65535])
def test_every_sample_in_one_block(payload_bytes, depth):
    same([RingFrame(f, sec=1_700_000_000, nsec=i, rxhash=i * 7919, ifindex=i, pkttype=i % 5)
          for i, f in enumerate(SAMPLES)], payload_bytes, (depth,))


@pytest.mark.parametrize("frame", SAMPLES)
def test_every_cut_of_every_sample(frame):
    for cut in range(len(frame) + 1):
        same([RingFrame(frame[:cut], wire_len=len(frame))], 16, DEPTHS)


@pytest.mark.parametrize("version", VERSIONS)
def test_tunnel_depth_defaults_to_one_and_is_bounded(version):
    block, first, num = tpacket3_block([RingFrame(f) for f in TUNNEL_CORPUS])
    assert encode_c(version, block, first, num, 8, {}) == \
        encode_c(version, block, first, num, 8, {}, 2**40 + 7, 1)
    for encode in (encode_c, encode_py):
        for depth in (-1, MAX_TUNNEL_DEPTH + 1):
            errors: dict = {}
            with pytest.raises(ValueError, match="tunnel_depth"):
                encode(version, block, first, num, 8, errors, 2**40 + 7, depth)
            assert errors == {}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("depth", DEPTHS)
def test_block_encoder_passes_tunnel_depth_on(version, depth):
    block, first, num = tpacket3_block([RingFrame(f) for f in TUNNEL_CORPUS])
    encoder = BlockEncoder(version, "eth0", 3, 2**60 + 5, 8, tunnel_depth=depth)
    expected = PY[version](block, first, num, 8, {}, encoder.prefix, 9, depth)
    assert encoder.encode(block, first, num, {}, 9) == expected


@pytest.mark.parametrize("version", VERSIONS)
def test_block_encoder_writes_into_an_outbox_slot_what_it_returns(version):
    """encode_into: the C encoder's own path for version 2, a copy for version 1."""
    block, first, num = tpacket3_block([RingFrame(f) for f in SAMPLES])
    encoder = BlockEncoder(version, "eth0", 3, 2**60 + 5, 8)
    body, rows, wire_bytes = encoder.encode(block, first, num, {}, 9)
    slot = memoryview(bytearray(len(body) + 100))
    assert encoder.encode_into(slot, block, first, num, {}, 9) == (len(body), rows, wire_bytes)
    assert slot[:len(body)] == body
    with pytest.raises(ValueError, match="outgrows"):
        encoder.encode_into(slot[:len(body) - 1], block, first, num, {}, 9)
    with pytest.raises(ValueError, match="tunnel_depth"):
        BlockEncoder(version, "eth0", 3, 1, 0, tunnel_depth=MAX_TUNNEL_DEPTH + 1)


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("where", ["first", "middle", "last", "every", "alternate"])
def test_tunnelled_rows_anywhere_in_a_block(where, depth):
    """The optional columns appear with the first tunnelled row of a block, wherever it
    is, with every row before and after it nil; a tunnel whose inner packet gives nothing
    (PPPoE LCP) leaves the inner columns out, and the next block starts again."""
    plain = [udp4_frame(sport=i) if i % 2 else tcp4_frame(sport=i) for i in range(19)]
    tunnelled = TUNNEL_CORPUS
    if where == "every":
        frames = list(tunnelled)
    elif where == "alternate":
        frames = [f for pair in zip(plain, tunnelled, strict=False) for f in pair]
    else:
        at = {"first": 0, "middle": 9, "last": len(plain)}[where]
        frames = [*plain[:at], tunnelled[0], *plain[at:]]
    same([RingFrame(f) for f in frames], 0, (depth,))
    same([RingFrame(f) for f in frames], 5, (depth,))
    same([RingFrame(f) for f in plain], 0, (depth,))  # after a tunnelled block: none
    same([RingFrame(plain[0]), RingFrame(tunnelled[2])], 0, (depth,))  # PPPoE LCP


def test_ring_metadata_vlan_and_timestamp_source():
    status = (_linux.TP_STATUS_TS_SOFTWARE, _linux.TP_STATUS_TS_RAW_HARDWARE, 0)
    same([RingFrame(udp4_frame(vlans=((0x8100, 5),)), vlan_tci=0xE00A, status=s)
          for s in status], 8)


@pytest.mark.parametrize("version", VERSIONS)
def test_an_empty_block_and_an_error_count_already_there(version):
    block, first, num = tpacket3_block([])
    assert encode_c(version, block, first, num, 0, {}) == \
        encode_py(version, block, first, num, 0, {})
    errors = {"truncated-ipv4": 3}
    block, first, num = tpacket3_block([RingFrame(udp4_frame()[:20])] * 2)
    encode_c(version, block, first, num, 0, errors)
    assert errors == {"truncated-ipv4": 5}


@pytest.mark.parametrize("version", VERSIONS)
def test_frames_past_the_end_of_the_buffer_are_not_read(version):
    """A header that claims more than the buffer holds: both stop at the buffer's end."""
    block, first, num = tpacket3_block([RingFrame(udp4_frame(payload=b"x" * 100))], tail=0)
    for cut in range(first, len(block) + 1, 7):
        short = block[:cut]
        assert encode_c(version, short, first, num, 32, {}) == \
            encode_py(version, short, first, num, 32, {})


@pytest.mark.parametrize("version", VERSIONS)
def test_a_memoryview_of_the_ring_is_read_in_place(version):
    block, first, num = tpacket3_block([RingFrame(f) for f in SAMPLES[:5]])
    view = memoryview(bytearray(block))
    assert encode_c(version, view, first, num, 8, {}) == \
        encode_py(version, block, first, num, 8, {})


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=200), st.integers(0, 2**32 - 1),
                          st.sampled_from([0, 1 << 4, 1 << 29, 1 << 31]),
                          st.integers(0, 4095)), max_size=12),
       st.integers(0, 100))
def test_random_frames(frames, payload_bytes):
    same([RingFrame(data, rxhash=h, status=s, vlan_tci=tci if s == 1 << 4 else None)
          for data, h, s, tci in frames], payload_bytes)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(SAMPLES), st.lists(st.tuples(st.integers(0, 10_000),
                                                    st.integers(0, 255)), max_size=6),
       st.integers(0, 300), st.sampled_from(DEPTHS))
def test_mutated_frames(frame, flips, cut, depth):
    data = bytearray(frame)
    for where, value in flips:
        if data:
            data[where % len(data)] = value
    same([RingFrame(bytes(data[:cut]), wire_len=len(data))], 24, (depth,))


# --- random nested tunnels ------------------------------------------------------------------
# A packet is built from the inside out: each step wraps what there is (an Ethernet frame,
# an IPv4 or IPv6 packet, an MPLS label stack) in an encapsulation that can carry it,
# with random header options; the result goes into an Ethernet frame.

A4, B4 = "198.51.100.1", "198.51.100.2"
A6, B6 = "2001:db8::10", "2001:db8::20"
ETHERTYPE_OF = {"ip4": 0x0800, "ip6": 0x86DD}


@st.composite
def innermost(draw):
    """An IPv4 or IPv6 packet with a transport header (or an Ethernet frame holding one)."""
    proto, body = draw(st.sampled_from([
        (6, F.tcp(1234, 443, 0x18, b"tcpdata")), (17, F.udp(53, 5353, b"dns")),
        (1, F.icmp(8, 0, b"ping")), (132, F.sctp(1, 2) + b"chunk"), (89, b"ospf")]))
    if draw(st.booleans()):
        packet, kind = F.ipv4(A4, B4, proto, body), "ip4"
    else:
        packet, kind = F.ipv6(A6, B6, 58 if proto == 1 else proto, body), "ip6"
    if draw(st.booleans()):
        vlans = tuple((0x8100, t) for t in draw(st.lists(st.integers(0, 4095), max_size=2)))
        return F.eth(F.MAC_A, F.MAC_B, ETHERTYPE_OF[kind], packet, vlans), "eth"
    return packet, kind


def ip_around(draw, proto: int, payload: bytes) -> tuple[bytes, str]:
    if draw(st.booleans()):
        return F.ipv4("192.0.2.7", "192.0.2.8", proto, payload), "ip4"
    return F.ipv6("2001:db8::7", "2001:db8::8", proto, payload), "ip6"


def wrap(draw, how: str, data: bytes, kind: str) -> tuple[bytes, str]:
    """data (of kind eth, ip4, ip6 or mpls) in the encapsulation `how`."""
    if how == "pppoe":  # IP -> Ethernet
        ppp = 0x0021 if kind == "ip4" else 0x0057
        length = draw(st.sampled_from([None, None, 0, 1, 2, len(data) // 2, 0xFFFF]))
        session = draw(st.integers(0, 0xFFFF))
        padding = bytes(draw(st.integers(0, 6)))
        return F.eth(F.MAC_B, F.MAC_A, 0x8864, F.pppoe(session, ppp, data, length) + padding,
                     ), "eth"
    if how == "mpls":  # IP or Ethernet (behind a control word) -> a label stack
        labels = draw(st.lists(st.integers(0, 2**20 - 1), min_size=1, max_size=3))
        if kind == "eth":
            data = bytes(4) + data
        return F.mpls(labels, data), "mpls"
    if how == "mpls-eth":  # a label stack -> Ethernet
        return F.eth(F.MAC_B, F.MAC_A, draw(st.sampled_from([0x8847, 0x8848])), data), "eth"
    if how == "gre":  # IP, Ethernet (NVGRE, ERSPAN) or MPLS -> IP
        key = draw(st.none() | st.integers(0, 2**32 - 1))
        csum = draw(st.booleans())
        seq = draw(st.none() | st.integers(0, 2**32 - 1))
        if kind == "eth":
            ptype = draw(st.sampled_from([0x6558, 0x88BE]))
            if ptype == 0x88BE and seq is not None:
                data = bytes(8) + data  # ERSPAN type II header
        else:
            ptype = {"ip4": 0x0800, "ip6": 0x86DD, "mpls": 0x8847}[kind]
        return ip_around(draw, 47, F.gre(ptype, data, key=key, csum=csum, seq=seq))
    if how == "vxlan":  # Ethernet -> IP
        vni = draw(st.integers(0, 2**24 - 1))
        return ip_around(draw, 17, F.udp(draw(st.integers(0, 0xFFFF)), 4789, F.vxlan(vni, data)))
    if how == "geneve":  # Ethernet or IP -> IP
        ptype = 0x6558 if kind == "eth" else ETHERTYPE_OF[kind]
        options = bytes(4 * draw(st.integers(0, 3)))
        vni = draw(st.integers(0, 2**24 - 1))
        return ip_around(draw, 17, F.udp(1, 6081, F.geneve(vni, data, ptype, options)))
    assert how == "ipip"  # IP -> IP
    return ip_around(draw, 4 if kind == "ip4" else 41, data)


CARRIES = {  # what each encapsulation can carry
    "eth": ("mpls", "gre", "vxlan", "geneve"),
    "ip4": ("pppoe", "mpls", "gre", "geneve", "ipip"),
    "ip6": ("pppoe", "mpls", "gre", "geneve", "ipip"),
    "mpls": ("mpls-eth", "gre"),
}


@st.composite
def nested_tunnel_frame(draw):
    data, kind = draw(innermost())
    for _ in range(draw(st.integers(1, 6))):
        data, kind = wrap(draw, draw(st.sampled_from(CARRIES[kind])), data, kind)
    if kind == "mpls":
        data, kind = wrap(draw, "mpls-eth", data, kind)
    if kind != "eth":
        vlans = tuple((0x88A8, t) for t in draw(st.lists(st.integers(0, 4095), max_size=1)))
        data = F.eth(F.MAC_B, F.MAC_A, ETHERTYPE_OF[kind], data, vlans)
    cut = draw(st.none() | st.integers(0, len(data)))
    return data if cut is None else data[:cut]


@settings(max_examples=500, deadline=None)
@given(st.lists(nested_tunnel_frame() | st.sampled_from(CORPUS), min_size=1, max_size=6),
       st.sampled_from([0, 1, 24, 400]))
def test_random_nested_tunnels(frames, payload_bytes):
    """Encapsulations in any order and nesting, cut anywhere, among other frames: the
    same bytes at every tunnel_depth."""
    same([RingFrame(f, wire_len=len(f) + 3) for f in frames], payload_bytes,
         range(MAX_TUNNEL_DEPTH + 1))


@pytest.mark.parametrize("rows", [0, 1, 7, 8, 9, 15, 16, 300])
@pytest.mark.parametrize("seq", [0, 127, 128, 65536, 2**32])
def test_the_batch_around_the_rows_decodes_as_a_batch(rows, seq):
    """Each array-header size (fixarray, array16), seq size and bitmap length (a partial
    last byte or not): a subscriber reads the batch."""
    import msgpack

    frames = [RingFrame(udp4_frame(sport=i) if i % 3 else tcp4_frame(sport=i))
              for i in range(rows)]
    block, first, num = tpacket3_block(frames)
    for version in VERSIONS:
        body, n, _ = encode_c(version, block, first, num, 0, {}, seq)
        assert body == encode_py(version, block, first, num, 0, {}, seq)[0]
        batch = msgpack.unpackb(body)
        assert (batch["v"], batch["iface"], batch["worker"], batch["epoch"], batch["seq"]) == \
            (version, "eth0", 3, 2**60 + 5, seq)
        assert n == rows
        if version == wire.ROWS_VERSION:
            sports = [row[15] for row in batch["packets"]]
        else:
            assert batch["n"] == rows
            sports = wire.decode_column(batch["columns"]["sport"], rows)
        assert sports == list(range(rows))


def test_a_length_beyond_uint32_saturates_in_columns():
    """A ring header's tp_len near 2**32 (+4 for a stripped tag): version 2 keeps len in a
    uint32 and saturates it, in C as in the reference."""
    frames = [RingFrame(udp4_frame(), wire_len=2**32 - 1, status=_linux.TP_STATUS_VLAN_VALID,
                        vlan_tci=7)]
    same(frames, 0)
    block, first, num = tpacket3_block(frames)
    body, _, _ = encode_c(wire.COLUMNS_VERSION, block, first, num, 0, {})
    import msgpack

    assert wire.decode_column(msgpack.unpackb(body)["columns"]["len"], 1) == [wire.LEN_MAX]


# --- unpack: batches read without a copy (subscriber side) --------------------------------


def plain(value):
    """unpack's result with memoryviews made bytes, to compare with msgpack's."""
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


@pytest.mark.parametrize("version", VERSIONS)
def test_unpack_reads_batches_as_msgpack_does(version):
    import msgpack

    block, first, num = tpacket3_block([RingFrame(f) for f in CORPUS * 4])
    body = encode_c(version, block, first, num, 16, {})[0]
    got = _fastpath.unpack(body)
    assert plain(got) == msgpack.unpackb(body)
    if version == wire.COLUMNS_VERSION:  # long buffers are views of the message
        values = got["columns"]["ts_ns"]["values"]
        assert len(values) >= 512 and isinstance(values, memoryview)
        assert values.obj is not None
        assert isinstance(got["columns"]["pkttype"]["values"], bytes)  # short: a copy


@settings(max_examples=300, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.text(max_size=40)
    | st.binary(max_size=300) | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=20)
    | st.dictionaries(st.text(max_size=10) | st.integers(-5, 5), inner, max_size=20),
    max_leaves=60))
def test_unpack_any_msgpack_value(value):
    import msgpack

    data = msgpack.packb(value, use_bin_type=True)
    assert plain(_fastpath.unpack(data)) == msgpack.unpackb(data, raw=False,
                                                            strict_map_key=False)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400), st.lists(st.tuples(st.integers(0, 10_000),
                                                   st.integers(0, 255)), max_size=8))
def test_unpack_never_trusts_a_hostile_message(noise, flips):
    """Random bytes and damaged real batches: a value or ValueError, never a crash or a
    read outside the message (run under ASan as the encoders are)."""
    block, first, num = tpacket3_block([RingFrame(f) for f in CORPUS[:4]])
    real = bytearray(encode_c(wire.COLUMNS_VERSION, block, first, num, 0, {})[0])
    for where, value in flips:
        real[where % len(real)] = value
    for data in (noise, bytes(real), bytes(real[:len(noise)])):
        with contextlib.suppress(ValueError):
            _fastpath.unpack(data)


def test_unpack_bounds_nesting_and_counts():
    with pytest.raises(ValueError, match="nested too deep"):
        _fastpath.unpack(b"\x91" * 100 + b"\xc0")
    with pytest.raises(ValueError, match="count beyond the message"):
        _fastpath.unpack(b"\xdd\xff\xff\xff\xff")
    with pytest.raises(ValueError, match="truncated"):
        _fastpath.unpack(b"\xc6\x00\x00\x10\x00abc")
    with pytest.raises(ValueError, match="extra bytes"):
        _fastpath.unpack(b"\xc0\xc0")


# --- arrow_capsules: a batch handed to pyarrow through the C data interface ---------------


def arrow_export(columns, n):
    pa = pytest.importorskip("pyarrow")

    class Export:
        def __arrow_c_array__(self, requested_schema=None):
            return _fastpath.arrow_capsules(columns, n)

    return pa.record_batch(Export())


def real_columns(frames=CORPUS * 3):
    block, first, num = tpacket3_block([RingFrame(f) for f in frames])
    batch = _fastpath.unpack(encode_c(wire.COLUMNS_VERSION, block, first, num, 8, {})[0])
    return batch["columns"], batch["n"]


def test_arrow_capsules_hold_the_columns():
    columns, n = real_columns()
    table = arrow_export(columns, n)
    table.validate(full=True)
    assert table.schema.names == list(columns)
    for name, col in columns.items():
        got = table.column(name)
        if name == "ts_ns":
            got = got.cast("int64")
        assert got.to_pylist() == wire.decode_column(col, n), name


@pytest.mark.parametrize(("name", "key", "damage", "why"), [
    ("len", "values", lambda b: b[:-1], "values shorter than n"),
    ("sport", "validity", lambda b: b"", "validity shorter"),
    ("src", "offsets", lambda b: b[:8], "offsets shorter"),
    ("src", "offsets", lambda b: b[:4] + (10**6).to_bytes(4, "little") + b[8:],
     "offsets go down|beyond the values"),
    ("src", "offsets", lambda b: (1).to_bytes(4, "little") + b[4:], "do not start at 0"),
    ("vlan", "values", lambda b: b"", "beyond the values"),
    ("err", "values", lambda b: bytes([100]) + b[1:], "outside the dictionary"),
    ("ts_src", "values", lambda b: bytes([255]) + b[1:], "outside the dictionary"),
])
def test_arrow_capsules_refuse_a_column_that_does_not_fit(name, key, damage, why):
    """A hostile publisher's buffers never let Arrow read outside them: refused up front."""
    columns, n = real_columns()
    columns[name] = {**columns[name], key: damage(bytes(columns[name][key]))}
    with pytest.raises(ValueError, match=why):
        _fastpath.arrow_capsules(columns, n)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 80), st.lists(st.tuples(st.sampled_from(list(wire.FIELDS)),
                                              st.sampled_from(["values", "validity",
                                                               "offsets"]),
                                              st.integers(0, 4000), st.integers(0, 255)),
                                    max_size=6))
def test_arrow_capsules_any_damage_is_refused_or_valid(n, flips):
    """Any n and any damaged bytes: a ValueError, or a batch Arrow validates fully."""
    pa = pytest.importorskip("pyarrow")
    columns, _ = real_columns()
    for name, key, where, value in flips:
        buf = columns[name].get(key)
        if buf is not None and len(buf):
            data = bytearray(buf)
            data[where % len(data)] = value
            columns[name] = {**columns[name], key: bytes(data)}
    try:
        table = arrow_export(columns, n)
    except ValueError:
        return
    assert isinstance(table, pa.RecordBatch)
    table.validate(full=True)
