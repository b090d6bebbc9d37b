/*
 * fanoutd._fastpath: one TPACKET_V3 ring block -> its msgpack batch.
 *
 * A compiled copy of fanoutd/decode.py's decode_block followed by the batch encoding of
 * publish.py (encode_batch_py):
 * same fields, same error reasons, same bytes (tests/test_fastpath.py compares the two on
 * every decoder test frame and on random and mutated ones). decode.py stays the reference
 * and the fallback; this exists because the profile showed the per-packet Python work
 * (walking, unpacking, building a row, msgpack encoding it) costs several times the
 * budget of the whole path, and no Python form of it comes close (docs/performance.md).
 *
 * Every read is bounded by the frame's captured length and by the block: wire input
 * never makes it read outside the buffer it was given.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* --- the reference's constants (decode.py, _linux.py) ------------------------------- */

enum {
    E_TRUNC_ETH, E_TRUNC_VLAN, E_TRUNC_LLC, E_TRUNC_ARP, E_TRUNC_IPV4, E_BAD_IPV4_HDR,
    E_BAD_IPV4_LEN, E_TRUNC_IPV6, E_BAD_IPV6_HDR, E_TRUNC_IPV6_EXT, E_TRUNC_TCP,
    E_BAD_TCP_HDR, E_TRUNC_UDP, E_TRUNC_SCTP, E_TRUNC_DCCP, E_TRUNC_ICMP, E_TRUNC_ICMPV6,
    E_COUNT
};
static const char *const REASONS[E_COUNT] = {
    "truncated-ethernet", "truncated-vlan", "truncated-llc", "truncated-arp",
    "truncated-ipv4", "bad-ipv4-header", "bad-ipv4-length", "truncated-ipv6",
    "bad-ipv6-header", "truncated-ipv6-ext", "truncated-tcp", "bad-tcp-header",
    "truncated-udp", "truncated-sctp", "truncated-dccp", "truncated-icmp",
    "truncated-icmpv6",
};
static PyObject *reason_names[E_COUNT];

#define HDR_SIZE 59               /* struct TPACKET3_HDR in _linux.py */
#define TP_STATUS_VLAN_VALID (1u << 4)
#define TP_STATUS_TS_SOFTWARE (1u << 29)
#define TP_STATUS_TS_RAW_HARDWARE (1u << 31)
#define ROW_FIELDS 22             /* len(decode.FIELDS) */
#define NIL (-1)

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

typedef struct {
    uint64_t ts_ns, len, caplen;
    const char *ts_src;
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
} Row;

static void row_init(Row *r) {
    memset(r, 0, sizeof *r);
    r->ethertype = r->meta_vlan = NIL;
    r->proto = r->ttl = r->sport = r->dport = r->tcp_flags = r->icmp_type = r->icmp_code = NIL;
    r->err = -1;
    r->payload_start = -1;
}

/* The decoder. pos and end are offsets into buf; end never exceeds the frame. Each
 * function returns 1 and sets the payload span, or 0 when decoding stopped before it. */

static int transport(const uint8_t *buf, Py_ssize_t pos, Py_ssize_t end, long proto, Row *r) {
    Py_ssize_t avail = end - pos;
    Py_ssize_t need, header;
    int reason;
    switch (proto) {
    case 6: need = 20; reason = E_TRUNC_TCP; break;
    case 17: case 136: need = 8; reason = E_TRUNC_UDP; break;
    case 132: need = 12; reason = E_TRUNC_SCTP; break;
    case 33: need = 12; reason = E_TRUNC_DCCP; break;
    case 1: case 58:
        if (avail >= 2) { r->icmp_type = buf[pos]; r->icmp_code = buf[pos + 1]; }
        if (avail < 4) { r->err = proto == 1 ? E_TRUNC_ICMP : E_TRUNC_ICMPV6; return 0; }
        if (avail < 8) return 0;
        r->payload_start = pos + 8; r->payload_end = end;
        return 1;
    default:
        r->payload_start = pos; r->payload_end = end;
        return 1;
    }
    if (avail >= 4) { r->sport = be16(buf + pos); r->dport = be16(buf + pos + 2); }
    header = need;
    if (proto == 6 && avail >= 14) {
        uint8_t doff = buf[pos + 12], flags = buf[pos + 13];
        r->tcp_flags = ((long)(doff & 1) << 8) | flags;
        if (doff >> 4 < 5) { r->err = E_BAD_TCP_HDR; return 0; }
        header = (Py_ssize_t)(doff >> 4) * 4;
    } else if (proto == 33 && avail >= 5) {
        Py_ssize_t words = (Py_ssize_t)buf[pos + 4] * 4;
        header = words > need ? words : need;
    }
    if (avail < need) { r->err = reason; return 0; }
    if (avail < header) return 0;
    r->payload_start = pos + header; r->payload_end = end;
    return 1;
}

static int ipv4(const uint8_t *buf, Py_ssize_t pos, Py_ssize_t end, Row *r) {
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
    if (frag_offset) {
        r->payload_start = pos + ihl; r->payload_end = end;
        return 1;
    }
    return transport(buf, pos + ihl, end, r->proto, r);
}

static inline int ipv6_ext_8(long nxt) {
    return nxt == 0 || nxt == 43 || nxt == 60 || nxt == 135 || nxt == 139 || nxt == 140;
}

static int ipv6(const uint8_t *buf, Py_ssize_t pos, Py_ssize_t end, Row *r) {
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
        if (ipv6_ext_8(nxt) || nxt == 51) {
            if (end - pos < 2) { r->err = E_TRUNC_IPV6_EXT; return 0; }
            long following = buf[pos];
            Py_ssize_t hlen = buf[pos + 1];
            hlen = nxt == 51 ? (hlen + 2) * 4 : (hlen + 1) * 8;
            if (end - pos < hlen) { r->err = E_TRUNC_IPV6_EXT; return 0; }
            nxt = following;
            pos += hlen;
        } else if (nxt == 44) {
            if (end - pos < 8) { r->err = E_TRUNC_IPV6_EXT; return 0; }
            long following = buf[pos];
            uint16_t offset_flags = be16(buf + pos + 2);
            if (offset_flags & 0xFFF9) r->frag = 1;
            nxt = following;
            pos += 8;
            if (offset_flags >> 3) {  /* a later fragment: its payload starts mid-datagram */
                r->proto = nxt;
                r->payload_start = pos; r->payload_end = end;
                return 1;
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
    if (htype == 1 && ptype == 0x0800 && hlen == 6 && plen == 4) {
        r->src = buf + pos + 14; r->dst = buf + pos + 24; r->addr_len = 4;
    }
    r->payload_start = pos + size; r->payload_end = end;
    return 1;
}

static void frame(const uint8_t *buf, Py_ssize_t off, Py_ssize_t end, Row *r) {
    if (end - off < 14) {
        if (end - off >= 6) r->eth_dst = buf + off;
        if (end - off >= 12) r->eth_src = buf + off + 6;
        r->err = E_TRUNC_ETH;
        return;
    }
    r->eth_dst = buf + off; r->eth_src = buf + off + 6;
    long ethertype = be16(buf + off + 12);
    Py_ssize_t pos = off + 14;
    r->vlan_tags = buf + pos;
    while (ethertype == 0x8100 || ethertype == 0x88A8 || ethertype == 0x9100) {
        if (end - pos < 4) { r->err = E_TRUNC_VLAN; return; }
        r->n_vlan_tags++;
        ethertype = be16(buf + pos + 2);
        pos += 4;
    }
    if (ethertype <= 1500) {  /* 802.3: an LLC header; SNAP may carry an ethertype */
        if (end - pos < 3) { r->err = E_TRUNC_LLC; return; }
        if (buf[pos] != 0xAA || buf[pos + 1] != 0xAA) {
            r->payload_start = pos + 3; r->payload_end = end;
            return;
        }
        if (end - pos < 8) { r->err = E_TRUNC_LLC; return; }
        const uint8_t *oui = buf + pos + 3;
        ethertype = be16(buf + pos + 6);
        if (!(oui[0] == 0 && oui[1] == 0 && (oui[2] == 0 || oui[2] == 0xF8))) {
            r->payload_start = pos + 8; r->payload_end = end;
            return;
        }
        pos += 8;
    }
    r->ethertype = ethertype;
    if (ethertype == 0x0800) ipv4(buf, pos, end, r);
    else if (ethertype == 0x86DD) ipv6(buf, pos, end, r);
    else if (ethertype == 0x0806) arp(buf, pos, end, r);
    else { r->payload_start = pos; r->payload_end = end; }
}

/* --- msgpack, exactly as msgpack-python packs with use_bin_type=True --------------- */

typedef struct { uint8_t *buf; size_t len, cap; } Out;

static int out_reserve(Out *o, size_t more) {
    if (o->len + more <= o->cap) return 0;
    /* grows by doubling; kept across calls (see scratch) */
    size_t cap = o->cap ? o->cap : 4096;
    while (cap < o->len + more) cap *= 2;
    uint8_t *grown = PyMem_Realloc(o->buf, cap);
    if (grown == NULL) { PyErr_NoMemory(); return -1; }
    o->buf = grown; o->cap = cap;
    return 0;
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

static int put_row(Out *o, const Row *r, const uint8_t *buf, Py_ssize_t payload_bytes) {
    Py_ssize_t n_vlan = r->n_vlan_tags + (r->meta_vlan != NIL);
    Py_ssize_t payload = 0;
    if (payload_bytes && r->payload_start >= 0) {
        payload = r->payload_end - r->payload_start;
        if (payload > payload_bytes) payload = payload_bytes;
        if (payload < 0) payload = 0;
    }
    /* 160 bytes cover every fixed field with its largest encoding */
    if (out_reserve(o, 160 + 3 * (size_t)n_vlan + (size_t)payload + 5) < 0) return -1;
    put_array(o, ROW_FIELDS + (payload_bytes ? 1 : 0));
    put_uint(o, r->ts_ns);
    put_str(o, r->ts_src);
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
        put_uint(o, be16(r->vlan_tags + 4 * i) & 0x0FFF);
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
    if (payload_bytes) {
        if (r->payload_start >= 0) put_bin(o, buf + r->payload_start, (size_t)payload);
        else put_nil(o);
    }
    return 0;
}

/* --- the block walk (decode_block) ------------------------------------------------- */

#define ARRAY_HEADER_MAX 5

/* One output buffer for the life of the process, grown to the largest batch and reused:
 * a fresh allocation per block would mean fresh pages (faults, zeroing) each time.
 * Workers are single-threaded, and the GIL is held throughout. */
static Out scratch;

static PyObject *encode_batch(PyObject *self, PyObject *args) {
    Py_buffer view, prefix;
    Py_ssize_t first, num_pkts, payload_bytes;
    unsigned long long seq;
    PyObject *errors;
    if (!PyArg_ParseTuple(args, "y*nnnO!y*K", &view, &first, &num_pkts, &payload_bytes,
                          &PyDict_Type, &errors, &prefix, &seq))
        return NULL;
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
        if (pos < 0 || pos + HDR_SIZE > limit) break;  /* a corrupt chain */
        const uint8_t *h = block + pos;
        uint32_t next_offset = le32(h), sec = le32(h + 4), nsec = le32(h + 8);
        uint64_t snaplen = le32(h + 12), wire_len = le32(h + 16);
        uint32_t status = le32(h + 20);
        Py_ssize_t mac_off = pos + le16(h + 24);
        Row r;
        row_init(&r);
        r.rxhash = le32(h + 28);
        r.ifindex = (int32_t)le32(h + 52);
        r.pkttype = h[58];
        Py_ssize_t room = limit - mac_off > 0 ? limit - mac_off : 0;
        if (snaplen > (uint64_t)room) snaplen = (uint64_t)room;
        r.ts_ns = (uint64_t)sec * 1000000000u + nsec;
        r.ts_src = status & TP_STATUS_TS_RAW_HARDWARE ? "hardware"
                 : status & TP_STATUS_TS_SOFTWARE ? "software" : "fallback";
        if (status & TP_STATUS_VLAN_VALID) {
            r.meta_vlan = (long)(le32(h + 32) & 0x0FFF);
            r.caplen = snaplen + 4;
            r.len = wire_len + 4;
        } else {
            r.caplen = snaplen;
            r.len = wire_len;
        }
        frame(block, mac_off, mac_off + (Py_ssize_t)snaplen, &r);
        if (r.err >= 0) counts[r.err]++;
        wire_bytes += r.len;
        if (put_row(out, &r, block, payload_bytes) < 0) goto done;
        rows++;
        if (!next_offset) break;
        pos += next_offset;
    }
    /* the array header right against the first row, the head moved up against it */
    uint8_t header[ARRAY_HEADER_MAX];
    Out hdr = {header, 0, sizeof header};
    put_array(&hdr, (size_t)rows);
    const size_t gap = ARRAY_HEADER_MAX - hdr.len;
    memcpy(out->buf + head_len + gap, header, hdr.len);
    memmove(out->buf + gap, out->buf, head_len);

    for (int e = 0; e < E_COUNT; e++) {
        if (!counts[e]) continue;
        PyObject *old = PyDict_GetItemWithError(errors, reason_names[e]);
        if (old == NULL && PyErr_Occurred()) goto done;
        Py_ssize_t base = old ? PyLong_AsSsize_t(old) : 0;
        if (base == -1 && PyErr_Occurred()) goto done;
        PyObject *total = PyLong_FromSsize_t(base + counts[e]);
        if (total == NULL || PyDict_SetItem(errors, reason_names[e], total) < 0) {
            Py_XDECREF(total);
            goto done;
        }
        Py_DECREF(total);
    }
    result = Py_BuildValue("(y#nK)", (const char *)out->buf + gap, (Py_ssize_t)(out->len - gap),
                           rows, (unsigned long long)wire_bytes);
done:
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"encode_batch", encode_batch, METH_VARARGS,
     "encode_batch(block, first_offset, num_pkts, payload_bytes, errors, prefix, seq) -> "
     "(batch, rows, wire bytes)\n\n"
     "The batch publish.encode_batch_py makes of a ring block (decode.decode_block, then "
     "msgpack), in one pass: prefix (publish.batch_prefix), seq, then the rows. errors "
     "(reason -> count) is incremented as decode_block does."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "fanoutd._fastpath",
    "A ring block to msgpack rows in C; fanoutd/decode.py is the reference.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastpath(void) {
    for (int e = 0; e < E_COUNT; e++) {
        reason_names[e] = PyUnicode_InternFromString(REASONS[e]);
        if (reason_names[e] == NULL) return NULL;
    }
    return PyModule_Create(&module);
}
