"""The C batch encoder returns exactly what decode.py + msgpack return: the same bytes,
row count, wire bytes and error counts, on every kind of frame and on random ones."""

import pytest
from frames import (
    BROADCAST,
    MAC_A,
    MAC_B,
    RingFrame,
    arp,
    dot3,
    eth,
    icmp,
    ipv4,
    ipv6,
    ipv6_ext,
    ipv6_frag,
    llc,
    sctp,
    snap,
    tcp,
    tcp4_frame,
    tpacket3_block,
    udp,
    udp4_frame,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from fanoutd import _linux
from fanoutd.publish import batch_prefix, encode_batch_c, encode_batch_py

pytestmark = pytest.mark.skipif(encode_batch_c is None,
                                reason="fanoutd._fastpath is not built")
PREFIX = batch_prefix("eth0", 3, ("any", "fields"))


def encode_rows_c(block, first, num, payload_bytes, errors, seq=2**40 + 7):
    return encode_batch_c(block, first, num, payload_bytes, errors, PREFIX, seq)


def encode_rows_py(block, first, num, payload_bytes, errors, seq=2**40 + 7):
    return encode_batch_py(block, first, num, payload_bytes, errors, PREFIX, seq)

SAMPLES = [
    udp4_frame(payload=b"hello"),
    udp4_frame(payload=b"x" * 300),
    tcp4_frame(flags=0x12, payload=b"GET /"),
    eth(MAC_B, MAC_A, 0x0800, ipv4("10.0.0.1", "10.0.0.2", 6, tcp(1, 2, 0x18, b"d",
                                                                  options=bytes(12)))),
    eth(MAC_B, MAC_A, 0x0800, ipv4("10.0.0.1", "10.0.0.2", 17, udp(1, 2), options=bytes(8))),
    eth(MAC_B, MAC_A, 0x0800, ipv4("10.0.0.1", "10.0.0.2", 17, udp(1, 2, b"ab"),
                                   flags_frag=0x2000)),
    eth(MAC_B, MAC_A, 0x0800, ipv4("10.0.0.1", "10.0.0.2", 17, b"later", flags_frag=7)),
    eth(MAC_B, MAC_A, 0x0800, ipv4("10.0.0.1", "10.0.0.2", 1, icmp(8, 0, b"ping" * 3))),
    eth(MAC_B, MAC_A, 0x0800, ipv4("10.0.0.1", "10.0.0.2", 132, sctp(5, 6) + b"chunk")),
    eth(MAC_B, MAC_A, 0x0800, ipv4("10.0.0.1", "10.0.0.2", 47, b"\x00\x00\x08\x00gre")),
    eth(MAC_B, MAC_A, 0x86DD, ipv6("2001:db8::1", "2001:db8::2", 17, udp(1, 2, b"v6"))),
    eth(MAC_B, MAC_A, 0x86DD, ipv6("2001:db8::1", "2001:db8::2", 0,
                                   ipv6_ext(44) + ipv6_frag(6, 0, True) + tcp(1, 2))),
    eth(MAC_B, MAC_A, 0x86DD, ipv6("2001:db8::1", "2001:db8::2", 44, ipv6_frag(17, 9) + b"x")),
    eth(MAC_B, MAC_A, 0x86DD, ipv6("2001:db8::1", "2001:db8::2", 58, icmp(128, 0))),
    eth(BROADCAST, MAC_A, 0x0806, arp(1, MAC_A, "10.0.0.1", bytes(6), "10.0.0.2")),
    udp4_frame(vlans=((0x88A8, 10), (0x8100, 20))),
    udp4_frame(vlans=tuple((0x8100, i) for i in range(40))),
    dot3(MAC_B, MAC_A, llc(0x42, 0x42, 3, bytes(30))),
    dot3(MAC_B, MAC_A, snap(b"\x00\x00\x00", 0x0800, ipv4("1.1.1.1", "2.2.2.2", 17,
                                                          udp(1, 2)))),
    dot3(MAC_B, MAC_A, snap(b"\x00\x00\x0c", 0x2000, bytes(20))),
    eth(MAC_B, MAC_A, 0x88CC, b"lldp"),
    bytes(20),
]


def same(frames: list[RingFrame], payload_bytes: int) -> None:
    block, first, num = tpacket3_block(frames)
    py_errors: dict = {}
    c_errors: dict = {}
    expected = encode_rows_py(block, first, num, payload_bytes, py_errors)
    assert encode_rows_c(block, first, num, payload_bytes, c_errors) == expected
    assert c_errors == py_errors


@pytest.mark.parametrize("payload_bytes", [0, 3, 64, 65535])
def test_every_sample_in_one_block(payload_bytes):
    same([RingFrame(f, sec=1_700_000_000, nsec=i, rxhash=i * 7919, ifindex=i, pkttype=i % 5)
          for i, f in enumerate(SAMPLES)], payload_bytes)


@pytest.mark.parametrize("frame", SAMPLES)
def test_every_cut_of_every_sample(frame):
    for cut in range(len(frame) + 1):
        same([RingFrame(frame[:cut], wire_len=len(frame))], 16)


def test_ring_metadata_vlan_and_timestamp_source():
    status = (_linux.TP_STATUS_TS_SOFTWARE, _linux.TP_STATUS_TS_RAW_HARDWARE, 0)
    same([RingFrame(udp4_frame(vlans=((0x8100, 5),)), vlan_tci=0xE00A, status=s)
          for s in status], 8)


def test_an_empty_block_and_an_error_count_already_there():
    block, first, num = tpacket3_block([])
    assert encode_rows_c(block, first, num, 0, {}) == encode_rows_py(block, first, num, 0, {})
    errors = {"truncated-ipv4": 3}
    block, first, num = tpacket3_block([RingFrame(udp4_frame()[:20])] * 2)
    encode_rows_c(block, first, num, 0, errors)
    assert errors == {"truncated-ipv4": 5}


def test_frames_past_the_end_of_the_buffer_are_not_read():
    """A header that claims more than the buffer holds: both stop at the buffer's end."""
    block, first, num = tpacket3_block([RingFrame(udp4_frame(payload=b"x" * 100))], tail=0)
    for cut in range(first, len(block) + 1, 7):
        short = block[:cut]
        assert encode_rows_c(short, first, num, 32, {}) == encode_rows_py(short, first, num,
                                                                          32, {})


def test_a_memoryview_of_the_ring_is_read_in_place():
    block, first, num = tpacket3_block([RingFrame(f) for f in SAMPLES[:5]])
    view = memoryview(bytearray(block))
    assert encode_rows_c(view, first, num, 8, {}) == encode_rows_py(block, first, num, 8, {})


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
       st.integers(0, 300))
def test_mutated_frames(frame, flips, cut):
    data = bytearray(frame)
    for where, value in flips:
        if data:
            data[where % len(data)] = value
    same([RingFrame(bytes(data[:cut]), wire_len=len(data))], 24)


@pytest.mark.parametrize("rows", [0, 1, 15, 16, 300])
@pytest.mark.parametrize("seq", [0, 127, 128, 65536, 2**32])
def test_the_batch_around_the_rows_decodes_as_a_batch(rows, seq):
    """Each array-header size (fixarray, array16) and seq size: a subscriber reads it."""
    import msgpack

    block, first, num = tpacket3_block([RingFrame(udp4_frame(sport=i)) for i in range(rows)])
    body, n, _ = encode_batch_c(block, first, num, 0, {}, PREFIX, seq)
    assert body == encode_batch_py(block, first, num, 0, {}, PREFIX, seq)[0]
    batch = msgpack.unpackb(body)
    assert (batch["v"], batch["iface"], batch["worker"], batch["seq"]) == (1, "eth0", 3, seq)
    assert [row[15] for row in batch["packets"]] == list(range(rows)) and n == rows
