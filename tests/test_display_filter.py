"""`fanoutd tail`'s display filters without a daemon: the options as tail's own parser
reads them, the filter over crafted records, and tail itself reading a fake publisher.

tests/integration/test_client_tail.py runs tail against a real daemon; what is shown for
which packet is pinned here.
"""

import ipaddress
import json
import threading
import time

import msgpack
import pytest
import zmq

from fanoutd import cli
from fanoutd.client import Batch, Record
from fanoutd.views import DisplayFilter
from fanoutd.wire import HELLO

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
    args = cli._parser().parse_args(["tail", *options])
    return DisplayFilter.from_options(args.proto, args.host, args.port, args.vlan,
                                      args.worker)


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
    ["--port", "-1"], ["--vlan", "4096"], ["--worker", "x"],
])
def test_bad_filter_values_are_usage_errors(capsys, option):
    with pytest.raises(SystemExit) as info:
        cli.main(["tail", *option])
    assert info.value.code == 2
    assert option[0] in capsys.readouterr().err


class FakePublisher:
    """An XPUB on ipc:// that answers tail's welcome subscription as fanoutd's proxy does
    and publishes version 1 batches."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.endpoint = endpoint
        self.sock = ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)

    def answer_hello(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # tail subscribes to pkt. before the welcome: once the welcome's subscription
            # is read, so was pkt.'s, and nothing published from now on is missed.
            if self.sock.poll(100) and self.sock.recv() == b"\x01" + HELLO:
                self.sock.send(HELLO)
                return
        raise AssertionError("tail never subscribed to the welcome")

    def publish(self, seq: int, rows: list[list]) -> None:
        body = {"v": 1, "iface": "cap0", "worker": 0, "seq": seq, "fields": FIELDS,
                "packets": rows}
        self.sock.send_multipart([b"pkt.cap0.0", msgpack.packb(body)])


def test_tail_prints_exactly_the_matching_packets(capsys, tmp_path):
    """tail --json --proto udp --port 53 --count N reading a publisher: the N matching
    packets, one JSON object per line, in order; the others never printed."""
    ctx = zmq.Context()
    pub = FakePublisher(ctx, f"ipc://{tmp_path}/pub")
    wanted = list(MATCHING.values())
    status: list[int] = []
    tail = threading.Thread(target=lambda: status.append(cli.main([
        "tail", "--endpoint", pub.endpoint, "--json", "--proto", "udp", "--port", "53",
        "--count", str(len(wanted)), "--timeout", "10"])), daemon=True)
    try:
        tail.start()
        pub.answer_hello()
        pub.publish(0, list(OTHERS.values())[:3])
        pub.publish(1, list(ROWS.values()))
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
