"""Frame -> summary row.

A row is a list whose columns are named by wire.FIELDS (the `fields` of a batch).
Decoding never raises on wire input: a frame that ends early or carries an impossible header
gets `err` set to one of wire.ERROR_REASONS and keeps every field parsed before the problem.
An unknown or unparsed protocol is not an error; its fields simply stay None.

Tunnels (PPPoE, MPLS, GRE, VXLAN, Geneve, IP in IP; the "tunnels" section below) are
decoded through to `tunnel_depth` levels: the outer fields stay those of the outer packet,
and the inner packet is decoded by the same functions into a row of its own, whose fields
become the row's inner_* fields.

Every header is read with a precompiled struct.Struct and every read is bounded by the
captured length, never by the buffer (the buffer is a whole ring block holding other frames).
"""

import struct

from fanoutd import _linux
from fanoutd.wire import FIELDS, TS_SOURCES

(
    TS_NS,
    TS_SRC,
    LEN,
    CAPLEN,
    IFINDEX,
    RXHASH,
    PKTTYPE,
    ETH_DST,
    ETH_SRC,
    ETHERTYPE,
    VLAN,
    SRC,
    DST,
    PROTO,
    TTL,
    SPORT,
    DPORT,
    TCP_FLAGS,
    ICMP_TYPE,
    ICMP_CODE,
    FRAG,
    ERR,
    TUNNEL,
    TUNNEL_ID,
    INNER_ETH_DST,
    INNER_ETH_SRC,
    INNER_SRC,
    INNER_DST,
    INNER_PROTO,
    INNER_SPORT,
    INNER_DPORT,
    INNER_TCP_FLAGS,
) = range(len(FIELDS))

# Who stamped the packet (tp_status): the NIC, the kernel on receive, or the packet socket
# itself when nothing earlier did.
TS_HARDWARE, TS_SOFTWARE, TS_FALLBACK = TS_SOURCES

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
VLAN_TPIDS = frozenset((0x8100, 0x88A8, 0x9100))  # 802.1Q, 802.1ad, pre-standard QinQ
ETH_MAX_LENGTH_FIELD = 1500  # type/length <= 1500 is an 802.3 length, not an ethertype
ETH_P_802_3_MIN = 0x0600  # the smallest ethertype
VLAN_TAG_LEN = 4
# SNAP OUIs whose protocol id is an ethertype: RFC 1042 and 802.1H bridge-tunnel.
SNAP_ETHERTYPE_OUIS = frozenset((b"\x00\x00\x00", b"\x00\x00\xf8"))

ETH_P_PPP_SES = 0x8864  # PPPoE session stage (0x8863, discovery, carries no packets)
ETH_P_MPLS_UC, ETH_P_MPLS_MC = 0x8847, 0x8848
ETH_P_TEB = 0x6558  # transparent Ethernet bridging: GRE (NVGRE) and Geneve carrying Ethernet
ETH_P_ERSPAN = 0x88BE  # ERSPAN type I (no GRE sequence number) and II, over GRE
PPP_IP, PPP_IPV6 = 0x0021, 0x0057
GRE_CSUM, GRE_ROUTING, GRE_KEY, GRE_SEQ = 0x8000, 0x4000, 0x2000, 0x1000
GRE_VERSION = 0x0007
UDP_PORT_VXLAN = 4789
UDP_PORT_GENEVE = 6081
UDP_PORT_MPLS = 6635  # MPLS in UDP (RFC 7510)
ERSPAN_II_HEADER = 8
ERSPAN_II_VERSION = 1  # the high nibble of its first byte
# Arista's vendor header (its TAP aggregation timestamp), between the source MAC and the
# frame's own ethertype: subtype 1, then a version whose low byte gives the timestamp's
# size (0x10: 64 bits, 0x20: 48; the high byte is its time scale).
ETH_P_ARISTA = 0xD28B
ARISTA_TIMESTAMP_LEN = {0x10: 8, 0x20: 6}
MAX_TUNNEL_DEPTH = 4  # config tunnel_depth: 0 (outer headers only) .. this

IPPROTO_IPIP = 4
IPPROTO_IPV6 = 41
IPPROTO_GRE = 47
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_DCCP = 33
IPPROTO_ICMPV6 = 58
IPPROTO_SCTP = 132
IPPROTO_UDPLITE = 136
# IPv6 extension headers we walk: hop-by-hop, routing, destination options use
# (len + 1) * 8 bytes; AH uses (len + 2) * 4; the fragment header is 8 bytes.
IPV6_EXT_8 = frozenset((0, 43, 60, 135, 139, 140))
IPPROTO_FRAGMENT = 44
IPPROTO_AH = 51

_MACS_TYPE = struct.Struct("!6s6sH")
_LLC_SNAP = struct.Struct("!BBB3sH")
_ARP = struct.Struct("!HHBBH")
_ARP_IPV4 = struct.Struct("!6x4s6x4s")
# ver_ihl, total length, flags+fragment offset, ttl, protocol, src, dst
_IPV4 = struct.Struct("!BxH2xHBB2x4s4s")
# version/class/flow, payload length, next header, hop limit, src, dst
_IPV6 = struct.Struct("!IHBB16s16s")
_IPV6_EXT = struct.Struct("!BB")
_IPV6_FRAG = struct.Struct("!BxH")
_PORTS = struct.Struct("!HH")
_TCP = struct.Struct("!HH8xBB")  # ports, data offset, flags
_ICMP = struct.Struct("!BB")
_ETHERTYPE = struct.Struct("!H")
_PPPOE = struct.Struct("!2xHHH")  # (ver/type, code,) session id, length, PPP protocol
_U32 = struct.Struct("!I")  # an MPLS label stack entry, a GRE key
_GRE = struct.Struct("!HH")  # flags and version, protocol type
_VXLAN_VNI = struct.Struct("!4xI")  # (flags, reserved,) VNI << 8 | reserved
_GENEVE = struct.Struct("!BxHI")  # version and option length, (flags,) protocol, VNI << 8

_PORT_PROTOS = {  # protocol -> (minimum header length, reason when shorter)
    IPPROTO_TCP: (20, "truncated-tcp"),
    IPPROTO_UDP: (8, "truncated-udp"),
    IPPROTO_UDPLITE: (8, "truncated-udp"),
    IPPROTO_SCTP: (12, "truncated-sctp"),
    IPPROTO_DCCP: (12, "truncated-dccp"),
}


def decode_frame(
    buf: bytes,
    off: int,
    caplen: int,
    wire_len: int,
    ts_ns: int = 0,
    ifindex: int = 0,
    rxhash: int = 0,
    pkttype: int = 0,
    vlan_tci: int | None = None,
    ts_src: str = TS_FALLBACK,
    payload_bytes: int = 0,
    tunnel_depth: int = 1,
) -> list:
    """Summarise the frame buf[off:off+caplen] into a row in FIELDS order, plus a
    `payload` column (up to payload_bytes bytes) when payload_bytes > 0.

    vlan_tci is the tag the kernel stripped into the ring header (TP_STATUS_VLAN_VALID),
    or None. Like libpcap, which puts such a tag back, `len` and `caplen` then count it.
    tunnel_depth: how many encapsulations to decode through (0: none).
    """
    end = off + caplen
    vlan = []
    if vlan_tci is not None:
        vlan.append(vlan_tci & 0x0FFF)
        caplen += VLAN_TAG_LEN
        wire_len += VLAN_TAG_LEN
    row = [ts_ns, ts_src, wire_len, caplen, ifindex, rxhash, pkttype, None, None, None, vlan,
           None, None, None, None, None, None, None, None, None, False, None,
           None, None, None, None, None, None, None, None, None, None]
    payload = _frame(buf, off, end, row, tunnel_depth)
    if payload_bytes:
        row.append(None if payload is None
                   else buf[payload[0]:min(payload[0] + payload_bytes, payload[1])])
    return row


def _frame(buf: bytes, off: int, end: int, row: list,
           depth: int) -> tuple[int, int] | None:
    """Fill the row from the Ethernet header on; return where the payload lies (start,
    end) or None when decoding stopped before it. depth: tunnels still to decode."""
    if end - off < 14:
        if end - off >= 6:
            row[ETH_DST] = buf[off:off + 6]
        if end - off >= 12:
            row[ETH_SRC] = buf[off + 6:off + 12]
        row[ERR] = "truncated-ethernet"
        return None
    row[ETH_DST], row[ETH_SRC], ethertype = _MACS_TYPE.unpack_from(buf, off)
    pos = off + 14

    if ethertype == ETH_P_ARISTA and end - pos >= 4:  # right after the MACs, where Arista puts it
        subtype, version = _PORTS.unpack_from(buf, pos)
        stamp = ARISTA_TIMESTAMP_LEN.get(version & 0xFF) if subtype == 1 else None
        if stamp is not None:  # else another subtype or version: not decoded further
            if end - pos < 4 + stamp + 2:
                row[ERR] = "truncated-arista"
                return None
            pos += 4 + stamp
            (ethertype,) = _ETHERTYPE.unpack_from(buf, pos)
            pos += 2

    while ethertype in VLAN_TPIDS:
        if end - pos < VLAN_TAG_LEN:
            row[ERR] = "truncated-vlan"
            return None
        tci, ethertype = _PORTS.unpack_from(buf, pos)
        row[VLAN].append(tci & 0x0FFF)
        pos += VLAN_TAG_LEN

    if ethertype <= ETH_MAX_LENGTH_FIELD:
        # 802.3 with an LLC header; only SNAP with the zero OUI carries an ethertype.
        if end - pos < 3:
            row[ERR] = "truncated-llc"
            return None
        if buf[pos] != 0xAA or buf[pos + 1] != 0xAA:
            return pos + 3, end
        if end - pos < 8:
            row[ERR] = "truncated-llc"
            return None
        _, _, _, oui, ethertype = _LLC_SNAP.unpack_from(buf, pos)
        # Only a protocol id of 0x0600 or more is an ethertype (one below, such as a Cisco
        # ISL header's, is not).
        if oui not in SNAP_ETHERTYPE_OUIS or ethertype < ETH_P_802_3_MIN:
            return pos + 8, end
        pos += 8

    row[ETHERTYPE] = ethertype
    if ethertype == ETH_P_IP:
        return _ipv4(buf, pos, end, row, depth)
    if ethertype == ETH_P_IPV6:
        return _ipv6(buf, pos, end, row, depth)
    if ethertype == ETH_P_ARP:
        return _arp(buf, pos, end, row)
    if depth:
        if ethertype == ETH_P_PPP_SES:
            return _pppoe(buf, pos, end, row, depth)
        if ethertype in (ETH_P_MPLS_UC, ETH_P_MPLS_MC):
            return _mpls(buf, pos, end, row, depth)
    return pos, end


def _ipv4(buf: bytes, pos: int, end: int, row: list,
          depth: int) -> tuple[int, int] | None:
    if end - pos < 20:
        row[ERR] = "truncated-ipv4"
        return None
    ver_ihl, total, frag, ttl, proto, src, dst = _IPV4.unpack_from(buf, pos)
    ihl = (ver_ihl & 0x0F) * 4
    if ver_ihl >> 4 != 4 or ihl < 20:
        row[ERR] = "bad-ipv4-header"
        return None
    row[SRC] = src
    row[DST] = dst
    row[PROTO] = proto
    row[TTL] = ttl
    frag_offset = frag & 0x1FFF
    if frag_offset or frag & 0x2000:
        row[FRAG] = True
    if total:  # 0 on GSO/BIG TCP packets captured before segmentation: length unknown
        if total < ihl:
            row[ERR] = "bad-ipv4-length"
            return None
        end = min(end, pos + total)  # what follows is Ethernet padding, not payload
    if end - pos < ihl:
        row[ERR] = "truncated-ipv4"
        return None
    if frag_offset:  # only the first fragment carries the transport header
        return pos + ihl, end
    return _transport(buf, pos + ihl, end, proto, row, depth)


def _ipv6(buf: bytes, pos: int, end: int, row: list,
          depth: int) -> tuple[int, int] | None:
    if end - pos < 40:
        row[ERR] = "truncated-ipv6"
        return None
    vtf, payload_len, nxt, hlim, src, dst = _IPV6.unpack_from(buf, pos)
    if vtf >> 28 != 6:
        row[ERR] = "bad-ipv6-header"
        return None
    row[SRC] = src
    row[DST] = dst
    row[TTL] = hlim
    pos += 40
    if payload_len:  # 0 for jumbograms and BIG TCP: the length is elsewhere or unknown
        end = min(end, pos + payload_len)
    while True:
        if nxt in IPV6_EXT_8 or nxt == IPPROTO_AH:
            if end - pos < 2:
                row[ERR] = "truncated-ipv6-ext"
                return None
            following, hlen = _IPV6_EXT.unpack_from(buf, pos)
            hlen = (hlen + 2) * 4 if nxt == IPPROTO_AH else (hlen + 1) * 8
            if end - pos < hlen:
                row[ERR] = "truncated-ipv6-ext"
                return None
            nxt = following
            pos += hlen
        elif nxt == IPPROTO_FRAGMENT:
            if end - pos < 8:
                row[ERR] = "truncated-ipv6-ext"
                return None
            following, offset_flags = _IPV6_FRAG.unpack_from(buf, pos)
            if offset_flags & 0xFFF9:  # fragment offset (bits 15..3) or more-fragments
                row[FRAG] = True
            nxt = following
            pos += 8
            if offset_flags >> 3:  # a later fragment: its payload starts mid-datagram
                row[PROTO] = nxt
                return pos, end
        else:
            break
    row[PROTO] = nxt
    return _transport(buf, pos, end, nxt, row, depth)


def _transport(buf: bytes, pos: int, end: int, proto: int, row: list,
               depth: int) -> tuple[int, int] | None:
    """Ports, flags or ICMP type; returns the payload after the transport header (after
    the network header for a protocol without one we parse). With depth left, UDP to the
    VXLAN or Geneve port, GRE and IP in IP are tunnels: decoded through."""
    avail = end - pos
    if proto in _PORT_PROTOS:
        need, reason = _PORT_PROTOS[proto]
        if avail >= 4:
            row[SPORT], row[DPORT] = _PORTS.unpack_from(buf, pos)
        header = need
        if proto == IPPROTO_TCP and avail >= 14:
            _, _, doff, flags = _TCP.unpack_from(buf, pos)
            row[TCP_FLAGS] = ((doff & 0x01) << 8) | flags  # NS, then CWR..FIN
            if doff >> 4 < 5:
                row[ERR] = "bad-tcp-header"
                return None
            header = (doff >> 4) * 4
        elif proto == IPPROTO_DCCP and avail >= 5:
            header = max(need, buf[pos + 4] * 4)  # data offset, in 32-bit words
        if avail < need:
            row[ERR] = reason
            return None
        if depth and proto == IPPROTO_UDP:
            if row[DPORT] == UDP_PORT_VXLAN:
                return _vxlan(buf, pos + 8, end, row, depth)
            if row[DPORT] == UDP_PORT_GENEVE:
                return _geneve(buf, pos + 8, end, row, depth)
            if row[DPORT] == UDP_PORT_MPLS:
                return _mpls(buf, pos + 8, end, row, depth)
        return (pos + header, end) if avail >= header else None
    if proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        if avail >= 2:
            row[ICMP_TYPE], row[ICMP_CODE] = _ICMP.unpack_from(buf, pos)
        if avail < 4:
            row[ERR] = "truncated-icmp" if proto == IPPROTO_ICMP else "truncated-icmpv6"
            return None
        return (pos + 8, end) if avail >= 8 else None  # type, code, checksum, 4 more
    if depth:
        if proto == IPPROTO_GRE:
            return _gre(buf, pos, end, row, depth)
        if proto in (IPPROTO_IPIP, IPPROTO_IPV6):
            row[TUNNEL] = "ipip"
            return _inner(buf, pos, end, row, depth, _ipv4 if proto == IPPROTO_IPIP else _ipv6)
    return pos, end


# --- tunnels --------------------------------------------------------------------------------
# Each sets `tunnel`, and `tunnel_id` once its header is whole, then decodes what it
# carries into a row of its own (_inner) with one level less to go.


def _inner(buf: bytes, pos: int, end: int, row: list, depth: int, decode) -> tuple[int, int] | None:
    """Decode the packet a tunnel carries (from buf[pos], by `decode`: _frame for
    Ethernet, _ipv4, _ipv6 or _mpls) and fill the row's inner fields from it: the
    innermost packet decoded, i.e. the one a tunnel inside it carries when that gave an
    Ethernet frame or an IP packet, else itself. An error in it is the row's error; its
    payload is the row's payload."""
    inner = [None] * len(FIELDS)
    inner[VLAN] = []
    payload = decode(buf, pos, end, inner, depth - 1)
    if inner[TUNNEL] is not None and (inner[INNER_ETH_DST] is not None
                                      or inner[INNER_SRC] is not None):
        row[INNER_ETH_DST:] = inner[INNER_ETH_DST:]
    else:
        row[INNER_ETH_DST] = inner[ETH_DST]
        row[INNER_ETH_SRC] = inner[ETH_SRC]
        row[INNER_SRC] = inner[SRC]
        row[INNER_DST] = inner[DST]
        row[INNER_PROTO] = inner[PROTO]
        row[INNER_SPORT] = inner[SPORT]
        row[INNER_DPORT] = inner[DPORT]
        row[INNER_TCP_FLAGS] = inner[TCP_FLAGS]
    if inner[ERR] is not None:
        row[ERR] = inner[ERR]
    return payload


# What GRE and Geneve carry, by their protocol type (an ethertype): how to decode it.
_CARRIED = {ETH_P_IP: _ipv4, ETH_P_IPV6: _ipv6, ETH_P_TEB: _frame}


def _pppoe(buf: bytes, pos: int, end: int, row: list,
           depth: int) -> tuple[int, int] | None:
    """PPPoE session (RFC 2516): a 6-byte header, then PPP's 2-byte protocol."""
    row[TUNNEL] = "pppoe"
    if end - pos < 8:
        row[ERR] = "truncated-pppoe"
        return None
    session, length, ppp_proto = _PPPOE.unpack_from(buf, pos)
    row[TUNNEL_ID] = session
    if length >= 2:  # the PPP frame's length, protocol included; what follows is padding
        end = min(end, pos + 6 + length)
    pos += 8
    if ppp_proto == PPP_IP:
        return _inner(buf, pos, end, row, depth, _ipv4)
    if ppp_proto == PPP_IPV6:
        return _inner(buf, pos, end, row, depth, _ipv6)
    return pos, end


def _mpls(buf: bytes, pos: int, end: int, row: list,
          depth: int) -> tuple[int, int] | None:
    """An MPLS label stack (RFC 3032); tunnel_id is the top label. After the bottom of
    the stack the first nibble tells IPv4 (4) from IPv6 (6); anything else (0: a
    pseudowire control word) is not decoded further."""
    row[TUNNEL] = "mpls"
    while True:
        if end - pos < 4:
            row[ERR] = "truncated-mpls"
            return None
        (entry,) = _U32.unpack_from(buf, pos)
        if row[TUNNEL_ID] is None:
            row[TUNNEL_ID] = entry >> 12
        pos += 4
        if entry & 0x100:  # bottom of stack
            break
    if end - pos >= 1:
        version = buf[pos] >> 4
        if version == 4:
            return _inner(buf, pos, end, row, depth, _ipv4)
        if version == 6:
            return _inner(buf, pos, end, row, depth, _ipv6)
    return pos, end


def _gre(buf: bytes, pos: int, end: int, row: list,
         depth: int) -> tuple[int, int] | None:
    """GRE version 0 (RFC 2784/2890): optional checksum, key (tunnel_id) and sequence
    number; carrying IPv4, IPv6, Ethernet (0x6558: NVGRE), ERSPAN type I or II, or MPLS.
    Version 1 (PPTP) and source routing are not decoded further."""
    row[TUNNEL] = "gre"
    if end - pos < 4:
        row[ERR] = "truncated-gre"
        return None
    flags, ptype = _GRE.unpack_from(buf, pos)
    if flags & (GRE_VERSION | GRE_ROUTING):
        return None
    hlen = 4
    if flags & GRE_CSUM:
        hlen += 4
    key_at = pos + hlen
    if flags & GRE_KEY:
        hlen += 4
    if flags & GRE_SEQ:
        hlen += 4
    if end - pos < hlen:
        row[ERR] = "truncated-gre"
        return None
    if flags & GRE_KEY:
        (row[TUNNEL_ID],) = _U32.unpack_from(buf, key_at)
    pos += hlen
    if ptype in _CARRIED:
        return _inner(buf, pos, end, row, depth, _CARRIED[ptype])
    if ptype == ETH_P_ERSPAN:
        if flags & GRE_SEQ:  # type II: an 8-byte ERSPAN header before the frame
            if end - pos < ERSPAN_II_HEADER:
                row[ERR] = "truncated-gre"
                return None
            if buf[pos] >> 4 != ERSPAN_II_VERSION:
                return pos, end  # another ERSPAN version: not decoded further
            pos += ERSPAN_II_HEADER
        return _inner(buf, pos, end, row, depth, _frame)
    if depth > 1 and ptype in (ETH_P_MPLS_UC, ETH_P_MPLS_MC):
        return _inner(buf, pos, end, row, depth, _mpls)
    return pos, end


def _vxlan(buf: bytes, pos: int, end: int, row: list,
           depth: int) -> tuple[int, int] | None:
    """VXLAN (RFC 7348, UDP port 4789): an 8-byte header with the 24-bit VNI, then an
    Ethernet frame."""
    row[TUNNEL] = "vxlan"
    if end - pos < 8:
        row[ERR] = "truncated-vxlan"
        return None
    (vni,) = _VXLAN_VNI.unpack_from(buf, pos)
    row[TUNNEL_ID] = vni >> 8
    return _inner(buf, pos + 8, end, row, depth, _frame)


def _geneve(buf: bytes, pos: int, end: int, row: list,
            depth: int) -> tuple[int, int] | None:
    """Geneve (RFC 8926, UDP port 6081): 8 bytes with the VNI, options, then what its
    protocol type says (Ethernet, IPv4 or IPv6). Versions other than 0 stop there."""
    row[TUNNEL] = "geneve"
    if end - pos < 8:
        row[ERR] = "truncated-geneve"
        return None
    ver_optlen, ptype, vni = _GENEVE.unpack_from(buf, pos)
    row[TUNNEL_ID] = vni >> 8
    if ver_optlen >> 6:
        return None
    hlen = 8 + (ver_optlen & 0x3F) * 4
    if end - pos < hlen:
        row[ERR] = "truncated-geneve"
        return None
    pos += hlen
    if ptype in _CARRIED:
        return _inner(buf, pos, end, row, depth, _CARRIED[ptype])
    return pos, end


def _arp(buf: bytes, pos: int, end: int, row: list) -> tuple[int, int] | None:
    if end - pos < 8:
        row[ERR] = "truncated-arp"
        return None
    htype, ptype, hlen, plen, _op = _ARP.unpack_from(buf, pos)
    size = 8 + 2 * (hlen + plen)
    if end - pos < size:
        row[ERR] = "truncated-arp"
        return None
    if htype == 1 and ptype == ETH_P_IP and hlen == 6 and plen == 4:
        row[SRC], row[DST] = _ARP_IPV4.unpack_from(buf, pos + 8)
    return pos + size, end


def ts_source(status: int) -> str:
    """Who stamped a packet, from its tp_status."""
    if status & _linux.TP_STATUS_TS_RAW_HARDWARE:
        return TS_HARDWARE
    if status & _linux.TP_STATUS_TS_SOFTWARE:
        return TS_SOFTWARE
    return TS_FALLBACK


def decode_block(block: bytes, first_offset: int, num_pkts: int, errors: dict,
                 payload_bytes: int = 0, tunnel_depth: int = 1) -> list:
    """Decode every frame of one TPACKET_V3 block (a copy of its bytes) into rows.

    Frames are found by following tp_next_offset from first_offset. errors maps a
    reason to a count and is incremented for each row whose `err` is set.
    """
    rows = []
    hdr_unpack = _linux.TPACKET3_HDR.unpack_from
    vlan_valid = _linux.TP_STATUS_VLAN_VALID
    limit = len(block)
    pos = first_offset
    for _ in range(num_pkts):
        if pos + _linux.TPACKET3_HDR.size > limit:
            break  # a corrupt chain; the kernel never writes one
        (next_offset, sec, nsec, snaplen, wire_len, status, mac, _net,
         rxhash, tci, _tpid, ifindex, _hatype, pkttype) = hdr_unpack(block, pos)
        mac_off = pos + mac
        snaplen = min(snaplen, max(0, limit - mac_off))
        row = decode_frame(block, mac_off, snaplen, wire_len, sec * 1_000_000_000 + nsec,
                           ifindex, rxhash, pkttype, tci if status & vlan_valid else None,
                           ts_source(status), payload_bytes, tunnel_depth)
        err = row[ERR]
        if err is not None:
            errors[err] = errors.get(err, 0) + 1
        rows.append(row)
        if not next_offset:
            break
        pos += next_offset
    return rows


def as_dict(row: list) -> dict:
    """A row as {field: value}; for tests and tools, never the hot path."""
    return dict(zip(FIELDS, row, strict=True))
