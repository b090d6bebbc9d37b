"""fanoutd.client without a daemon: Records from crafted batches, seq tracking, and
Subscribers reading in-process (inproc) publishers that speak the wire format."""

import copy
import ipaddress
import json
import time
from datetime import UTC, datetime

import pytest
import zmq
from fakes import FakeSensor

from fanoutd.client import Batch, Record, SeqTracker, StreamKey, Subscriber
from fanoutd.views import DisplayFilter, json_line, packet_line, parse_host, parse_proto
from fanoutd.wire import HELLO

FIELDS = ["ts_ns", "len", "caplen", "ifindex", "rxhash", "pkttype", "eth_dst", "eth_src",
          "ethertype", "vlan", "src", "dst", "proto", "ttl", "sport", "dport", "tcp_flags",
          "icmp_type", "icmp_code", "frag", "err"]
TS_NS = 1_795_620_081_380_946_028  # a capture time, with nanoseconds


def row(**values) -> list:
    base = dict(ts_ns=TS_NS, len=60, caplen=60, ifindex=3, rxhash=0, pkttype=0,
                eth_dst=bytes.fromhex("020000000002"), eth_src=bytes.fromhex("020000000001"),
                ethertype=0x0800, vlan=[], src=bytes([192, 0, 2, 1]),
                dst=bytes([192, 0, 2, 2]), proto=17, ttl=64, sport=1000, dport=53,
                tcp_flags=None, icmp_type=None, icmp_code=None, frag=False, err=None)
    base.update(values)
    return [base[f] for f in FIELDS]


def record(fields=FIELDS, values=None, **kw) -> Record:
    batch = Batch("pkt.eth0.1", "eth0", 1, 42, list(fields), [values or row(**kw)],
                  "tcp://sensor-a:7440")
    return next(batch.records())


# --------------------------------------------------------------------------- Record


def test_record_attribute_access():
    rec = record(sport=4000, dport=80, proto=6)
    assert (rec.sport, rec.dport, rec.proto, rec.len, rec.ttl) == (4000, 80, 6, 60, 64)
    assert (rec.iface, rec.worker, rec.seq, rec.sensor) == ("eth0", 1, 42,
                                                            "tcp://sensor-a:7440")
    assert rec.key == StreamKey("tcp://sensor-a:7440", "eth0", 1)
    assert rec["sport"] == 4000 and rec.get("nope", "x") == "x" and rec["worker"] == 1
    with pytest.raises(KeyError):
        rec["nope"]


def test_record_unknown_and_missing_fields():
    """A field this library does not know is read through the batch's fields; a version 1
    field the batch lacks is None; any other name is an AttributeError."""
    rec = record(fields=["ts_ns", "sport", "future_field"], values=[TS_NS, 7, "new"])
    assert rec.future_field == "new"
    assert rec.dport is None and rec.src_ip is None and rec.tcp_flags_text == ""
    with pytest.raises(AttributeError, match="no field 'nonsense'"):
        _ = rec.nonsense
    assert not hasattr(rec, "__setstate__x")
    dup = copy.copy(rec)
    assert dup.future_field == "new" and dup.sensor == rec.sensor
    # A row shorter than its fields (never sent, but harmless): the missing ones are None.
    short = next(Batch("t", "eth0", 0, 0, ["sport", "dport"], [[1]]).records())
    assert (short.sport, short.dport) == (1, None)


def test_record_conversions():
    rec = record(src=ipaddress.ip_address("2001:db8::1").packed,
                 dst=ipaddress.ip_address("2001:db8::2").packed, proto=6, tcp_flags=0x12,
                 vlan=[100, 7])
    assert rec.src_ip == ipaddress.IPv6Address("2001:db8::1")
    assert rec.dst_ip == ipaddress.IPv6Address("2001:db8::2")
    assert rec.eth_src_mac == "02:00:00:00:00:01" and rec.eth_dst_mac == "02:00:00:00:00:02"
    assert rec.tcp_flags_text == "S."
    when = rec.time
    assert when.tzinfo is UTC
    assert when == datetime.fromtimestamp(TS_NS // 10**9, UTC).replace(
        microsecond=TS_NS % 10**9 // 1000)
    v4 = record()
    assert v4.src_ip == ipaddress.IPv4Address("192.0.2.1")
    assert isinstance(v4.dst_ip, ipaddress.IPv4Address)
    assert record(src=None, dst=None).src_ip is None


def test_record_as_dict_and_json():
    rec = record(vlan=[5])
    d = rec.as_dict()
    assert d["src"] == "192.0.2.1" and d["dst"] == "192.0.2.2"
    assert d["eth_src"] == "02:00:00:00:00:01"
    assert (d["iface"], d["worker"], d["seq"], d["sensor"]) == ("eth0", 1, 42,
                                                                "tcp://sensor-a:7440")
    assert d["vlan"] == [5]
    assert json.loads(rec.to_json()) == d
    assert "\n" not in rec.to_json()
    assert rec.as_dict(raw=True)["src"] == bytes([192, 0, 2, 1])


# --------------------------------------------------------------------------- SeqTracker

KEY = StreamKey("tcp://a:7440", "eth0", 0)


def feed(seqs, key=KEY):
    gaps = []
    tracker = SeqTracker(on_gap=lambda k, n: gaps.append((k, n)))
    for seq in seqs:
        tracker.observe(key, seq)
    return tracker, gaps


def test_gap_is_counted_and_reported():
    tracker, gaps = feed([0, 1, 3])
    assert tracker.lost == {KEY: 1}
    assert gaps == [(KEY, 1)]
    assert tracker.duplicates == 0


def test_repeated_seq_is_a_duplicate():
    tracker, gaps = feed([5, 5])
    assert tracker.duplicates == 1 and tracker.lost == {} and gaps == []
    tracker, _ = feed([5, 6, 4])
    assert tracker.duplicates == 1 and tracker.lost == {}


def test_seq_zero_after_higher_is_a_restart_not_a_gap():
    tracker, gaps = feed([7, 0])
    assert tracker.lost == {} and gaps == [] and tracker.restarts == {KEY: 1}
    assert tracker.last[KEY] == 0


def test_first_batch_seen_sets_the_start():
    tracker, gaps = feed([1000, 1001])
    assert tracker.lost == {} and gaps == []


def test_late_batches_of_the_old_ring_are_not_gaps():
    """After a reload the old workers drain their rings while the new ones start: old
    batches numbered above the old ring's last seq may arrive after the new ring's 0."""
    tracker, gaps = feed([5, 6, 0, 7, 1, 8, 2, 3])
    assert tracker.lost == {} and gaps == [] and tracker.duplicates == 0
    tracker, gaps = feed([5, 0, 8, 1])  # the old ring lost 6 and 7
    assert tracker.lost == {KEY: 2}
    tracker, gaps = feed([5, 0, 1, 3])  # the new ring lost 2
    assert gaps == [(KEY, 1)]


def test_streams_are_tracked_apart():
    tracker = SeqTracker()
    a, b = StreamKey("tcp://a:7440", "eth0", 0), StreamKey("tcp://b:7440", "eth0", 0)
    for key, seq in [(a, 0), (b, 10), (a, 1), (b, 11), (a, 2), (b, 14)]:
        tracker.observe(key, seq)
    assert tracker.lost == {b: 2}
    tracker.observe(a, 5)
    assert tracker.lost == {a: 2, b: 2}


# --------------------------------------------------------------------------- Subscriber


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.term()


@pytest.fixture
def sensors(ctx):
    made = []

    def make(name: str) -> FakeSensor:
        made.append(FakeSensor(ctx, f"inproc://{name}", FIELDS))
        return made[-1]
    yield make
    for s in made:
        s.sock.close()


def take(sub: Subscriber, n: int, timeout: float = 5.0) -> list[Record]:
    """n records, bounded in time."""
    out: list[Record] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        for rec in sub.records(timeout=0.2):
            out.append(rec)
            if len(out) == n:
                break
    assert len(out) == n, f"got {len(out)} of {n} records"
    return out


def test_one_endpoint_records_and_packets(ctx, sensors):
    a = sensors("one")
    with Subscriber(a.endpoint, context=ctx) as sub:
        a.answer_hello()
        assert sub.wait_ready(5)
        a.publish(0, [row(sport=1), row(sport=2)])
        a.publish(1, [row(sport=3)])
        recs = take(sub, 3)
        assert [r.sport for r in recs] == [1, 2, 3]
        assert [r.seq for r in recs] == [0, 0, 1]
        assert {r.sensor for r in recs} == {a.endpoint}
        a.publish(2, [row(sport=4)])
        pkts = []
        for pkt in sub.packets(timeout=5):
            pkts.append(pkt)
            break
        assert pkts[0]["sport"] == 4 and pkts[0]["seq"] == 2 and pkts[0]["iface"] == "eth0"
        assert pkts[0]["src"] == bytes([192, 0, 2, 1])  # packets() keeps the wire values
        assert list(sub.batches(timeout=0.1)) == []  # nothing more: the timeout ends it


def test_two_sensors_with_the_same_interface_and_worker(ctx, sensors):
    """Both sensors publish eth0 worker 0: gaps are told apart by sensor."""
    a, b = sensors("sensor-a"), sensors("sensor-b")
    gaps = []
    with Subscriber([a.endpoint, b.endpoint], context=ctx,
                    on_gap=lambda key, n: gaps.append((key, n))) as sub:
        assert not sub.wait_ready(0.1)  # no welcome yet
        a.answer_hello()
        b.answer_hello()
        assert sub.wait_ready(5) and sub.ready == {a.endpoint, b.endpoint}
        for seq in (0, 1, 3):
            a.publish(seq, [row(sport=100 + seq)])
        for seq in (0, 1, 2):
            b.publish(seq, [row(sport=200 + seq)])
        recs = take(sub, 6)
        assert {(r.sensor, r.sport) for r in recs} == {
            (a.endpoint, 100), (a.endpoint, 101), (a.endpoint, 103),
            (b.endpoint, 200), (b.endpoint, 201), (b.endpoint, 202)}
        key_a = StreamKey(a.endpoint, "eth0", 0)
        assert sub.lost == {key_a: 1}
        assert gaps == [(key_a, 1)]
        assert sub.duplicates == 0


def test_batches_that_arrive_before_the_welcome_are_kept(ctx, sensors):
    a = sensors("early")
    with Subscriber(a.endpoint, context=ctx) as sub:
        deadline = time.monotonic() + 5
        while not (a.sock.poll(100) and a.sock.recv() == b"\x01" + HELLO):
            assert time.monotonic() < deadline
        a.publish(0, [row(sport=9)])  # pkt. was subscribed before the welcome
        a.sock.send(HELLO)
        assert sub.wait_ready(5)
        assert [r.sport for r in take(sub, 1)] == [9]


def test_duplicates_and_restart_through_the_subscriber(ctx, sensors):
    a = sensors("restart")
    with Subscriber(a.endpoint, context=ctx) as sub:
        a.answer_hello()
        assert sub.wait_ready(5)
        for seq in (5, 5, 7, 0, 1):
            a.publish(seq, [row(sport=seq)])
        take(sub, 5)
        key = StreamKey(a.endpoint, "eth0", 0)
        assert sub.duplicates == 1
        assert sub.lost == {key: 1}  # 6 is missing
        assert sub.restarts == {key: 1}


# --------------------------------------------------------------------------- display filter


def test_display_filter():
    udp53 = record(proto=17, sport=5353, dport=53)
    tcp80 = record(proto=6, sport=40000, dport=80, vlan=[100],
                   src=ipaddress.ip_address("10.1.2.3").packed)
    arp = record(proto=None, sport=None, dport=None, ethertype=0x0806)
    v6 = record(proto=58, src=ipaddress.ip_address("2001:db8::1").packed,
                dst=ipaddress.ip_address("2001:db8::2").packed, sport=None, dport=None)
    every = [udp53, tcp80, arp, v6]

    def shown(**kw):
        f = DisplayFilter.from_options(**kw)
        return [r for r in every if not f or f.matches(r)]

    assert shown() == every
    assert shown(protos=[parse_proto("udp")], ports=[53]) == [udp53]
    assert shown(protos=[parse_proto("tcp"), parse_proto("udp")]) == [udp53, tcp80]
    assert shown(protos=[parse_proto("arp")]) == [arp]
    assert shown(protos=[parse_proto("icmp6")]) == [v6]
    assert shown(protos=[parse_proto("58")]) == [v6]
    assert shown(ports=[80]) == [tcp80]
    assert shown(vlans=[100]) == [tcp80]
    assert shown(hosts=[parse_host("10.0.0.0/8")]) == [tcp80]
    assert shown(hosts=[parse_host("192.0.2.2")]) == [udp53, tcp80, arp]  # dst
    assert shown(hosts=[parse_host("2001:db8::2")]) == [v6]
    assert shown(workers=[1]) == every and shown(workers=[0]) == []
    with pytest.raises(ValueError):
        parse_proto("nope")
    with pytest.raises(ValueError):
        parse_host("300.1.1.1")


def test_tail_line_names_the_sensor():
    rec = record(proto=17, sport=1000, dport=53)
    line = packet_line(rec.as_dict(raw=True), show_sensor=True)
    assert line.startswith("tcp://sensor-a:7440 ") and "UDP 192.0.2.1:1000 > 192.0.2.2:53" in line
    assert not packet_line(rec.as_dict(raw=True)).startswith("tcp://")


def test_tail_json_adds_time_and_names():
    rec = record(proto=6, sport=443, dport=50000, tcp_flags=0x12)
    out = json.loads(json_line(rec))
    assert {k: v for k, v in out.items()
            if k not in ("time", "proto_name", "inner_proto_name", "ethertype_name")} \
        == rec.as_dict()
    assert out["inner_proto_name"] is None and out["tunnel"] is None  # no tunnel
    seconds, ns = divmod(TS_NS, 10**9)
    assert out["time"] == datetime.fromtimestamp(seconds, UTC).strftime(
        "%Y-%m-%dT%H:%M:%S") + f".{ns:09d}Z"
    assert out["time"].endswith(f"{TS_NS % 10**9:09d}Z")
    assert (out["proto_name"], out["ethertype_name"]) == ("tcp", "ipv4")
    names = {p: json.loads(json_line(record(proto=p)))["proto_name"]
             for p in (1, 17, 58, 132, 253)}
    assert names == {1: "icmp", 17: "udp", 58: "icmp6", 132: "sctp", 253: None}
    arp = json.loads(json_line(record(proto=None, ethertype=0x0806)))
    assert (arp["proto_name"], arp["ethertype_name"]) == (None, "arp")
    v6 = json.loads(json_line(record(ethertype=0x86DD)))
    assert v6["ethertype_name"] == "ipv6"
