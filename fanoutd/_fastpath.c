/*
 * fanoutd._fastpath: one TPACKET_V3 ring block -> its msgpack batch, version 1 (rows) or
 * version 2 (columns laid out as Apache Arrow lays them out).
 *
 * A compiled copy of fanoutd/decode.py's decode_block followed by the batch encoding of
 * fanoutd/wire.py (encoder.encode_rows_py, encoder.encode_columns_py):
 * same fields, same error reasons, same bytes (tests/test_fastpath.py compares the two on
 * every decoder test frame and on random and mutated ones). decode.py stays the reference
 * and the fallback; this exists because the profile showed the per-packet Python work
 * (walking, unpacking, building a row, msgpack encoding it) costs several times the
 * budget of the whole path, and no Python form of it comes close (docs/performance.md).
 *
 * Every read is bounded by the frame's captured length and by the block: wire input
 * never makes it read outside the buffer it was given. Tunnels are decoded as decode.py
 * decodes them: the carried packet into a Row of its own by the same functions with one
 * level of tunnel_depth less (at most MAX_TUNNEL_DEPTH levels, so recursion is bounded).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <netinet/in.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>

/* --- the reference's constants (decode.py, wire.py, _linux.py) ---------------------- */

enum {
    E_TRUNC_ETH, E_TRUNC_VLAN, E_TRUNC_LLC, E_TRUNC_ARP, E_TRUNC_IPV4, E_BAD_IPV4_HDR,
    E_BAD_IPV4_LEN, E_TRUNC_IPV6, E_BAD_IPV6_HDR, E_TRUNC_IPV6_EXT, E_TRUNC_TCP,
    E_BAD_TCP_HDR, E_TRUNC_UDP, E_TRUNC_SCTP, E_TRUNC_DCCP, E_TRUNC_ICMP, E_TRUNC_ICMPV6,
    E_TRUNC_PPPOE, E_TRUNC_MPLS, E_TRUNC_GRE, E_TRUNC_VXLAN, E_TRUNC_GENEVE,
    E_TRUNC_ARISTA, E_COUNT
};
static const char *const REASONS[E_COUNT] = {  /* wire.ERROR_REASONS, in its order */
    "truncated-ethernet", "truncated-vlan", "truncated-llc", "truncated-arp",
    "truncated-ipv4", "bad-ipv4-header", "bad-ipv4-length", "truncated-ipv6",
    "bad-ipv6-header", "truncated-ipv6-ext", "truncated-tcp", "bad-tcp-header",
    "truncated-udp", "truncated-sctp", "truncated-dccp", "truncated-icmp",
    "truncated-icmpv6", "truncated-pppoe", "truncated-mpls", "truncated-gre",
    "truncated-vxlan", "truncated-geneve", "truncated-arista",
};
static PyObject *reason_names[E_COUNT];

/* wire.TUNNELS, in its order (the `tunnel` field's dictionary); a Row's tunnel is one of
 * these plus 1, 0 for none (what row_init's memset leaves). */
enum { T_PPPOE, T_MPLS, T_GRE, T_VXLAN, T_GENEVE, T_IPIP, T_COUNT };
static const char *const TUNNELS[T_COUNT] = {"pppoe", "mpls", "gre", "vxlan", "geneve", "ipip"};

enum { TS_HARDWARE, TS_SOFTWARE, TS_FALLBACK, TS_COUNT };
static const char *const TS_SOURCES[TS_COUNT] = {"hardware", "software", "fallback"};

/* The ring: a struct tpacket3_hdr, then (at TPACKET_ALIGN of its size) the sockaddr_ll
 * the kernel fills in. Offsets from <linux/if_packet.h>, pinned to the ones _linux.py's
 * TPACKET3_HDR uses, so the two readers cannot drift apart. */
#define HDR_OFF(field) offsetof(struct tpacket3_hdr, field)
#define HV1_OFF(field) (HDR_OFF(hv1) + offsetof(struct tpacket_hdr_variant1, field))
#define SLL_OFF TPACKET_ALIGN(sizeof(struct tpacket3_hdr))
#define SLL_FIELD_OFF(field) (SLL_OFF + offsetof(struct sockaddr_ll, field))
_Static_assert(HDR_OFF(tp_next_offset) == 0, "tp_next_offset");
_Static_assert(HDR_OFF(tp_sec) == 4, "tp_sec");
_Static_assert(HDR_OFF(tp_nsec) == 8, "tp_nsec");
_Static_assert(HDR_OFF(tp_snaplen) == 12, "tp_snaplen");
_Static_assert(HDR_OFF(tp_len) == 16, "tp_len");
_Static_assert(HDR_OFF(tp_status) == 20, "tp_status");
_Static_assert(HDR_OFF(tp_mac) == 24, "tp_mac");
_Static_assert(HV1_OFF(tp_rxhash) == 28, "tp_rxhash");
_Static_assert(HV1_OFF(tp_vlan_tci) == 32, "tp_vlan_tci");
_Static_assert(SLL_OFF == 48, "sockaddr_ll");
_Static_assert(SLL_FIELD_OFF(sll_ifindex) == 52, "sll_ifindex");
_Static_assert(SLL_FIELD_OFF(sll_pkttype) == 58, "sll_pkttype");
#define HDR_SIZE (SLL_FIELD_OFF(sll_pkttype) + 1)  /* what is read of each packet header */

/* Link and network numbers decode.py names too. */
#define ETH_HEADER_LEN 14
#define ETH_MAX_LENGTH_FIELD 1500       /* type/length up to this: an 802.3 length */
#define VLAN_TAG_LEN 4
#define ETH_P_QINQ_PRE 0x9100           /* pre-standard QinQ (ETH_P_QINQ1) */
#define LLC_SNAP_SAP 0xAA
#define IPPROTO_HIP 139
#define IPPROTO_SHIM6 140
#define ARPHRD_ETHER_ 1                 /* ARP hardware type Ethernet */
/* Tunnels (decode.py's "tunnels" section) */
#define ETH_P_TEB_ 0x6558               /* transparent Ethernet bridging (NVGRE, Geneve) */
#define ETH_P_ERSPAN_ 0x88BE            /* ERSPAN type I and II, over GRE */
#define PPP_IP 0x0021
#define PPP_IPV6 0x0057
#define PPPOE_HEADER_LEN 8              /* the session header and PPP's protocol */
#define GRE_CSUM 0x8000
#define GRE_ROUTING 0x4000
#define GRE_KEY 0x2000
#define GRE_SEQ 0x1000
#define GRE_VERSION 0x0007
#define UDP_PORT_VXLAN 4789
#define UDP_PORT_GENEVE 6081
#define UDP_PORT_MPLS 6635              /* MPLS in UDP (RFC 7510) */
#define ERSPAN_II_HEADER 8
#define ERSPAN_II_VERSION 1             /* the high nibble of its first byte */
#define ETH_P_ARISTA 0xD28B             /* Arista's timestamp header, after the MACs */
#define MAX_TUNNEL_DEPTH 4              /* decode.MAX_TUNNEL_DEPTH */
#define NIL (-1)
#define ROW_FIELDS 32                   /* len(wire.FIELDS) */
#define VLAN_ID_MASK 0x0FFF
#define LEN_MAX 0xFFFFFFFFu             /* version 2 keeps len and caplen in uint32 */

/* --- reading (little-endian ring header, big-endian wire) --------------------------- */

static inline uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static inline uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* --- one row, as decode.py fills it ------------------------------------------------- */

/* A row's inner_* fields: what the innermost tunnel decoded carries. */
typedef struct {
    const uint8_t *eth_dst, *eth_src;   /* NULL: nil */
    const uint8_t *src, *dst;           /* NULL: nil */
    int addr_len;
    long proto, sport, dport, tcp_flags;  /* NIL: nil */
} Inner;

typedef struct {
    uint64_t ts_ns, len, caplen;
    int ts_src;                         /* an index into TS_SOURCES */
    int64_t ifindex;
    uint32_t rxhash;
    uint8_t pkttype;
    const uint8_t *eth_dst, *eth_src;   /* NULL: nil */
    long ethertype;                     /* NIL: nil */
    long meta_vlan;                     /* the tag from the ring header, or NIL */
    const uint8_t *vlan_tags;           /* in-frame tags: 4 bytes each */
    Py_ssize_t n_vlan_tags;
    const uint8_t *src, *dst;           /* NULL: nil */
    int addr_len;
    long proto, ttl, sport, dport, tcp_flags, icmp_type, icmp_code;
    int frag;
    int err;                            /* -1: nil, else an index into REASONS */
    Py_ssize_t payload_start, payload_end;  /* payload_start < 0: nil */
    int level;                          /* the tunnels this row's packet is inside of */
    int tunnel;                         /* 0: nil, else 1 + an index into TUNNELS */
    /* Set (by set_tunnel) only once `tunnel` is: with tunnel 0 they are all nil and never
     * read, so that a frame without a tunnel costs nothing to initialise. */
    int64_t tunnel_id;                  /* NIL: nil; up to 32 bits (the GRE key) */
    Inner inner;
} Row;

/* Copied from a template rather than memset and then set: a memset of this size
 * compiles to `rep stos`, whose start-up cost was a third of read_packet's time. */
static const Row ROW_INIT = {
    .ethertype = NIL, .meta_vlan = NIL,
    .proto = NIL, .ttl = NIL, .sport = NIL, .dport = NIL, .tcp_flags = NIL,
    .icmp_type = NIL, .icmp_code = NIL, .err = -1, .payload_start = -1,
};

static void row_init(Row *r) {
    memcpy(r, &ROW_INIT, offsetof(Row, tunnel_id));
}

/* The row goes through a tunnel of this kind: its tunnel fields become nil but `tunnel`. */
static void set_tunnel(Row *r, int kind) {
    r->tunnel = kind + 1;
    r->tunnel_id = NIL;
    r->inner = (Inner){NULL, NULL, NULL, NULL, 0, NIL, NIL, NIL, NIL};
}

/* The decoder. pos and end are offsets into buf; end never exceeds the frame. Each
 * function returns 1 and sets the payload span, or 0 when decoding stopped before it.
 *
 * decode.py's `depth` argument (how many tunnels are still to be decoded through) is
 * tunnel_depth - r->level here: the call's tunnel_depth is kept aside (as `scratch` is:
 * workers are single-threaded and the GIL is held throughout), and a row's level, the
 * tunnels its packet is inside of, is 0 as row_init leaves it for the outer packet. So
 * the path of a frame without a tunnel carries no depth along: it is read only where a
 * tunnel could start. */
static int tunnel_depth;
#define DEPTH_LEFT(r) (tunnel_depth - (r)->level)

/* What a tunnel carries, and so which function decodes it (inner()'s `decode`). */
enum { D_FRAME, D_IPV4, D_IPV6, D_MPLS };

/* frame(), ipv4() and ipv6() are inlined where they are called (read_packet, inner), as
 * they were before tunnels (which made them recursive); the tunnels are kept out of
 * line, and every recursion goes through them: the path of a frame without a tunnel
 * compiles as it did (an encode_columns of plain UDP or TCP runs the same instructions
 * per packet, give or take one). */
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
#define DECODE_FN static inline __attribute__((always_inline))
#define TUNNEL_FN __attribute__((noinline))
static TUNNEL_FN int pppoe(const uint8_t *buf, Py_ssize_t pos, Py_ssize_t end, Row *r);
static TUNNEL_FN int mpls(const uint8_t *buf, Py_ssize_t pos, Py_ssize_t end, Row *r);
static TUNNEL_FN int gre(const uint8_t *buf, Py_ssize_t pos, Py_ssize_t end, Row *r);
static TUNNEL_FN int vxlan(const uint8_t *buf, Py_ssize_t pos, Py_ssize_t end, Row *r);
static TUNNEL_FN int geneve(const uint8_t *buf, Py_ssize_t pos, Py_ssize_t end, Row *r);
static TUNNEL_FN int ipip(const uint8_t *buf, Py_ssize_t pos, Py_ssize_t end, Row *r,
                          long proto);

static inline int payload_at(Row *r, Py_ssize_t start, Py_ssize_t end) {
    r->payload_start = start; r->payload_end = end;
    return 1;
}

static int transport(const uint8_t *buf, Py_ssize_t pos, Py_ssize_t end, long proto, Row *r) {
    Py_ssize_t avail = end - pos;
    Py_ssize_t need, header;
    int reason;
    switch (proto) {
    case IPPROTO_TCP: need = 20; reason = E_TRUNC_TCP; break;
    case IPPROTO_UDP:  /* the generic path's steps for an 8-byte header, and tunnels */
        if (avail >= 4) { r->sport = be16(buf + pos); r->dport = be16(buf + pos + 2); }
        if (avail < 8) { r->err = E_TRUNC_UDP; return 0; }
        /* to the VXLAN, Geneve or MPLS-in-UDP port: a tunnel */
        if (UNLIKELY((r->dport == UDP_PORT_VXLAN || r->dport == UDP_PORT_GENEVE
                      || r->dport == UDP_PORT_MPLS) && DEPTH_LEFT(r) > 0))
            return r->dport == UDP_PORT_VXLAN ? vxlan(buf, pos + 8, end, r)
                 : r->dport == UDP_PORT_GENEVE ? geneve(buf, pos + 8, end, r)
                 : mpls(buf, pos + 8, end, r);
        return payload_at(r, pos + 8, end);
    case IPPROTO_UDPLITE: need = 8; reason = E_TRUNC_UDP; break;
    case IPPROTO_SCTP: need = 12; reason = E_TRUNC_SCTP; break;
    case IPPROTO_DCCP: need = 12; reason = E_TRUNC_DCCP; break;
    case IPPROTO_ICMP: case IPPROTO_ICMPV6:
        if (avail >= 2) { r->icmp_type = buf[pos]; r->icmp_code = buf[pos + 1]; }
        if (avail < 4) {
            r->err = proto == IPPROTO_ICMP ? E_TRUNC_ICMP : E_TRUNC_ICMPV6;
            return 0;
        }
        if (avail < 8) return 0;
        return payload_at(r, pos + 8, end);
    default:  /* (GRE and IP in IP here, not as cases: that made the switch a jump table) */
        if (DEPTH_LEFT(r) > 0) {
            if (proto == IPPROTO_GRE) return gre(buf, pos, end, r);
            if (proto == IPPROTO_IPIP || proto == IPPROTO_IPV6)
                return ipip(buf, pos, end, r, proto);
        }
        return payload_at(r, pos, end);
    }
    if (avail >= 4) { r->sport = be16(buf + pos); r->dport = be16(buf + pos + 2); }
    header = need;
    if (proto == IPPROTO_TCP && avail >= 14) {
        uint8_t doff = buf[pos + 12], flags = buf[pos + 13];
        r->tcp_flags = ((long)(doff & 1) << 8) | flags;
        if (doff >> 4 < 5) { r->err = E_BAD_TCP_HDR; return 0; }
        header = (Py_ssize_t)(doff >> 4) * 4;
    } else if (proto == IPPROTO_DCCP && avail >= 5) {
        Py_ssize_t words = (Py_ssize_t)buf[pos + 4] * 4;
        header = words > need ? words : need;
    }
    if (avail < need) { r->err = reason; return 0; }
    if (avail < header) return 0;
    return payload_at(r, pos + header, end);
}

DECODE_FN int ipv4(const uint8_t *buf, Py_ssize_t pos, Py_ssize_t end, Row *r) {
    if (end - pos < 20) { r->err = E_TRUNC_IPV4; return 0; }
    uint8_t ver_ihl = buf[pos];
    Py_ssize_t total = be16(buf + pos + 2);
    uint16_t frag = be16(buf + pos + 6);
    Py_ssize_t ihl = (Py_ssize_t)(ver_ihl & 0x0F) * 4;
    if (ver_ihl >> 4 != 4 || ihl < 20) { r->err = E_BAD_IPV4_HDR; return 0; }
    r->src = buf + pos + 12; r->dst = buf + pos + 16; r->addr_len = 4;
    r->proto = buf[pos + 9];
    r->ttl = buf[pos + 8];
    uint16_t frag_offset = frag & 0x1FFF;
    if (frag_offset || (frag & 0x2000)) r->frag = 1;
    if (total) {  /* 0 on GSO/BIG TCP packets captured before segmentation */
        if (total < ihl) { r->err = E_BAD_IPV4_LEN; return 0; }
        if (pos + total < end) end = pos + total;  /* the rest is Ethernet padding */
    }
    if (end - pos < ihl) { r->err = E_TRUNC_IPV4; return 0; }
    if (frag_offset) return payload_at(r, pos + ihl, end);
    return transport(buf, pos + ihl, end, r->proto, r);
}

/* Extension headers of (len + 1) * 8 bytes (AH and the fragment header differ). */
DECODE_FN int ipv6_ext_8(long nxt) {
    return nxt == IPPROTO_HOPOPTS || nxt == IPPROTO_ROUTING || nxt == IPPROTO_DSTOPTS
        || nxt == IPPROTO_MH || nxt == IPPROTO_HIP || nxt == IPPROTO_SHIM6;
}

DECODE_FN int ipv6(const uint8_t *buf, Py_ssize_t pos, Py_ssize_t end, Row *r) {
    if (end - pos < 40) { r->err = E_TRUNC_IPV6; return 0; }
    uint32_t vtf = be32(buf + pos);
    Py_ssize_t payload_len = be16(buf + pos + 4);
    long nxt = buf[pos + 6];
    if (vtf >> 28 != 6) { r->err = E_BAD_IPV6_HDR; return 0; }
    r->src = buf + pos + 8; r->dst = buf + pos + 24; r->addr_len = 16;
    r->ttl = buf[pos + 7];
    pos += 40;
    if (payload_len && pos + payload_len < end) end = pos + payload_len;
    for (;;) {
        if (ipv6_ext_8(nxt) || nxt == IPPROTO_AH) {
            if (end - pos < 2) { r->err = E_TRUNC_IPV6_EXT; return 0; }
            long following = buf[pos];
            Py_ssize_t hlen = buf[pos + 1];
            hlen = nxt == IPPROTO_AH ? (hlen + 2) * 4 : (hlen + 1) * 8;
            if (end - pos < hlen) { r->err = E_TRUNC_IPV6_EXT; return 0; }
            nxt = following;
            pos += hlen;
        } else if (nxt == IPPROTO_FRAGMENT) {
            if (end - pos < 8) { r->err = E_TRUNC_IPV6_EXT; return 0; }
            long following = buf[pos];
            uint16_t offset_flags = be16(buf + pos + 2);
            if (offset_flags & 0xFFF9) r->frag = 1;
            nxt = following;
            pos += 8;
            if (offset_flags >> 3) {  /* a later fragment: its payload starts mid-datagram */
                r->proto = nxt;
                return payload_at(r, pos, end);
            }
        } else {
            break;
        }
    }
    r->proto = nxt;
    return transport(buf, pos, end, nxt, r);
}

static int arp(const uint8_t *buf, Py_ssize_t pos, Py_ssize_t end, Row *r) {
    if (end - pos < 8) { r->err = E_TRUNC_ARP; return 0; }
    uint16_t htype = be16(buf + pos), ptype = be16(buf + pos + 2);
    uint8_t hlen = buf[pos + 4], plen = buf[pos + 5];
    Py_ssize_t size = 8 + 2 * ((Py_ssize_t)hlen + plen);
    if (end - pos < size) { r->err = E_TRUNC_ARP; return 0; }
    if (htype == ARPHRD_ETHER_ && ptype == ETH_P_IP && hlen == 6 && plen == 4) {
        r->src = buf + pos + 14; r->dst = buf + pos + 24; r->addr_len = 4;
    }
    return payload_at(r, pos + size, end);
}

static inline int vlan_tpid(long ethertype) {
    return ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD || ethertype == ETH_P_QINQ_PRE;
}

DECODE_FN int frame(const uint8_t *buf, Py_ssize_t off, Py_ssize_t end, Row *r) {
    if (end - off < ETH_HEADER_LEN) {
        if (end - off >= 6) r->eth_dst = buf + off;
        if (end - off >= 12) r->eth_src = buf + off + 6;
        r->err = E_TRUNC_ETH;
        return 0;
    }
    r->eth_dst = buf + off; r->eth_src = buf + off + 6;
    long ethertype = be16(buf + off + 12);
    Py_ssize_t pos = off + ETH_HEADER_LEN;
    if (UNLIKELY(ethertype == ETH_P_ARISTA) && end - pos >= 4) {
        /* subtype 1, version 0x??10 or 0x??20: a 64- or 48-bit timestamp, then the
         * frame's own ethertype; another kind is not decoded further */
        uint16_t subtype = be16(buf + pos), version = be16(buf + pos + 2) & 0xFF;
        Py_ssize_t stamp = version == 0x10 ? 8 : version == 0x20 ? 6 : 0;
        if (subtype == 1 && stamp) {
            if (end - pos < 4 + stamp + 2) { r->err = E_TRUNC_ARISTA; return 0; }
            pos += 4 + stamp;
            ethertype = be16(buf + pos);
            pos += 2;
        }
    }
    r->vlan_tags = buf + pos;
    while (vlan_tpid(ethertype)) {
        if (end - pos < VLAN_TAG_LEN) { r->err = E_TRUNC_VLAN; return 0; }
        r->n_vlan_tags++;
        ethertype = be16(buf + pos + 2);
        pos += VLAN_TAG_LEN;
    }
    if (ethertype <= ETH_MAX_LENGTH_FIELD) {  /* 802.3: LLC; SNAP may carry an ethertype */
        if (end - pos < 3) { r->err = E_TRUNC_LLC; return 0; }
        if (buf[pos] != LLC_SNAP_SAP || buf[pos + 1] != LLC_SNAP_SAP)
            return payload_at(r, pos + 3, end);
        if (end - pos < 8) { r->err = E_TRUNC_LLC; return 0; }
        const uint8_t *oui = buf + pos + 3;
        ethertype = be16(buf + pos + 6);
        /* RFC 1042 and 802.1H OUIs carry an ethertype, if the protocol id is one (a
         * value below 0x0600, such as a Cisco ISL header's, is not) */
        if (!(oui[0] == 0 && oui[1] == 0 && (oui[2] == 0 || oui[2] == 0xF8))
                || ethertype < ETH_P_802_3_MIN)
            return payload_at(r, pos + 8, end);
        pos += 8;
    }
    r->ethertype = ethertype;
    if (ethertype == ETH_P_IP) return ipv4(buf, pos, end, r);
    if (ethertype == ETH_P_IPV6) return ipv6(buf, pos, end, r);
    if (ethertype == ETH_P_ARP) return arp(buf, pos, end, r);
    if (DEPTH_LEFT(r) > 0) {
        if (ethertype == ETH_P_PPP_SES) return pppoe(buf, pos, end, r);
        if (ethertype == ETH_P_MPLS_UC || ethertype == ETH_P_MPLS_MC)
            return mpls(buf, pos, end, r);
    }
    return payload_at(r, pos, end);
}

/* --- tunnels (decode.py's _inner, _pppoe, _mpls, _gre, _vxlan, _geneve) ------------ */

/* The packet a tunnel carries, from buf[pos], decoded as `decode` says (D_FRAME for
 * Ethernet, D_IPV4, D_IPV6 or D_MPLS) into a row of its own with one level less to go;
 * the row's inner fields are taken from it (from its own inner fields when it went
 * through a tunnel too). Its error is the row's error, its payload the row's payload. */
static TUNNEL_FN int inner(const uint8_t *buf, Py_ssize_t pos, Py_ssize_t end, Row *r,
                           int decode) {
    Row in;
    row_init(&in);
    in.level = r->level + 1;
    int ok;
    switch (decode) {
    case D_FRAME: ok = frame(buf, pos, end, &in); break;
    case D_IPV4: ok = ipv4(buf, pos, end, &in); break;
    case D_IPV6: ok = ipv6(buf, pos, end, &in); break;
    default: ok = mpls(buf, pos, end, &in); break;
    }
    if (in.tunnel && (in.inner.eth_dst || in.inner.src)) {  /* it carried a packet */
        r->inner = in.inner;
    } else {
        r->inner.eth_dst = in.eth_dst;
        r->inner.eth_src = in.eth_src;
        r->inner.src = in.src;
        r->inner.dst = in.dst;
        r->inner.addr_len = in.addr_len;
        r->inner.proto = in.proto;
        r->inner.sport = in.sport;
        r->inner.dport = in.dport;
        r->inner.tcp_flags = in.tcp_flags;
    }
    if (in.err >= 0) r->err = in.err;
    r->payload_start = in.payload_start;
    r->payload_end = in.payload_end;
    return ok;
}

/* What GRE and Geneve carry, by their protocol type (an ethertype): inner()'s `decode`,
 * or -1 for none of these (decode.py's _CARRIED). */
static int carried(uint16_t ptype) {
    switch (ptype) {
    case ETH_P_IP: return D_IPV4;
    case ETH_P_IPV6: return D_IPV6;
    case ETH_P_TEB_: return D_FRAME;
    default: return -1;
    }
}

/* PPPoE session (RFC 2516): a 6-byte header, then PPP's 2-byte protocol. */
static int pppoe(const uint8_t *buf, Py_ssize_t pos, Py_ssize_t end, Row *r) {
    set_tunnel(r, T_PPPOE);
    if (end - pos < PPPOE_HEADER_LEN) { r->err = E_TRUNC_PPPOE; return 0; }
    r->tunnel_id = be16(buf + pos + 2);
    Py_ssize_t length = be16(buf + pos + 4);
    uint16_t ppp_proto = be16(buf + pos + 6);
    /* the PPP frame's length, protocol included; what follows is padding */
    if (length >= 2 && pos + 6 + length < end) end = pos + 6 + length;
    pos += PPPOE_HEADER_LEN;
    if (ppp_proto == PPP_IP) return inner(buf, pos, end, r, D_IPV4);
    if (ppp_proto == PPP_IPV6) return inner(buf, pos, end, r, D_IPV6);
    return payload_at(r, pos, end);
}

/* An MPLS label stack (RFC 3032); tunnel_id is the top label. After the bottom of the
 * stack the first nibble tells IPv4 from IPv6; anything else is not decoded further. */
static int mpls(const uint8_t *buf, Py_ssize_t pos, Py_ssize_t end, Row *r) {
    set_tunnel(r, T_MPLS);
    for (;;) {
        if (end - pos < 4) { r->err = E_TRUNC_MPLS; return 0; }
        uint32_t entry = be32(buf + pos);
        if (r->tunnel_id == NIL) r->tunnel_id = entry >> 12;
        pos += 4;
        if (entry & 0x100) break;  /* bottom of stack */
    }
    if (end - pos >= 1) {
        int version = buf[pos] >> 4;
        if (version == 4) return inner(buf, pos, end, r, D_IPV4);
        if (version == 6) return inner(buf, pos, end, r, D_IPV6);
    }
    return payload_at(r, pos, end);
}

/* GRE version 0 (RFC 2784/2890): optional checksum, key (tunnel_id) and sequence number;
 * carrying IPv4, IPv6, Ethernet (NVGRE), ERSPAN type I or II, or MPLS. Version 1 (PPTP)
 * and source routing are not decoded further. */
static int gre(const uint8_t *buf, Py_ssize_t pos, Py_ssize_t end, Row *r) {
    set_tunnel(r, T_GRE);
    if (end - pos < 4) { r->err = E_TRUNC_GRE; return 0; }
    uint16_t flags = be16(buf + pos), ptype = be16(buf + pos + 2);
    if (flags & (GRE_VERSION | GRE_ROUTING)) return 0;
    Py_ssize_t hlen = 4;
    if (flags & GRE_CSUM) hlen += 4;
    Py_ssize_t key_at = pos + hlen;
    if (flags & GRE_KEY) hlen += 4;
    if (flags & GRE_SEQ) hlen += 4;
    if (end - pos < hlen) { r->err = E_TRUNC_GRE; return 0; }
    if (flags & GRE_KEY) r->tunnel_id = be32(buf + key_at);
    pos += hlen;
    int decode = carried(ptype);
    if (decode >= 0) return inner(buf, pos, end, r, decode);
    switch (ptype) {
    case ETH_P_ERSPAN_:
        if (flags & GRE_SEQ) {  /* type II: an 8-byte ERSPAN header before the frame */
            if (end - pos < ERSPAN_II_HEADER) { r->err = E_TRUNC_GRE; return 0; }
            if (buf[pos] >> 4 != ERSPAN_II_VERSION) return payload_at(r, pos, end);
            pos += ERSPAN_II_HEADER;
        }
        return inner(buf, pos, end, r, D_FRAME);
    case ETH_P_MPLS_UC: case ETH_P_MPLS_MC:
        if (DEPTH_LEFT(r) > 1) return inner(buf, pos, end, r, D_MPLS);
        break;
    }
    return payload_at(r, pos, end);
}

/* VXLAN (RFC 7348): an 8-byte header with the 24-bit VNI, then an Ethernet frame. */
static int vxlan(const uint8_t *buf, Py_ssize_t pos, Py_ssize_t end, Row *r) {
    set_tunnel(r, T_VXLAN);
    if (end - pos < 8) { r->err = E_TRUNC_VXLAN; return 0; }
    r->tunnel_id = be32(buf + pos + 4) >> 8;
    return inner(buf, pos + 8, end, r, D_FRAME);
}

/* Geneve (RFC 8926): 8 bytes with the VNI, options, then what its protocol type says
 * (Ethernet, IPv4 or IPv6). Versions other than 0 stop there. */
static int geneve(const uint8_t *buf, Py_ssize_t pos, Py_ssize_t end, Row *r) {
    set_tunnel(r, T_GENEVE);
    if (end - pos < 8) { r->err = E_TRUNC_GENEVE; return 0; }
    uint8_t ver_optlen = buf[pos];
    uint16_t ptype = be16(buf + pos + 2);
    r->tunnel_id = be32(buf + pos + 4) >> 8;
    if (ver_optlen >> 6) return 0;
    Py_ssize_t hlen = 8 + (Py_ssize_t)(ver_optlen & 0x3F) * 4;
    if (end - pos < hlen) { r->err = E_TRUNC_GENEVE; return 0; }
    pos += hlen;
    int decode = carried(ptype);
    return decode >= 0 ? inner(buf, pos, end, r, decode) : payload_at(r, pos, end);
}

/* IP in IP (protocol 4: IPv4 inside, 41: IPv6 inside): no header of its own. */
static int ipip(const uint8_t *buf, Py_ssize_t pos, Py_ssize_t end, Row *r, long proto) {
    set_tunnel(r, T_IPIP);
    return inner(buf, pos, end, r, proto == IPPROTO_IPIP ? D_IPV4 : D_IPV6);
}

/* --- msgpack, exactly as msgpack-python packs with use_bin_type=True --------------- */

/* fixed: buf is not ours to grow (a bytes object sized in advance) */
typedef struct { uint8_t *buf; size_t len, cap; int fixed; } Out;

static __attribute__((noinline)) int out_grow(Out *o, size_t more) {
    if (o->fixed) {
        PyErr_SetString(PyExc_SystemError, "fastpath: a batch outgrew its computed size");
        return -1;
    }
    /* grows by doubling; kept across calls (see scratch) */
    size_t cap = o->cap ? o->cap : 4096;
    while (cap < o->len + more) cap *= 2;
    uint8_t *grown = PyMem_Realloc(o->buf, cap);
    if (grown == NULL) { PyErr_NoMemory(); return -1; }
    o->buf = grown; o->cap = cap;
    return 0;
}
/* Room for `more` bytes: inline, since it is called a few times per packet and nearly
 * always has the room already (a call each was 5 % of the encoder). */
static inline int out_reserve(Out *o, size_t more) {
    return o->len + more <= o->cap ? 0 : out_grow(o, more);
}
static inline void put1(Out *o, uint8_t b) { o->buf[o->len++] = b; }
static inline void put_be(Out *o, uint64_t v, int n) {
    uint8_t *p = o->buf + o->len;
    switch (n) {
    case 8: p[0] = (uint8_t)(v >> 56); p[1] = (uint8_t)(v >> 48); p[2] = (uint8_t)(v >> 40);
            p[3] = (uint8_t)(v >> 32); p += 4; /* fall through */
    case 4: p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p += 2; /* fall through */
    case 2: p[0] = (uint8_t)(v >> 8); p += 1; /* fall through */
    default: p[0] = (uint8_t)v;
    }
    o->len += (size_t)n;
}
static void put_uint(Out *o, uint64_t v) {
    if (v < 0x80) put1(o, (uint8_t)v);
    else if (v <= 0xFF) { put1(o, 0xCC); put_be(o, v, 1); }
    else if (v <= 0xFFFF) { put1(o, 0xCD); put_be(o, v, 2); }
    else if (v <= 0xFFFFFFFFu) { put1(o, 0xCE); put_be(o, v, 4); }
    else { put1(o, 0xCF); put_be(o, v, 8); }
}
static void put_int(Out *o, int64_t v) {
    if (v >= 0) { put_uint(o, (uint64_t)v); return; }
    if (v >= -32) put1(o, (uint8_t)(0xE0 | (v + 32)));
    else if (v >= -128) { put1(o, 0xD0); put_be(o, (uint64_t)v, 1); }
    else if (v >= -32768) { put1(o, 0xD1); put_be(o, (uint64_t)v, 2); }
    else if (v >= INT32_MIN) { put1(o, 0xD2); put_be(o, (uint64_t)v, 4); }
    else { put1(o, 0xD3); put_be(o, (uint64_t)v, 8); }
}
static inline void put_nil(Out *o) { put1(o, 0xC0); }
static inline void put_opt(Out *o, long v) { if (v == NIL) put_nil(o); else put_uint(o, (uint64_t)v); }
static void put_str(Out *o, const char *s) {
    size_t n = strlen(s);  /* short ASCII constants: the compiler folds most of this */
    if (n < 32) put1(o, (uint8_t)(0xA0 | n)); else { put1(o, 0xD9); put1(o, (uint8_t)n); }
    memcpy(o->buf + o->len, s, n); o->len += n;
}
static void put_bin(Out *o, const uint8_t *p, size_t n) {
    if (n <= 0xFF) { put1(o, 0xC4); put_be(o, n, 1); }
    else if (n <= 0xFFFF) { put1(o, 0xC5); put_be(o, n, 2); }
    else { put1(o, 0xC6); put_be(o, n, 4); }
    memcpy(o->buf + o->len, p, n); o->len += n;
}
static void put_array(Out *o, size_t n) {
    if (n < 16) put1(o, (uint8_t)(0x90 | n));
    else if (n <= 0xFFFF) { put1(o, 0xDC); put_be(o, n, 2); }
    else { put1(o, 0xDD); put_be(o, n, 4); }
}

static void put_map(Out *o, size_t n) {
    if (n < 16) put1(o, (uint8_t)(0x80 | n));
    else if (n <= 0xFFFF) { put1(o, 0xDE); put_be(o, n, 2); }
    else { put1(o, 0xDF); put_be(o, n, 4); }
}

#define TUNNEL_FIELDS 10  /* tunnel, tunnel_id and the 8 inner_* fields (wire.TUNNEL_FIELDS) */

static inline void put_opt_bin(Out *o, const uint8_t *p, size_t n) {
    if (p) put_bin(o, p, n); else put_nil(o);
}

/* A row's tunnel fields, when it went through one. */
static void put_tunnel_fields(Out *o, const Row *r) {
    put_str(o, TUNNELS[r->tunnel - 1]);
    if (r->tunnel_id == NIL) put_nil(o); else put_uint(o, (uint64_t)r->tunnel_id);
    put_opt_bin(o, r->inner.eth_dst, 6);
    put_opt_bin(o, r->inner.eth_src, 6);
    put_opt_bin(o, r->inner.src, (size_t)r->inner.addr_len);
    put_opt_bin(o, r->inner.dst, (size_t)r->inner.addr_len);
    put_opt(o, r->inner.proto);
    put_opt(o, r->inner.sport);
    put_opt(o, r->inner.dport);
    put_opt(o, r->inner.tcp_flags);
}

static int put_row(Out *o, const Row *r, const uint8_t *buf, Py_ssize_t payload_bytes) {
    Py_ssize_t n_vlan = r->n_vlan_tags + (r->meta_vlan != NIL);
    Py_ssize_t payload = 0;
    if (payload_bytes && r->payload_start >= 0) {
        payload = r->payload_end - r->payload_start;
        if (payload > payload_bytes) payload = payload_bytes;
        if (payload < 0) payload = 0;
    }
    /* 256 bytes cover every fixed field with its largest encoding, tunnel fields too */
    if (out_reserve(o, 256 + 3 * (size_t)n_vlan + (size_t)payload + 5) < 0) return -1;
    put_array(o, ROW_FIELDS + (payload_bytes ? 1 : 0));
    put_uint(o, r->ts_ns);
    put_str(o, TS_SOURCES[r->ts_src]);
    put_uint(o, r->len);
    put_uint(o, r->caplen);
    put_int(o, r->ifindex);
    put_uint(o, r->rxhash);
    put_uint(o, r->pkttype);
    if (r->eth_dst) put_bin(o, r->eth_dst, 6); else put_nil(o);
    if (r->eth_src) put_bin(o, r->eth_src, 6); else put_nil(o);
    put_opt(o, r->ethertype);
    put_array(o, (size_t)n_vlan);
    if (r->meta_vlan != NIL) put_uint(o, (uint64_t)r->meta_vlan);
    for (Py_ssize_t i = 0; i < r->n_vlan_tags; i++)
        put_uint(o, be16(r->vlan_tags + VLAN_TAG_LEN * i) & VLAN_ID_MASK);
    if (r->src) put_bin(o, r->src, (size_t)r->addr_len); else put_nil(o);
    if (r->dst) put_bin(o, r->dst, (size_t)r->addr_len); else put_nil(o);
    put_opt(o, r->proto);
    put_opt(o, r->ttl);
    put_opt(o, r->sport);
    put_opt(o, r->dport);
    put_opt(o, r->tcp_flags);
    put_opt(o, r->icmp_type);
    put_opt(o, r->icmp_code);
    put1(o, r->frag ? 0xC3 : 0xC2);
    if (r->err >= 0) put_str(o, REASONS[r->err]); else put_nil(o);
    if (!r->tunnel) {  /* every tunnel field nil */
        memset(o->buf + o->len, 0xC0, TUNNEL_FIELDS);
        o->len += TUNNEL_FIELDS;
    } else {
        put_tunnel_fields(o, r);
    }
    if (payload_bytes) {
        if (r->payload_start >= 0) put_bin(o, buf + r->payload_start, (size_t)payload);
        else put_nil(o);
    }
    return 0;
}

/* --- the block walk (decode_block) ------------------------------------------------- */

/* The packet whose header is at block[pos], decoded into r (decode_block's loop body).
 * Returns its tp_next_offset, or -1 when its header would not fit in the block (a
 * corrupt chain; the kernel never writes one). */
static long read_packet(const uint8_t *block, Py_ssize_t limit, Py_ssize_t pos, Row *r) {
    if (pos < 0 || pos + (Py_ssize_t)HDR_SIZE > limit) return -1;
    const uint8_t *h = block + pos;
    uint32_t next_offset = le32(h + HDR_OFF(tp_next_offset));
    uint32_t sec = le32(h + HDR_OFF(tp_sec)), nsec = le32(h + HDR_OFF(tp_nsec));
    uint64_t snaplen = le32(h + HDR_OFF(tp_snaplen)), wire_len = le32(h + HDR_OFF(tp_len));
    uint32_t status = le32(h + HDR_OFF(tp_status));
    Py_ssize_t mac_off = pos + le16(h + HDR_OFF(tp_mac));
    row_init(r);
    r->rxhash = le32(h + HV1_OFF(tp_rxhash));
    r->ifindex = (int32_t)le32(h + SLL_FIELD_OFF(sll_ifindex));
    r->pkttype = h[SLL_FIELD_OFF(sll_pkttype)];
    Py_ssize_t room = limit - mac_off > 0 ? limit - mac_off : 0;
    if (snaplen > (uint64_t)room) snaplen = (uint64_t)room;
    r->ts_ns = (uint64_t)sec * 1000000000u + nsec;
    r->ts_src = status & TP_STATUS_TS_RAW_HARDWARE ? TS_HARDWARE
              : status & TP_STATUS_TS_SOFTWARE ? TS_SOFTWARE : TS_FALLBACK;
    if (status & TP_STATUS_VLAN_VALID) {
        r->meta_vlan = (long)(le32(h + HV1_OFF(tp_vlan_tci)) & VLAN_ID_MASK);
        r->caplen = snaplen + VLAN_TAG_LEN;
        r->len = wire_len + VLAN_TAG_LEN;
    } else {
        r->caplen = snaplen;
        r->len = wire_len;
    }
    frame(block, mac_off, mac_off + (Py_ssize_t)snaplen, r);
    return (long)next_offset;
}

/* errors[reason] += counts[reason] for every reason seen (decode_block's accounting). */
static int add_error_counts(PyObject *errors, const Py_ssize_t counts[E_COUNT]) {
    for (int e = 0; e < E_COUNT; e++) {
        if (!counts[e]) continue;
        PyObject *old = PyDict_GetItemWithError(errors, reason_names[e]);
        if (old == NULL && PyErr_Occurred()) return -1;
        Py_ssize_t base = old ? PyLong_AsSsize_t(old) : 0;
        if (base == -1 && PyErr_Occurred()) return -1;
        PyObject *total = PyLong_FromSsize_t(base + counts[e]);
        if (total == NULL || PyDict_SetItem(errors, reason_names[e], total) < 0) {
            Py_XDECREF(total);
            return -1;
        }
        Py_DECREF(total);
    }
    return 0;
}

static inline Py_ssize_t payload_length(const Row *r, Py_ssize_t payload_bytes) {
    if (!payload_bytes || r->payload_start < 0) return 0;
    Py_ssize_t n = r->payload_end - r->payload_start;
    if (n > payload_bytes) n = payload_bytes;
    return n < 0 ? 0 : n;
}

#define ARRAY_HEADER_MAX 5

/* One output buffer for the life of the process, grown to the largest batch and reused:
 * a fresh allocation per block would mean fresh pages (faults, zeroing) each time.
 * Workers are single-threaded, and the GIL is held throughout. */
static Out scratch;

/* Both encoders' arguments: (block, first_offset, num_pkts, payload_bytes, errors,
 * prefix, seq[, tunnel_depth]). The two buffers are released by the caller. */
#define PARSE_ENCODE_ARGS(args)                                                         \
    Py_buffer view, prefix;                                                             \
    Py_ssize_t first, num_pkts, payload_bytes;                                          \
    unsigned long long seq;                                                             \
    PyObject *errors;                                                                   \
    int depth = 1;                                                                      \
    if (!PyArg_ParseTuple(args, "y*nnnO!y*K|i", &view, &first, &num_pkts,               \
                          &payload_bytes, &PyDict_Type, &errors, &prefix, &seq, &depth)) \
        return NULL;                                                                    \
    if (depth < 0 || depth > MAX_TUNNEL_DEPTH) {                                        \
        PyBuffer_Release(&prefix);                                                      \
        PyBuffer_Release(&view);                                                        \
        return PyErr_Format(PyExc_ValueError, "tunnel_depth %d is not in 0..%d", depth, \
                            MAX_TUNNEL_DEPTH);                                          \
    }                                                                                   \
    tunnel_depth = depth

/* Version 1: the rows, each a msgpack array (wire.rows_body). */
static PyObject *encode_batch(PyObject *self, PyObject *args) {
    PARSE_ENCODE_ARGS(args);
    const uint8_t *block = view.buf;
    const Py_ssize_t limit = view.len;
    Out *out = &scratch;
    Py_ssize_t rows = 0;
    uint64_t wire_bytes = 0;
    Py_ssize_t counts[E_COUNT] = {0};
    PyObject *result = NULL;

    /* the map up to its last value: prefix, "seq": seq, "packets": then the rows' array,
     * whose header (1 to 5 bytes) is only known at the end: leave room for the largest */
    out->len = 0;
    if (out_reserve(out, (size_t)prefix.len + 32 + ARRAY_HEADER_MAX
                    + (size_t)(num_pkts > 0 ? num_pkts : 0) * 112) < 0)
        goto done;
    memcpy(out->buf, prefix.buf, (size_t)prefix.len);
    out->len = (size_t)prefix.len;
    put_str(out, "seq");
    put_uint(out, seq);
    put_str(out, "packets");
    const size_t head_len = out->len;
    out->len += ARRAY_HEADER_MAX;
    Py_ssize_t pos = first;
    for (Py_ssize_t i = 0; i < num_pkts; i++) {
        Row r;
        long next_offset = read_packet(block, limit, pos, &r);
        if (next_offset < 0) break;
        if (r.err >= 0) counts[r.err]++;
        wire_bytes += r.len;
        if (put_row(out, &r, block, payload_bytes) < 0) goto done;
        rows++;
        if (!next_offset) break;
        pos += next_offset;
    }
    /* the array header right against the first row, the head moved up against it */
    uint8_t header[ARRAY_HEADER_MAX];
    Out hdr = {header, 0, sizeof header, 1};  /* a stack array: never grown */
    put_array(&hdr, (size_t)rows);
    const size_t gap = ARRAY_HEADER_MAX - hdr.len;
    memcpy(out->buf + head_len + gap, header, hdr.len);
    memmove(out->buf + gap, out->buf, head_len);

    if (add_error_counts(errors, counts) < 0) goto done;
    result = Py_BuildValue("(y#nK)", (const char *)out->buf + gap, (Py_ssize_t)(out->len - gap),
                           rows, (unsigned long long)wire_bytes);
done:
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&view);
    return result;
}

/* --- version 2: columns (wire.columns_body) ----------------------------------------- */

/* The columns, in wire.FIELD_TABLE's order (and payload last), with their layouts. */
enum {
    C_TS_NS, C_TS_SRC, C_LEN, C_CAPLEN, C_IFINDEX, C_RXHASH, C_PKTTYPE, C_ETH_DST,
    C_ETH_SRC, C_ETHERTYPE, C_VLAN, C_SRC, C_DST, C_PROTO, C_TTL, C_SPORT, C_DPORT,
    C_TCP_FLAGS, C_ICMP_TYPE, C_ICMP_CODE, C_FRAG, C_ERR,
    C_TUNNEL, C_TUNNEL_ID, C_INNER_ETH_DST, C_INNER_ETH_SRC, C_INNER_SRC, C_INNER_DST,
    C_INNER_PROTO, C_INNER_SPORT, C_INNER_DPORT, C_INNER_TCP_FLAGS,
    C_PAYLOAD, C_COUNT
};
_Static_assert(C_PAYLOAD == ROW_FIELDS, "payload follows the row fields");
_Static_assert(C_PAYLOAD - C_TUNNEL == TUNNEL_FIELDS, "the tunnel fields end the row");
/* The optional columns (wire.Field.optional): the tunnel fields, C_TUNNEL up to C_PAYLOAD.
 * A batch leaves out each one that is nil in every row. */
#define OPTIONAL_COLUMN(k) ((k) >= C_TUNNEL && (k) < C_PAYLOAD)
enum { L_FIXED, L_BOOL, L_FIXED_BINARY, L_BINARY, L_LIST, L_DICTIONARY };
typedef struct {
    const char *name, *arrow;
    int layout, nullable, width;  /* width: bytes per value (fixed, fixed binary, list item) */
    const char *const *dictionary;
    int dictionary_len;
} ColumnSpec;
static const ColumnSpec COLUMNS[C_COUNT] = {
    {"ts_ns", "timestamp[ns, UTC]", L_FIXED, 0, 8, NULL, 0},
    {"ts_src", "dictionary<int8, utf8>", L_DICTIONARY, 0, 1, TS_SOURCES, TS_COUNT},
    {"len", "uint32", L_FIXED, 0, 4, NULL, 0},
    {"caplen", "uint32", L_FIXED, 0, 4, NULL, 0},
    {"ifindex", "int32", L_FIXED, 0, 4, NULL, 0},
    {"rxhash", "uint32", L_FIXED, 0, 4, NULL, 0},
    {"pkttype", "uint8", L_FIXED, 0, 1, NULL, 0},
    {"eth_dst", "fixed_size_binary[6]", L_FIXED_BINARY, 1, 6, NULL, 0},
    {"eth_src", "fixed_size_binary[6]", L_FIXED_BINARY, 1, 6, NULL, 0},
    {"ethertype", "uint16", L_FIXED, 1, 2, NULL, 0},
    {"vlan", "list<uint16>", L_LIST, 0, 2, NULL, 0},
    {"src", "binary", L_BINARY, 1, 0, NULL, 0},
    {"dst", "binary", L_BINARY, 1, 0, NULL, 0},
    {"proto", "uint8", L_FIXED, 1, 1, NULL, 0},
    {"ttl", "uint8", L_FIXED, 1, 1, NULL, 0},
    {"sport", "uint16", L_FIXED, 1, 2, NULL, 0},
    {"dport", "uint16", L_FIXED, 1, 2, NULL, 0},
    {"tcp_flags", "uint16", L_FIXED, 1, 2, NULL, 0},
    {"icmp_type", "uint8", L_FIXED, 1, 1, NULL, 0},
    {"icmp_code", "uint8", L_FIXED, 1, 1, NULL, 0},
    {"frag", "bool", L_BOOL, 0, 0, NULL, 0},
    {"err", "dictionary<int8, utf8>", L_DICTIONARY, 1, 1, REASONS, E_COUNT},
    {"tunnel", "dictionary<int8, utf8>", L_DICTIONARY, 1, 1, TUNNELS, T_COUNT},
    {"tunnel_id", "uint32", L_FIXED, 1, 4, NULL, 0},
    {"inner_eth_dst", "fixed_size_binary[6]", L_FIXED_BINARY, 1, 6, NULL, 0},
    {"inner_eth_src", "fixed_size_binary[6]", L_FIXED_BINARY, 1, 6, NULL, 0},
    {"inner_src", "binary", L_BINARY, 1, 0, NULL, 0},
    {"inner_dst", "binary", L_BINARY, 1, 0, NULL, 0},
    {"inner_proto", "uint8", L_FIXED, 1, 1, NULL, 0},
    {"inner_sport", "uint16", L_FIXED, 1, 2, NULL, 0},
    {"inner_dport", "uint16", L_FIXED, 1, 2, NULL, 0},
    {"inner_tcp_flags", "uint16", L_FIXED, 1, 2, NULL, 0},
    {"payload", "binary", L_BINARY, 1, 0, NULL, 0},
};

/* Each column's buffers, reused from block to block like `scratch`. */
typedef struct {
    Out values, validity, offsets;
    Py_ssize_t nulls;
} Column;
static Column columns[C_COUNT];

/* The optional (tunnel) columns of the block being encoded. They are set up only at the
 * first row that went through a tunnel (a block without one never touches them), with
 * every row before it nil; from then on each tunnelled row is written as it comes and
 * the rows between are filled in as nil when the next one comes, or at the end. */
static struct {
    int active;             /* set up for this block */
    Py_ssize_t filled;      /* rows 0..filled-1 are in them */
    Py_ssize_t tunnelled;   /* rows written (the rest are nil) */
} tunnel_columns;

static inline void put_le(uint8_t *p, uint64_t v, int n) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    /* v's low n bytes are already in order: one store once inlined with a constant n
     * (the byte loop below was 40 % of encode_columns' time) */
    memcpy(p, &v, (size_t)n);
#else
    for (int i = 0; i < n; i++) p[i] = (uint8_t)(v >> (8 * i));
#endif
}
static inline void set_bit(Out *bitmap, Py_ssize_t i) { bitmap->buf[i >> 3] |= (uint8_t)(1u << (i & 7)); }

/* Row i's value of a fixed-width column; nil (value NIL, nullable columns) stores 0 and
 * leaves the validity bit clear. */
static inline void col_fixed(Column *c, int width, Py_ssize_t i, long long value) {
    if (value == NIL) { memset(c->values.buf + (size_t)i * width, 0, (size_t)width); c->nulls++; }
    else { put_le(c->values.buf + (size_t)i * width, (uint64_t)value, width); set_bit(&c->validity, i); }
}
static inline int col_bytes(Column *c, Py_ssize_t i, const uint8_t *p, Py_ssize_t n) {
    /* a variable-length value (binary): its bytes, then its end offset; p NULL is nil */
    if (p == NULL) c->nulls++;
    else {
        if (out_reserve(&c->values, (size_t)n) < 0) return -1;
        uint8_t *to = c->values.buf + c->values.len;
        /* addresses: constant sizes, so no call to memcpy for 4 or 16 bytes */
        if (n == 4) memcpy(to, p, 4);
        else if (n == 16) memcpy(to, p, 16);
        else memcpy(to, p, (size_t)n);
        c->values.len += (size_t)n;
        set_bit(&c->validity, i);
    }
    put_le(c->offsets.buf + 4 * ((size_t)i + 1), c->values.len, 4);
    return 0;
}
static inline void col_mac(Column *c, Py_ssize_t i, const uint8_t *mac) {
    if (mac) { memcpy(c->values.buf + 6 * (size_t)i, mac, 6); set_bit(&c->validity, i); }
    else { memset(c->values.buf + 6 * (size_t)i, 0, 6); c->nulls++; }
}

/* Size column k's buffers for up to n rows: fixed values, zeroed bitmaps, offsets
 * starting at 0. */
static int column_reset(int k, Py_ssize_t n) {
    size_t bitmap_len = ((size_t)n + 7) / 8;
    const ColumnSpec *spec = &COLUMNS[k];
    Column *c = &columns[k];
    c->values.len = c->validity.len = c->offsets.len = 0;
    c->nulls = 0;
    size_t values = spec->layout == L_BOOL ? bitmap_len
                  : spec->layout == L_BINARY || spec->layout == L_LIST
                    ? (size_t)n * 16 : (size_t)n * (size_t)spec->width;
    if (out_reserve(&c->values, values + 1) < 0) return -1;
    if (spec->layout == L_BOOL) memset(c->values.buf, 0, bitmap_len);
    if (out_reserve(&c->validity, bitmap_len + 1) < 0) return -1;
    memset(c->validity.buf, 0, bitmap_len);
    if (out_reserve(&c->offsets, 4 * ((size_t)n + 1)) < 0) return -1;
    put_le(c->offsets.buf, 0, 4);
    return 0;
}

/* Every column a block always has (the optional ones wait for a tunnelled row). */
static int columns_reset(Py_ssize_t n, int ncols) {
    for (int k = 0; k < ncols; k++)
        if (!OPTIONAL_COLUMN(k) && column_reset(k, n) < 0) return -1;
    tunnel_columns.active = 0;
    tunnel_columns.filled = tunnel_columns.tunnelled = 0;
    return 0;
}

/* Rows tunnel_columns.filled..upto-1 of the optional columns as nil: an end offset
 * for the binary ones (the others were zeroed, validity bits clear, when set up). */
static void tunnel_columns_fill(Py_ssize_t upto) {
    for (int k = C_INNER_SRC; k <= C_INNER_DST; k++) {
        Column *c = &columns[k];
        for (Py_ssize_t j = tunnel_columns.filled; j < upto; j++)
            put_le(c->offsets.buf + 4 * ((size_t)j + 1), c->values.len, 4);
    }
    tunnel_columns.filled = upto;
}

/* Row i, which went through a tunnel, into the optional columns (of up to n rows). */
static __attribute__((noinline)) int tunnel_columns_add(const Row *r, Py_ssize_t i,
                                                        Py_ssize_t n) {
    Column *c = columns;
    if (!tunnel_columns.active) {  /* the block's first: set them up, rows 0..i-1 nil */
        for (int k = C_TUNNEL; k < C_PAYLOAD; k++) {
            if (column_reset(k, n) < 0) return -1;
            if (COLUMNS[k].layout != L_BINARY)
                memset(c[k].values.buf, 0, (size_t)n * (size_t)COLUMNS[k].width);
        }
        tunnel_columns.active = 1;
    }
    tunnel_columns_fill(i);
    c[C_TUNNEL].values.buf[i] = (uint8_t)(r->tunnel - 1);
    set_bit(&c[C_TUNNEL].validity, i);
    col_fixed(&c[C_TUNNEL_ID], 4, i, r->tunnel_id);
    col_mac(&c[C_INNER_ETH_DST], i, r->inner.eth_dst);
    col_mac(&c[C_INNER_ETH_SRC], i, r->inner.eth_src);
    if (col_bytes(&c[C_INNER_SRC], i, r->inner.src, r->inner.addr_len) < 0) return -1;
    if (col_bytes(&c[C_INNER_DST], i, r->inner.dst, r->inner.addr_len) < 0) return -1;
    col_fixed(&c[C_INNER_PROTO], 1, i, r->inner.proto);
    col_fixed(&c[C_INNER_SPORT], 2, i, r->inner.sport);
    col_fixed(&c[C_INNER_DPORT], 2, i, r->inner.dport);
    col_fixed(&c[C_INNER_TCP_FLAGS], 2, i, r->inner.tcp_flags);
    tunnel_columns.filled = i + 1;
    tunnel_columns.tunnelled++;
    return 0;
}

/* The optional columns of an n-row block made whole: the rows after the last tunnelled
 * one nil, and every row that went through no tunnel counted as a null. */
static void tunnel_columns_finish(Py_ssize_t n) {
    if (!tunnel_columns.active) return;
    tunnel_columns_fill(n);
    for (int k = C_TUNNEL; k < C_PAYLOAD; k++) columns[k].nulls += n - tunnel_columns.tunnelled;
}

/* Whether column k is in the batch of n rows: an optional one only when some row has a
 * value in it (after tunnel_columns_finish). */
static inline int column_present(int k, Py_ssize_t n) {
    return !OPTIONAL_COLUMN(k) || (tunnel_columns.active && columns[k].nulls < n);
}

/* Row i into the columns (of up to n rows). */
static int columns_add(const Row *r, Py_ssize_t i, Py_ssize_t n, const uint8_t *block,
                       Py_ssize_t payload_bytes) {
    Column *c = columns;
    put_le(c[C_TS_NS].values.buf + 8 * (size_t)i, r->ts_ns, 8);
    c[C_TS_SRC].values.buf[i] = (uint8_t)r->ts_src;
    put_le(c[C_LEN].values.buf + 4 * (size_t)i, r->len > LEN_MAX ? LEN_MAX : r->len, 4);
    put_le(c[C_CAPLEN].values.buf + 4 * (size_t)i, r->caplen > LEN_MAX ? LEN_MAX : r->caplen, 4);
    put_le(c[C_IFINDEX].values.buf + 4 * (size_t)i, (uint64_t)(uint32_t)r->ifindex, 4);
    put_le(c[C_RXHASH].values.buf + 4 * (size_t)i, r->rxhash, 4);
    c[C_PKTTYPE].values.buf[i] = r->pkttype;
    const uint8_t *macs[2] = {r->eth_dst, r->eth_src};
    for (int k = 0; k < 2; k++) col_mac(&c[C_ETH_DST + k], i, macs[k]);
    col_fixed(&c[C_ETHERTYPE], 2, i, r->ethertype);
    /* vlan: the ring header's tag first, then the frame's, outermost first */
    Column *vlan = &c[C_VLAN];
    Py_ssize_t tags = r->n_vlan_tags + (r->meta_vlan != NIL);
    if (out_reserve(&vlan->values, 2 * (size_t)tags) < 0) return -1;
    if (r->meta_vlan != NIL) { put_le(vlan->values.buf + vlan->values.len, (uint64_t)r->meta_vlan, 2); vlan->values.len += 2; }
    for (Py_ssize_t t = 0; t < r->n_vlan_tags; t++) {
        put_le(vlan->values.buf + vlan->values.len,
               be16(r->vlan_tags + VLAN_TAG_LEN * t) & VLAN_ID_MASK, 2);
        vlan->values.len += 2;
    }
    put_le(vlan->offsets.buf + 4 * ((size_t)i + 1), vlan->values.len / 2, 4);
    if (col_bytes(&c[C_SRC], i, r->src, r->addr_len) < 0) return -1;
    if (col_bytes(&c[C_DST], i, r->dst, r->addr_len) < 0) return -1;
    col_fixed(&c[C_PROTO], 1, i, r->proto);
    col_fixed(&c[C_TTL], 1, i, r->ttl);
    col_fixed(&c[C_SPORT], 2, i, r->sport);
    col_fixed(&c[C_DPORT], 2, i, r->dport);
    col_fixed(&c[C_TCP_FLAGS], 2, i, r->tcp_flags);
    col_fixed(&c[C_ICMP_TYPE], 1, i, r->icmp_type);
    col_fixed(&c[C_ICMP_CODE], 1, i, r->icmp_code);
    if (r->frag) set_bit(&c[C_FRAG].values, i);
    col_fixed(&c[C_ERR], 1, i, r->err >= 0 ? r->err : NIL);
    if (r->tunnel && tunnel_columns_add(r, i, n) < 0) return -1;
    if (payload_bytes) {
        const uint8_t *p = r->payload_start >= 0 ? block + r->payload_start : NULL;
        if (col_bytes(&c[C_PAYLOAD], i, p, payload_length(r, payload_bytes)) < 0) return -1;
    }
    return 0;
}

/* Column k's values buffer of an n-row batch, in bytes. */
static size_t column_values_len(int k, Py_ssize_t n) {
    const ColumnSpec *spec = &COLUMNS[k];
    if (spec->layout == L_BOOL) return ((size_t)n + 7) / 8;
    if (spec->layout == L_BINARY || spec->layout == L_LIST) return columns[k].values.len;
    return (size_t)n * (size_t)spec->width;
}

/* What columns_put() reserves for column k: its names, bitmap, offsets and values. */
static size_t column_need(int k, Py_ssize_t n) {
    return 128 + column_values_len(k, n) + ((size_t)n + 7) / 8 + 4 * ((size_t)n + 1);
}

/* The most columns_put() writes: the sum of what it reserves, so that a buffer of this
 * size never has to grow. */
static size_t columns_bound(Py_ssize_t n, int ncols) {
    size_t total = 8;
    for (int k = 0; k < ncols; k++) {
        if (!column_present(k, n)) continue;
        total += column_need(k, n);
        if (COLUMNS[k].layout == L_DICTIONARY) total += 64 * (size_t)COLUMNS[k].dictionary_len;
    }
    return total;
}

/* The finished columns of n rows as the msgpack map wire.columns_body makes. */
static int columns_put(Out *o, Py_ssize_t n, int ncols) {
    size_t bitmap_len = ((size_t)n + 7) / 8;
    int present = 0;
    for (int k = 0; k < ncols; k++) present += column_present(k, n);
    if (out_reserve(o, 8) < 0) return -1;
    put_map(o, (size_t)present);
    for (int k = 0; k < ncols; k++) {
        if (!column_present(k, n)) continue;
        const ColumnSpec *spec = &COLUMNS[k];
        Column *c = &columns[k];
        size_t values_len = column_values_len(k, n);
        if (out_reserve(o, column_need(k, n)) < 0) return -1;
        put_str(o, spec->name);
        int entries = spec->layout == L_BINARY || spec->layout == L_LIST
                      || spec->layout == L_DICTIONARY ? 4 : 3;
        put_map(o, (size_t)entries);
        put_str(o, "type");
        put_str(o, spec->arrow);
        put_str(o, "validity");
        if (spec->nullable && c->nulls) put_bin(o, c->validity.buf, bitmap_len);
        else put_nil(o);
        if (spec->layout == L_BINARY || spec->layout == L_LIST) {
            put_str(o, "offsets");
            put_bin(o, c->offsets.buf, 4 * ((size_t)n + 1));
        }
        put_str(o, "values");
        put_bin(o, c->values.buf, values_len);
        if (spec->layout == L_DICTIONARY) {
            if (out_reserve(o, 64 * (size_t)spec->dictionary_len) < 0) return -1;
            put_str(o, "dictionary");
            put_array(o, (size_t)spec->dictionary_len);
            for (int d = 0; d < spec->dictionary_len; d++) put_str(o, spec->dictionary[d]);
        }
    }
    return 0;
}

/* Version 2 into `into` at into_offset (NULL: into a bytes object that is returned). */
static PyObject *columns_encode(Py_buffer *into, Py_ssize_t into_offset, PyObject *args) {
    PARSE_ENCODE_ARGS(args);
    const uint8_t *block = view.buf;
    const Py_ssize_t limit = view.len;
    const int ncols = payload_bytes ? C_COUNT : ROW_FIELDS;
    Py_ssize_t max_rows = num_pkts > 0 ? num_pkts : 0;
    Py_ssize_t rows = 0;
    uint64_t wire_bytes = 0;
    Py_ssize_t counts[E_COUNT] = {0};
    PyObject *result = NULL, *body = NULL;

    if (columns_reset(max_rows, ncols) < 0) goto done;
    Py_ssize_t pos = first;
    for (Py_ssize_t i = 0; i < max_rows; i++) {
        Row r;
        long next_offset = read_packet(block, limit, pos, &r);
        if (next_offset < 0) break;
        if (r.err >= 0) counts[r.err]++;
        wire_bytes += r.len;
        if (columns_add(&r, i, max_rows, block, payload_bytes) < 0) goto done;
        rows++;
        if (!next_offset) break;
        pos += next_offset;
    }
    tunnel_columns_finish(rows);
    /* Written straight into the caller's buffer when the most it can take fits there,
     * else into a bytes object sized for that most and then cut to what it took (and
     * copied into the caller's buffer, if any). */
    const size_t bound = (size_t)prefix.len + 64 + columns_bound(rows, ncols);
    const size_t room = into ? (size_t)(into->len - into_offset) : 0;
    uint8_t *direct = into && bound <= room ? (uint8_t *)into->buf + into_offset : NULL;
    if (direct == NULL) {
        body = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)bound);
        if (body == NULL) goto done;
    }
    Out o = {direct ? direct : (uint8_t *)PyBytes_AS_STRING(body), 0, bound, 1}, *out = &o;
    memcpy(out->buf, prefix.buf, (size_t)prefix.len);
    out->len = (size_t)prefix.len;
    put_str(out, "seq");
    put_uint(out, seq);
    put_str(out, "n");
    put_uint(out, (uint64_t)rows);
    put_str(out, "columns");
    if (columns_put(out, rows, ncols) < 0) goto done;
    if (into != NULL && out->len > room) {  /* checked before errors counts anything */
        PyErr_Format(PyExc_ValueError, "a batch of %zu bytes outgrows its buffer of %zu",
                     out->len, room);
        goto done;
    }
    if (add_error_counts(errors, counts) < 0) goto done;
    if (into != NULL) {
        if (direct == NULL) memcpy((uint8_t *)into->buf + into_offset, out->buf, out->len);
        result = Py_BuildValue("(nnK)", (Py_ssize_t)out->len, rows,
                               (unsigned long long)wire_bytes);
        goto done;
    }
    if (_PyBytes_Resize(&body, (Py_ssize_t)out->len) < 0) goto done;  /* frees body on error */
    result = Py_BuildValue("(NnK)", body, rows, (unsigned long long)wire_bytes);
    body = NULL;  /* the tuple has it (or, on failure, Py_BuildValue released it) */
done:
    Py_XDECREF(body);
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&view);
    return result;
}

static PyObject *encode_columns(PyObject *self, PyObject *args) {
    return columns_encode(NULL, 0, args);
}

static PyObject *encode_columns_into(PyObject *self, PyObject *args) {
    Py_buffer into;
    Py_ssize_t offset;
    if (PyTuple_GET_SIZE(args) < 2) {
        PyErr_SetString(PyExc_TypeError, "encode_columns_into(buffer, offset, block, ...)");
        return NULL;
    }
    if (PyObject_GetBuffer(PyTuple_GET_ITEM(args, 0), &into, PyBUF_WRITABLE) < 0) return NULL;
    offset = PyNumber_AsSsize_t(PyTuple_GET_ITEM(args, 1), PyExc_OverflowError);
    PyObject *result = NULL, *rest = NULL;
    if (offset == -1 && PyErr_Occurred()) goto done;
    if (offset < 0 || offset > into.len) {
        PyErr_SetString(PyExc_ValueError, "offset out of the buffer");
        goto done;
    }
    rest = PyTuple_GetSlice(args, 2, PyTuple_GET_SIZE(args));
    if (rest != NULL) result = columns_encode(&into, offset, rest);
done:
    Py_XDECREF(rest);
    PyBuffer_Release(&into);
    return result;
}

/* --- reading a batch without copying it (subscribers) ------------------------------ */

/* msgpack -> Python objects, as msgpack.unpackb(raw=False) gives them, except that a bin
 * of UNPACK_VIEW_MIN bytes or more becomes a memoryview of the message instead of a copy:
 * a version 2 batch's columns are then wrapped by numpy and pyarrow where ZeroMQ
 * received them. Input comes from the
 * network, so every length is checked against the buffer and nesting is bounded. */

#define UNPACK_MAX_DEPTH 32

typedef struct {
    const uint8_t *p;
    Py_ssize_t len, pos;
    PyObject *view;  /* a memoryview of the whole message; bins are slices of it */
} Reader;

static PyObject *unpack_error(const char *what, Py_ssize_t pos) {
    PyErr_Format(PyExc_ValueError, "not a msgpack batch: %s at byte %zd", what, pos);
    return NULL;
}

static int need(Reader *r, Py_ssize_t n) {
    if (n < 0 || r->len - r->pos < n) { unpack_error("truncated", r->pos); return -1; }
    return 0;
}

static uint64_t take_be(Reader *r, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = v << 8 | r->p[r->pos + i];
    r->pos += n;
    return v;
}

static PyObject *unpack_value(Reader *r, int depth, int as_key);

static PyObject *unpack_container(Reader *r, Py_ssize_t n, int is_map, int depth) {
    if (depth >= UNPACK_MAX_DEPTH) return unpack_error("nested too deep", r->pos);
    /* each entry takes at least one byte: a count beyond the message is a lie */
    if (n > r->len - r->pos) return unpack_error("count beyond the message", r->pos);
    if (!is_map) {
        PyObject *list = PyList_New(n);
        if (list == NULL) return NULL;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *item = unpack_value(r, depth + 1, 0);
            if (item == NULL) { Py_DECREF(list); return NULL; }
            PyList_SET_ITEM(list, i, item);
        }
        return list;
    }
    PyObject *dict = PyDict_New();
    if (dict == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t at = r->pos;
        PyObject *key = unpack_value(r, depth + 1, 1);
        if (key == NULL) { Py_DECREF(dict); return NULL; }
        if (PyList_Check(key) || PyDict_Check(key)) {  /* unhashable: never in a batch */
            Py_DECREF(key); Py_DECREF(dict);
            return unpack_error("a map key that is a container", at);
        }
        PyObject *value = unpack_value(r, depth + 1, 0);
        if (value == NULL || PyDict_SetItem(dict, key, value) < 0) {
            Py_DECREF(key); Py_XDECREF(value); Py_DECREF(dict);
            return NULL;
        }
        Py_DECREF(key);
        Py_DECREF(value);
    }
    return dict;
}

/* Shorter bins are copied: a memoryview costs more to make than such a copy, and a
 * version 1 batch holds several small bins per packet. Columns are longer. */
#define UNPACK_VIEW_MIN 512

static PyObject *unpack_bytes(Reader *r, Py_ssize_t n, int is_str, int as_key) {
    if (need(r, n) < 0) return NULL;
    const char *start = (const char *)r->p + r->pos;
    Py_ssize_t at = r->pos;
    r->pos += n;
    if (is_str) return PyUnicode_DecodeUTF8(start, n, "strict");
    if (as_key || n < UNPACK_VIEW_MIN) return PyBytes_FromStringAndSize(start, n);
    return PySequence_GetSlice(r->view, at, at + n);
}

static PyObject *unpack_value(Reader *r, int depth, int as_key) {
    if (need(r, 1) < 0) return NULL;
    uint8_t b = r->p[r->pos++];
    if (b <= 0x7F) return PyLong_FromLong(b);
    if (b >= 0xE0) return PyLong_FromLong((int8_t)b);
    if ((b & 0xF0) == 0x80) return unpack_container(r, b & 0x0F, 1, depth);
    if ((b & 0xF0) == 0x90) return unpack_container(r, b & 0x0F, 0, depth);
    if ((b & 0xE0) == 0xA0) return unpack_bytes(r, b & 0x1F, 1, as_key);
    switch (b) {
    case 0xC0: Py_RETURN_NONE;
    case 0xC2: Py_RETURN_FALSE;
    case 0xC3: Py_RETURN_TRUE;
    case 0xC4: case 0xC5: case 0xC6: {
        int w = b == 0xC4 ? 1 : b == 0xC5 ? 2 : 4;
        if (need(r, w) < 0) return NULL;
        return unpack_bytes(r, (Py_ssize_t)take_be(r, w), 0, as_key);
    }
    case 0xD9: case 0xDA: case 0xDB: {
        int w = b == 0xD9 ? 1 : b == 0xDA ? 2 : 4;
        if (need(r, w) < 0) return NULL;
        return unpack_bytes(r, (Py_ssize_t)take_be(r, w), 1, as_key);
    }
    case 0xCC: case 0xCD: case 0xCE: case 0xCF: {
        int w = 1 << (b - 0xCC);
        if (need(r, w) < 0) return NULL;
        return PyLong_FromUnsignedLongLong(take_be(r, w));
    }
    case 0xD0: case 0xD1: case 0xD2: case 0xD3: {
        int w = 1 << (b - 0xD0);
        if (need(r, w) < 0) return NULL;
        uint64_t v = take_be(r, w);
        int64_t sv = w == 1 ? (int8_t)v : w == 2 ? (int16_t)v : w == 4 ? (int32_t)v
                   : (int64_t)v;
        return PyLong_FromLongLong(sv);
    }
    case 0xCA: case 0xCB: {
        int w = b == 0xCA ? 4 : 8;
        if (need(r, w) < 0) return NULL;
        uint64_t v = take_be(r, w);
        if (w == 4) { uint32_t u = (uint32_t)v; float f; memcpy(&f, &u, 4); return PyFloat_FromDouble(f); }
        double d; memcpy(&d, &v, 8); return PyFloat_FromDouble(d);
    }
    case 0xDC: case 0xDD: case 0xDE: case 0xDF: {
        int w = (b == 0xDC || b == 0xDE) ? 2 : 4;
        if (need(r, w) < 0) return NULL;
        return unpack_container(r, (Py_ssize_t)take_be(r, w), b >= 0xDE, depth);
    }
    default:
        return unpack_error("a type a batch never holds", r->pos - 1);
    }
}

static PyObject *unpack(PyObject *self, PyObject *arg) {
    Py_buffer buf;
    if (PyObject_GetBuffer(arg, &buf, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *view = PyMemoryView_FromObject(arg);
    PyObject *result = NULL;
    if (view != NULL) {
        Reader r = {buf.buf, buf.len, 0, view};
        result = unpack_value(&r, 0, 0);
        if (result != NULL && r.pos != r.len) {
            Py_DECREF(result);
            result = unpack_error("extra bytes after the message", r.pos);
        }
        Py_DECREF(view);
    }
    PyBuffer_Release(&buf);
    return result;
}

/* --- a version 2 batch as Arrow, in one call (the Arrow C data interface) ----------- */

/* Batch.to_arrow(): the received columns handed to pyarrow as one struct array through
 * the Arrow C data interface and its PyCapsule protocol, pointing at the buffers where
 * they were received; the exported structs keep the batch's column dict alive until
 * Arrow releases them. Cheaper than a pyarrow.Array.from_buffers per column, and every
 * buffer is checked first: lengths against n, offsets rising and within their data,
 * dictionary codes within the dictionary, since the batch came from the network. */

struct ArrowSchema {
    const char *format, *name, *metadata;
    int64_t flags, n_children;
    struct ArrowSchema **children, *dictionary;
    void (*release)(struct ArrowSchema *);
    void *private_data;
};
struct ArrowArray {
    int64_t length, null_count, offset, n_buffers, n_children;
    const void **buffers;
    struct ArrowArray **children, *dictionary;
    void (*release)(struct ArrowArray *);
    void *private_data;
};
#define ARROW_FLAG_NULLABLE 2

/* Everything an export allocates, freed by the top-level release. */
typedef struct {
    PyObject *owner;          /* the columns dict: it keeps every buffer alive */
    void **blocks;            /* malloc'd blocks to free */
    Py_ssize_t n_blocks, cap_blocks;
} Arena;

static void *arena_alloc(Arena *a, size_t size) {
    if (a->n_blocks == a->cap_blocks) {
        Py_ssize_t cap = a->cap_blocks ? a->cap_blocks * 2 : 64;
        void **grown = realloc(a->blocks, (size_t)cap * sizeof *grown);
        if (grown == NULL) return NULL;
        a->blocks = grown; a->cap_blocks = cap;
    }
    void *p = calloc(1, size ? size : 1);
    if (p != NULL) a->blocks[a->n_blocks++] = p;
    return p;
}

static void arena_free(Arena *a) {
    if (a == NULL) return;
    for (Py_ssize_t i = 0; i < a->n_blocks; i++) free(a->blocks[i]);
    free(a->blocks);
    if (a->owner != NULL) {  /* Arrow may release from any thread */
        PyGILState_STATE g = PyGILState_Ensure();
        Py_DECREF(a->owner);
        PyGILState_Release(g);
    }
    free(a);
}

static void release_child_schema(struct ArrowSchema *s) { s->release = NULL; }
static void release_child_array(struct ArrowArray *a) { a->release = NULL; }
static void release_schema(struct ArrowSchema *s) {
    arena_free(s->private_data);
    s->release = NULL;
}
static void release_array(struct ArrowArray *a) {
    arena_free(a->private_data);
    a->release = NULL;
}

typedef struct {
    const char *wire;   /* the type as the wire names it */
    const char *arrow;  /* its Arrow C format string */
    int width;          /* bytes per value; 0: a bitmap (bool) */
} TypeMap;
static const TypeMap PRIMITIVES[] = {
    {"int8", "c", 1}, {"uint8", "C", 1}, {"int16", "s", 2}, {"uint16", "S", 2},
    {"int32", "i", 4}, {"uint32", "I", 4}, {"int64", "l", 8}, {"uint64", "L", 8},
    {"float32", "f", 4}, {"float64", "g", 8}, {"timestamp[ns, UTC]", "tsn:UTC", 8},
    {"bool", "b", 0},
};

static const TypeMap *primitive(const char *wire) {
    for (size_t i = 0; i < sizeof PRIMITIVES / sizeof *PRIMITIVES; i++)
        if (strcmp(PRIMITIVES[i].wire, wire) == 0) return &PRIMITIVES[i];
    return NULL;
}

/* The column map's keys, made once (PyDict_GetItemString makes a str at each call). */
static PyObject *key_type, *key_validity, *key_values, *key_offsets, *key_dictionary;

/* A column's buffer: NULL and length 0 for nil; -1 with an exception if it is not one. */
static int column_buffer(PyObject *col, PyObject *key, Py_buffer *view) {
    memset(view, 0, sizeof *view);
    PyObject *obj = PyDict_GetItemWithError(col, key);  /* borrowed */
    if (obj == NULL && PyErr_Occurred()) return -1;
    if (obj == NULL || obj == Py_None) return 0;
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0) return -1;
    /* the dict (owned by the arena) keeps obj, and so its memory, alive */
    return 0;
}

static int bad_column(const char *name, const char *why) {
    PyErr_Format(PyExc_ValueError, "column %s: %s", name, why);
    return -1;
}

/* Fill schema and array for one column; 0 done, 1 skipped (a type not known), -1 error. */
static int export_column(Arena *arena, const char *name, PyObject *col, int64_t n,
                         struct ArrowSchema *schema, struct ArrowArray *array) {
    PyObject *type_obj = PyDict_GetItemWithError(col, key_type);
    if (type_obj == NULL || !PyUnicode_Check(type_obj)) return bad_column(name, "no type");
    const char *type = PyUnicode_AsUTF8(type_obj);
    if (type == NULL) return -1;
    Py_buffer validity, values, offsets;
    int rc = -1;
    if (column_buffer(col, key_validity, &validity) < 0) return -1;
    if (column_buffer(col, key_values, &values) < 0) { PyBuffer_Release(&validity); return -1; }
    if (column_buffer(col, key_offsets, &offsets) < 0) {
        PyBuffer_Release(&validity); PyBuffer_Release(&values); return -1;
    }
    size_t bitmap_len = ((size_t)n + 7) / 8;
    const void **buffers = arena_alloc(arena, 3 * sizeof *buffers);
    char *name_copy = arena_alloc(arena, strlen(name) + 1);
    if (buffers == NULL || name_copy == NULL) { PyErr_NoMemory(); goto done; }
    strcpy(name_copy, name);
    if (validity.buf != NULL && (size_t)validity.len < bitmap_len) {
        bad_column(name, "validity shorter than n bits"); goto done;
    }
    schema->name = name_copy;
    schema->flags = ARROW_FLAG_NULLABLE;
    schema->release = release_child_schema;
    array->length = n;
    array->null_count = validity.buf != NULL ? -1 : 0;
    array->release = release_child_array;
    array->buffers = buffers;
    buffers[0] = validity.buf;
    const TypeMap *prim = primitive(type);
    if (prim != NULL) {
        size_t need = prim->width ? (size_t)n * (size_t)prim->width : bitmap_len;
        if ((size_t)values.len < need) { bad_column(name, "values shorter than n"); goto done; }
        schema->format = prim->arrow;
        array->n_buffers = 2;
        buffers[1] = values.buf;
        rc = 0;
    } else if (strncmp(type, "fixed_size_binary[", 18) == 0) {
        long width = strtol(type + 18, NULL, 10);
        if (width <= 0 || width > 1 << 20) { bad_column(name, "bad width"); goto done; }
        if ((size_t)values.len < (size_t)n * (size_t)width) {
            bad_column(name, "values shorter than n"); goto done;
        }
        char *format = arena_alloc(arena, 24);
        if (format == NULL) { PyErr_NoMemory(); goto done; }
        snprintf(format, 24, "w:%ld", width);
        schema->format = format;
        array->n_buffers = 2;
        buffers[1] = values.buf;
        rc = 0;
    } else if (strcmp(type, "binary") == 0 || strncmp(type, "list<", 5) == 0) {
        int is_list = type[0] == 'l';
        const TypeMap *item = NULL;
        if (is_list) {
            char inner[32];
            size_t len = strlen(type);
            if (len < 7 || len - 6 >= sizeof inner || type[len - 1] != '>') {
                rc = 1; goto done;
            }
            memcpy(inner, type + 5, len - 6);
            inner[len - 6] = 0;
            item = primitive(inner);
            if (item == NULL || item->width == 0) { rc = 1; goto done; }
        }
        if ((size_t)offsets.len < 4 * ((size_t)n + 1)) {
            bad_column(name, "offsets shorter than n + 1"); goto done;
        }
        int32_t prev = 0, first;
        memcpy(&first, offsets.buf, 4);
        if (first != 0) { bad_column(name, "offsets do not start at 0"); goto done; }
        for (int64_t i = 1; i <= n; i++) {
            int32_t end;
            memcpy(&end, (const char *)offsets.buf + 4 * i, 4);
            if (end < prev) { bad_column(name, "offsets go down"); goto done; }
            prev = end;
        }
        size_t width = is_list ? (size_t)item->width : 1;
        if ((size_t)prev * width > (size_t)values.len) {
            bad_column(name, "offsets beyond the values"); goto done;
        }
        if (!is_list) {
            schema->format = "z";
            array->n_buffers = 3;
            buffers[1] = offsets.buf;
            buffers[2] = values.buf;
        } else {
            struct ArrowSchema *child_schema = arena_alloc(arena, sizeof *child_schema);
            struct ArrowArray *child = arena_alloc(arena, sizeof *child);
            struct ArrowSchema **schema_children = arena_alloc(arena, sizeof(void *));
            struct ArrowArray **array_children = arena_alloc(arena, sizeof(void *));
            const void **child_buffers = arena_alloc(arena, 2 * sizeof(void *));
            if (!child_schema || !child || !schema_children || !array_children
                    || !child_buffers) { PyErr_NoMemory(); goto done; }
            child_schema->format = item->arrow;
            child_schema->name = "item";
            child_schema->release = release_child_schema;
            child->length = prev;
            child->n_buffers = 2;
            child->buffers = child_buffers;
            child_buffers[1] = values.buf;
            child->release = release_child_array;
            schema_children[0] = child_schema;
            array_children[0] = child;
            schema->format = "+l";
            schema->n_children = 1;
            schema->children = schema_children;
            array->n_buffers = 2;
            buffers[1] = offsets.buf;
            array->n_children = 1;
            array->children = array_children;
        }
        rc = 0;
    } else if (strcmp(type, "dictionary<int8, utf8>") == 0) {
        PyObject *names = PyDict_GetItemWithError(col, key_dictionary);
        if (names == NULL || !PyList_Check(names)) {
            bad_column(name, "no dictionary"); goto done;
        }
        Py_ssize_t count = PyList_GET_SIZE(names);
        if ((size_t)values.len < (size_t)n) { bad_column(name, "values shorter than n"); goto done; }
        /* every code, a null row's too (the encoder writes 0 there), so that no Arrow
         * kernel can read outside the dictionary whatever it does with nulls */
        int8_t lowest = 0, highest = 0;
        for (int64_t i = 0; i < n; i++) {
            int8_t code = ((const int8_t *)values.buf)[i];
            lowest = code < lowest ? code : lowest;
            highest = code > highest ? code : highest;
        }
        if (n && (lowest < 0 || highest >= count)) {
            bad_column(name, "a code outside the dictionary"); goto done;
        }
        /* the dictionary: a utf8 array of the names */
        size_t total = 0;
        for (Py_ssize_t i = 0; i < count; i++) {
            Py_ssize_t len;
            PyObject *item = PyList_GET_ITEM(names, i);
            if (!PyUnicode_Check(item) || PyUnicode_AsUTF8AndSize(item, &len) == NULL) {
                if (!PyErr_Occurred()) bad_column(name, "a dictionary entry is not text");
                goto done;
            }
            total += (size_t)len;
        }
        int32_t *dict_offsets = arena_alloc(arena, 4 * ((size_t)count + 1));
        char *dict_data = arena_alloc(arena, total);
        struct ArrowSchema *dict_schema = arena_alloc(arena, sizeof *dict_schema);
        struct ArrowArray *dict = arena_alloc(arena, sizeof *dict);
        const void **dict_buffers = arena_alloc(arena, 3 * sizeof(void *));
        if (!dict_offsets || !dict_data || !dict_schema || !dict || !dict_buffers) {
            PyErr_NoMemory(); goto done;
        }
        size_t at = 0;
        for (Py_ssize_t i = 0; i < count; i++) {
            Py_ssize_t len;
            const char *text = PyUnicode_AsUTF8AndSize(PyList_GET_ITEM(names, i), &len);
            dict_offsets[i] = (int32_t)at;
            memcpy(dict_data + at, text, (size_t)len);
            at += (size_t)len;
        }
        dict_offsets[count] = (int32_t)at;
        dict_schema->format = "u";
        dict_schema->name = "";
        dict_schema->release = release_child_schema;
        dict->length = count;
        dict->n_buffers = 3;
        dict->buffers = dict_buffers;
        dict_buffers[1] = dict_offsets;
        dict_buffers[2] = dict_data;
        dict->release = release_child_array;
        schema->format = "c";
        schema->dictionary = dict_schema;
        array->n_buffers = 2;
        buffers[1] = values.buf;
        array->dictionary = dict;
        rc = 0;
    } else {
        rc = 1;  /* a type this library does not know: left out, as subscribers must */
    }
done:
    PyBuffer_Release(&validity);
    PyBuffer_Release(&values);
    PyBuffer_Release(&offsets);
    return rc;
}

static void schema_capsule_free(PyObject *capsule) {
    struct ArrowSchema *s = PyCapsule_GetPointer(capsule, "arrow_schema");
    if (s != NULL && s->release != NULL) s->release(s);
    free(s);
}
static void array_capsule_free(PyObject *capsule) {
    struct ArrowArray *a = PyCapsule_GetPointer(capsule, "arrow_array");
    if (a != NULL && a->release != NULL) a->release(a);
    free(a);
}

static PyObject *arrow_capsules(PyObject *self, PyObject *args) {
    PyObject *columns;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "O!n", &PyDict_Type, &columns, &n)) return NULL;
    if (n < 0) return PyErr_Format(PyExc_ValueError, "negative row count");
    Arena *schema_arena = calloc(1, sizeof *schema_arena);
    Arena *array_arena = calloc(1, sizeof *array_arena);
    struct ArrowSchema *schema = calloc(1, sizeof *schema);
    struct ArrowArray *array = calloc(1, sizeof *array);
    PyObject *result = NULL;
    if (!schema_arena || !array_arena || !schema || !array) { PyErr_NoMemory(); goto fail; }
    /* both halves keep the dict alive: a consumer may release them in either order */
    Py_INCREF(columns); schema_arena->owner = columns;
    Py_INCREF(columns); array_arena->owner = columns;
    Py_ssize_t count = PyDict_GET_SIZE(columns);
    struct ArrowSchema **schema_children = arena_alloc(schema_arena, (size_t)count * sizeof(void *));
    struct ArrowArray **array_children = arena_alloc(array_arena, (size_t)count * sizeof(void *));
    const void **struct_buffers = arena_alloc(array_arena, sizeof(void *));
    if (!schema_children || !array_children || !struct_buffers) { PyErr_NoMemory(); goto fail; }
    Py_ssize_t pos = 0, kept = 0;
    PyObject *key, *col;
    while (PyDict_Next(columns, &pos, &key, &col)) {
        if (!PyUnicode_Check(key) || !PyDict_Check(col)) {
            PyErr_SetString(PyExc_ValueError, "columns: a name or column of the wrong kind");
            goto fail;
        }
        const char *name = PyUnicode_AsUTF8(key);
        struct ArrowSchema *cs = arena_alloc(schema_arena, sizeof *cs);
        struct ArrowArray *ca = arena_alloc(array_arena, sizeof *ca);
        if (name == NULL || cs == NULL || ca == NULL) { if (!PyErr_Occurred()) PyErr_NoMemory(); goto fail; }
        /* the array's allocations live in the array arena, the schema's in the schema's */
        int rc = export_column(array_arena, name, col, n, cs, ca);
        if (rc < 0) goto fail;
        if (rc > 0) continue;
        /* copy what the schema needs into its own arena (the two are released apart) */
        char *name_copy = arena_alloc(schema_arena, strlen(name) + 1);
        if (name_copy == NULL) { PyErr_NoMemory(); goto fail; }
        strcpy(name_copy, name);
        cs->name = name_copy;
        if (cs->format[0] == 'w') {
            char *format = arena_alloc(schema_arena, strlen(cs->format) + 1);
            if (format == NULL) { PyErr_NoMemory(); goto fail; }
            strcpy(format, cs->format);
            cs->format = format;
        }
        if (cs->n_children) {  /* a list's item schema */
            struct ArrowSchema **kids = arena_alloc(schema_arena, sizeof(void *));
            struct ArrowSchema *item = arena_alloc(schema_arena, sizeof *item);
            if (kids == NULL || item == NULL) { PyErr_NoMemory(); goto fail; }
            *item = *cs->children[0];
            kids[0] = item;
            cs->children = kids;
        }
        if (cs->dictionary != NULL) {
            struct ArrowSchema *dict = arena_alloc(schema_arena, sizeof *dict);
            if (dict == NULL) { PyErr_NoMemory(); goto fail; }
            *dict = *cs->dictionary;
            cs->dictionary = dict;
        }
        schema_children[kept] = cs;
        array_children[kept] = ca;
        kept++;
    }
    schema->format = "+s";
    schema->name = "";
    schema->n_children = kept;
    schema->children = schema_children;
    schema->release = release_schema;
    schema->private_data = schema_arena;
    array->length = n;
    array->n_buffers = 1;
    array->buffers = struct_buffers;
    array->n_children = kept;
    array->children = array_children;
    array->release = release_array;
    array->private_data = array_arena;
    schema_arena = array_arena = NULL;  /* owned by the structs from here on */
    PyObject *s_cap = PyCapsule_New(schema, "arrow_schema", schema_capsule_free);
    if (s_cap == NULL) { schema->release(schema); free(schema); schema = NULL; goto fail; }
    schema = NULL;
    PyObject *a_cap = PyCapsule_New(array, "arrow_array", array_capsule_free);
    if (a_cap == NULL) { Py_DECREF(s_cap); array->release(array); free(array); array = NULL; goto fail; }
    array = NULL;
    result = PyTuple_Pack(2, s_cap, a_cap);
    Py_DECREF(s_cap);
    Py_DECREF(a_cap);
    return result;
fail:
    if (schema != NULL && schema->release != NULL) schema->release(schema);
    else arena_free(schema_arena);
    if (array != NULL && array->release != NULL) array->release(array);
    else arena_free(array_arena);
    free(schema);
    free(array);
    return NULL;
}

/* ---- the shared-memory outbox's two counters (fanoutd/outbox.py) -------------------- */

/* A counter word at `offset` of a shared mapping: 8-byte aligned, in bounds. */
static uint64_t *counter_word(Py_buffer *view, Py_ssize_t offset) {
    if (offset < 0 || offset % 8 || offset + 8 > view->len) {
        PyErr_SetString(PyExc_ValueError, "counter offset out of bounds or unaligned");
        return NULL;
    }
    return (uint64_t *)((char *)view->buf + offset);
}

/* load_acquire(buffer, offset) -> int: what the other side published with store_release,
   and everything it wrote before it. */
static PyObject *load_acquire(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t offset;
    if (!PyArg_ParseTuple(args, "y*n", &view, &offset)) return NULL;
    uint64_t *word = counter_word(&view, offset);
    uint64_t value = word ? __atomic_load_n(word, __ATOMIC_ACQUIRE) : 0;
    PyBuffer_Release(&view);
    return word ? PyLong_FromUnsignedLongLong(value) : NULL;
}

/* store_release(buffer, offset, value): publish value after everything written before. */
static PyObject *store_release(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t offset;
    unsigned long long value;
    if (!PyArg_ParseTuple(args, "w*nK", &view, &offset, &value)) return NULL;
    uint64_t *word = counter_word(&view, offset);
    if (word) __atomic_store_n(word, (uint64_t)value, __ATOMIC_RELEASE);
    PyBuffer_Release(&view);
    if (!word) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"load_acquire", load_acquire, METH_VARARGS,
     "load_acquire(buffer, offset) -> int\n\n"
     "The 64-bit counter at offset (8-aligned) of a shared mapping, loaded with acquire "
     "ordering: what was written before its store_release is visible after it."},
    {"store_release", store_release, METH_VARARGS,
     "store_release(buffer, offset, value)\n\n"
     "Store the 64-bit counter at offset (8-aligned) of a writable shared mapping with "
     "release ordering: everything written before it is visible to a load_acquire that "
     "sees it."},
    {"encode_batch", encode_batch, METH_VARARGS,
     "encode_batch(block, first_offset, num_pkts, payload_bytes, errors, prefix, seq, "
     "tunnel_depth=1) -> (batch, rows, wire bytes)\n\n"
     "The version 1 batch encoder.encode_rows_py makes of a ring block (decode.decode_block, "
     "then wire.rows_body), in one pass: prefix (wire.batch_prefix), seq, then the rows. "
     "errors (reason -> count) is incremented as decode_block does. tunnel_depth: how many "
     "nested tunnels to decode through, 0 to decode.MAX_TUNNEL_DEPTH (else ValueError)."},
    {"encode_columns", encode_columns, METH_VARARGS,
     "encode_columns(block, first_offset, num_pkts, payload_bytes, errors, prefix, seq, "
     "tunnel_depth=1) -> (batch, rows, wire bytes)\n\n"
     "The version 2 batch encoder.encode_columns_py makes of a ring block "
     "(decode.decode_block, then wire.columns_body): prefix, seq, n, then the columns, "
     "less the optional (tunnel) ones nil in every row."},
    {"encode_columns_into", encode_columns_into, METH_VARARGS,
     "encode_columns_into(buffer, offset, block, first_offset, num_pkts, payload_bytes, "
     "errors, prefix, seq, tunnel_depth=1) -> (length, rows, wire bytes)\n\n"
     "encode_columns, with the batch written into the writable buffer at offset instead "
     "of returned: its first length bytes from there. ValueError when it does not fit."},
    {"arrow_capsules", arrow_capsules, METH_VARARGS,
     "arrow_capsules(columns, n) -> (schema capsule, array capsule)\n\n"
     "A version 2 batch's columns (as unpacked) as an Arrow struct array through the C data "
     "interface, over the same buffers; columns of unknown types are left out. ValueError "
     "when a buffer does not fit n rows."},
    {"unpack", unpack, METH_O,
     "unpack(buffer) -> object\n\n"
     "msgpack.unpackb(buffer, raw=False), except that each bin is a memoryview of buffer "
     "(no copy). ValueError on anything malformed."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "fanoutd._fastpath",
    "Ring blocks to batches in C (fanoutd/decode.py and wire.py are the reference), and "
    "batches unpacked without a copy.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastpath(void) {
    if (!(key_type = PyUnicode_InternFromString("type"))
            || !(key_validity = PyUnicode_InternFromString("validity"))
            || !(key_values = PyUnicode_InternFromString("values"))
            || !(key_offsets = PyUnicode_InternFromString("offsets"))
            || !(key_dictionary = PyUnicode_InternFromString("dictionary")))
        return NULL;
    for (int e = 0; e < E_COUNT; e++) {
        reason_names[e] = PyUnicode_InternFromString(REASONS[e]);
        if (reason_names[e] == NULL) return NULL;
    }
    return PyModule_Create(&module);
}
