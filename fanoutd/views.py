"""What a person at a terminal sees: `fanoutd tail` lines and its display filter, and the
`fanoutd stats` table."""

import ipaddress
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from fanoutd.batch import Record, format_ip, format_mac, format_tcp_flags
from fanoutd.wire import TUNNELS

PROTO_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMP6", 132: "SCTP", 33: "DCCP",
               136: "UDPLite", 47: "GRE", 50: "ESP", 51: "AH"}
ETHERTYPE_NAMES = {0x0800: "IPv4", 0x86DD: "IPv6", 0x0806: "ARP", 0x88CC: "LLDP",
                   0x8847: "MPLS", 0x8863: "PPPoE-D", 0x8864: "PPPoE-S"}
# The `tunnel` field's values, as they are usually written.
TUNNEL_NAMES = {"pppoe": "PPPoE", "mpls": "MPLS", "gre": "GRE", "vxlan": "VXLAN",
                "geneve": "Geneve", "ipip": "IPIP"}


def _flow(src: str | None, dst: str | None, sport: int | None, dport: int | None) -> str:
    """source > destination, with the ports when there are (tcpdump's ADDR.PORT for
    IPv6)."""
    if sport is not None:
        sep = "." if ":" in (src or "") else ":"
        src, dst = f"{src}{sep}{sport}", f"{dst}{sep}{dport}"
    return f"{src} > {dst}"


def packet_line(pkt: dict, show_sensor: bool = False) -> str:
    """One packet as a line: time, worker, protocol, source > destination, flags, length;
    with show_sensor, the endpoint it came from first (for several sensors).

    A packet that went through a tunnel shows the tunnel, its id, the inner packet as a
    packet is shown, then `via` the outer addresses (the outer MAC addresses for PPPoE
    and MPLS, which have no outer IP): `VXLAN 5001 TCP 10.0.0.1:443 > 10.0.0.2:51000
    [P.] via 192.0.2.1 > 192.0.2.2`."""
    ts = pkt["ts_ns"]
    when = time.strftime("%H:%M:%S", time.localtime(ts // 1_000_000_000))
    parts = [f"{when}.{ts % 1_000_000_000 // 1000:06d}", f"w{pkt['worker']}"]
    if show_sensor and pkt.get("sensor"):
        parts.insert(0, pkt["sensor"])
    if pkt.get("vlan"):
        parts.append("vlan " + ".".join(str(v) for v in pkt["vlan"]))
    proto, src, dst = pkt.get("proto"), format_ip(pkt.get("src")), format_ip(pkt.get("dst"))
    ethertype = pkt.get("ethertype")
    if pkt.get("tunnel") is not None:
        parts += _tunnel_parts(pkt, src, dst)
    elif proto is not None:
        parts.append(PROTO_NAMES.get(proto, f"proto-{proto}"))
        parts.append(_flow(src, dst, pkt.get("sport"), pkt.get("dport")))
        if pkt.get("tcp_flags") is not None:
            parts.append(f"[{format_tcp_flags(pkt['tcp_flags'])}]")
        if pkt.get("icmp_type") is not None:
            parts.append(f"type {pkt['icmp_type']} code {pkt['icmp_code']}")
        if pkt.get("frag"):
            parts.append("frag")
    elif src is not None:
        parts.append(f"{ETHERTYPE_NAMES.get(ethertype, 'IP')} {src} > {dst}")
    else:
        name = ETHERTYPE_NAMES.get(ethertype) if ethertype is not None else "802.3"
        parts.append(name or f"ethertype 0x{ethertype:04x}")
        parts.append(f"{format_mac(pkt.get('eth_src'))} > {format_mac(pkt.get('eth_dst'))}")
    parts.append(f"len {pkt['len']}")
    if pkt.get("err"):
        parts.append(f"[{pkt['err']}]")
    return " ".join(parts)


def _tunnel_parts(pkt: dict, outer_src: str | None, outer_dst: str | None) -> list[str]:
    """A tunnelled packet: the tunnel and its id, what of the inner packet was decoded
    (its protocol, addresses and ports, TCP flags; or its MAC addresses; or nothing when
    the tunnel header was cut short), and `via` the outer packet."""
    tunnel = pkt["tunnel"]
    parts = [TUNNEL_NAMES.get(tunnel, tunnel.upper())]
    if pkt.get("tunnel_id") is not None:
        parts.append(str(pkt["tunnel_id"]))
    proto = pkt.get("inner_proto")
    src, dst = format_ip(pkt.get("inner_src")), format_ip(pkt.get("inner_dst"))
    if proto is not None:
        parts.append(PROTO_NAMES.get(proto, f"proto-{proto}"))
    if src is not None or dst is not None:
        parts.append(_flow(src, dst, pkt.get("inner_sport"), pkt.get("inner_dport")))
    elif pkt.get("inner_eth_src") is not None:  # an inner frame that is not IP
        parts.append(f"{format_mac(pkt['inner_eth_src'])} > "
                     f"{format_mac(pkt.get('inner_eth_dst'))}")
    if pkt.get("inner_tcp_flags") is not None:
        parts.append(f"[{format_tcp_flags(pkt['inner_tcp_flags'])}]")
    if outer_src is not None or outer_dst is not None:
        parts.append(f"via {outer_src} > {outer_dst}")
    elif pkt.get("eth_src") is not None:  # PPPoE, MPLS: no outer IP
        parts.append(f"via {format_mac(pkt['eth_src'])} > {format_mac(pkt.get('eth_dst'))}")
    if pkt.get("frag"):
        parts.append("frag")
    return parts


# `fanoutd tail`'s display filter: applied by the subscriber to what it receives. The daemon
# still captures and publishes every packet; that is the capture filter's job.

# --proto names: IP protocol numbers, and arp, which is an ethertype.
PROTO_BY_NAME = {"icmp": 1, "tcp": 6, "udp": 17, "icmp6": 58, "icmpv6": 58, "sctp": 132,
                 "dccp": 33, "udplite": 136, "gre": 47, "esp": 50, "ah": 51}
ETHERTYPE_ARP = 0x0806


# `fanoutd tail --json` names: the --proto names, and the ethertype names in lower case.
JSON_PROTO_NAMES = {number: name for name, number in PROTO_BY_NAME.items() if name != "icmpv6"}
JSON_ETHERTYPE_NAMES = {number: name.lower() for number, name in ETHERTYPE_NAMES.items()}


def iso_time(ts_ns: int) -> str:
    """Nanoseconds since the epoch as ISO 8601 in UTC, to the nanosecond:
    2026-12-01T15:06:51.123456789Z."""
    seconds, ns = divmod(ts_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ns:09d}Z"


def json_line(rec: Record) -> str:
    """`fanoutd tail --json`: Record.to_json()'s keys, plus `time` (iso_time of ts_ns),
    `proto_name`, `inner_proto_name` and `ethertype_name` (null when there is none or it
    has no name here)."""
    out = rec.as_dict()
    ts = out.get("ts_ns")
    out["time"] = None if ts is None else iso_time(ts)
    out["proto_name"] = JSON_PROTO_NAMES.get(out.get("proto"))
    out["inner_proto_name"] = JSON_PROTO_NAMES.get(out.get("inner_proto"))
    out["ethertype_name"] = JSON_ETHERTYPE_NAMES.get(out.get("ethertype"))
    return json.dumps(out, separators=(",", ":"))


def parse_proto(text: str) -> int | str:
    """A --proto value: an IP protocol number (a name or 0-255), or "arp"."""
    name = text.strip().lower()
    if name == "arp":
        return "arp"
    if name in PROTO_BY_NAME:
        return PROTO_BY_NAME[name]
    if name.isdigit() and 0 <= int(name) <= 255:
        return int(name)
    raise ValueError(f"unknown protocol {text!r} (a number 0-255, arp, or one of "
                     f"{', '.join(PROTO_BY_NAME)})")


def parse_tunnel(text: str) -> str:
    """A --tunnel value: an encapsulation name (wire.TUNNELS), or "any"."""
    name = text.strip().lower()
    if name == "any" or name in TUNNELS:
        return name
    raise ValueError(f"unknown tunnel {text!r} (any, or one of {', '.join(TUNNELS)})")


def parse_host(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A --host value: an address, or a network in CIDR notation (10.0.0.0/8)."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"not an IP address or network: {text!r}") from None


def parse_number(text: str, low: int, high: int, what: str) -> int:
    value = text.strip()
    if not value.isdigit() or not low <= int(value) <= high:
        raise ValueError(f"{what} must be a number between {low} and {high}, got {text!r}")
    return int(value)


@dataclass(frozen=True)
class DisplayFilter:
    """Which records to show. Each option given must match (AND); within one option any
    value may (OR). An empty filter shows everything.

    Through a tunnel, protos, hosts and ports each match the outer packet or the inner
    one (its inner_* fields): `--host` finds a flow inside a tunnel and the tunnel's
    endpoints alike. Each option is matched on its own, so with several options one may
    match the outer packet and another the inner one."""

    # IP protocol numbers (proto or inner_proto), or "arp" (the outer ethertype)
    protos: frozenset[int | str] = field(default_factory=frozenset)
    # src or dst (or inner_src or inner_dst) in one
    hosts: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    ports: frozenset[int] = field(default_factory=frozenset)  # sport or dport, or inner
    vlans: frozenset[int] = field(default_factory=frozenset)  # any of the packet's VLAN IDs
    workers: frozenset[int] = field(default_factory=frozenset)
    tunnels: frozenset[str] = field(default_factory=frozenset)  # wire.TUNNELS, or "any"

    def __bool__(self) -> bool:
        return bool(self.protos or self.hosts or self.ports or self.vlans or self.workers
                    or self.tunnels)

    def matches(self, rec: Record) -> bool:
        if self.workers and rec.worker not in self.workers:
            return False
        if self.tunnels and not (rec.tunnel in self.tunnels or (
                "any" in self.tunnels and rec.tunnel is not None)):
            return False
        if self.protos and not (rec.proto in self.protos or rec.inner_proto in self.protos or (
                "arp" in self.protos and rec.ethertype == ETHERTYPE_ARP)):
            return False
        if self.ports and not self.ports.intersection(
                (rec.sport, rec.dport, rec.inner_sport, rec.inner_dport)):
            return False
        if self.vlans and not self.vlans.intersection(rec.vlan or ()):
            return False
        if self.hosts:
            addresses = [ip for ip in (rec.src_ip, rec.dst_ip, rec.inner_src_ip,
                                       rec.inner_dst_ip) if ip is not None]
            if not any(ip in net for ip in addresses for net in self.hosts
                       if ip.version == net.version):
                return False
        return True

    @classmethod
    def from_options(cls, protos: Iterable[int | str] = (), hosts: Iterable = (),
                     ports: Iterable[int] = (), vlans: Iterable[int] = (),
                     workers: Iterable[int] = (),
                     tunnels: Iterable[str] = ()) -> "DisplayFilter":
        return cls(frozenset(protos), tuple(hosts), frozenset(ports), frozenset(vlans),
                   frozenset(workers), frozenset(tunnels))


# `fanoutd stats`: (column title, metric) per worker; packets/s is derived from two scrapes.
STATS_COLUMNS = (
    ("kernel pkts", "fanoutd_kernel_packets_total"),
    ("drops", "fanoutd_kernel_drops_total"),
    ("freezes", "fanoutd_kernel_freezes_total"),
    ("decoded", "fanoutd_packets_decoded_total"),
    ("decode errs", "fanoutd_decode_errors_total"),
    ("outbox full", "fanoutd_outbox_full_total"),
    ("restarts", "fanoutd_worker_restarts_total"),
    ("backlog", "fanoutd_ring_blocks_user"),
)


def read_metrics(address: str, timeout: float = 3.0) -> dict[tuple[str, str], dict[str, float]]:
    """Scrape http://ADDRESS/metrics: {(interface, worker): {sample name: value}}, with
    decode errors summed over their reasons."""
    from urllib.request import ProxyHandler, build_opener

    from prometheus_client.parser import text_string_to_metric_families

    opener = build_opener(ProxyHandler({}))  # a metrics address is never reached via a proxy
    with opener.open(f"http://{address}/metrics", timeout=timeout) as response:
        text = response.read().decode()
    table: dict[tuple[str, str], dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            worker = sample.labels.get("worker")
            if worker is None or not sample.name.startswith("fanoutd_"):
                continue
            row = table.setdefault((sample.labels.get("interface", ""), worker), {})
            row[sample.name] = row.get(sample.name, 0.0) + sample.value
    return table


def stats_table(before: dict, after: dict, seconds: float) -> str:
    """Per-worker table: packets/s between the two scrapes, then running totals."""
    titles = ["interface", "worker", "packets/s"] + [title for title, _ in STATS_COLUMNS]
    rows, totals = [], [0.0] * (len(titles) - 2)
    for key in sorted(after, key=lambda k: (k[0], int(k[1]) if k[1].isdigit() else k[1])):
        now, then = after[key], before.get(key, {})
        packets = "fanoutd_kernel_packets_total"
        rate = max(0.0, now.get(packets, 0) - then.get(packets, 0)) / seconds
        values = [rate] + [now.get(metric, 0.0) for _, metric in STATS_COLUMNS]
        totals = [t + v for t, v in zip(totals, values, strict=True)]
        rows.append([*key, *values])
    rows.append(["total", "", *totals])
    text = [[str(cell) if isinstance(cell, str) else f"{cell:,.0f}" for cell in row]
            for row in [titles, *rows]]
    widths = [max(len(row[i]) for row in text) for i in range(len(titles))]
    return "\n".join("  ".join(cell.rjust(w) if i > 1 else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
                     for row in text)
