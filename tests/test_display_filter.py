"""`fanoutd tail`'s display filters without a daemon: the options as tail's own parser
reads them, the filter over crafted records, and tail itself reading a fake publisher.

tests/integration/test_client_tail.py runs tail against a real daemon; what is shown for
which packet is pinned here.
"""

import ipaddress
import json
import threading

import frames as F
import pytest
import zmq
from fakes import FakeSensor

from fanoutd import cli, wire
from fanoutd.client import Batch, Record
from fanoutd.encoder import encode_columns_py, encode_rows_py
from fanoutd.views import DisplayFilter, json_line, packet_line

FIELDS = ["ts_ns", "len", "caplen", "ifindex", "rxhash", "pkttype", "eth_dst", "eth_src",
          "ethertype", "vlan", "src", "dst", "proto", "ttl", "sport", "dport", "tcp_flags",
          "icmp_type", "icmp_code", "frag", "err"]
TS_NS = 1_795_620_081_380_946_028


def row(name: int, src: str | None = "198.51.100.1", dst: str | None = "192.0.2.53",
        proto: int | None = 17, sport: int | None = 40000, dport: int | None = 53,
        ethertype: int = 0x0800, vlan: tuple[int, ...] = (), **extra) -> list:
    """One version 1 row; `name` goes into the source MAC, to tell the rows apart."""
    values = dict(ts_ns=TS_NS, len=60, caplen=60, ifindex=3, rxhash=0, pkttype=0,
                  eth_dst=bytes.fromhex("020000000002"),
                  eth_src=bytes.fromhex("02f0000000") + bytes([name]), ethertype=ethertype,
                  vlan=list(vlan), src=src and ipaddress.ip_address(src).packed,
                  dst=dst and ipaddress.ip_address(dst).packed, proto=proto, ttl=64,
                  sport=sport, dport=dport, tcp_flags=None, icmp_type=None, icmp_code=None,
                  frag=False, err=None)
    values.update(extra)
    return [values[f] for f in FIELDS]


# The frames of test_client_tail.py's tail test, as rows: {name: row}.
MATCHING = {  # UDP with port 53 on either side
    1: row(1, sport=40001),  # a query
    2: row(2, "192.0.2.53", "198.51.100.1", sport=53, dport=40001),  # its reply
    3: row(3, "198.51.100.3", sport=40003, vlan=(100,)),  # VLAN-tagged
    4: row(4, "2001:db8::1", "2001:db8::53", sport=40004, ethertype=0x86DD),
    5: row(5, sport=40005, vlan=(100, 200)),  # QinQ: outer tag 100, inner 200
}
OTHERS = {
    11: row(11, dst="192.0.2.54", sport=40011, dport=54),  # UDP, another port
    12: row(12, proto=6, sport=40012, tcp_flags=0x12),  # port 53, but TCP
    13: row(13, proto=1, sport=None, dport=None, icmp_type=8, icmp_code=0),
    14: row(14, proto=None, sport=None, dport=None, ethertype=0x0806),  # ARP
    15: row(15, None, None, proto=None, sport=None, dport=None, ethertype=0x88CC),  # LLDP
}
ROWS = {**MATCHING, **OTHERS}


def records(rows: dict[int, list], worker: int = 0) -> dict[int, Record]:
    batch = Batch(f"pkt.cap0.{worker}", "cap0", worker, 0, FIELDS, list(rows.values()),
                  "ipc://sensor")
    return dict(zip(rows, batch.records(), strict=True))


def tail_filter(*options: str) -> DisplayFilter:
    """The filter tail builds from these options, through its own argument parser."""
    return cli.tail_display_filter(cli._parser().parse_args(["tail", *options]))


def shown(*options: str, worker: int = 0) -> set[int]:
    f = tail_filter(*options)
    return {name for name, rec in records(ROWS, worker).items() if not f or f.matches(rec)}


def test_no_option_shows_everything():
    assert not tail_filter()
    assert shown() == set(ROWS)


def test_proto_and_port_together():
    """Each option given must match: UDP and port 53 (source or destination)."""
    assert shown("--proto", "udp", "--port", "53") == set(MATCHING)
    assert shown("--port", "53") == set(MATCHING) | {12}


def test_values_of_one_option_are_alternatives_however_given():
    """Repeated and comma-listed values are one list: any may match."""
    assert shown("--proto", "tcp,icmp") == shown("--proto", "tcp", "--proto", "icmp") \
        == {12, 13}
    assert shown("--port", "54", "--port", "40001,40003") == {1, 2, 3, 11}


def test_proto_names_numbers_and_arp():
    assert shown("--proto", "6") == shown("--proto", "TCP") == {12}
    assert shown("--proto", "icmp") == {13}
    assert shown("--proto", "arp") == {14}  # an ethertype, not an IP protocol
    assert shown("--proto", "arp,udp") == set(MATCHING) | {11, 14}
    assert shown("--proto", "icmp6") == set()


def test_port_never_matches_a_packet_without_ports():
    assert shown("--port", "8") == set()  # ICMP type 8 is not a port
    assert shown("--port", "53,54,40001", "--proto", "icmp,arp") == set()


def test_host_is_source_or_destination_and_networks_work():
    assert shown("--host", "192.0.2.53") == set(ROWS) - {4, 11, 15}  # ARP rows carry IPs
    assert shown("--host", "198.51.100.3") == {3}
    assert shown("--host", "198.51.100.0/24", "--proto", "udp") == set(MATCHING) - {4} | {11}
    assert shown("--host", "2001:db8::/32") == {4}
    assert shown("--host", "::ffff:192.0.2.53") == set()  # never across IP versions
    assert shown("--host", "0.0.0.0/0") == set(ROWS) - {4, 15}  # every IPv4 packet


def test_vlan_is_any_of_the_tags():
    assert shown("--vlan", "100") == {3, 5}
    assert shown("--vlan", "200") == {5}
    assert shown("--vlan", "0") == set()  # an untagged packet has no VLAN 0


def test_worker():
    assert shown("--worker", "1", worker=1) == set(ROWS)
    assert shown("--worker", "0,2", worker=1) == set()


@pytest.mark.parametrize("option", [
    ["--proto", "nope"], ["--proto", "256"], ["--host", "300.1.1.1"], ["--port", "65536"],
    ["--port", "-1"], ["--vlan", "4096"], ["--worker", "x"], ["--tunnel", "vxlan-gpe"],
])
def test_bad_filter_values_are_usage_errors(capsys, option):
    with pytest.raises(SystemExit) as info:
        cli.main(["tail", *option])
    assert info.value.code == 2
    assert option[0] in capsys.readouterr().err


def test_tail_prints_exactly_the_matching_packets(capsys, tmp_path):
    """tail --json --proto udp --port 53 --count N reading a publisher: the N matching
    packets, one JSON object per line, in order; the others never printed."""
    ctx = zmq.Context()
    pub = FakeSensor(ctx, f"ipc://{tmp_path}/pub", FIELDS)
    wanted = list(MATCHING.values())
    status: list[int] = []
    tail = threading.Thread(target=lambda: status.append(cli.main([
        "tail", "--endpoint", pub.endpoint, "--json", "--proto", "udp", "--port", "53",
        "--count", str(len(wanted)), "--timeout", "10"])), daemon=True)
    try:
        tail.start()
        pub.answer_hello()
        pub.publish(0, list(OTHERS.values())[:3], iface="cap0")
        pub.publish(1, list(ROWS.values()), iface="cap0")
        tail.join(15)
        assert not tail.is_alive(), "tail did not stop after --count packets"
    finally:
        pub.sock.close()
        ctx.term()
    out, err = capsys.readouterr()
    assert status == [0], err
    objs = [json.loads(line) for line in out.splitlines()]
    assert [o["eth_src"] for o in objs] == [r[FIELDS.index("eth_src")].hex(":")
                                            for r in wanted]
    for o in objs:
        assert o["proto_name"] == "udp" and 53 in (o["sport"], o["dport"]), o
        assert o["iface"] == "cap0" and o["sensor"] == pub.endpoint
    assert f"listening on {pub.endpoint}" in err


# --------------------------------------------------------------------------- tunnels

# Frames through each tunnel, decoded by decode.py into full rows (every wire field).
TUNNEL_FRAMES = {
    "pppoe": F.TUNNEL_CORPUS[0],  # session 0x1234, IPv4/TCP 10.0.0.1:443 > 10.0.0.2:51000
    "pppoe-lcp": F.TUNNEL_CORPUS[2],  # session 7, LCP: no inner packet
    "mpls": F.TUNNEL_CORPUS[4],  # labels 16, 1000; the same TCP
    "gre": F.TUNNEL_CORPUS[7],  # no key; the same TCP, outer 192.0.2.1 > 192.0.2.2
    "gre-key": F.TUNNEL_CORPUS[8],  # key 0xDEADBEEF; IPv6/UDP 2001:db8::a.5353
    "nvgre": F.TUNNEL_CORPUS[9],  # outer IPv6; Ethernet/IPv4/UDP 10.1.0.1:53 > 10.1.0.2:1053
    "vxlan": F.TUNNEL_CORPUS[14],  # VNI 5001; the TCP
    "vxlan-gre": F.TUNNEL_CORPUS[16],  # VXLAN around GRE: at depth 1, inner proto 47
    "geneve": F.TUNNEL_CORPUS[17],  # VNI 77; Ethernet/IPv4/UDP 10.1.0.1:53
    "geneve-ip": F.TUNNEL_CORPUS[18],  # VNI 78 over IPv6; IPv4/TCP
    "ipip": F.TUNNEL_CORPUS[20],  # 4 in 4; the TCP
    "6in4": F.TUNNEL_CORPUS[21],  # IPv6/UDP in IPv4
    "vxlan-cut": F.TUNNEL_CORPUS[14][:14 + 20 + 8 + 5],  # VXLAN header cut: no id, no inner
    "vxlan-lldp": F.vxlan_frame(9, F.eth(F.MAC_A, F.MAC_B, 0x88CC, b"lldp")),  # not IP
    "vxlan-inner-cut": F.TUNNEL_CORPUS[14][:14 + 20 + 8 + 8 + 14 + 10],  # inner IPv4 cut
    "mpls-cut": F.TUNNEL_CORPUS[4][:18],  # the label stack cut: the top label only
}
TUNNEL_LINES = {
    "pppoe": "PPPoE 4660 TCP 10.0.0.1:443 > 10.0.0.2:51000 [P.] "
             "via 02:00:00:00:00:01 > 02:00:00:00:00:02 len 66",
    "pppoe-lcp": "PPPoE 7 via 02:00:00:00:00:01 > 02:00:00:00:00:02 len 26",
    "mpls": "MPLS 16 TCP 10.0.0.1:443 > 10.0.0.2:51000 [P.] "
            "via 02:00:00:00:00:01 > 02:00:00:00:00:02 len 66",
    "gre": "GRE TCP 10.0.0.1:443 > 10.0.0.2:51000 [P.] via 192.0.2.1 > 192.0.2.2 len 82",
    "gre-key": "GRE 3735928559 UDP 2001:db8::a.5353 > 2001:db8::b.5353 "
               "via 192.0.2.1 > 192.0.2.2 len 102",
    "nvgre": "GRE 1280256 UDP 10.1.0.1:53 > 10.1.0.2:1053 via 2001:db8::1 > 2001:db8::2 "
             "len 105",
    "vxlan": "VXLAN 5001 TCP 10.0.0.1:443 > 10.0.0.2:51000 [P.] via 192.0.2.1 > 192.0.2.2 "
             "len 108",
    "vxlan-gre": "VXLAN 1 GRE 10.0.0.1 > 10.0.0.2 via 192.0.2.1 > 192.0.2.2 len 132",
    "geneve": "Geneve 77 UDP 10.1.0.1:53 > 10.1.0.2:1053 via 192.0.2.1 > 192.0.2.2 len 101",
    "geneve-ip": "Geneve 78 TCP 10.0.0.1:443 > 10.0.0.2:51000 [P.] "
                 "via 2001:db8::1 > 2001:db8::2 len 114",
    "ipip": "IPIP TCP 10.0.0.1:443 > 10.0.0.2:51000 [P.] via 192.0.2.1 > 192.0.2.2 len 78",
    "6in4": "IPIP UDP 2001:db8::a.5353 > 2001:db8::b.5353 via 192.0.2.1 > 192.0.2.2 len 86",
    "vxlan-cut": "VXLAN via 192.0.2.1 > 192.0.2.2 len 47 [truncated-vxlan]",
    "vxlan-lldp": "VXLAN 9 02:00:00:00:00:02 > 02:00:00:00:00:01 via 192.0.2.1 > 192.0.2.2 "
                  "len 68",
    "vxlan-inner-cut": "VXLAN 5001 02:00:00:00:00:02 > 02:00:00:00:00:01 "
                       "via 192.0.2.1 > 192.0.2.2 len 74 [truncated-ipv4]",
    "mpls-cut": "MPLS 16 via 02:00:00:00:00:01 > 02:00:00:00:00:02 len 18 [truncated-mpls]",
}


def tunnel_records(version: int = wire.ROWS_VERSION) -> dict[str, Record]:
    """TUNNEL_FRAMES as the records of one batch, of either wire-format version."""
    block, first, num = F.tpacket3_block([F.RingFrame(f, sec=1_700_000_000)
                                          for f in TUNNEL_FRAMES.values()])
    encode = encode_rows_py if version == wire.ROWS_VERSION else encode_columns_py
    body, _, _ = encode(block, first, num, 0, {}, wire.batch_prefix(version, "cap0", 0, 1),
                        0, 1)
    batch = Batch.from_message(b"pkt.cap0.0", body, "ipc://sensor")
    return dict(zip(TUNNEL_FRAMES, batch.records(), strict=True))


def line_of(rec: Record) -> str:
    """tail's line without its time and worker."""
    return packet_line(rec.as_dict(raw=True)).split(" ", 2)[2]


@pytest.mark.parametrize("version", [wire.ROWS_VERSION, wire.COLUMNS_VERSION])
def test_tail_shows_the_tunnel_the_inner_flow_and_the_outer_one(version):
    assert {name: line_of(rec) for name, rec in tunnel_records(version).items()} \
        == TUNNEL_LINES


def test_tail_lines_of_packets_without_a_tunnel_are_as_before():
    """Rows of a batch without the tunnel fields (a version 1 batch of an older daemon,
    or a version 2 batch that left their columns out) read as before."""
    lines = {name: line_of(rec) for name, rec in records(ROWS).items()}
    assert lines[1] == "UDP 198.51.100.1:40001 > 192.0.2.53:53 len 60"
    assert lines[4] == "UDP 2001:db8::1.40004 > 2001:db8::53.53 len 60"
    assert lines[3] == "vlan 100 UDP 198.51.100.3:40003 > 192.0.2.53:53 len 60"
    assert lines[12] == "TCP 198.51.100.1:40012 > 192.0.2.53:53 [S.] len 60"
    assert lines[13] == "ICMP 198.51.100.1 > 192.0.2.53 type 8 code 0 len 60"
    assert lines[14] == "ARP 198.51.100.1 > 192.0.2.53 len 60"
    assert lines[15] == "LLDP 02:f0:00:00:00:0f > 02:00:00:00:00:02 len 60"


def test_tail_line_of_a_crafted_tunnel_row_with_inner_fields_missing():
    """What a row may lack (never all of it from decode.py, but a subscriber shows what
    it is given): no tunnel id, inner protocol without addresses, no outer IP, a tunnel
    name this version does not know."""
    base = dict(zip(FIELDS, row(1, proto=17, sport=49152, dport=4789), strict=True))
    base.update(worker=0, tunnel="vxlan")
    assert packet_line(base).split(" ", 2)[2] == \
        "VXLAN via 198.51.100.1 > 192.0.2.53 len 60"
    assert packet_line({**base, "inner_proto": 6, "inner_tcp_flags": 0x02}).split(" ", 2)[2] \
        == "VXLAN TCP [S] via 198.51.100.1 > 192.0.2.53 len 60"
    assert packet_line({**base, "src": None, "dst": None, "tunnel": "l2tp",
                        "tunnel_id": 3}).split(" ", 2)[2] == \
        "L2TP 3 via 02:f0:00:00:00:01 > 02:00:00:00:00:02 len 60"


def tunnels_shown(*options: str) -> set[str]:
    f = tail_filter(*options)
    return {name for name, rec in tunnel_records().items() if f.matches(rec)}


INNER_TCP = {"pppoe", "mpls", "gre", "vxlan", "geneve-ip", "ipip"}  # 10.0.0.1:443 TCP
INNER_UDP = {"gre-key", "nvgre", "geneve", "6in4"}
OUTER_192 = {"gre", "gre-key", "vxlan", "vxlan-gre", "geneve", "ipip", "6in4", "vxlan-cut",
             "vxlan-lldp", "vxlan-inner-cut"}  # outer 192.0.2.1 > 192.0.2.2


def test_host_matches_the_inner_or_the_outer_addresses():
    assert tunnels_shown("--host", "10.0.0.1") == INNER_TCP | {"vxlan-gre"}
    assert tunnels_shown("--host", "10.1.0.0/16") == {"nvgre", "geneve"}
    assert tunnels_shown("--host", "2001:db8::b") == {"gre-key", "6in4"}  # inner IPv6
    assert tunnels_shown("--host", "2001:db8::1") == {"nvgre", "geneve-ip"}  # outer IPv6
    assert tunnels_shown("--host", "192.0.2.2") == OUTER_192
    assert tunnels_shown("--host", "10.0.0.1", "--host", "192.0.2.1") == \
        INNER_TCP | OUTER_192
    # the rows without a tunnel are unaffected by the inner fields they lack
    assert shown("--host", "10.0.0.1") == set()


def test_port_matches_the_inner_or_the_outer_ports():
    assert tunnels_shown("--port", "443") == INNER_TCP
    assert tunnels_shown("--port", "51000,1053") == INNER_TCP | {"nvgre", "geneve"}
    assert tunnels_shown("--port", "4789") == {"vxlan", "vxlan-gre", "vxlan-cut",
                                               "vxlan-lldp", "vxlan-inner-cut"}  # outer
    assert tunnels_shown("--port", "6081") == {"geneve", "geneve-ip"}
    assert tunnels_shown("--port", "5353") == {"gre-key", "6in4"}


def test_proto_matches_the_inner_or_the_outer_protocol():
    assert tunnels_shown("--proto", "tcp") == INNER_TCP  # never the outer one here
    # UDP: VXLAN and Geneve outside, or an inner UDP packet
    assert tunnels_shown("--proto", "udp") == INNER_UDP | {
        "vxlan", "vxlan-gre", "geneve-ip", "vxlan-cut", "vxlan-lldp", "vxlan-inner-cut"}
    assert tunnels_shown("--proto", "gre") == {"gre", "gre-key", "nvgre", "vxlan-gre"}
    assert tunnels_shown("--proto", "4") == {"ipip"}  # IP in IP, outside
    assert tunnels_shown("--proto", "tcp", "--port", "443", "--host", "192.0.2.1") == \
        INNER_TCP & OUTER_192
    assert tunnels_shown("--proto", "arp") == set()


def test_tunnel_matches_the_encapsulation():
    every = set(TUNNEL_FRAMES)
    vxlan = {name for name in every if name.startswith("vxlan")}
    assert tunnels_shown("--tunnel", "vxlan") == vxlan
    assert tunnels_shown("--tunnel", "pppoe,MPLS") == {
        name for name in every if name.startswith(("pppoe", "mpls"))}
    assert tunnels_shown("--tunnel", "ipip") == {"ipip", "6in4"}
    assert tunnels_shown("--tunnel", "any") == every
    assert tunnels_shown("--tunnel", "vxlan", "--host", "10.0.0.1") == {"vxlan", "vxlan-gre"}
    assert shown("--tunnel", "any") == set()  # the rows without a tunnel


def test_tail_json_and_records_of_tunnelled_packets():
    recs = tunnel_records(wire.COLUMNS_VERSION)
    vxlan = recs["vxlan"]
    assert (vxlan.tunnel, vxlan.tunnel_id, vxlan.inner_proto) == ("vxlan", 5001, 6)
    assert str(vxlan.inner_src_ip) == "10.0.0.1" and str(vxlan.inner_dst_ip) == "10.0.0.2"
    assert vxlan.inner_tcp_flags_text == "P." and vxlan.tcp_flags_text == ""
    assert vxlan.inner_eth_src_mac == "02:00:00:00:00:02"
    out = json.loads(json_line(vxlan))
    assert (out["inner_src"], out["inner_dst"], out["src"]) == ("10.0.0.1", "10.0.0.2",
                                                                "192.0.2.1")
    assert (out["inner_eth_dst"], out["inner_eth_src"]) == ("02:00:00:00:00:01",
                                                            "02:00:00:00:00:02")
    assert (out["proto_name"], out["inner_proto_name"], out["tunnel"]) == ("udp", "tcp",
                                                                          "vxlan")
    cut = json.loads(json_line(recs["vxlan-cut"]))
    assert cut["tunnel"] == "vxlan" and cut["inner_src"] is None and cut["tunnel_id"] is None
    assert cut["inner_proto_name"] is None
    pppoe = recs["pppoe"]
    assert pppoe.src_ip is None and str(pppoe.inner_src_ip) == "10.0.0.1"
    assert json.loads(json_line(pppoe))["inner_eth_src"] is None  # PPP carries no Ethernet
