"""decode.py through tunnels: each encapsulation's fields, where inner decoding starts,
nested tunnels and tunnel_depth, inner headers cut short, and the payload that follows."""

import pytest
from frames import (
    ERSPAN_II,
    MAC_A,
    MAC_B,
    eth,
    geneve,
    gre,
    ip_bytes,
    ipv4,
    ipv6,
    mpls,
    pppoe,
    tcp,
    udp,
    vxlan,
    vxlan_frame,
)

from fanoutd.decode import MAX_TUNNEL_DEPTH, as_dict, decode_frame

INNER_TCP4 = ipv4("10.0.0.1", "10.0.0.2", 6, tcp(443, 51000, 0x12, b"hello"))
INNER_UDP6 = ipv6("2001:db8::a", "2001:db8::b", 17, udp(5353, 53, b"query"))
MAC_C, MAC_D = bytes.fromhex("0a0000000003"), bytes.fromhex("0a0000000004")
INNER_ETH = eth(MAC_C, MAC_D, 0x0800, INNER_TCP4)
TCP4_INNER = {"inner_src": ip_bytes("10.0.0.1"), "inner_dst": ip_bytes("10.0.0.2"),
              "inner_proto": 6, "inner_sport": 443, "inner_dport": 51000,
              "inner_tcp_flags": 0x12}
UDP6_INNER = {"inner_src": ip_bytes("2001:db8::a"), "inner_dst": ip_bytes("2001:db8::b"),
              "inner_proto": 17, "inner_sport": 5353, "inner_dport": 53,
              "inner_tcp_flags": None}
NO_MACS = {"inner_eth_dst": None, "inner_eth_src": None}
MACS = {"inner_eth_dst": MAC_C, "inner_eth_src": MAC_D}
OUTER4 = {"src": ip_bytes("192.0.2.1"), "dst": ip_bytes("192.0.2.2")}


def decoded(frame: bytes, depth: int = 1, payload_bytes: int = 0) -> dict:
    row = decode_frame(frame, 0, len(frame), len(frame), payload_bytes=payload_bytes,
                       tunnel_depth=depth)
    out = as_dict(row[:-1] if payload_bytes else row)
    if payload_bytes:
        out["payload"] = row[-1]
    return out


def pick(row: dict, expected: dict) -> dict:
    return {name: row[name] for name in expected}


def outer4(proto: int, payload: bytes) -> bytes:
    return eth(MAC_B, MAC_A, 0x0800, ipv4("192.0.2.1", "192.0.2.2", proto, payload))


def outer6(proto: int, payload: bytes) -> bytes:
    return eth(MAC_B, MAC_A, 0x86DD, ipv6("2001:db8::1", "2001:db8::2", proto, payload))


CASES = [
    pytest.param(eth(MAC_B, MAC_A, 0x8864, pppoe(0x1234, 0x0021, INNER_TCP4)),
                 {"ethertype": 0x8864, "src": None, "tunnel": "pppoe", "tunnel_id": 0x1234,
                  **NO_MACS, **TCP4_INNER}, id="pppoe-ipv4"),
    pytest.param(eth(MAC_B, MAC_A, 0x8864, pppoe(1, 0x0057, INNER_UDP6)),
                 {"tunnel": "pppoe", "tunnel_id": 1, **UDP6_INNER}, id="pppoe-ipv6"),
    pytest.param(eth(MAC_B, MAC_A, 0x8847, mpls([16, 17, 1000], INNER_TCP4)),
                 {"ethertype": 0x8847, "tunnel": "mpls", "tunnel_id": 16, **TCP4_INNER},
                 id="mpls-3-labels-ipv4"),
    pytest.param(eth(MAC_B, MAC_A, 0x8848, mpls([0xFFFFF], INNER_UDP6)),
                 {"tunnel": "mpls", "tunnel_id": 0xFFFFF, **UDP6_INNER}, id="mpls-mc-ipv6"),
    pytest.param(eth(MAC_B, MAC_A, 0x8847, mpls([5], b"\x00\x00\x00\x07" + INNER_ETH)),
                 {"tunnel": "mpls", "tunnel_id": 5, "inner_src": None, "err": None},
                 id="mpls-control-word"),
    pytest.param(outer4(47, gre(0x0800, INNER_TCP4)),
                 {**OUTER4, "proto": 47, "tunnel": "gre", "tunnel_id": None, **NO_MACS,
                  **TCP4_INNER}, id="gre-ipv4"),
    pytest.param(outer4(47, gre(0x86DD, INNER_UDP6, key=0xFFFFFFFF, csum=True, seq=3)),
                 {"tunnel": "gre", "tunnel_id": 0xFFFFFFFF, **UDP6_INNER},
                 id="gre-csum-key-seq-ipv6"),
    pytest.param(outer6(47, gre(0x6558, INNER_ETH, key=0x00138900)),
                 {"proto": 47, "tunnel": "gre", "tunnel_id": 0x00138900, **MACS,
                  **TCP4_INNER}, id="nvgre"),
    pytest.param(outer4(47, gre(0x88BE, INNER_ETH)),
                 {"tunnel": "gre", **MACS, **TCP4_INNER}, id="erspan-i"),
    pytest.param(outer4(47, gre(0x88BE, ERSPAN_II + INNER_ETH, seq=1)),
                 {"tunnel": "gre", **MACS, **TCP4_INNER}, id="erspan-ii"),
    pytest.param(outer4(47, gre(0x88BE, bytes(8) + INNER_ETH, seq=1)),
                 {"tunnel": "gre", "inner_src": None, "err": None}, id="erspan-ii-version-0"),
    pytest.param(outer4(17, udp(1, 6635, mpls([30, 31], INNER_TCP4))),
                 {"dport": 6635, "tunnel": "mpls", "tunnel_id": 30, **NO_MACS, **TCP4_INNER},
                 id="mpls-in-udp"),
    pytest.param(outer4(47, gre(0x880B, b"\xff\x03\x00\x21" + INNER_TCP4, key=1, version=1)),
                 {"tunnel": "gre", "tunnel_id": None, "inner_src": None, "err": None},
                 id="pptp-not-decoded"),
    pytest.param(vxlan_frame(5001, INNER_ETH),
                 {**OUTER4, "proto": 17, "dport": 4789, "tunnel": "vxlan", "tunnel_id": 5001,
                  **MACS, **TCP4_INNER}, id="vxlan"),
    pytest.param(vxlan_frame(7, eth(MAC_C, MAC_D, 0x86DD, INNER_UDP6,
                                    vlans=((0x8100, 10), (0x8100, 20)))),
                 {"tunnel": "vxlan", "tunnel_id": 7, "vlan": [], **MACS, **UDP6_INNER},
                 id="vxlan-inner-vlans-skipped"),
    pytest.param(outer4(17, udp(1, 6081, geneve(77, INNER_ETH, options=bytes(12)))),
                 {"dport": 6081, "tunnel": "geneve", "tunnel_id": 77, **MACS, **TCP4_INNER},
                 id="geneve-options"),
    pytest.param(outer6(17, udp(1, 6081, geneve(78, INNER_UDP6, ptype=0x86DD))),
                 {"tunnel": "geneve", "tunnel_id": 78, **NO_MACS, **UDP6_INNER},
                 id="geneve-ipv6"),
    pytest.param(outer4(4, INNER_TCP4),
                 {**OUTER4, "proto": 4, "tunnel": "ipip", "tunnel_id": None, **TCP4_INNER},
                 id="ipip-4in4"),
    pytest.param(outer4(41, INNER_UDP6), {"tunnel": "ipip", **UDP6_INNER}, id="ipip-6in4"),
    pytest.param(outer6(4, INNER_TCP4), {"tunnel": "ipip", **TCP4_INNER}, id="ipip-4in6"),
    pytest.param(outer6(41, INNER_UDP6), {"tunnel": "ipip", **UDP6_INNER}, id="ipip-6in6"),
]


@pytest.mark.parametrize(("frame", "expected"), CASES)
def test_each_encapsulation(frame, expected):
    row = decoded(frame)
    assert row["err"] is None or "err" in expected
    assert pick(row, expected) == expected


@pytest.mark.parametrize(("frame", "expected"), CASES)
def test_outer_fields_are_those_of_tunnel_depth_0(frame, expected):
    """Decoding through a tunnel changes none of the fields that describe the outer packet."""
    outer = decoded(frame, depth=0)
    through = decoded(frame)
    assert {k: v for k, v in through.items() if not k.startswith(("tunnel", "inner_"))} == \
        {k: v for k, v in outer.items() if not k.startswith(("tunnel", "inner_"))}
    assert all(v is None for k, v in outer.items() if k.startswith(("tunnel", "inner_")))


def test_vxlan_on_another_port_or_a_source_port_is_plain_udp():
    for sport, dport in ((4789, 40000), (40000, 4790)):
        frame = outer4(17, udp(sport, dport, vxlan(1, INNER_ETH)))
        assert pick(decoded(frame), {"tunnel": None, "inner_src": None}) == {
            "tunnel": None, "inner_src": None}


def test_pppoe_discovery_is_no_tunnel():
    row = decoded(eth(MAC_B, MAC_A, 0x8863, b"\x11\x09\x00\x00\x00\x00"))
    assert (row["ethertype"], row["tunnel"], row["err"]) == (0x8863, None, None)


def test_pppoe_length_cuts_the_padding():
    """After the PPPoE payload comes Ethernet padding: the PPPoE length bounds the inner
    packet as the IP total length does (here the PPP frame is an unknown protocol, so
    nothing else would)."""
    frame = eth(MAC_B, MAC_A, 0x8864, pppoe(3, 0xC021, b"lcp!") + b"\xee" * 10)
    assert decoded(frame, payload_bytes=100)["payload"] == b"lcp!"


# --- depth and nesting ---------------------------------------------------------------------

NESTED = vxlan_frame(9, eth(MAC_C, MAC_D, 0x0800, ipv4("10.9.0.1", "10.9.0.2", 47,
                                                         gre(0x0800, INNER_TCP4, key=44))))


def test_depth_1_stops_at_the_packet_inside_the_first_tunnel():
    row = decoded(NESTED)
    assert pick(row, {"tunnel": 1, "tunnel_id": 1, "inner_src": 1, "inner_proto": 1,
                      "inner_sport": 1, "inner_eth_src": 1}) == {
        "tunnel": "vxlan", "tunnel_id": 9, "inner_src": ip_bytes("10.9.0.1"), "inner_proto": 47,
        "inner_sport": None, "inner_eth_src": MAC_D}


def test_depth_2_reaches_the_innermost_packet_and_names_the_outermost_tunnel():
    row = decoded(NESTED, depth=2)
    # The innermost tunnel (GRE over IPv4) carries no Ethernet: no inner MACs.
    assert pick(row, {"tunnel": 1, "tunnel_id": 1, **TCP4_INNER, **NO_MACS}) == {
        "tunnel": "vxlan", "tunnel_id": 9, **TCP4_INNER, **NO_MACS}


def test_a_tunnel_inside_that_carries_nothing_decodable_leaves_the_packet_around_it():
    """VXLAN around IPv4 around PPTP's GRE version 1, at depth 2: the GRE carries nothing
    fanoutd decodes, so the inner fields are the IPv4 packet's, the innermost decoded."""
    pptp = gre(0x880B, b"\xff\x03\x00\x21" + INNER_TCP4, key=1, version=1)
    frame = vxlan_frame(9, eth(MAC_C, MAC_D, 0x0800, ipv4("10.9.0.1", "10.9.0.2", 47, pptp)))
    row = decoded(frame, depth=2)
    assert pick(row, {"tunnel": 1, "inner_src": 1, "inner_proto": 1, "inner_eth_src": 1}) == {
        "tunnel": "vxlan", "inner_src": ip_bytes("10.9.0.1"), "inner_proto": 47,
        "inner_eth_src": MAC_D}


def test_mpls_in_gre_needs_depth_2():
    frame = outer4(47, gre(0x8847, mpls([20], INNER_TCP4)))
    assert decoded(frame)["inner_src"] is None
    assert pick(decoded(frame, depth=2), {"tunnel": "gre", **TCP4_INNER}) == {
        "tunnel": "gre", **TCP4_INNER}


def test_depth_is_bounded():
    frame = INNER_TCP4
    for vni in range(MAX_TUNNEL_DEPTH + 2):
        frame = ipv4("192.0.2.1", "192.0.2.2", 17, udp(1, 4789, vxlan(vni, eth(
            MAC_C, MAC_D, 0x0800, frame))))
    frame = eth(MAC_B, MAC_A, 0x0800, frame)
    row = decoded(frame, depth=MAX_TUNNEL_DEPTH)
    assert row["tunnel_id"] == MAX_TUNNEL_DEPTH + 1  # the outermost
    assert row["inner_dport"] == 4789  # the innermost decoded is still VXLAN's UDP


# --- truncation ----------------------------------------------------------------------------

def test_every_truncation_keeps_the_outer_row_and_what_the_inner_packet_gave():
    """Cut a tunnelled frame anywhere: decoding never raises, the outer fields are those
    of the same cut decoded without tunnels (minus the payload), and an inner header cut
    short is named by the reason the same header gives outside a tunnel."""
    inner_reasons = {"truncated-ethernet", "truncated-vlan", "truncated-ipv4", "truncated-ipv6",
                     "truncated-tcp", "truncated-udp"}
    for case in CASES:
        frame = case.values[0]
        for cut in range(len(frame) + 1):
            part = frame[:cut]
            row, outer = decoded(part), decoded(part, depth=0)
            for name, value in outer.items():
                if name != "err" and not name.startswith(("tunnel", "inner_")):
                    assert row[name] == value, (case.id, cut, name)
            if row["tunnel"] is None:
                assert row["err"] == outer["err"], (case.id, cut)
            elif row["err"] is not None:
                assert outer["err"] is None, (case.id, cut)  # outer headers were whole
                assert row["err"].startswith("truncated-"), (case.id, cut)
                assert (row["err"] in inner_reasons
                        or row["err"] == f"truncated-{row['tunnel']}"), (case.id, cut)


def test_inner_tcp_cut_short_keeps_inner_ports():
    frame = vxlan_frame(5, INNER_ETH)
    cut = len(frame) - len(b"hello") - 20 + 6  # 6 bytes of the inner TCP header
    row = decoded(frame[:cut])
    assert pick(row, {"err": 1, "tunnel_id": 1, "inner_sport": 1, "inner_dport": 1,
                      "inner_tcp_flags": 1, "inner_src": 1}) == {
        "err": "truncated-tcp", "tunnel_id": 5, "inner_sport": 443, "inner_dport": 51000,
        "inner_tcp_flags": None, "inner_src": ip_bytes("10.0.0.1")}


def test_payload_is_the_innermost_packets():
    row = decoded(vxlan_frame(5, INNER_ETH), payload_bytes=64)
    assert row["payload"] == b"hello"
    row = decoded(vxlan_frame(5, INNER_ETH), depth=0, payload_bytes=8)
    assert row["payload"] == vxlan(5, b"")  # without tunnels: what follows UDP
