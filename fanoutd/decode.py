"""Frame -> summary row.

A row is a list whose columns are named by wire.FIELDS (the `fields` of a batch).
Decoding never raises on wire input: a frame that ends early or carries an impossible header
gets `err` set to one of wire.ERROR_REASONS and keeps every field parsed before the problem.
An unknown or unparsed protocol is not an error; its fields simply stay None.

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
) -> list:
    """Summarise the frame buf[off:off+caplen] into a row in FIELDS order, plus a
    `payload` column (up to payload_bytes bytes) when payload_bytes > 0.

    vlan_tci is the tag the kernel stripped into the ring header (TP_STATUS_VLAN_VALID),
    or None. Like libpcap, which puts such a tag back, `len` and `caplen` then count it.
    """
    end = off + caplen
    vlan = []
    if vlan_tci is not None:
        vlan.append(vlan_tci & 0x0FFF)
        caplen += VLAN_TAG_LEN
        wire_len += VLAN_TAG_LEN
    row = [ts_ns, ts_src, wire_len, caplen, ifindex, rxhash, pkttype, None, None, None, vlan,
           None, None, None, None, None, None, None, None, None, False, None]
    payload = _frame(buf, off, end, row)
    if payload_bytes:
        row.append(None if payload is None
                   else buf[payload[0]:min(payload[0] + payload_bytes, payload[1])])
    return row


def _frame(buf: bytes, off: int, end: int, row: list) -> tuple[int, int] | None:
    """Fill the row from the Ethernet header on; return where the payload lies (start,
    end) or None when decoding stopped before it."""
    if end - off < 14:
        if end - off >= 6:
            row[ETH_DST] = buf[off:off + 6]
        if end - off >= 12:
            row[ETH_SRC] = buf[off + 6:off + 12]
        row[ERR] = "truncated-ethernet"
        return None
    row[ETH_DST], row[ETH_SRC], ethertype = _MACS_TYPE.unpack_from(buf, off)
    pos = off + 14

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
        return _ipv4(buf, pos, end, row)
    if ethertype == ETH_P_IPV6:
        return _ipv6(buf, pos, end, row)
    if ethertype == ETH_P_ARP:
        return _arp(buf, pos, end, row)
    return pos, end


def _ipv4(buf: bytes, pos: int, end: int, row: list) -> tuple[int, int] | None:
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
    return _transport(buf, pos + ihl, end, proto, row)


def _ipv6(buf: bytes, pos: int, end: int, row: list) -> tuple[int, int] | None:
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
    return _transport(buf, pos, end, nxt, row)


def _transport(buf: bytes, pos: int, end: int, proto: int,
               row: list) -> tuple[int, int] | None:
    """Ports, flags or ICMP type; returns the payload after the transport header (after
    the network header for a protocol without one we parse)."""
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
        return (pos + header, end) if avail >= header else None
    if proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        if avail >= 2:
            row[ICMP_TYPE], row[ICMP_CODE] = _ICMP.unpack_from(buf, pos)
        if avail < 4:
            row[ERR] = "truncated-icmp" if proto == IPPROTO_ICMP else "truncated-icmpv6"
            return None
        return (pos + 8, end) if avail >= 8 else None  # type, code, checksum, 4 more
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
                 payload_bytes: int = 0) -> list:
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
                           ts_source(status), payload_bytes)
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
