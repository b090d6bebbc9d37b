"""Capture options through the real kernel path: a libpcap filter, promiscuous mode,
payload bytes, the timestamp source, several interfaces, two daemons on one interface."""

import signal

import frames as F
import netlab
import pytest

pytestmark = pytest.mark.integration


def sports(cap: netlab.Capture) -> list[int]:
    return sorted(r["sport"] for r in cap.rows if r["sport"] is not None)


def test_filter_admits_exactly_the_matching_frames(injector, start_daemon, subscribe):
    daemon = start_daemon(workers=2, fanout="lb", extra=("--filter", "udp dst port 53"))
    sub = subscribe(daemon)
    wanted = [F.udp4_frame(sport=1000 + i, dport=53) for i in range(20)]
    others = ([F.udp4_frame(sport=2000 + i, dport=54) for i in range(20)]
              + [F.tcp4_frame(sport=3000 + i, dport=53) for i in range(20)]
              + [F.arp_frame(1, "10.0.0.1", "10.0.0.2")] * 5)
    injector.send_all(others + wanted + others)
    cap = sub.collect(netlab.at_least(len(wanted)), timeout=10, detail=daemon.logs)
    assert sports(cap) == list(range(1000, 1020))
    assert {r["dport"] for r in cap.rows} == {53}
    # Filtered out before the ring: the kernel counts only what the filter let through.
    m = netlab.wait_for(lambda: (lambda m: m if netlab.metric_sum(
        m, "fanoutd_kernel_packets_total") >= len(wanted) else None)(daemon.metrics()), 10,
        "the kernel counters")
    assert netlab.metric_sum(m, "fanoutd_kernel_packets_total") == len(wanted)


def test_invalid_filter_is_a_config_error(ns):
    proc = netlab.run_cli(ns, "run", "--interface", "cap0", "--filter", "udp prot 53")
    assert proc.returncode == 78, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fanoutd: filter (--filter): "), lines
    assert "'udp prot 53' does not compile: can't parse filter expression" in lines[0]


def promiscuous(ns: netlab.NetNS) -> bool:
    """IFF_PROMISC in the device's own flags (a packet socket's membership sets it there;
    `ip link` prints PROMISC only for the flag set by hand, and counts memberships in
    `promiscuity N`, which must agree)."""
    flags = int(ns.exec("cat", "/sys/class/net/cap0/flags"), 16)
    count = int(ns.exec("ip", "-d", "link", "show", "cap0").split("promiscuity ")[1].split()[0])
    assert bool(flags & 0x100) == (count > 0)
    return bool(flags & 0x100)


def test_promiscuous_while_running_and_not_after(ns, start_daemon):
    assert not promiscuous(ns)
    daemon = start_daemon(workers=2)
    assert promiscuous(ns)
    assert daemon.stop(signal.SIGTERM) == 0
    assert not promiscuous(ns)


def test_no_promisc(ns, start_daemon):
    start_daemon(workers=1, extra=("--no-promisc",))
    assert not promiscuous(ns)


def test_payload_bytes_match_what_was_sent(injector, start_daemon, subscribe):
    daemon = start_daemon(workers=1, extra=("--payload-bytes", "12"))
    sub = subscribe(daemon)
    sent = {5000 + i: f"payload #{i:03d} and more".encode() for i in range(30)}
    injector.send_all(F.udp4_frame(sport=port, payload=data) for port, data in sent.items())
    injector.send(F.tcp4_frame(sport=6000, payload=b"GET / HTTP/1.1\r\n"))
    cap = sub.collect(netlab.at_least(len(sent) + 1), timeout=10, detail=daemon.logs)
    assert "payload" in cap.batches[0]["fields"]
    got = {r["sport"]: r["payload"] for r in cap.rows}
    assert all(got[port] == data[:12] for port, data in sent.items())
    assert got[6000] == b"GET / HTTP/1"


@pytest.mark.parametrize("rxhash, rps, hashed", [
    ("auto", False, False),  # a veth supplies no hash: auto does not make the kernel compute it
    ("auto", True, True),  # RPS hashes every packet anyway: auto takes it
    ("true", False, True),
    ("false", True, False),
])
def test_the_flow_hash_is_asked_for_as_configured(ns, injector, start_daemon, subscribe,
                                                  rxhash, rps, hashed):
    if rps:  # RPS on cap0's one receive queue, steering to CPU 0
        ns.exec("sh", "-c", "echo 1 > /sys/class/net/cap0/queues/rx-0/rps_cpus")
    daemon = start_daemon(workers=1, extra=("--rxhash", rxhash))
    sub = subscribe(daemon)
    injector.send_all(F.udp4_frame(sport=7100 + i) for i in range(20))
    cap = sub.collect(netlab.at_least(20), timeout=10, detail=daemon.logs)
    hashes = {r["rxhash"] for r in cap.rows}
    if hashed:
        assert 0 not in hashes and len(hashes) > 1, hashes  # 20 flows, 20 hashes
    else:
        assert hashes == {0}, hashes


def test_rows_say_who_stamped_them(injector, start_daemon, subscribe):
    daemon = start_daemon(workers=1)
    sub = subscribe(daemon)
    injector.send_all(F.udp4_frame(sport=7000 + i) for i in range(5))
    cap = sub.collect(netlab.at_least(5), timeout=10, detail=daemon.logs)
    assert {r["ts_src"] for r in cap.rows} == {"software"}


def test_hardware_timestamps_on_a_veth_are_refused_clearly(ns):
    proc = netlab.run_cli(ns, "run", "--interface", "cap0", "--timestamp", "hardware")
    assert proc.returncode == 78, proc.stderr
    assert proc.stderr.strip() == (
        "fanoutd: timestamp (--timestamp): hardware: cap0 cannot timestamp received packets "
        "in hardware (see ethtool -T cap0); use software")


def test_two_daemons_on_one_interface_each_see_every_frame(injector, start_daemon, subscribe):
    first, second = start_daemon(workers=2), start_daemon(workers=2)
    subs = [subscribe(first), subscribe(second)]
    injector.send_all(F.udp4_frame(sport=8000 + i) for i in range(50))
    for daemon, sub in zip((first, second), subs, strict=True):
        cap = sub.collect(netlab.at_least(50), timeout=10, detail=daemon.logs)
        assert sports(cap) == list(range(8000, 8050))


def test_several_interfaces_in_one_daemon(ns, start_daemon, subscribe):
    """Each interface gets its own fanout group and workers; topics, rows, metrics and
    process names tell them apart."""
    ns.add_veth("inj1", "cap1")
    daemon = start_daemon(workers=2, extra=("--interface", "cap1"))
    daemon.interface = "cap1"
    daemon.wait_ready()
    sub = subscribe(daemon)
    with netlab.Injector(ns, "inj0") as inj0, netlab.Injector(ns, "inj1") as inj1:
        inj0.send_all(F.udp4_frame(sport=9000 + i) for i in range(20))
        inj1.send_all(F.udp4_frame(sport=9500 + i) for i in range(30))
    cap = sub.collect(netlab.at_least(50), timeout=10, detail=daemon.logs)
    by_iface = {}
    for batch, topic in zip(cap.batches, cap.topics, strict=True):
        assert topic.startswith(f"pkt.{batch['iface']}.")
        by_iface.setdefault(batch["iface"], []).extend(
            dict(zip(batch["fields"], row, strict=True))["sport"] for row in batch["packets"])
    assert sorted(by_iface["cap0"]) == list(range(9000, 9020))
    assert sorted(by_iface["cap1"]) == list(range(9500, 9530))
    m = daemon.metrics()
    for iface in ("cap0", "cap1"):
        assert m[("fanoutd_workers_up", frozenset({("interface", iface)}))] == 2
    assert set(daemon.children_by_comm()) == {"fd-cap0-w0", "fd-cap0-w1", "fd-cap1-w0",
                                              "fd-cap1-w1", "fanoutd-proxy"}
