"""Every injected frame is summarised exactly once, and correctly, in both wire-format
versions (2: columns, the default; 1: rows).

Each frame carries a unique Ethernet source MAC (frames.mac(i)), so a row can be matched
to the frame it summarises even when decoding stopped early (the truncated IPv4 frame).
"""

import time
from dataclasses import dataclass

import frames as F
import netlab
import pytest

pytestmark = pytest.mark.integration

V1_FIELDS = {"ts_ns", "len", "caplen", "ifindex", "rxhash", "pkttype", "eth_dst", "eth_src",
             "ethertype", "vlan", "src", "dst", "proto", "ttl", "sport", "dport", "tcp_flags",
             "icmp_type", "icmp_code", "frag", "err"}
PACKET_BROADCAST, PACKET_OTHERHOST = 1, 3
TCP_FLAG_SETS = (0x002, 0x012, 0x010, 0x018, 0x011, 0x004, 0x0C2, 0x110, 0x029)


@dataclass
class Case:
    """One injected frame and the row fields it must produce."""

    kind: str
    frame: bytes
    expect: dict
    ip: bool  # a well-formed IP frame: the kernel's flow hash must be non-zero


def _ip4(i: int, net: int) -> str:
    return f"10.{net}.{i >> 8 & 0xFF}.{i & 0xFF}"


def _ip6(i: int, net: int) -> str:
    return f"2001:db8:{net:x}::{i:x}"


def _case(kind: str, i: int) -> Case:
    """Build frame number i of kind `kind`, with its expected summary."""
    m = F.mac(i)
    ttl = 1 + i % 250
    s4, d4, s6, d6 = _ip4(i, 1), _ip4(i, 2), _ip6(i, 1), _ip6(i, 2)
    sport = 10000 + i
    base = {"eth_src": m, "eth_dst": F.MAC_B, "pkttype": PACKET_OTHERHOST, "vlan": [],
            "err": None, "frag": False, "ethertype": 0x0800, "ttl": ttl,
            "src": F.ip_bytes(s4), "dst": F.ip_bytes(d4), "tcp_flags": None,
            "icmp_type": None, "icmp_code": None, "sport": None, "dport": None}
    v6 = {"ethertype": 0x86DD, "src": F.ip_bytes(s6), "dst": F.ip_bytes(d6)}

    def c(frame: bytes, ip: bool = True, **exp) -> Case:
        return Case(kind, frame, {**base, **exp}, ip)

    if kind == "udp4":
        return c(F.ipv4_frame(s4, d4, 17, F.udp(sport, 53, b"q" * (i % 7)), m, ttl=ttl),
                 proto=17, sport=sport, dport=53)
    if kind == "tcp4":
        flags = TCP_FLAG_SETS[i % len(TCP_FLAG_SETS)]
        return c(F.ipv4_frame(s4, d4, 6, F.tcp(sport, 443, flags), m, ttl=ttl),
                 proto=6, sport=sport, dport=443, tcp_flags=flags)
    if kind == "icmp4":
        typ, code = ((8, 0), (3, 1), (11, 0))[i % 3]
        return c(F.ipv4_frame(s4, d4, 1, F.icmp(typ, code), m, ttl=ttl),
                 proto=1, icmp_type=typ, icmp_code=code)
    if kind == "udp6":
        return c(F.ipv6_frame(s6, d6, 17, F.udp(sport, 5353), m, hlim=ttl),
                 proto=17, sport=sport, dport=5353, **v6)
    if kind == "icmp6":
        return c(F.ipv6_frame(s6, d6, 58, F.icmp(128, 0), m, hlim=ttl),
                 proto=58, icmp_type=128, icmp_code=0, **v6)
    if kind == "tcp6-ext":  # hop-by-hop -> destination options -> TCP
        payload = F.ipv6_ext(60) + F.ipv6_ext(6, body_len=14) + F.tcp(sport, 22, 0x018)
        return c(F.ipv6_frame(s6, d6, 0, payload, m, hlim=ttl),
                 proto=6, sport=sport, dport=22, tcp_flags=0x018, **v6)
    if kind == "udp6-frag0":  # first fragment, more-fragments set: ports are readable
        payload = F.ipv6_frag(17, offset=0, more=True, ident=i) + F.udp(sport, 4790, b"x" * 8)
        return c(F.ipv6_frame(s6, d6, 44, payload, m, hlim=ttl),
                 proto=17, sport=sport, dport=4790, frag=True, **v6)
    if kind == "arp":
        return c(F.arp_frame(1, s4, d4, eth_src=m), ip=False, eth_dst=F.BROADCAST,
                 pkttype=PACKET_BROADCAST, ethertype=0x0806, ttl=None, proto=None)
    if kind == "dot1q":  # the kernel moves this tag into the ring header on receive
        vid = 1 + i % 4094
        return c(F.ipv4_frame(s4, d4, 17, F.udp(sport, 53), m, vlans=((0x8100, vid),),
                              ttl=ttl), proto=17, sport=sport, dport=53, vlan=[vid])
    if kind == "qinq":  # outer 802.1ad tag stripped by the kernel, inner 802.1Q in the frame
        outer, inner = 100 + i % 50, 1 + i % 4000
        return c(F.ipv4_frame(s4, d4, 17, F.udp(sport, 53), m,
                              vlans=((0x88A8, outer), (0x8100, (5 << 13) | inner)), ttl=ttl),
                 proto=17, sport=sport, dport=53, vlan=[outer, inner])
    if kind == "trunc4":  # 12 bytes of IPv4 header: nothing of it can be parsed
        frame = F.ipv4_frame(s4, d4, 17, F.udp(sport, 53), m, ttl=ttl)[:14 + 12]
        return c(frame, ip=False, err="truncated-ipv4", src=None, dst=None, proto=None,
                 ttl=None)
    if kind == "frag4-later":  # a later IPv4 fragment: no transport header to read
        frame = F.ipv4_frame(s4, d4, 17, b"y" * 16, m, ttl=ttl, ident=i, flags_frag=185)
        return c(frame, proto=17, frag=True)
    if kind == "frag4-first":  # first fragment, MF set: ports are read
        frame = F.ipv4_frame(s4, d4, 17, F.udp(sport, 53, b"z" * 24), m, ttl=ttl, ident=i,
                             flags_frag=0x2000)
        return c(frame, proto=17, sport=sport, dport=53, frag=True)
    raise ValueError(kind)


KINDS = ("udp4", "tcp4", "icmp4", "udp6", "icmp6", "tcp6-ext", "udp6-frag0", "arp", "dot1q",
         "qinq", "trunc4", "frag4-later", "frag4-first")


def mixed_cases(n: int = 300) -> list[Case]:
    return [_case(KINDS[i % len(KINDS)], i) for i in range(n)]


def _mismatches(case: Case, row: dict, ifindex: int, now_ns: int) -> list[str]:
    exp = {**case.expect, "len": len(case.frame), "caplen": len(case.frame),
           "ifindex": ifindex}
    bad = [f"{k}: got {row.get(k)!r}, want {v!r}" for k, v in exp.items() if row.get(k) != v]
    if abs(row["ts_ns"] - now_ns) > 5_000_000_000:
        bad.append(f"ts_ns {row['ts_ns']} is not within 5 s of now ({now_ns})")
    if case.ip and not row["rxhash"]:
        bad.append("rxhash is 0 for an IP frame")
    return bad


def check_batches(cap: netlab.Capture, workers: int, version: int) -> None:
    """Batch envelope: version, iface, topic, epoch, all v1 fields, per-worker seq 0..
    with no gaps."""
    seqs: dict[int, list[int]] = {}
    for topic, batch in zip(cap.topics, cap.batches, strict=True):
        assert batch["v"] == version, batch
        assert isinstance(batch["epoch"], int) and batch["epoch"] > 0, batch["epoch"]
        if version == 2:
            assert batch["n"] == len(batch["packets"])
        assert batch["iface"] == "cap0", batch["iface"]
        assert 0 <= batch["worker"] < workers, batch["worker"]
        assert topic == f"pkt.cap0.{batch['worker']}", (topic, batch["worker"])
        missing = V1_FIELDS - set(batch["fields"])
        assert not missing, f"batch lacks fields {sorted(missing)}"
        assert batch["packets"], f"empty batch {batch['worker']}/{batch['seq']}"
        seqs.setdefault(batch["worker"], []).append(batch["seq"])
    for worker, got in seqs.items():
        assert sorted(got) == list(range(len(got))), \
            f"worker {worker} seq values are not 0..{len(got) - 1} without gaps: {got}"
    assert not cap.other, f"unexpected messages: {cap.other[:3]}"


@pytest.mark.parametrize(("workers", "wire_format"), [(1, "columns"), (2, "columns"),
                                                     (2, "rows")])
def test_every_frame_summarised_once_and_correctly(ns, injector, start_daemon, subscribe,
                                                    workers, wire_format):
    cases = mixed_cases(300)
    by_mac = {c.expect["eth_src"]: c for c in cases}
    assert len(by_mac) == len(cases)
    # No defrag (the default flag): lone IPv4 fragments would be held for reassembly.
    daemon = start_daemon(workers=workers, fanout="hash", fanout_flags="none",
                          extra=["--format", wire_format, "--rxhash", "true"])
    sub = subscribe(daemon)

    injector.send_all(c.frame for c in cases)
    cap = sub.collect(netlab.all_keys(set(by_mac), lambda r: r["eth_src"]), timeout=15,
                      detail=daemon.logs)
    now_ns = time.time_ns()

    check_batches(cap, workers, 2 if wire_format == "columns" else 1)
    seen: dict[bytes, int] = {}
    for row in cap.rows:
        seen[row["eth_src"]] = seen.get(row["eth_src"], 0) + 1
    dupes = {k.hex(): n for k, n in seen.items() if n > 1}
    strays = [r for r in cap.rows if r["eth_src"] not in by_mac]
    assert not dupes, f"frames summarised more than once (eth_src: count): {dupes}"
    assert not strays, f"{len(strays)} rows for frames never injected, e.g. {strays[:2]}"

    ifindex = ns.ifindex("cap0")
    problems = []
    for row in cap.rows:
        case = by_mac[row["eth_src"]]
        problems += [f"{case.kind} #{int.from_bytes(row['eth_src'][2:])}: {p}"
                     for p in _mismatches(case, row, ifindex, now_ns)]
    assert not problems, f"{len(problems)} wrong fields:\n" + "\n".join(problems[:40])
    if workers == 2:
        assert {r["worker"] for r in cap.rows} <= {0, 1}
