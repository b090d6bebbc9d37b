"""Frame builders for tests: crafted bytes, no third-party packet library.

Checksums are left zero: nothing on the capture path verifies them.
"""

import ipaddress
import struct

MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")
BROADCAST = b"\xff" * 6


def ip_bytes(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes,
        vlans: tuple[tuple[int, int], ...] = ()) -> bytes:
    """Ethernet II frame; vlans is ((tpid, tci), ...) outermost first."""
    tags = b"".join(struct.pack("!HH", tpid, tci) for tpid, tci in vlans)
    return dst + src + tags + struct.pack("!H", ethertype) + payload


def dot3(dst: bytes, src: bytes, llc_and_payload: bytes) -> bytes:
    """802.3 frame: the type/length field holds the length of what follows."""
    return dst + src + struct.pack("!H", len(llc_and_payload)) + llc_and_payload


def ipv4(src: str, dst: str, proto: int, payload: bytes, ttl: int = 64, ident: int = 0,
         flags_frag: int = 0, options: bytes = b"") -> bytes:
    """flags_frag is the raw 16-bit field: 0x2000 more-fragments, low 13 bits offset/8."""
    assert len(options) % 4 == 0
    ihl = 5 + len(options) // 4
    total = ihl * 4 + len(payload)
    return struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, ident, flags_frag, ttl, proto, 0,
                       ip_bytes(src), ip_bytes(dst)) + options + payload


def ipv6(src: str, dst: str, nxt: int, payload: bytes, hlim: int = 64) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), nxt, hlim,
                       ip_bytes(src), ip_bytes(dst)) + payload


def ipv6_ext(nxt: int, body_len: int = 6) -> bytes:
    """Hop-by-hop, routing or destination-options header: (len+1)*8 bytes in all."""
    assert (body_len + 2) % 8 == 0
    return struct.pack("!BB", nxt, (body_len + 2) // 8 - 1) + b"\x00" * body_len


def ipv6_frag(nxt: int, offset: int = 0, more: bool = False, ident: int = 1) -> bytes:
    """Fragment header; offset in 8-byte units."""
    return struct.pack("!BBHI", nxt, 0, (offset << 3) | int(more), ident)


def udp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def tcp(sport: int, dport: int, flags: int = 0x02, payload: bytes = b"",
        options: bytes = b"", seq: int = 0) -> bytes:
    assert len(options) % 4 == 0
    doff = 5 + len(options) // 4
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 0, (doff << 4) | (flags >> 8 & 1),
                       flags & 0xFF, 65535, 0, 0) + options + payload


def sctp(sport: int, dport: int) -> bytes:
    return struct.pack("!HHII", sport, dport, 0, 0)


def icmp(icmp_type: int, code: int, payload: bytes = b"\x00\x00\x00\x00") -> bytes:
    return struct.pack("!BBH", icmp_type, code, 0) + payload


def arp(op: int, sha: bytes, spa: str, tha: bytes, tpa: str) -> bytes:
    return struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, sha, ip_bytes(spa), tha,
                       ip_bytes(tpa))


def udp4_frame(src: str = "192.0.2.1", dst: str = "192.0.2.2", sport: int = 1000,
               dport: int = 2000, payload: bytes = b"", vlans: tuple = (),
               ident: int = 0) -> bytes:
    return eth(MAC_B, MAC_A, 0x0800, ipv4(src, dst, 17, udp(sport, dport, payload),
                                          ident=ident), vlans)


def tcp4_frame(src: str = "192.0.2.1", dst: str = "192.0.2.2", sport: int = 1000,
               dport: int = 80, flags: int = 0x02, payload: bytes = b"",
               ident: int = 0) -> bytes:
    return eth(MAC_B, MAC_A, 0x0800, ipv4(src, dst, 6, tcp(sport, dport, flags, payload),
                                          ident=ident))


# --- more builders (802.3/LLC, IPv6 AH, DCCP, generic ARP, TPACKET_V3 blocks) ---

OUI_ZERO = b"\x00\x00\x00"  # RFC 1042 encapsulation: the SNAP protocol id is an ethertype
OUI_CISCO = bytes.fromhex("00000c")


def llc(dsap: int, ssap: int, control: int = 0x03, payload: bytes = b"") -> bytes:
    """802.2 LLC header (unnumbered format: one control byte) and payload."""
    return struct.pack("!BBB", dsap, ssap, control) + payload


def snap(oui: bytes, pid: int, payload: bytes = b"") -> bytes:
    """LLC/SNAP header: AA AA 03, 3-byte OUI, 2-byte protocol id, then payload."""
    return llc(0xAA, 0xAA, 0x03, oui + struct.pack("!H", pid) + payload)


def ipv6_ah(nxt: int, icv: bytes = b"\x00" * 12) -> bytes:
    """Authentication header: its length field counts 4-byte units, minus 2."""
    total = 12 + len(icv)
    assert total % 8 == 0
    return struct.pack("!BBHII", nxt, total // 4 - 2, 0, 0x100, 1) + icv


def dccp(sport: int, dport: int, pkt_type: int = 0) -> bytes:
    """DCCP generic header with short (24-bit) sequence numbers: 12 bytes, X = 0."""
    return struct.pack("!HHBBHB3s", sport, dport, 3, 0, 0, pkt_type << 1, b"\x00\x00\x01")


def arp_generic(op: int, htype: int, ptype: int, sha: bytes, spa: bytes, tha: bytes,
                tpa: bytes) -> bytes:
    """ARP for any hardware/protocol pair; hlen and plen come from the address lengths."""
    assert len(sha) == len(tha) and len(spa) == len(tpa)
    return struct.pack("!HHBBH", htype, ptype, len(sha), len(spa), op) + sha + spa + tha + tpa


# TPACKET_V3 ring blocks, laid out as net/packet/af_packet.c writes them. The layouts are
# written out here independently of fanoutd._linux, so tests cross-check its structs.
TPACKET_ALIGNMENT = 16
AF_PACKET = 17
ARPHRD_ETHER = 1
# version, offset_to_priv, then tpacket_hdr_v1: block_status, num_pkts, offset_to_first_pkt,
# blk_len, seq_num, ts_first_pkt {sec, nsec}, ts_last_pkt {sec, nsec}
_BLOCK_DESC = struct.Struct("<II" "IIIIQ" "IIII")
# tpacket3_hdr: tp_next_offset, tp_sec, tp_nsec, tp_snaplen, tp_len, tp_status, tp_mac, tp_net,
# hv1 {tp_rxhash, tp_vlan_tci, tp_vlan_tpid, tp_padding}, tp_padding[8]: 48 bytes
_TP3_HDR = struct.Struct("<IIIIIIHH" "IIHH" "8x")
_SOCKADDR_LL = struct.Struct("<H2siHBB8s")  # family, protocol (network order), ifindex, ...
TPACKET3_HDRLEN = _TP3_HDR.size + _SOCKADDR_LL.size  # 68


def tpacket_align(n: int) -> int:
    return (n + TPACKET_ALIGNMENT - 1) & ~(TPACKET_ALIGNMENT - 1)


# For an Ethernet frame the kernel puts the network header at TPACKET_ALIGN(hdrlen + 16)
# plus PACKET_RESERVE, and the MAC header 14 bytes before it: tp_mac 82 and tp_net 96
# without a reserve.
TP_NET = tpacket_align(TPACKET3_HDRLEN + 16)
TP_MAC = TP_NET - 14


class RingFrame:
    """One frame to put in a block: its captured bytes and its ring-header metadata."""

    def __init__(self, data: bytes, sec: int = 0, nsec: int = 0, wire_len: int | None = None,
                 ifindex: int = 1, rxhash: int = 0, pkttype: int = 0,
                 vlan_tci: int | None = None, vlan_tpid: int = 0x8100,
                 reserve: int = 0, status: int = 0) -> None:
        self.data = data
        self.sec = sec
        self.nsec = nsec
        self.wire_len = len(data) if wire_len is None else wire_len
        self.ifindex = ifindex
        self.rxhash = rxhash
        self.pkttype = pkttype
        self.vlan_tci = vlan_tci
        self.vlan_tpid = vlan_tpid
        self.reserve = reserve  # PACKET_RESERVE headroom: moves tp_mac and tp_net
        self.status = status  # more tp_status bits, e.g. the timestamp source


TP_STATUS_USER = 1
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6


def tpacket3_block(frames: list[RingFrame], seq: int = 1, fill: int = 0xEE,
                   tail: int = 64) -> tuple[bytes, int, int]:
    """A TPACKET_V3 block holding frames; returns (block, offset_to_first_pkt, num_pkts).

    Frames sit at 16-byte aligned offsets chained by tp_next_offset (0 on the last one).
    Padding between frames and `tail` bytes after the last are `fill`, never zero, so a
    decoder that reads past a frame's tp_snaplen sees garbage rather than a clean end.
    """
    first = tpacket_align(_BLOCK_DESC.size)
    body = bytearray()
    for i, f in enumerate(frames):
        tp_net = TP_NET + f.reserve
        tp_mac = tp_net - 14
        size = tp_mac + len(f.data)
        next_offset = tpacket_align(size) if i < len(frames) - 1 else 0
        status = TP_STATUS_USER | f.status
        tci = tpid = 0
        if f.vlan_tci is not None:
            status |= TP_STATUS_VLAN_VALID | TP_STATUS_VLAN_TPID_VALID
            tci, tpid = f.vlan_tci, f.vlan_tpid
        hdr = _TP3_HDR.pack(next_offset, f.sec, f.nsec, len(f.data), f.wire_len, status,
                            tp_mac, tp_net, f.rxhash, tci, tpid, 0)
        sll = _SOCKADDR_LL.pack(AF_PACKET, struct.pack("!H", 0x0003), f.ifindex, ARPHRD_ETHER,
                                f.pkttype, 6, f.data[6:12].ljust(8, b"\x00"))
        record = hdr + sll
        record += bytes([fill]) * (tp_mac - len(record)) + f.data
        if next_offset:
            record += bytes([fill]) * (next_offset - len(record))
        body += record
    blk_len = first + len(body)  # what the frames use; the tail is not part of it
    body += bytes([fill]) * tail
    ts_first = (frames[0].sec, frames[0].nsec) if frames else (0, 0)
    ts_last = (frames[-1].sec, frames[-1].nsec) if frames else (0, 0)
    desc = _BLOCK_DESC.pack(1, 0, TP_STATUS_USER, len(frames), first, blk_len, seq,
                            *ts_first, *ts_last)
    return desc + bytes([fill]) * (first - len(desc)) + bytes(body), first, len(frames)


# Builders added for the integration tests (tests/integration/).


def mac(n: int) -> bytes:
    """A locally administered unicast MAC that carries n: a per-frame identity tag."""
    return b"\x02\xf0" + struct.pack("!I", n)


def ipv4_frame(src: str, dst: str, proto: int, payload: bytes, eth_src: bytes = MAC_A,
               eth_dst: bytes = MAC_B, vlans: tuple = (), **ipv4_kw) -> bytes:
    """Ethernet/IPv4 around any transport payload; ipv4_kw: ttl, ident, flags_frag, options."""
    return eth(eth_dst, eth_src, 0x0800, ipv4(src, dst, proto, payload, **ipv4_kw), vlans)


def ipv6_frame(src: str, dst: str, nxt: int, payload: bytes, eth_src: bytes = MAC_A,
               eth_dst: bytes = MAC_B, vlans: tuple = (), hlim: int = 64) -> bytes:
    """Ethernet/IPv6; payload starts at the header `nxt` names (extension or transport)."""
    return eth(eth_dst, eth_src, 0x86DD, ipv6(src, dst, nxt, payload, hlim), vlans)


def arp_frame(op: int, spa: str, tpa: str, eth_src: bytes = MAC_A,
              eth_dst: bytes = BROADCAST) -> bytes:
    """Ethernet/ARP for IPv4 (op 1 request, 2 reply); sender hardware address = eth_src."""
    tha = b"\x00" * 6 if op == 1 else eth_dst
    return eth(eth_dst, eth_src, 0x0806, arp(op, eth_src, spa, tha, tpa))


# Tunnels (decode.py's "tunnels" section, docs/wire-format.md "Tunnels").


def pppoe(session: int, ppp_proto: int, payload: bytes, length: int | None = None) -> bytes:
    """A PPPoE session header (ver 1, type 1, code 0) and PPP protocol, then payload;
    length (the PPPoE payload length: protocol and payload) as given or true."""
    body = struct.pack("!H", ppp_proto) + payload
    return struct.pack("!BBHH", 0x11, 0, session, len(body) if length is None else length) + body


def mpls(labels: list[int], payload: bytes, ttl: int = 64) -> bytes:
    """An MPLS label stack, outermost first; the last entry has the bottom-of-stack bit."""
    return b"".join(struct.pack("!I", label << 12 | (i == len(labels) - 1) << 8 | ttl)
                    for i, label in enumerate(labels)) + payload


def gre(ptype: int, payload: bytes, key: int | None = None, csum: bool = False,
        seq: int | None = None, version: int = 0) -> bytes:
    """A GRE header with the optional fields asked for (RFC 2784/2890)."""
    flags = (0x8000 if csum else 0) | (0x2000 if key is not None else 0) | (
        0x1000 if seq is not None else 0) | version
    out = struct.pack("!HH", flags, ptype)
    if csum:
        out += b"\xbe\xef\x00\x00"
    if key is not None:
        out += struct.pack("!I", key)
    if seq is not None:
        out += struct.pack("!I", seq)
    return out + payload


def vxlan(vni: int, inner: bytes, flags: int = 0x08) -> bytes:
    """A VXLAN header (the I flag set by default) and the inner Ethernet frame."""
    return struct.pack("!B3xI", flags, vni << 8) + inner


def geneve(vni: int, inner: bytes, ptype: int = 0x6558, options: bytes = b"",
           version: int = 0) -> bytes:
    """A Geneve header with options (a multiple of 4 bytes) and what it carries."""
    assert len(options) % 4 == 0
    return struct.pack("!BBHI", version << 6 | len(options) // 4, 0, ptype,
                       vni << 8) + options + inner


ERSPAN_II = bytes((0x10, 0x01, 0x00, 0x64)) + bytes(4)  # version 1, VLAN 1, session 100


def arista(version: int, rest: bytes, subtype: int = 1) -> bytes:
    """An Ethernet frame with Arista's timestamp header after the MACs: `rest` is the
    frame from its own ethertype on; version 0x?010 has a 64-bit stamp, 0x?020 48 bits."""
    stamp = bytes(range(1, 9)) if version & 0xFF == 0x10 else bytes(range(1, 7))
    return MAC_B + MAC_A + struct.pack("!HHH", 0xD28B, subtype, version) + stamp + rest


def vxlan_frame(vni: int, inner: bytes, outer_src: str = "192.0.2.1",
                outer_dst: str = "192.0.2.2", sport: int = 49152,
                eth_src: bytes = MAC_A) -> bytes:
    """Ethernet/IPv4/UDP to port 4789/VXLAN around an inner Ethernet frame."""
    return eth(MAC_B, eth_src, 0x0800, ipv4(outer_src, outer_dst, 17,
                                            udp(sport, 4789, vxlan(vni, inner))))


# One frame down every path of the decoder: each protocol, option, fragment, tag and
# 802.3 form it knows, and some it does not. The C encoder, the wire format and the client
# are checked against decode.py on all of it (and on every truncation of each).
CORPUS = [
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
    dot3(MAC_B, MAC_A, snap(b"\x00\x00\x00", 0x05FF, bytes(20))),
    eth(MAC_B, MAC_A, 0x88CC, b"lldp"),
    bytes(20),
]

_INNER_TCP4 = ipv4("10.0.0.1", "10.0.0.2", 6, tcp(443, 51000, 0x18, b"data"))
_INNER_UDP6 = ipv6("2001:db8::a", "2001:db8::b", 17, udp(5353, 5353, b"mdns"))
_INNER_ETH = eth(MAC_A, MAC_B, 0x0800, ipv4("10.1.0.1", "10.1.0.2", 17, udp(53, 1053, b"q")))
# VXLAN around Ethernet/IPv4/GRE around IPv4/TCP: two tunnels deep
NESTED_VXLAN_GRE = vxlan_frame(1, eth(MAC_A, MAC_B, 0x0800, ipv4(
    "10.0.0.1", "10.0.0.2", 47, gre(0x0800, _INNER_TCP4))))
# One frame through each encapsulation decode.py knows, each path through its header.
TUNNEL_CORPUS = [
    eth(MAC_B, MAC_A, 0x8864, pppoe(0x1234, 0x0021, _INNER_TCP4)),
    eth(MAC_B, MAC_A, 0x8864, pppoe(7, 0x0057, _INNER_UDP6) + bytes(6)),  # padded
    eth(MAC_B, MAC_A, 0x8864, pppoe(7, 0xC021, b"\x01\x01\x00\x04")),  # LCP
    eth(MAC_B, MAC_A, 0x8863, b"\x11\x09\x00\x00\x00\x00"),  # discovery: no tunnel
    eth(MAC_B, MAC_A, 0x8847, mpls([16, 1000], _INNER_TCP4)),
    eth(MAC_B, MAC_A, 0x8848, mpls([3], _INNER_UDP6)),
    eth(MAC_B, MAC_A, 0x8847, mpls([100, 200], b"\x00\x00\x00\x00" + _INNER_ETH)),
    eth(MAC_B, MAC_A, 0x0800, ipv4("192.0.2.1", "192.0.2.2", 47, gre(0x0800, _INNER_TCP4))),
    eth(MAC_B, MAC_A, 0x0800, ipv4("192.0.2.1", "192.0.2.2", 47,
                                   gre(0x86DD, _INNER_UDP6, key=0xDEADBEEF, csum=True, seq=9))),
    eth(MAC_B, MAC_A, 0x86DD, ipv6("2001:db8::1", "2001:db8::2", 47,
                                   gre(0x6558, _INNER_ETH, key=5001 << 8))),  # NVGRE
    eth(MAC_B, MAC_A, 0x0800, ipv4("192.0.2.1", "192.0.2.2", 47,
                                   gre(0x88BE, ERSPAN_II + _INNER_ETH, seq=1))),
    eth(MAC_B, MAC_A, 0x0800, ipv4("192.0.2.1", "192.0.2.2", 47, gre(0x88BE, _INNER_ETH))),
    eth(MAC_B, MAC_A, 0x0800, ipv4("192.0.2.1", "192.0.2.2", 47,
                                   gre(0x880B, b"\xff\x03\x00\x21", key=0x00040001, version=1))),
    eth(MAC_B, MAC_A, 0x0800, ipv4("192.0.2.1", "192.0.2.2", 47,
                                   gre(0x8847, mpls([20], _INNER_TCP4)))),
    vxlan_frame(5001, eth(MAC_A, MAC_B, 0x0800, _INNER_TCP4)),
    vxlan_frame(0xFFFFFF, eth(MAC_A, MAC_B, 0x86DD, _INNER_UDP6, vlans=((0x8100, 5),))),
    NESTED_VXLAN_GRE,
    eth(MAC_B, MAC_A, 0x0800, ipv4("192.0.2.1", "192.0.2.2", 17, udp(
        6081 + 1, 6081, geneve(77, _INNER_ETH, options=bytes(8))))),
    eth(MAC_B, MAC_A, 0x86DD, ipv6("2001:db8::1", "2001:db8::2", 17, udp(
        1, 6081, geneve(78, _INNER_TCP4, ptype=0x0800)))),
    eth(MAC_B, MAC_A, 0x0800, ipv4("192.0.2.1", "192.0.2.2", 17, udp(
        1, 6081, geneve(79, _INNER_ETH, version=1)))),
    eth(MAC_B, MAC_A, 0x0800, ipv4("192.0.2.1", "192.0.2.2", 4, _INNER_TCP4)),
    eth(MAC_B, MAC_A, 0x0800, ipv4("192.0.2.1", "192.0.2.2", 41, _INNER_UDP6)),
    eth(MAC_B, MAC_A, 0x86DD, ipv6("2001:db8::1", "2001:db8::2", 4, _INNER_TCP4)),
    eth(MAC_B, MAC_A, 0x86DD, ipv6("2001:db8::1", "2001:db8::2", 41, _INNER_UDP6)),
    eth(MAC_B, MAC_A, 0x0800, ipv4("192.0.2.1", "192.0.2.2", 17, udp(
        1, 6635, mpls([30, 31], _INNER_TCP4)))),  # MPLS in UDP
    arista(0x0010, eth(MAC_B, MAC_A, 0x8847, mpls([40], _INNER_TCP4))[12:]),
    arista(0x0120, eth(MAC_B, MAC_A, 0x8100, b"\x00\x05\x08\x00" + _INNER_TCP4)[12:]),
    arista(0x0030, eth(MAC_B, MAC_A, 0x0800, _INNER_TCP4)[12:]),  # unknown version
    eth(MAC_B, MAC_A, 0x0800, ipv4("192.0.2.1", "192.0.2.2", 47,
                                   gre(0x88BE, bytes(8) + _INNER_ETH, seq=1))),  # ERSPAN v0
]
CORPUS += TUNNEL_CORPUS
