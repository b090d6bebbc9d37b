"""Unit tests for fanoutd.decode on crafted bytes; docs/wire-format.md is the contract."""

import re
from pathlib import Path

import pytest
from frames import (
    BROADCAST,
    MAC_A,
    MAC_B,
    OUI_CISCO,
    OUI_ZERO,
    TPACKET3_HDRLEN,
    RingFrame,
    arista,
    arp,
    arp_generic,
    dccp,
    dot3,
    eth,
    geneve,
    gre,
    icmp,
    ip_bytes,
    ipv4,
    ipv6,
    ipv6_ah,
    ipv6_ext,
    ipv6_frag,
    llc,
    mpls,
    pppoe,
    sctp,
    snap,
    tcp,
    tcp4_frame,
    tpacket3_block,
    udp,
    udp4_frame,
    vxlan,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from fanoutd import _linux
from fanoutd.decode import as_dict, decode_block, decode_frame
from fanoutd.wire import ERROR_REASONS, FIELDS, PAYLOAD_FIELD, TUNNEL_FIELDS

SPEC = Path(__file__).resolve().parent.parent / "docs" / "wire-format.md"

SRC4, DST4 = "192.0.2.1", "198.51.100.7"
SRC6, DST6 = "2001:db8::1", "2001:db8:ffff::2"
A4, B4 = ip_bytes(SRC4), ip_bytes(DST4)
A6, B6 = ip_bytes(SRC6), ip_bytes(DST6)

ETH_IP, ETH_ARP, ETH_IPV6 = 0x0800, 0x0806, 0x86DD
TCP, UDP, DCCP, SCTP, UDPLITE, ICMP, ICMPV6 = 6, 17, 33, 132, 136, 1, 58
HOPOPTS, ROUTING, FRAGMENT, AH, DSTOPTS = 0, 43, 44, 51, 60
SYN, ACK, FIN, PSH, RST, NS = 0x02, 0x10, 0x01, 0x08, 0x04, 0x100


# --- helpers -------------------------------------------------------------------------------

def decoded(frame: bytes, **meta) -> dict:
    """Decode a frame captured as given (caplen = len = len(frame)) into a {field: value}."""
    return as_dict(decode_frame(frame, 0, len(frame), len(frame), **meta))


def pick(row: dict, names) -> dict:
    """The fields of row named by names (or by an expected dict's keys), to compare with `==`
    for a readable diff."""
    return {name: row[name] for name in names}


def eth4(proto: int, payload: bytes, **ip_kw) -> bytes:
    return eth(MAC_B, MAC_A, ETH_IP, ipv4(SRC4, DST4, proto, payload, **ip_kw))


def eth6(nxt: int, payload: bytes, hlim: int = 64) -> bytes:
    return eth(MAC_B, MAC_A, ETH_IPV6, ipv6(SRC6, DST6, nxt, payload, hlim))


EXT_BODY = {HOPOPTS: 6, ROUTING: 22, DSTOPTS: 14}  # sizes 8, 24 and 16 bytes in all


def eth6_chain(kinds: tuple[int, ...], last: int, payload: bytes, hlim: int = 64) -> bytes:
    """IPv6 with the extension headers `kinds` (in order) before `last` and its payload."""
    headers = b""
    for kind, nxt in zip(kinds, (*kinds[1:], last), strict=False):  # () gives no header
        if kind == FRAGMENT:
            headers += ipv6_frag(nxt)
        elif kind == AH:
            headers += ipv6_ah(nxt)
        else:
            headers += ipv6_ext(nxt, EXT_BODY[kind])
    return eth6(kinds[0] if kinds else last, headers + payload, hlim)


def assert_well_formed(row: list) -> None:
    """The invariants of any row, whatever the input bytes."""
    assert isinstance(row, list)
    assert len(row) == len(FIELDS)
    d = as_dict(row)
    assert d["err"] is None or d["err"] in ERROR_REASONS
    assert d["eth_dst"] is None or (isinstance(d["eth_dst"], bytes) and len(d["eth_dst"]) == 6)
    assert d["eth_src"] is None or (isinstance(d["eth_src"], bytes) and len(d["eth_src"]) == 6)
    assert d["ethertype"] is None or 0 <= d["ethertype"] <= 0xFFFF
    assert isinstance(d["vlan"], list) and all(0 <= v <= 0xFFF for v in d["vlan"])
    for name in ("src", "dst"):
        assert d[name] is None or (isinstance(d[name], bytes) and len(d[name]) in (4, 16))
    for name in ("proto", "ttl", "icmp_type", "icmp_code"):
        assert d[name] is None or 0 <= d[name] <= 0xFF
    for name in ("sport", "dport"):
        assert d[name] is None or 0 <= d[name] <= 0xFFFF
    assert d["tcp_flags"] is None or 0 <= d["tcp_flags"] <= 0x1FF
    assert isinstance(d["frag"], bool)


# --- the spec's tables ---------------------------------------------------------------------

def _spec_table(heading: str) -> list[str]:
    """The backquoted names in the first column of the table under a heading of the spec."""
    text = SPEC.read_text().split(heading, 1)[1]
    names = []
    for line in text.splitlines()[1:]:
        if line.startswith("#"):
            break
        if line.startswith("| `"):
            names += re.findall(r"`([^`]+)`", line.split("|")[1])
    return names


def test_fields_are_the_spec_row_fields():
    assert _spec_table("### Fields") == [*FIELDS, PAYLOAD_FIELD]


def test_error_reasons_are_the_spec_reasons():
    assert _spec_table("### `err` reasons") == list(ERROR_REASONS)


# --- Ethernet and 802.3 --------------------------------------------------------------------

def test_ethernet_ii_udp_full_row():
    frame = udp4_frame(SRC4, DST4, 1000, 53, b"query")
    row = as_dict(decode_frame(frame, 0, len(frame), len(frame), ts_ns=1_700_000_000_123456789,
                               ifindex=7, rxhash=0xDEADBEEF, pkttype=3))
    assert row == {
        "ts_ns": 1_700_000_000_123456789, "ts_src": "fallback",
        "len": len(frame), "caplen": len(frame),
        "ifindex": 7, "rxhash": 0xDEADBEEF, "pkttype": 3,
        "eth_dst": MAC_B, "eth_src": MAC_A, "ethertype": ETH_IP, "vlan": [],
        "src": A4, "dst": B4, "proto": UDP, "ttl": 64, "sport": 1000, "dport": 53,
        "tcp_flags": None, "icmp_type": None, "icmp_code": None, "frag": False, "err": None,
        **dict.fromkeys(TUNNEL_FIELDS),
    }


@pytest.mark.parametrize("version", [0x0010, 0x0110, 0x0020, 0x0120])
def test_arista_timestamp_header_is_skipped(version):
    """Arista's TAP aggregation timestamp sits between the MACs and the ethertype: the row
    is that of the frame it precedes, VLAN tags after it included."""
    frame = arista(version, eth(MAC_B, MAC_A, 0x8100, b"\x00\x07\x08\x00"
                                + ipv4(SRC4, DST4, UDP, udp(1000, 53)))[12:])
    expected = {**{"eth_dst": MAC_B, "eth_src": MAC_A}, "ethertype": ETH_IP, "vlan": [7],
                "src": A4, "dst": B4, "proto": UDP, "dport": 53, "err": None}
    assert pick(decoded(frame), expected) == expected


@pytest.mark.parametrize(("subtype", "version"), [(1, 0x0030), (2, 0x0010)])
def test_arista_header_of_another_kind_stops_without_error(subtype, version):
    frame = arista(version, UDP4[12:], subtype=subtype)
    expected = {"ethertype": 0xD28B, "src": None, "err": None}
    assert pick(decoded(frame), expected) == expected


def test_unknown_ethertype_is_not_an_error():
    row = decoded(eth(BROADCAST, MAC_A, 0x88CC, b"\x02\x07\x04" + bytes(40)))  # LLDP
    expected = {"eth_dst": BROADCAST, "eth_src": MAC_A, "ethertype": 0x88CC, "vlan": [],
                "src": None, "dst": None, "proto": None, "sport": None, "err": None}
    assert pick(row, expected) == expected


def test_dot3_plain_llc_has_no_ethertype():
    stp_dst = bytes.fromhex("0180c2000000")
    frame = dot3(stp_dst, MAC_A, llc(0x42, 0x42, 0x03, bytes(35)))  # a spanning-tree BPDU
    expected = {"eth_dst": stp_dst, "eth_src": MAC_A, "ethertype": None, "vlan": [],
                "src": None, "proto": None, "err": None}
    assert pick(decoded(frame), expected) == expected


def test_dot3_snap_zero_oui_carries_ipv4():
    frame = dot3(MAC_B, MAC_A, snap(OUI_ZERO, ETH_IP, ipv4(SRC4, DST4, UDP, udp(67, 68))))
    expected = {"eth_dst": MAC_B, "eth_src": MAC_A, "ethertype": ETH_IP, "src": A4, "dst": B4,
                "proto": UDP, "ttl": 64, "sport": 67, "dport": 68, "err": None}
    assert pick(decoded(frame), expected) == expected


def test_dot3_snap_bridge_tunnel_oui_carries_ipv4():
    frame = dot3(MAC_B, MAC_A, snap(b"\x00\x00\xf8", ETH_IP, ipv4(SRC4, DST4, UDP, udp(1, 2))))
    expected = {"ethertype": ETH_IP, "src": A4, "sport": 1, "dport": 2, "err": None}
    assert pick(decoded(frame), expected) == expected


def test_dot3_snap_nonzero_oui_has_no_ethertype():
    frame = dot3(bytes.fromhex("01000ccccccc"), MAC_A, snap(OUI_CISCO, 0x2000, bytes(40)))  # CDP
    expected = {"eth_src": MAC_A, "ethertype": None, "src": None, "proto": None, "err": None}
    assert pick(decoded(frame), expected) == expected


def test_dot3_snap_nonzero_oui_with_ip_pid_is_not_ip():
    # The protocol id only means an ethertype under the zero OUI.
    frame = dot3(MAC_B, MAC_A, snap(OUI_CISCO, ETH_IP, ipv4(SRC4, DST4, UDP, udp(1, 2))))
    expected = {"ethertype": None, "src": None, "sport": None, "err": None}
    assert pick(decoded(frame), expected) == expected


@pytest.mark.parametrize(("pid", "ethertype"), [(0x0000, None), (0x05FF, None),
                                                (0x0600, 0x0600), (0x88CC, 0x88CC)])
def test_dot3_snap_protocol_id_below_0x0600_is_not_an_ethertype(pid, ethertype):
    """Under the zero OUI the protocol id is an ethertype only from 0x0600 on: a Cisco ISL
    header looks like SNAP with a length there, and is reported like other 802.3 frames."""
    row = decoded(dot3(MAC_B, MAC_A, snap(OUI_ZERO, pid, bytes(40))))
    assert (row["ethertype"], row["src"], row["err"]) == (ethertype, None, None)


@pytest.mark.parametrize(("type_len", "ethertype"), [
    (46, None), (1500, None), (1501, 1501), (0x0600, 0x0600),  # above 1500 is an ethertype
])
def test_type_length_boundary(type_len, ethertype):
    row = decoded(eth(MAC_B, MAC_A, type_len, llc(0x42, 0x42, 0x03, bytes(43))))
    assert (row["ethertype"], row["err"]) == (ethertype, None)


@pytest.mark.parametrize("dsap_ssap", [b"\xaa\x42", b"\x42\xaa", b"\xe0\xe0"])
def test_dot3_llc_that_is_not_snap_has_no_ethertype(dsap_ssap):
    # Only AA AA is SNAP; a zero OUI and an IPv4 protocol id after anything else mean nothing.
    inner = dsap_ssap + b"\x03" + OUI_ZERO + b"\x08\x00" + ipv4(SRC4, DST4, UDP, udp(1, 2))
    expected = {"ethertype": None, "src": None, "sport": None, "err": None}
    assert pick(decoded(dot3(MAC_B, MAC_A, inner)), expected) == expected


def test_dot3_snap_inside_vlan_tag():
    inner = snap(OUI_ZERO, ETH_IP, ipv4(SRC4, DST4, UDP, udp(5, 6)))
    frame = eth(MAC_B, MAC_A, len(inner), inner, vlans=((0x8100, 12),))
    expected = {"vlan": [12], "ethertype": ETH_IP, "src": A4, "sport": 5, "dport": 6, "err": None}
    assert pick(decoded(frame), expected) == expected


# --- VLAN tags -----------------------------------------------------------------------------

PCP5_DEI = (5 << 13) | (1 << 12)  # priority and drop-eligible bits, which are not the VID


@pytest.mark.parametrize(("vlans", "ids"), [
    pytest.param(((0x8100, 100),), [100], id="802.1q"),
    pytest.param(((0x8100, PCP5_DEI | 4094),), [4094], id="802.1q-pcp-dei"),
    pytest.param(((0x88A8, 7),), [7], id="802.1ad-single"),
    pytest.param(((0x88A8, 10), (0x8100, 20)), [10, 20], id="qinq-88a8-8100"),
    pytest.param(((0x9100, 30), (0x8100, PCP5_DEI | 40)), [30, 40], id="qinq-9100-8100"),
    pytest.param(((0x88A8, 1), (0x8100, 2), (0x8100, 3)), [1, 2, 3], id="three-tags"),
])
def test_vlan_tags_in_frame(vlans, ids):
    frame = udp4_frame(SRC4, DST4, 1000, 2000, vlans=vlans)
    expected = {"vlan": ids, "ethertype": ETH_IP, "src": A4, "dst": B4, "proto": UDP,
                "sport": 1000, "dport": 2000, "len": len(frame), "caplen": len(frame),
                "err": None}
    assert pick(decoded(frame), expected) == expected


def test_priority_tag_is_vlan_0():
    frame = udp4_frame(vlans=((0x8100, 5 << 13),))
    expected = {"vlan": [0], "ethertype": ETH_IP, "sport": 1000, "err": None}
    assert pick(decoded(frame), expected) == expected


@pytest.mark.parametrize(("tci", "vid"), [
    (42, 42), ((3 << 13) | 42, 42), (PCP5_DEI | 4095, 4095), (6 << 13, 0),
])
@pytest.mark.parametrize(("caplen", "wire_len"), [(None, None), (34, 1514)])
def test_stripped_tag_comes_first_and_counts_4_bytes(tci, vid, caplen, wire_len):
    frame = udp4_frame(SRC4, DST4, 1000, 2000)
    caplen = len(frame) if caplen is None else caplen
    wire_len = len(frame) if wire_len is None else wire_len
    row = as_dict(decode_frame(frame, 0, caplen, wire_len, vlan_tci=tci))
    expected = {"vlan": [vid], "len": wire_len + 4, "caplen": caplen + 4, "ethertype": ETH_IP,
                "src": A4, "err": None if caplen == len(frame) else "truncated-udp"}
    assert pick(row, expected) == expected


def test_stripped_outer_tag_then_in_frame_tag():
    frame = udp4_frame(vlans=((0x8100, 200),))
    row = as_dict(decode_frame(frame, 0, len(frame), len(frame), vlan_tci=(1 << 13) | 100))
    expected = {"vlan": [100, 200], "ethertype": ETH_IP, "len": len(frame) + 4,
                "caplen": len(frame) + 4, "sport": 1000, "err": None}
    assert pick(row, expected) == expected


def test_no_stripped_tag_counts_nothing():
    frame = udp4_frame()
    row = as_dict(decode_frame(frame, 0, len(frame), 1514, vlan_tci=None))
    assert pick(row, ("vlan", "len", "caplen")) == {
        "vlan": [], "len": 1514, "caplen": len(frame)}


# --- IPv4 ----------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [
    pytest.param(b"\x01\x01\x01\x00", id="ihl6"),
    pytest.param(b"\x94\x04\x00\x00" + b"\x01" * 4, id="ihl7-router-alert"),
    pytest.param(b"\x01" * 39 + b"\x00", id="ihl15"),
])
@pytest.mark.parametrize(("proto", "transport", "flags"), [
    pytest.param(UDP, udp(4321, 53), None, id="udp"),
    pytest.param(TCP, tcp(40000, 443, SYN | ACK), SYN | ACK, id="tcp"),
])
def test_ipv4_options_then_ports(options, proto, transport, flags):
    sport = 4321 if proto == UDP else 40000
    dport = 53 if proto == UDP else 443
    frame = eth4(proto, transport, options=options, ttl=17)
    expected = {"src": A4, "dst": B4, "proto": proto, "ttl": 17, "sport": sport,
                "dport": dport, "tcp_flags": flags, "frag": False, "err": None}
    assert pick(decoded(frame), expected) == expected


@pytest.mark.parametrize(("flags_frag", "frag", "ports"), [
    pytest.param(0x2000, True, (1000, 2000), id="first-more-fragments"),
    pytest.param(0x2000 | 185, True, (None, None), id="middle"),
    pytest.param(185, True, (None, None), id="last"),
    pytest.param(0x4000, False, (1000, 2000), id="dont-fragment-only"),
    pytest.param(0, False, (1000, 2000), id="unfragmented"),
])
def test_ipv4_fragments(flags_frag, frag, ports):
    # A later fragment's payload here looks like a UDP header; it must not be read as one.
    frame = eth4(UDP, udp(1000, 2000, b"x" * 32), flags_frag=flags_frag, ident=0x1234)
    expected = {"src": A4, "dst": B4, "proto": UDP, "frag": frag, "sport": ports[0],
                "dport": ports[1], "err": None}
    assert pick(decoded(frame), expected) == expected


def test_ipv4_later_fragment_with_tiny_payload_is_no_error():
    frame = eth4(TCP, b"\x01\x02", flags_frag=100)
    expected = {"proto": TCP, "frag": True, "sport": None, "tcp_flags": None, "err": None}
    assert pick(decoded(frame), expected) == expected


@pytest.mark.parametrize("ttl", [0, 1, 64, 255])
def test_ipv4_ttl(ttl):
    assert decoded(eth4(UDP, udp(1, 2), ttl=ttl))["ttl"] == ttl


# --- IPv6 ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kinds", [
    pytest.param((), id="none"),
    pytest.param((HOPOPTS,), id="hop"),
    pytest.param((HOPOPTS, ROUTING, DSTOPTS), id="hop-routing-dst"),
    pytest.param((HOPOPTS, DSTOPTS, ROUTING, FRAGMENT, DSTOPTS), id="hop-dst-rt-frag-dst"),
    pytest.param((HOPOPTS, AH), id="hop-ah"),
    pytest.param((AH, DSTOPTS), id="ah-dst"),
])
@pytest.mark.parametrize(("proto", "transport", "flags"), [
    pytest.param(TCP, tcp(50000, 22, FIN | PSH | ACK), FIN | PSH | ACK, id="tcp"),
    pytest.param(UDP, udp(5353, 5353), None, id="udp"),
])
def test_ipv6_extension_chain(kinds, proto, transport, flags):
    frame = eth6_chain(kinds, proto, transport, hlim=200)
    sport, dport = (50000, 22) if proto == TCP else (5353, 5353)
    expected = {"ethertype": ETH_IPV6, "src": A6, "dst": B6, "ttl": 200, "proto": proto,
                "sport": sport, "dport": dport, "tcp_flags": flags, "frag": False, "err": None}
    assert pick(decoded(frame), expected) == expected


@pytest.mark.parametrize(("offset", "more", "frag", "ports"), [
    pytest.param(0, True, True, (1000, 2000), id="first-fragment"),
    pytest.param(185, True, True, (None, None), id="middle"),
    pytest.param(185, False, True, (None, None), id="last"),
    pytest.param(0, False, False, (1000, 2000), id="atomic"),
])
def test_ipv6_fragment_header(offset, more, frag, ports):
    payload = ipv6_frag(UDP, offset, more) + udp(1000, 2000, b"y" * 16)
    frame = eth6(HOPOPTS, ipv6_ext(FRAGMENT) + payload)
    expected = {"proto": UDP, "frag": frag, "sport": ports[0], "dport": ports[1],
                "src": A6, "ttl": 64, "err": None}
    assert pick(decoded(frame), expected) == expected


def test_ipv6_later_fragment_proto_is_fragment_next_header():
    # After offset > 0 nothing follows but data, even when the next header is an extension.
    frame = eth6(FRAGMENT, ipv6_frag(DSTOPTS, offset=3) + b"\xff\xff" + bytes(30))
    expected = {"proto": DSTOPTS, "frag": True, "sport": None, "err": None}
    assert pick(decoded(frame), expected) == expected


def test_ipv6_later_fragment_with_tiny_payload_is_no_error():
    frame = eth6(FRAGMENT, ipv6_frag(TCP, offset=1) + b"\x00")
    expected = {"proto": TCP, "frag": True, "sport": None, "tcp_flags": None, "err": None}
    assert pick(decoded(frame), expected) == expected


@pytest.mark.parametrize("hlim", [0, 1, 255])
def test_ipv6_hop_limit_is_ttl(hlim):
    assert decoded(eth6(UDP, udp(1, 2), hlim=hlim))["ttl"] == hlim


# --- transport -----------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [
    pytest.param(SYN, id="syn"),
    pytest.param(SYN | ACK, id="syn-ack"),
    pytest.param(FIN | PSH | ACK, id="fin-psh-ack"),
    pytest.param(RST, id="rst"),
    pytest.param(NS | ACK, id="ns-ack"),
    pytest.param(0x1FF, id="all"),
    pytest.param(0, id="none"),
])
def test_tcp_flags(flags):
    row = decoded(tcp4_frame(SRC4, DST4, 33000, 80, flags))
    assert pick(row, ("proto", "sport", "dport", "tcp_flags", "err")) == {
        "proto": TCP, "sport": 33000, "dport": 80, "tcp_flags": flags, "err": None}


def test_tcp_with_options_and_payload():
    seg = tcp(1, 65535, SYN, payload=b"data", options=b"\x02\x04\x05\xb4" + b"\x01" * 4)
    expected = {"sport": 1, "dport": 65535, "tcp_flags": SYN, "err": None}
    assert pick(decoded(eth4(TCP, seg)), expected) == expected


PORT_CASES = [
    pytest.param(TCP, tcp(1234, 80), id="tcp"),
    pytest.param(UDP, udp(1234, 80), id="udp"),
    pytest.param(UDPLITE, udp(1234, 80), id="udplite"),
    pytest.param(SCTP, sctp(1234, 80), id="sctp"),
    pytest.param(DCCP, dccp(1234, 80), id="dccp"),
]


@pytest.mark.parametrize(("proto", "transport"), PORT_CASES)
@pytest.mark.parametrize("version", [4, 6])
def test_ports(version, proto, transport):
    frame = eth4(proto, transport) if version == 4 else eth6(proto, transport)
    expected = {"proto": proto, "sport": 1234, "dport": 80, "icmp_type": None,
                "tcp_flags": SYN if proto == TCP else None, "err": None}
    assert pick(decoded(frame), expected) == expected


@pytest.mark.parametrize(("icmp_type", "code"), [(8, 0), (0, 0), (3, 3), (11, 1), (5, 1)])
def test_icmp_type_code(icmp_type, code):
    expected = {"proto": ICMP, "icmp_type": icmp_type, "icmp_code": code, "sport": None,
                "dport": None, "err": None}
    assert pick(decoded(eth4(ICMP, icmp(icmp_type, code))), expected) == expected


@pytest.mark.parametrize(("icmp_type", "code"), [(128, 0), (129, 0), (1, 4), (135, 0), (2, 0)])
def test_icmpv6_type_code(icmp_type, code):
    frame = eth6_chain((HOPOPTS,), ICMPV6, icmp(icmp_type, code))
    expected = {"proto": ICMPV6, "icmp_type": icmp_type, "icmp_code": code, "sport": None,
                "err": None}
    assert pick(decoded(frame), expected) == expected


@pytest.mark.parametrize(("version", "proto", "depth"), [
    (4, 47, 0), (4, 50, 1), (4, 51, 1), (4, 89, 1), (4, 4, 0), (4, 41, 0), (4, 255, 1),
    (6, 47, 0), (6, 50, 1), (6, 59, 1), (6, 89, 1), (6, 4, 0),
])
def test_other_ip_protocols(version, proto, depth):
    """Protocols without ports; GRE and IP in IP too when tunnels are not decoded."""
    payload = udp(1000, 2000, bytes(20))  # would give ports if wrongly read as UDP
    frame = eth4(proto, payload) if version == 4 else eth6(proto, payload)
    expected = {"proto": proto, "sport": None, "dport": None, "tcp_flags": None,
                "icmp_type": None, "icmp_code": None, "frag": False, "err": None,
                "tunnel": None, "inner_src": None}
    assert pick(decoded(frame, tunnel_depth=depth), expected) == expected


# --- ARP -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("op", "dst_mac", "tha"), [
    pytest.param(1, BROADCAST, bytes(6), id="request"),
    pytest.param(2, MAC_A, MAC_A, id="reply"),
])
def test_arp_ipv4(op, dst_mac, tha):
    frame = eth(dst_mac, MAC_B, ETH_ARP, arp(op, MAC_B, SRC4, tha, DST4) + bytes(18))
    expected = {"eth_dst": dst_mac, "ethertype": ETH_ARP, "src": A4, "dst": B4, "proto": None,
                "ttl": None, "sport": None, "err": None}
    assert pick(decoded(frame), expected) == expected


@pytest.mark.parametrize(("htype", "ptype", "hw", "proto_addr"), [
    pytest.param(1, ETH_IPV6, MAC_A, A6, id="plen16"),
    pytest.param(32, ETH_IP, bytes(20), A4, id="infiniband-hlen20"),
    pytest.param(6, ETH_IP, MAC_A, A4, id="htype-ieee802"),
    pytest.param(1, ETH_IP, bytes(8), A4, id="hlen8"),
])
def test_arp_not_ethernet_ipv4_has_no_addresses(htype, ptype, hw, proto_addr):
    frame = eth(BROADCAST, MAC_A, ETH_ARP, arp_generic(1, htype, ptype, hw, proto_addr, hw,
                                                       proto_addr))
    expected = {"ethertype": ETH_ARP, "src": None, "dst": None, "err": None}
    assert pick(decoded(frame), expected) == expected


# --- error reasons -------------------------------------------------------------------------

UDP4 = udp4_frame(SRC4, DST4, 1000, 2000)
QINQ = udp4_frame(vlans=((0x88A8, 10), (0x8100, 20)))
DOT3_SNAP = dot3(MAC_B, MAC_A, snap(OUI_ZERO, ETH_IP, ipv4(SRC4, DST4, UDP, udp(1, 2))))
ARP_REQ = eth(BROADCAST, MAC_A, ETH_ARP, arp(1, MAC_A, SRC4, bytes(6), DST4))
TCP4 = tcp4_frame(SRC4, DST4, 1000, 80, SYN | ACK)
TCP6 = eth6(TCP, tcp(1000, 80, SYN | ACK))
ETH_FIELDS = {"eth_dst": MAC_B, "eth_src": MAC_A}
IP4_FIELDS = {**ETH_FIELDS, "ethertype": ETH_IP, "src": A4, "dst": B4, "ttl": 64}
IP6_FIELDS = {**ETH_FIELDS, "ethertype": ETH_IPV6, "src": A6, "dst": B6, "ttl": 64}


def _ipv4_first_byte(frame: bytes, value: int) -> bytes:
    return frame[:14] + bytes([value]) + frame[15:]


def _ipv4_total_length(frame: bytes, total: int) -> bytes:
    return frame[:16] + total.to_bytes(2, "big") + frame[18:]


def _ipv6_version(frame: bytes, version: int) -> bytes:
    return frame[:14] + bytes([version << 4]) + frame[15:]


ERROR_CASES = [
    # (reason, frame, fields that must still be set)
    pytest.param("truncated-ethernet", b"", {"eth_dst": None, "eth_src": None, "vlan": []},
                 id="eth-empty"),
    pytest.param("truncated-ethernet", UDP4[:5], {"eth_dst": None, "eth_src": None},
                 id="eth-5"),
    pytest.param("truncated-ethernet", UDP4[:6], {"eth_dst": MAC_B, "eth_src": None},
                 id="eth-6"),
    pytest.param("truncated-ethernet", UDP4[:12], {**ETH_FIELDS, "ethertype": None},
                 id="eth-12"),
    pytest.param("truncated-ethernet", UDP4[:13], {**ETH_FIELDS, "ethertype": None},
                 id="eth-13"),
    pytest.param("truncated-vlan", QINQ[:16], {**ETH_FIELDS, "vlan": [], "ethertype": None},
                 id="vlan-first-tag"),
    pytest.param("truncated-vlan", QINQ[:21], {**ETH_FIELDS, "vlan": [10], "ethertype": None},
                 id="vlan-second-tag"),
    pytest.param("truncated-llc", dot3(MAC_B, MAC_A, llc(0x42, 0x42))[:16],
                 {**ETH_FIELDS, "ethertype": None}, id="llc-2"),
    pytest.param("truncated-llc", DOT3_SNAP[:17 + 3], {**ETH_FIELDS, "ethertype": None},
                 id="snap-cut-in-oui"),
    pytest.param("truncated-llc", DOT3_SNAP[:14 + 7], {**ETH_FIELDS, "ethertype": None},
                 id="snap-cut-in-pid"),
    pytest.param("truncated-arp", ARP_REQ[:14 + 7], {"ethertype": ETH_ARP, "src": None},
                 id="arp-header"),
    pytest.param("truncated-arp", ARP_REQ[:14 + 27],
                 {"ethertype": ETH_ARP, "src": None, "dst": None}, id="arp-addresses"),
    pytest.param("truncated-ipv4", UDP4[:14 + 19],
                 {**ETH_FIELDS, "ethertype": ETH_IP, "src": None, "proto": None},
                 id="ipv4-19"),
    pytest.param("truncated-ipv4", eth4(UDP, udp(1, 2), options=bytes(4))[:14 + 20],
                 {**IP4_FIELDS, "proto": UDP, "frag": False, "sport": None},
                 id="ipv4-ihl6-20-bytes"),
    pytest.param("truncated-ipv4",
                 eth4(UDP, udp(1, 2), options=bytes(40), flags_frag=0x2000)[:14 + 40],
                 {**IP4_FIELDS, "proto": UDP, "frag": True, "sport": None},
                 id="ipv4-ihl15-40-bytes-mf"),
    pytest.param("bad-ipv4-header", _ipv4_first_byte(UDP4, 0x65),
                 {**ETH_FIELDS, "ethertype": ETH_IP, "src": None, "proto": None},
                 id="ipv4-version-6"),
    pytest.param("bad-ipv4-header", _ipv4_first_byte(UDP4, 0x44),
                 {"ethertype": ETH_IP, "src": None, "sport": None}, id="ipv4-ihl4"),
    pytest.param("bad-ipv4-header", _ipv4_first_byte(UDP4, 0x40),
                 {"ethertype": ETH_IP, "src": None}, id="ipv4-ihl0"),
    pytest.param("bad-ipv4-length", _ipv4_total_length(UDP4, 19),
                 {**IP4_FIELDS, "proto": UDP, "sport": None}, id="ipv4-total-below-header"),
    pytest.param("truncated-tcp", _ipv4_total_length(TCP4, 20) + bytes(26),
                 {**IP4_FIELDS, "proto": TCP, "sport": None}, id="tcp-only-padding"),
    pytest.param("truncated-ipv6", eth6(UDP, udp(1, 2))[:14 + 39],
                 {**ETH_FIELDS, "ethertype": ETH_IPV6, "src": None, "ttl": None},
                 id="ipv6-39"),
    pytest.param("bad-ipv6-header", _ipv6_version(eth6(UDP, udp(1, 2)), 4),
                 {**ETH_FIELDS, "ethertype": ETH_IPV6, "src": None, "proto": None},
                 id="ipv6-version-4"),
    pytest.param("bad-ipv6-header", _ipv6_version(eth6(UDP, udp(1, 2)), 0),
                 {"ethertype": ETH_IPV6, "src": None}, id="ipv6-version-0"),
    pytest.param("truncated-ipv6-ext", eth6_chain((HOPOPTS,), UDP, udp(1, 2))[:54 + 1],
                 {**IP6_FIELDS, "proto": None, "sport": None}, id="ext-1-byte"),
    pytest.param("truncated-ipv6-ext", eth6_chain((ROUTING,), UDP, udp(1, 2))[:54 + 23],
                 {**IP6_FIELDS, "proto": None}, id="ext-short-of-its-length"),
    pytest.param("truncated-ipv6-ext",
                 eth6_chain((HOPOPTS, DSTOPTS), UDP, udp(1, 2))[:54 + 8 + 15],
                 {**IP6_FIELDS, "proto": None}, id="second-ext-cut"),
    pytest.param("truncated-ipv6-ext", eth6(FRAGMENT, ipv6_frag(UDP, 5, True))[:54 + 7],
                 {**IP6_FIELDS, "proto": None, "frag": False}, id="fragment-header-7"),
    pytest.param("truncated-ipv6-ext", eth6_chain((AH,), UDP, udp(1, 2))[:54 + 20],
                 {**IP6_FIELDS, "proto": None}, id="ah-cut"),
    pytest.param("truncated-ipv6-ext",
                 eth6(FRAGMENT, ipv6_frag(HOPOPTS, 0, True) + ipv6_ext(UDP))[:54 + 8 + 4],
                 {**IP6_FIELDS, "proto": None, "frag": True}, id="ext-after-first-fragment"),
    pytest.param("truncated-tcp", TCP4[:34 + 10],
                 {**IP4_FIELDS, "proto": TCP, "sport": 1000, "dport": 80, "tcp_flags": None},
                 id="tcp-10"),
    pytest.param("truncated-tcp", TCP4[:34 + 3],
                 {"proto": TCP, "sport": None, "dport": None, "tcp_flags": None}, id="tcp-3"),
    pytest.param("truncated-tcp", TCP4[:34 + 14],
                 {"proto": TCP, "sport": 1000, "dport": 80, "tcp_flags": SYN | ACK},
                 id="tcp-14"),
    pytest.param("truncated-tcp", TCP4[:34 + 19],
                 {"sport": 1000, "dport": 80, "tcp_flags": SYN | ACK}, id="tcp-19"),
    pytest.param("truncated-tcp", TCP6[:54 + 10],
                 {**IP6_FIELDS, "proto": TCP, "sport": 1000, "dport": 80, "tcp_flags": None},
                 id="tcp6-10"),
    pytest.param("bad-tcp-header", TCP4[:46] + bytes([0x40]) + TCP4[47:],
                 {**IP4_FIELDS, "proto": TCP, "sport": 1000, "dport": 80,
                  "tcp_flags": SYN | ACK}, id="tcp-doff-4"),
    pytest.param("bad-tcp-header", TCP4[:46] + bytes([0x01]) + TCP4[47:],
                 {"sport": 1000, "dport": 80, "tcp_flags": NS | SYN | ACK},
                 id="tcp-doff-0-ns"),
    pytest.param("truncated-udp", UDP4[:34 + 6],
                 {**IP4_FIELDS, "proto": UDP, "sport": 1000, "dport": 2000}, id="udp-6"),
    pytest.param("truncated-udp", UDP4[:34 + 3],
                 {"proto": UDP, "sport": None, "dport": None}, id="udp-3"),
    pytest.param("truncated-udp", eth4(UDPLITE, udp(7, 8))[:34 + 4],
                 {"proto": UDPLITE, "sport": 7, "dport": 8}, id="udplite-4"),
    pytest.param("truncated-udp", eth6(UDP, udp(7, 8))[:54 + 7],
                 {**IP6_FIELDS, "proto": UDP, "sport": 7, "dport": 8}, id="udp6-7"),
    pytest.param("truncated-sctp", eth4(SCTP, sctp(9, 10))[:34 + 11],
                 {**IP4_FIELDS, "proto": SCTP, "sport": 9, "dport": 10}, id="sctp-11"),
    pytest.param("truncated-dccp", eth4(DCCP, dccp(11, 12))[:34 + 11],
                 {**IP4_FIELDS, "proto": DCCP, "sport": 11, "dport": 12}, id="dccp-11"),
    pytest.param("truncated-dccp", eth6(DCCP, dccp(11, 12))[:54 + 2],
                 {**IP6_FIELDS, "proto": DCCP, "sport": None}, id="dccp6-2"),
    pytest.param("truncated-icmp", eth4(ICMP, icmp(8, 0))[:34 + 3],
                 {**IP4_FIELDS, "proto": ICMP, "icmp_type": 8, "icmp_code": 0},
                 id="icmp-3"),
    pytest.param("truncated-icmp", eth4(ICMP, icmp(8, 0))[:34 + 1],
                 {"proto": ICMP, "icmp_type": None, "icmp_code": None}, id="icmp-1"),
    pytest.param("truncated-icmpv6", eth6(ICMPV6, icmp(128, 0))[:54 + 3],
                 {**IP6_FIELDS, "proto": ICMPV6, "icmp_type": 128, "icmp_code": 0},
                 id="icmpv6-3"),
    pytest.param("truncated-icmpv6", eth6_chain((HOPOPTS,), ICMPV6, icmp(1, 4))[:62],
                 {"proto": ICMPV6, "icmp_type": None}, id="icmpv6-0"),
    pytest.param("truncated-arista", arista(0x0010, UDP4[12:])[:14 + 4 + 7],
                 {**ETH_FIELDS, "ethertype": None, "src": None}, id="arista-stamp"),
    # Tunnel headers (tests/test_tunnels.py covers inner headers cut short)
    pytest.param("truncated-pppoe", eth(MAC_B, MAC_A, 0x8864, pppoe(9, 0x21, bytes(20)))[:21],
                 {**ETH_FIELDS, "ethertype": 0x8864, "tunnel": "pppoe", "tunnel_id": None},
                 id="pppoe-7"),
    pytest.param("truncated-mpls", eth(MAC_B, MAC_A, 0x8847, mpls([16, 17], bytes(20)))[:21],
                 {**ETH_FIELDS, "tunnel": "mpls", "tunnel_id": 16}, id="mpls-second-label"),
    pytest.param("truncated-gre", eth4(47, gre(0x0800, bytes(20), key=5))[:34 + 7],
                 {**IP4_FIELDS, "proto": 47, "tunnel": "gre", "tunnel_id": None},
                 id="gre-key"),
    pytest.param("truncated-gre", eth4(47, gre(0x88BE, bytes(20), seq=1))[:34 + 8 + 7],
                 {**IP4_FIELDS, "tunnel": "gre"}, id="gre-erspan-ii"),
    pytest.param("truncated-vxlan", eth4(UDP, udp(1, 4789, vxlan(5, bytes(20))))[:34 + 8 + 7],
                 {**IP4_FIELDS, "dport": 4789, "tunnel": "vxlan", "tunnel_id": None},
                 id="vxlan-7"),
    pytest.param("truncated-geneve",
                 eth4(UDP, udp(1, 6081, geneve(6, bytes(20), options=bytes(8))))[:34 + 8 + 12],
                 {**IP4_FIELDS, "tunnel": "geneve", "tunnel_id": 6}, id="geneve-options"),
]


@pytest.mark.parametrize(("reason", "frame", "kept"), ERROR_CASES)
def test_error_reason(reason, frame, kept):
    row = decoded(frame)
    assert row["err"] == reason
    assert pick(row, kept) == kept
    assert row["len"] == row["caplen"] == len(frame)


def test_every_error_reason_has_a_case():
    assert {case.values[0] for case in ERROR_CASES} == set(ERROR_REASONS)


def test_error_keeps_stripped_vlan_and_metadata():
    frame = TCP4[:34 + 10]
    row = as_dict(decode_frame(frame, 0, len(frame), 60, ts_ns=5, ifindex=2, rxhash=9,
                               pkttype=4, vlan_tci=33))
    expected = {"err": "truncated-tcp", "vlan": [33], "len": 64, "caplen": len(frame) + 4,
                "ts_ns": 5, "ifindex": 2, "rxhash": 9, "pkttype": 4, "sport": 1000}
    assert pick(row, expected) == expected


# --- reads are bounded by caplen -----------------------------------------------------------

RICH_FRAMES = {
    "qinq-ipv4-options-tcp": eth(MAC_B, MAC_A, ETH_IP, ipv4(
        SRC4, DST4, TCP, tcp(1234, 443, NS | PSH | ACK, b"payload", b"\x01\x01\x08\x0a"),
        options=b"\x94\x04\x00\x00", flags_frag=0x2000),
        vlans=((0x88A8, 10), (0x8100, 20))),
    "ipv6-ext-chain-tcp": eth6_chain((HOPOPTS, ROUTING, AH, DSTOPTS), TCP,
                                     tcp(5000, 80, SYN, b"GET /")),
    "ipv6-first-fragment-udp": eth6(HOPOPTS, ipv6_ext(FRAGMENT)
                                    + ipv6_frag(UDP, 0, True) + udp(53, 5353, b"answer")),
    "ipv6-later-fragment": eth6(FRAGMENT, ipv6_frag(TCP, 100) + bytes(24)),
    "snap-ipv4-udp": DOT3_SNAP,
    "llc": dot3(MAC_B, MAC_A, llc(0x42, 0x42, 0x03, bytes(40))),
    "arp": ARP_REQ,
    "icmpv6": eth6(ICMPV6, icmp(128, 0, b"ping")),
    "icmp": eth4(ICMP, icmp(3, 3, bytes(28))),
    "sctp": eth4(SCTP, sctp(7, 9), ttl=3),
    "dccp6": eth6(DCCP, dccp(1, 2)),
    "udplite": eth4(UDPLITE, udp(3, 4, b"lite")),
}
GARBAGE = bytes(range(256))


def _unset(value) -> bool:
    """The value a field has before the decoder gets to it (None, frag False, vlan [])."""
    return value is None or value is False or value == []


@pytest.mark.parametrize("tci", [None, 77])
@pytest.mark.parametrize("name", list(RICH_FRAMES))
def test_reads_stop_at_caplen(name, tci):
    frame = RICH_FRAMES[name]
    prefix = GARBAGE[:37]
    for cut in range(len(frame) + 1):
        alone = decode_frame(frame[:cut], 0, cut, len(frame), 1, 2, 3, 0, tci)
        # The bytes past the cut are the rest of the real frame, then garbage...
        buf = prefix + frame + GARBAGE
        assert decode_frame(buf, len(prefix), cut, len(frame), 1, 2, 3, 0, tci) == alone, cut
        # ... or garbage right away.
        buf = prefix + frame[:cut] + GARBAGE[::-1]
        assert decode_frame(buf, len(prefix), cut, len(frame), 1, 2, 3, 0, tci) == alone, cut


@pytest.mark.parametrize("name", list(RICH_FRAMES))
def test_truncation_keeps_a_prefix_of_the_full_decode(name):
    frame = RICH_FRAMES[name]
    full = decoded(frame)
    assert full["err"] is None
    for cut in range(len(frame)):
        row = as_dict(decode_frame(frame, 0, cut, len(frame)))
        assert row["caplen"] == cut and row["len"] == len(frame)
        for field in FIELDS:
            if field in ("caplen", "len", "err") or _unset(row[field]):
                continue
            if field == "vlan":
                assert full["vlan"][:len(row["vlan"])] == row["vlan"], cut
            else:
                assert row[field] == full[field], (cut, field)


# --- decode_block --------------------------------------------------------------------------



BLOCK_FRAMES = [
    RingFrame(UDP4, sec=1_700_000_000, nsec=123_456_789, ifindex=2, rxhash=0xDEADBEEF,
              pkttype=_linux.PACKET_HOST),
    RingFrame(TCP4, sec=1_700_000_001, nsec=0, ifindex=3, rxhash=1,
              pkttype=_linux.PACKET_OUTGOING, vlan_tci=(2 << 13) | 100),
    RingFrame(TCP4[:34 + 10], sec=1_700_000_001, nsec=999_999_999, wire_len=len(TCP4),
              ifindex=2, pkttype=_linux.PACKET_OTHERHOST),
    RingFrame(ARP_REQ, sec=1_700_000_002, nsec=5, ifindex=4, pkttype=_linux.PACKET_BROADCAST,
              reserve=32),
    RingFrame(UDP4[:10], sec=1_700_000_003, nsec=6, wire_len=60, ifindex=2,
              pkttype=_linux.PACKET_MULTICAST, vlan_tci=4095),
    RingFrame(TCP6[:54 + 12], sec=1_700_000_004, nsec=7, wire_len=len(TCP6), ifindex=2,
              reserve=5),
]


def test_block_layout_matches_linux_module():
    assert TPACKET3_HDRLEN == _linux.TPACKET3_HDRLEN == 68
    assert _linux.TPACKET_ALIGNMENT == 16
    block, first, num = tpacket3_block(BLOCK_FRAMES, seq=42)
    head = _linux.BLOCK_HEAD.unpack_from(block, _linux.BLOCK_STATUS_OFFSET)
    assert head == (_linux.TP_STATUS_USER, num, first, len(block) - 64, 42)
    assert (num, first) == (6, 48)


def test_decode_block_rows():
    block, first, num = tpacket3_block(BLOCK_FRAMES)
    rows = [as_dict(r) for r in decode_block(block, first, num, {})]
    assert len(rows) == 6
    meta_fields = ("ts_ns", "len", "caplen", "ifindex", "rxhash", "pkttype", "vlan", "err")
    meta = [pick(r, meta_fields) for r in rows]
    assert meta == [
        {"ts_ns": 1_700_000_000_123_456_789, "len": len(UDP4), "caplen": len(UDP4),
         "ifindex": 2, "rxhash": 0xDEADBEEF, "pkttype": 0, "vlan": [], "err": None},
        {"ts_ns": 1_700_000_001_000_000_000, "len": len(TCP4) + 4, "caplen": len(TCP4) + 4,
         "ifindex": 3, "rxhash": 1, "pkttype": 4, "vlan": [100], "err": None},
        {"ts_ns": 1_700_000_001_999_999_999, "len": len(TCP4), "caplen": 44,
         "ifindex": 2, "rxhash": 0, "pkttype": 3, "vlan": [], "err": "truncated-tcp"},
        {"ts_ns": 1_700_000_002_000_000_005, "len": len(ARP_REQ), "caplen": len(ARP_REQ),
         "ifindex": 4, "rxhash": 0, "pkttype": 1, "vlan": [], "err": None},
        {"ts_ns": 1_700_000_003_000_000_006, "len": 64, "caplen": 14,
         "ifindex": 2, "rxhash": 0, "pkttype": 2, "vlan": [4095],
         "err": "truncated-ethernet"},
        {"ts_ns": 1_700_000_004_000_000_007, "len": len(TCP6), "caplen": 66,
         "ifindex": 2, "rxhash": 0, "pkttype": 0, "vlan": [], "err": "truncated-tcp"},
    ]
    # And the packets themselves, which sit among 0xEE padding in the block.
    assert pick(rows[0], ("src", "sport", "dport")) == {
        "src": A4, "sport": 1000, "dport": 2000}
    assert pick(rows[1], ("proto", "tcp_flags", "dport")) == {
        "proto": TCP, "tcp_flags": SYN | ACK, "dport": 80}
    assert pick(rows[2], ("sport", "dport", "tcp_flags")) == {
        "sport": 1000, "dport": 80, "tcp_flags": None}
    assert pick(rows[3], ("ethertype", "src", "dst")) == {
        "ethertype": ETH_ARP, "src": A4, "dst": B4}
    assert pick(rows[4], ("eth_dst", "eth_src")) == {"eth_dst": MAC_B, "eth_src": None}


def test_decode_block_rows_equal_decode_frame():
    block, first, num = tpacket3_block(BLOCK_FRAMES)
    expected = [decode_frame(f.data, 0, len(f.data), f.wire_len,
                             f.sec * 1_000_000_000 + f.nsec, f.ifindex, f.rxhash, f.pkttype,
                             f.vlan_tci) for f in BLOCK_FRAMES]
    assert decode_block(block, first, num, {}) == expected


def test_decode_block_counts_errors():
    block, first, num = tpacket3_block(BLOCK_FRAMES)
    errors = {"truncated-tcp": 5, "bad-ipv4-header": 1}
    decode_block(block, first, num, errors)
    assert errors == {"truncated-tcp": 7, "bad-ipv4-header": 1, "truncated-ethernet": 1}


def test_decode_block_without_errors_leaves_errors_alone():
    block, first, num = tpacket3_block([RingFrame(UDP4), RingFrame(TCP4), RingFrame(ARP_REQ)])
    errors: dict = {}
    rows = decode_block(block, first, num, errors)
    assert [as_dict(r)["ethertype"] for r in rows] == [ETH_IP, ETH_IP, ETH_ARP]
    assert errors == {}


def test_decode_block_reads_only_num_pkts():
    block, first, _ = tpacket3_block(BLOCK_FRAMES)
    errors: dict = {}
    rows = decode_block(block, first, 2, errors)
    assert [as_dict(r)["ifindex"] for r in rows] == [2, 3]
    assert errors == {}
    assert decode_block(block, first, 0, errors) == []


def test_decode_block_empty():
    block, first, num = tpacket3_block([])
    assert (num, decode_block(block, first, num, {})) == (0, [])


# --- properties ----------------------------------------------------------------------------

@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=200), tci=st.none() | st.integers(0, 0xFFFF))
def test_arbitrary_bytes_never_raise(data, tci):
    row = decode_frame(data, 0, len(data), len(data), vlan_tci=tci)
    assert_well_formed(row)
    assert as_dict(row)["caplen"] == len(data) + (0 if tci is None else 4)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), prefix=st.binary(max_size=40),
       suffix=st.binary(max_size=40))
def test_arbitrary_bytes_inside_a_buffer(data, prefix, suffix):
    row = decode_frame(prefix + data + suffix, len(prefix), len(data), 1500)
    assert_well_formed(row)
    assert row == decode_frame(data, 0, len(data), 1500)


@st.composite
def mutated_frames(draw) -> bytes:
    frame = bytearray(RICH_FRAMES[draw(st.sampled_from(sorted(RICH_FRAMES)))])
    for _ in range(draw(st.integers(0, 4))):
        frame[draw(st.integers(0, len(frame) - 1))] = draw(st.integers(0, 255))
    return bytes(frame[:draw(st.integers(0, len(frame)))])


@settings(max_examples=500, deadline=None)
@given(frame=mutated_frames(), suffix=st.binary(min_size=1, max_size=40),
       tci=st.none() | st.integers(0, 0xFFFF))
def test_mutated_and_cut_frames_never_raise(frame, suffix, tci):
    row = decode_frame(frame, 0, len(frame), 1514, vlan_tci=tci)
    assert_well_formed(row)
    assert decode_frame(b"\x00" + frame + suffix, 1, len(frame), 1514, vlan_tci=tci) == row


def test_ethernet_padding_after_the_ip_length_is_not_read():
    # A 42-byte UDP frame padded to the 60-byte Ethernet minimum: the padding is not payload,
    # so a UDP header the IP length cuts short is truncated whatever follows it.
    padded = UDP4 + bytes(18)
    assert pick(decoded(padded), {"sport": 1000, "err": None}) == {"sport": 1000, "err": None}
    short = _ipv4_total_length(UDP4, 24) + bytes(18)
    expected = {"proto": UDP, "sport": 1000, "dport": 2000, "err": "truncated-udp"}
    assert pick(decoded(short), expected) == expected


def test_ipv6_payload_length_bounds_the_transport_header():
    frame = eth6(UDP, udp(1, 2))
    cut = frame[:18] + (4).to_bytes(2, "big") + frame[20:]  # payload length 4 of the 8
    expected = {"proto": UDP, "sport": 1, "dport": 2, "err": "truncated-udp"}
    assert pick(decoded(cut), expected) == expected


@pytest.mark.parametrize("frame", [
    pytest.param(_ipv4_total_length(TCP4, 0), id="ipv4-total-0"),
    pytest.param(eth6(TCP, tcp(1000, 80, SYN | ACK))[:18] + b"\x00\x00"
                 + eth6(TCP, tcp(1000, 80, SYN | ACK))[20:], id="ipv6-payload-0"),
])
def test_zero_ip_length_means_unknown_as_in_gso_and_big_tcp(frame):
    expected = {"sport": 1000, "dport": 80, "tcp_flags": SYN | ACK, "err": None}
    assert pick(decoded(frame), expected) == expected


# --- timestamp source and payload bytes (issue 7) -------------------------------------------

@pytest.mark.parametrize(("status", "source"), [
    (0, "fallback"),
    (_linux.TP_STATUS_TS_SOFTWARE, "software"),
    (_linux.TP_STATUS_TS_RAW_HARDWARE, "hardware"),
    (_linux.TP_STATUS_TS_RAW_HARDWARE | _linux.TP_STATUS_TS_SOFTWARE, "hardware"),
])
def test_ts_src_from_the_ring_status(status, source):
    block, first, num = tpacket3_block([RingFrame(UDP4, status=status)])
    (row,) = decode_block(block, first, num, {})
    assert as_dict(row)["ts_src"] == source


def payload_of(frame: bytes, n: int = 8, cut: int | None = None) -> bytes | None:
    cut = len(frame) if cut is None else cut
    row = decode_frame(frame, 0, cut, len(frame), payload_bytes=n)
    assert len(row) == len(FIELDS) + 1
    return row[-1]


@pytest.mark.parametrize(("frame", "payload"), [
    pytest.param(udp4_frame(SRC4, DST4, 1, 2, b"0123456789"), b"01234567", id="udp"),
    pytest.param(tcp4_frame(SRC4, DST4, 1, 2, SYN, b"GET / HTTP/1.1"), b"GET / HT", id="tcp"),
    pytest.param(eth4(TCP, tcp(1, 2, ACK, b"data", options=bytes(12))), b"data", id="tcp-options"),
    pytest.param(eth4(SCTP, sctp(1, 2) + b"chunkdata"), b"chunkdat", id="sctp"),
    pytest.param(eth4(ICMP, icmp(8, 0, b"\x00\x01\x00\x02ping!")), b"ping!", id="icmp-echo"),
    pytest.param(eth4(89, b"\x00\x00\x08\x00ospfinner"), b"\x00\x00\x08\x00ospf",
                 id="other-ip-after-ip-header"),
    pytest.param(eth6(UDP, udp(1, 2, b"v6payload")), b"v6payloa", id="ipv6-udp"),
    pytest.param(eth6_chain((HOPOPTS, DSTOPTS), UDP, udp(1, 2, b"behind ext")), b"behind e",
                 id="ipv6-ext-udp"),
    pytest.param(eth4(UDP, b"fragment-data", flags_frag=4), b"fragment", id="later-fragment"),
    pytest.param(eth(BROADCAST, MAC_A, 0x88CC, b"lldp-tlvs"), b"lldp-tlv", id="other-ethertype"),
    pytest.param(eth(BROADCAST, MAC_A, ETH_ARP,
                     arp(1, MAC_A, SRC4, bytes(6), DST4) + b"pad"), b"pad", id="arp-trailer"),
    pytest.param(udp4_frame(SRC4, DST4, 1, 2, b"abc") + bytes(18), b"abc",
                 id="ip-length-excludes-ethernet-padding"),
    pytest.param(udp4_frame(SRC4, DST4, 1, 2, b""), b"", id="empty"),
])
def test_payload_bytes(frame, payload):
    assert payload_of(frame) == payload


def test_payload_is_cut_at_the_captured_length():
    frame = udp4_frame(SRC4, DST4, 1, 2, b"0123456789")
    assert payload_of(frame, n=100, cut=len(frame) - 4) == b"012345"


def test_no_payload_when_decoding_stopped_before_it():
    frame = tcp4_frame(SRC4, DST4, 1, 2, SYN, b"data")
    assert payload_of(frame, cut=14 + 20 + 10) is None  # truncated-tcp


def test_payload_column_only_when_asked():
    assert len(decode_frame(UDP4, 0, len(UDP4), len(UDP4))) == len(FIELDS)
    block, first, num = tpacket3_block([RingFrame(udp4_frame(payload=b"xyz"))])
    (row,) = decode_block(block, first, num, {}, payload_bytes=2)
    assert row[-1] == b"xy"
