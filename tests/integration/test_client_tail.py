"""The subscriber side against real daemons: `fanoutd tail` display filters, Records with
their conversions, one Subscriber reading two sensors and finding a gap, and the
top-talkers example."""

import contextlib
import ipaddress
import json
import subprocess
import sys
import time
from datetime import UTC, datetime

import frames as F
import netlab
import pytest

from fanoutd.client import Record, StreamKey, Subscriber

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def background(argv: list[str]):
    """A subscriber process (tail, the example) with its stdout and stderr read on threads;
    killed on exit whatever happened."""
    proc = subprocess.Popen(argv, cwd=netlab.REPO, env={**netlab.base_env(),
                                                        "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    try:
        yield proc, netlab.LineReader(proc), netlab.StreamReader(proc.stderr)
    finally:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def tail_beside_a_subscriber(daemon: netlab.Daemon, *options: str):
    """`fanoutd tail --endpoint DAEMON OPTIONS` in the background and a Subscriber, both
    with their subscriptions in effect: (tail process, its stdout, its stderr, the
    Subscriber, a logs() for failure messages)."""
    argv = [*netlab.cli_argv(), "tail", "--endpoint", daemon.endpoint, *options]
    with background(argv) as (tail, out, err), Subscriber(daemon.endpoint) as sub:
        def logs() -> str:
            return f"tail stdout {out.drain()[-5:]}, stderr {err.drain()[-5:]}\n{daemon.logs()}"

        netlab.wait_line(err, lambda line: "listening on" in line, 15,
                         "tail to say its subscriptions are in effect", detail=logs)
        assert sub.wait_ready(10), daemon.logs()
        yield tail, out, err, sub, logs


def collect(sub: Subscriber, want: set, key, timeout: float = 10.0,
            detail=None) -> dict:
    """Records from sub until key(rec) has covered `want` (bounded): {key: Record}."""
    got: dict = {}
    deadline = time.monotonic() + timeout
    while not want <= set(got):
        left = deadline - time.monotonic()
        if left <= 0:
            extra = f"\n{detail()}" if detail else ""
            raise netlab.WaitTimeout(f"got {len(set(got) & want)} of {len(want)} packets; "
                                     f"missing {sorted(want - set(got))[:5]}{extra}")
        for rec in sub.records(timeout=min(left, 0.5)):
            got.setdefault(key(rec), rec)
            if want <= set(got):
                break
    return got


def mac_of(rec: Record) -> bytes:
    return rec.eth_src


# --------------------------------------------------------------------------- tail


def test_tail_display_filter_and_records(ns, injector, start_daemon):
    """`fanoutd tail --json --proto udp --port 53 --count N` prints exactly the N matching
    packets, one JSON object per line; a Record Subscriber sees every packet with the
    right attribute values."""
    daemon = start_daemon(workers=2)
    # Every frame carries its identity in its source MAC.
    matching = {
        F.mac(1): F.ipv4_frame("198.51.100.1", "192.0.2.53", 17, F.udp(40001, 53),
                               eth_src=F.mac(1)),
        F.mac(2): F.ipv4_frame("192.0.2.53", "198.51.100.1", 17, F.udp(53, 40001),
                               eth_src=F.mac(2)),  # the reply: sport 53
        F.mac(3): F.ipv4_frame("198.51.100.3", "192.0.2.53", 17, F.udp(40003, 53),
                               eth_src=F.mac(3), vlans=((0x8100, 100),)),
        F.mac(4): F.ipv6_frame("2001:db8::1", "2001:db8::53", 17, F.udp(40004, 53),
                               eth_src=F.mac(4)),
    }
    others = {
        F.mac(11): F.ipv4_frame("198.51.100.1", "192.0.2.54", 17, F.udp(40011, 54),
                                eth_src=F.mac(11)),  # UDP, another port
        F.mac(12): F.ipv4_frame("198.51.100.1", "192.0.2.53", 6, F.tcp(40012, 53, 0x12),
                                eth_src=F.mac(12)),  # port 53, but TCP
        F.mac(13): F.ipv4_frame("198.51.100.1", "192.0.2.53", 1, F.icmp(8, 0),
                                eth_src=F.mac(13)),
        F.mac(14): F.arp_frame(1, "198.51.100.1", "192.0.2.53", eth_src=F.mac(14)),
    }
    last = F.mac(5)  # sent only once every other frame is known to be published
    matching_all = {**matching, last: F.ipv4_frame("198.51.100.5", "192.0.2.53", 17,
                                                   F.udp(40005, 53), eth_src=last)}
    with tail_beside_a_subscriber(daemon, "--json", "--proto", "udp", "--port", "53",
                                  "--count", str(len(matching_all)), "--timeout", "30",
                                  "--stats") as (tail, out, err, sub, logs):
        frames = [f for pair in zip(others.values(), matching.values(), strict=True)
                  for f in pair]
        injector.send_all(frames)
        # The Subscriber got them all: so were they all published, to tail as well, before
        # the last matching frame that ends tail's --count.
        got = collect(sub, set(matching) | set(others), mac_of, detail=logs)
        injector.send(matching_all[last])
        assert tail.wait(timeout=20) == 0, logs()
        lines = out.drain()
        stderr = "".join(err.drain())

    # tail: exactly the matching packets, each line one JSON object.
    objs = [json.loads(line) for line in lines]
    assert all(isinstance(o, dict) for o in objs)
    assert len(objs) == len(matching_all), lines
    assert {o["eth_src"] for o in objs} == {m.hex(":") for m in matching_all}
    for o in objs:
        assert o["proto"] == 17 and 53 in (o["sport"], o["dport"]), o
        assert o["iface"] == "cap0" and o["sensor"] == daemon.endpoint
    assert "0 batches lost" in stderr, stderr  # --stats

    # Records: attribute values and conversions.
    now = datetime.now(UTC)
    for rec in got.values():
        assert rec.iface == "cap0" and rec.sensor == daemon.endpoint and rec.worker in (0, 1)
        assert abs((now - rec.time).total_seconds()) < 60, rec.time
        assert rec.len == len({**matching, **others}[rec.eth_src])
    vlan = got[F.mac(3)]
    assert (vlan.src_ip, vlan.dst_ip) == (ipaddress.ip_address("198.51.100.3"),
                                          ipaddress.ip_address("192.0.2.53"))
    assert (vlan.proto, vlan.sport, vlan.dport, vlan.vlan) == (17, 40003, 53, [100])
    assert vlan.eth_src_mac == F.mac(3).hex(":") and vlan.eth_dst_mac == F.MAC_B.hex(":")
    assert got[F.mac(4)].src_ip == ipaddress.IPv6Address("2001:db8::1")
    tcp = got[F.mac(12)]
    assert (tcp.proto, tcp.tcp_flags_text) == (6, "S.")
    arp = got[F.mac(14)]
    assert arp.ethertype == 0x0806 and arp.proto is None
    assert str(arp.src_ip) == "198.51.100.1"
    assert json.loads(arp.to_json())["dst"] == "192.0.2.53"
    assert sub.lost == {} and sub.duplicates == 0


# --------------------------------------------------------------------------- tunnels


def vxlan_frame(name: int, vni: int, inner: bytes) -> bytes:
    """frames.vxlan_frame from source MAC frames.mac(name): the packet's identity."""
    return F.vxlan_frame(vni, inner, eth_src=F.mac(name))


def inner_ip(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    return F.eth(F.MAC_A, F.MAC_B, 0x0800, F.ipv4(src, dst, proto, payload))


def test_tail_shows_tunnels_and_matches_the_inner_host(ns, injector, start_daemon):
    """A daemon with --tunnel-depth 2: tail --host 10.0.0.1 shows the packets of that host
    inside VXLAN (also under GRE inside VXLAN) and outside any tunnel, each tunnelled one
    as tunnel, id, inner flow and outer addresses; a Subscriber reads the tunnel fields."""
    daemon = start_daemon(workers=1, extra=("--tunnel-depth", "2"))
    tcp = inner_ip("10.0.0.1", "10.0.0.2", 6, F.tcp(443, 51000, 0x18, b"data"))
    frames = {
        1: vxlan_frame(1, 5001, tcp),
        2: vxlan_frame(2, 7, inner_ip("10.9.0.1", "10.9.0.2", 47, F.gre(
            0x0800, F.ipv4("10.0.0.1", "10.0.0.3", 17, F.udp(53, 1053, b"q"))))),
        3: F.ipv4_frame("10.0.0.1", "192.0.2.9", 17, F.udp(1000, 53), eth_src=F.mac(3)),
        4: vxlan_frame(4, 5002, inner_ip("10.5.0.1", "10.5.0.2", 6, F.tcp(1, 2))),  # not shown
    }
    last = vxlan_frame(5, 5003, tcp)  # ends tail's --count, once the others are published
    want = {
        1: f"VXLAN 5001 TCP 10.0.0.1:443 > 10.0.0.2:51000 [P.] via 192.0.2.1 > 192.0.2.2 "
           f"len {len(frames[1])}",
        2: f"VXLAN 7 UDP 10.0.0.1:53 > 10.0.0.3:1053 via 192.0.2.1 > 192.0.2.2 "
           f"len {len(frames[2])}",
        3: f"UDP 10.0.0.1:1000 > 192.0.2.9:53 len {len(frames[3])}",
        5: f"VXLAN 5003 TCP 10.0.0.1:443 > 10.0.0.2:51000 [P.] via 192.0.2.1 > 192.0.2.2 "
           f"len {len(last)}",
    }
    with tail_beside_a_subscriber(daemon, "--host", "10.0.0.1", "--count", str(len(want)),
                                  "--timeout", "30") as (tail, out, _err, sub, logs):
        injector.send_all(frames.values())
        got = collect(sub, {F.mac(i) for i in frames}, mac_of, detail=logs)
        injector.send(last)
        assert tail.wait(timeout=20) == 0, logs()
        lines = out.drain()

    assert [line.rstrip("\n").split(" ", 2)[2] for line in lines] == list(want.values()), lines
    vxlan, nested, plain = (got[F.mac(i)] for i in (1, 2, 3))
    assert (vxlan.tunnel, vxlan.tunnel_id, vxlan.inner_proto, vxlan.inner_dport) == \
        ("vxlan", 5001, 6, 51000)
    assert (vxlan.proto, vxlan.dport) == (17, 4789)  # the outer packet
    assert str(vxlan.inner_src_ip) == "10.0.0.1" and vxlan.inner_tcp_flags_text == "P."
    assert vxlan.inner_eth_src_mac == F.MAC_B.hex(":")
    assert (nested.tunnel, nested.tunnel_id, str(nested.inner_dst_ip)) == ("vxlan", 7,
                                                                         "10.0.0.3")
    assert plain.tunnel is None and plain.inner_src is None


# --------------------------------------------------------------------------- two sensors


def test_one_subscriber_two_sensors_and_a_gap(ns, injector, start_daemon):
    """Two daemons, each capturing on its own namespace's cap0 with one worker: the same
    (iface, worker) on both. One Subscriber reads both, tells their packets apart, and
    finds the gap it makes on sensor A by not reading (receive high-water mark 1, the
    publisher's 4) while A publishes a few hundred batches."""
    daemon_a = start_daemon(workers=1, extra=("--hwm", "4"))
    gaps: list[tuple[StreamKey, int]] = []
    with contextlib.ExitStack() as stack:
        ns_b = stack.enter_context(netlab.NetNS())
        daemon_b = stack.enter_context(netlab.Daemon(ns_b, stack.enter_context(
            netlab.workdir()), workers=1))
        injector_b = stack.enter_context(netlab.Injector(ns_b))
        daemon_b.wait_ready()
        sub = stack.enter_context(Subscriber(
            [daemon_a.endpoint, daemon_b.endpoint], rcvhwm=1,
            on_gap=lambda key, missing: gaps.append((key, missing))))
        assert sub.wait_ready(10), daemon_a.logs() + daemon_b.logs()

        def logs() -> str:
            return f"lost {sub.lost}\n{daemon_a.logs()}\n{daemon_b.logs()}"

        # Both sensors, one packet each: the same interface and worker, told apart.
        injector.send(F.ipv4_frame("192.0.2.1", "192.0.2.2", 17, F.udp(1, 2), eth_src=F.mac(1)))
        injector_b.send(F.ipv4_frame("192.0.2.1", "192.0.2.2", 17, F.udp(1, 2),
                                     eth_src=F.mac(2)))
        got = collect(sub, {F.mac(1), F.mac(2)}, mac_of, detail=logs)
        key_a, key_b = got[F.mac(1)].key, got[F.mac(2)].key
        assert key_a == StreamKey(daemon_a.endpoint, "cap0", 0)
        assert key_b == StreamKey(daemon_b.endpoint, "cap0", 0)

        # Stop reading while sensor A publishes many batches: they overflow the queues.
        total = 20_000
        with netlab.Pump(injector, total, total // 2):
            pass

        def published() -> bool:
            m = daemon_a.metrics()
            done = netlab.metric_sum(m, "fanoutd_packets_decoded_total") >= total + 1
            return done and netlab.metric_sum(m, "fanoutd_batches_published_total") >= 50
        netlab.wait_for(published, 30, "sensor A to decode and publish the pumped frames",
                        detail=logs)

        # Read again: first what was queued, until A's queue is empty (a marker sent while
        # it is still full would be dropped too), then a marker from each sensor.
        drained = 0
        deadline = time.monotonic() + 20
        for _ in sub.batches(timeout=1.0):
            drained += 1
            assert time.monotonic() < deadline, f"still draining after {drained} batches"
        assert drained > 0, logs()
        injector.send(F.ipv4_frame("192.0.2.1", "192.0.2.2", 17, F.udp(1, 2), eth_src=F.mac(3)))
        injector_b.send(F.ipv4_frame("192.0.2.1", "192.0.2.2", 17, F.udp(1, 2),
                                     eth_src=F.mac(4)))
        got = collect(sub, {F.mac(3), F.mac(4)}, mac_of, timeout=20, detail=logs)
        assert got[F.mac(3)].sensor == daemon_a.endpoint
        assert got[F.mac(4)].sensor == daemon_b.endpoint

        assert sub.lost.get(key_a, 0) > 0, logs()
        assert key_b not in sub.lost, logs()
        assert gaps and {key for key, _ in gaps} == {key_a}
        assert sum(n for _, n in gaps) == sub.lost[key_a]
        assert sub.duplicates == 0


# --------------------------------------------------------------------------- example


def test_top_talkers_example(ns, injector, start_daemon):
    """examples/top_talkers.py ranks the sources by bytes over its window."""
    daemon = start_daemon(workers=2)
    argv = [sys.executable, str(netlab.REPO / "examples" / "top_talkers.py"),
            "--endpoint", daemon.endpoint, "--json", "--window", "60", "--top", "3",
            "--refresh", "0.5", "--iterations", "20"]
    # (source, frames, UDP payload bytes): .10 sends the most bytes, .20 the most packets.
    talkers = [("192.0.2.10", 30, 200), ("192.0.2.20", 50, 10), ("192.0.2.30", 5, 1000)]
    frame_len = {src: 14 + 20 + 8 + payload for src, _, payload in talkers}
    want = sorted(({"key": src, "bytes": n * frame_len[src], "packets": n}
                   for src, n, _ in talkers), key=lambda row: -row["bytes"])
    assert [row["key"] for row in want] == ["192.0.2.10", "192.0.2.30", "192.0.2.20"]
    with background(argv) as (proc, out, err):
        def logs() -> str:
            return f"stdout {out.drain()[-3:]}, stderr {err.drain()[-5:]}\n{daemon.logs()}"

        netlab.wait_line(err, lambda line: "listening on" in line, 15,
                         "top_talkers to subscribe", detail=logs)
        frames = [F.udp4_frame(src=src, sport=1000 + i, dport=9, payload=b"x" * payload)
                  for src, n, payload in talkers for i in range(n)]
        injector.send_all(frames[i] for i in sorted(range(len(frames)), key=lambda i: i % 7))

        def complete_table() -> dict | None:
            for table in out.json_objects():
                if sum(row["packets"] for row in table["top"]) == len(frames):
                    return table
            return None
        table = netlab.wait_for(complete_table, 15, "a table that counts every frame",
                                detail=logs)
        assert table["top"] == want, table
        assert table["window_s"] == 60 and table["lost_batches"] == 0
        assert proc.wait(timeout=30) == 0, logs()  # --iterations ends it
