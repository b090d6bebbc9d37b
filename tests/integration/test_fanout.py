"""PACKET_FANOUT modes with 2 workers: how frames are spread, and that none is lost or doubled.

Frames are UDP or TCP with a unique source port, so each row names its frame.
"""

import os
import signal
from collections import Counter

import frames as F
import netlab
import pytest

pytestmark = pytest.mark.integration


def udp_frames(n: int, base: int = 20000) -> dict[int, bytes]:
    """{sport: frame} for n UDP frames from distinct source addresses and ports."""
    return {base + i: F.udp4_frame(src=f"10.9.{i >> 8}.{i & 0xFF}", sport=base + i, dport=53)
            for i in range(n)}


def deliver_once(injector, sub, daemon, frames_by_sport: dict[int, bytes]) -> netlab.Capture:
    """Inject the frames; collect until each source port is seen; assert each is seen once."""
    injector.send_all(frames_by_sport.values())
    want = set(frames_by_sport)
    cap = sub.collect(netlab.all_keys(want, lambda r: r["sport"]), timeout=10,
                      detail=daemon.logs)
    counts = Counter(r["sport"] for r in cap.rows)
    dupes = {p: n for p, n in counts.items() if n > 1}
    strays = set(counts) - want
    assert not dupes, f"frames delivered more than once (sport: count): {dupes}"
    assert not strays, f"rows for frames never injected: sports {sorted(strays)[:10]}"
    return cap


def per_worker(cap: netlab.Capture) -> dict[int, int]:
    return dict(Counter(r["worker"] for r in cap.rows))


def test_lb_splits_evenly(injector, start_daemon, subscribe):
    daemon = start_daemon(workers=2, fanout="lb")
    cap = deliver_once(injector, subscribe(daemon), daemon, udp_frames(200))
    counts = per_worker(cap)
    assert set(counts) == {0, 1}, f"lb used workers {counts}"
    assert abs(counts[0] - counts[1]) <= 1, f"lb split unevenly: {counts}"


def test_hash_keeps_both_directions_of_a_flow_on_one_worker(injector, start_daemon,
                                                            subscribe):
    daemon = start_daemon(workers=2, fanout="hash")
    sub = subscribe(daemon)
    frames, n_flows, rounds = [], 30, 3
    for f in range(n_flows):
        client, server, cport = f"10.20.0.{f + 1}", f"10.30.0.{f + 1}", 40000 + f
        for _ in range(rounds):
            frames.append(F.tcp4_frame(client, server, cport, 443, 0x010))
            frames.append(F.tcp4_frame(server, client, 443, cport, 0x018))
    injector.send_all(frames)

    def flow(r: dict) -> frozenset:
        return frozenset({(r["src"], r["sport"]), (r["dst"], r["dport"])})

    cap = sub.collect(netlab.at_least(len(frames)), timeout=10, detail=daemon.logs)
    assert len(cap.rows) == len(frames), cap.summary()
    workers_of: dict[frozenset, set] = {}
    for r in cap.rows:
        workers_of.setdefault(flow(r), set()).add(r["worker"])
    assert len(workers_of) == n_flows, f"saw {len(workers_of)} flows, injected {n_flows}"
    split = {tuple(sorted(k)): w for k, w in workers_of.items() if len(w) > 1}
    assert not split, f"flows seen on both workers: {split}"
    used = Counter(next(iter(w)) for w in workers_of.values())
    assert set(used) == {0, 1}, f"hash put every flow on one worker: {dict(used)}"
    for key, n in Counter(flow(r) for r in cap.rows).items():
        assert n == 2 * rounds, f"flow {sorted(key)} seen {n} times, injected {2 * rounds}"


def test_rollover_at_low_rate_stays_on_one_worker(injector, start_daemon, subscribe):
    daemon = start_daemon(workers=2, fanout="rollover")
    cap = deliver_once(injector, subscribe(daemon), daemon, udp_frames(100))
    counts = per_worker(cap)
    assert len(counts) == 1, f"rollover spread frames over workers at low rate: {counts}"


@pytest.mark.parametrize("mode", ["cpu", "qm", "rnd"])
def test_mode_delivers_every_frame_once(injector, start_daemon, subscribe, mode):
    daemon = start_daemon(workers=2, fanout=mode)
    cap = deliver_once(injector, subscribe(daemon), daemon, udp_frames(100))
    assert set(per_worker(cap)) <= {0, 1}


def test_hash_with_defrag_and_rollover_flags(injector, start_daemon, subscribe):
    daemon = start_daemon(workers=2, fanout="hash", fanout_flags="defrag,rollover")
    sub = subscribe(daemon)
    frames = udp_frames(60)
    frames |= {30000 + i: F.tcp4_frame(src=f"10.8.0.{i + 1}", sport=30000 + i, flags=0x002)
               for i in range(60)}
    # With defrag the kernel reassembles IPv4 fragments before fanout: two fragments of
    # one UDP datagram must come out as a single, whole, unfragmented row.
    datagram = F.udp(31000, 53, b"A" * 40)
    frames[31000] = F.ipv4_frame("10.5.0.1", "10.5.0.2", 17, datagram[:24], ident=77,
                                 flags_frag=0x2000)
    second = F.ipv4_frame("10.5.0.1", "10.5.0.2", 17, datagram[24:], ident=77, flags_frag=3)
    injector.send(second)  # the later fragment first: reassembly is order-independent
    cap = deliver_once(injector, sub, daemon, frames)
    whole = next(r for r in cap.rows if r["sport"] == 31000)
    assert (whole["frag"], whole["len"], whole["dport"]) == (False, 14 + 20 + 48, 53), whole
    assert len(cap.rows) == len(frames), cap.summary()


GROUP = "4242"


def test_a_second_daemon_in_the_same_group_is_refused(injector, start_daemon, subscribe):
    """Two daemons given the same --group-id on one interface would join one group, each
    seeing about half of the traffic, without a word. The second is refused: exit 69
    with one line naming the group and the interface; the first sees every frame."""
    first = start_daemon(workers=2, extra=("--group-id", GROUP))
    sub = subscribe(first)
    second = start_daemon(ready=False, workers=2, extra=("--group-id", GROUP))
    status = netlab.wait_for(lambda: second.proc.poll(), 20, "the second daemon to exit",
                             detail=second.logs)
    assert status == 69, second.logs()
    lines = second.stderr_text().splitlines()
    assert len(lines) == 1, lines
    assert f"cap0: fanout group {GROUP} is in use already" in lines[0], lines
    deliver_once(injector, sub, first, udp_frames(200))
    assert f"fanout hash (group {GROUP})" in first.logs()


@pytest.mark.parametrize("mode", ["hash", "lb"])
def test_a_group_in_use_by_another_capture_is_refused(ns, start_daemon, mode):
    """The group is held by another program's socket (mode hash): refused, whatever the
    mode asked for, and the check itself never joins that group (it would take packets
    from its holder meanwhile)."""
    with netlab.fanout_holder(ns, int(GROUP)):
        daemon = start_daemon(ready=False, workers=2, fanout=mode,
                              extra=("--group-id", GROUP))
        status = netlab.wait_for(lambda: daemon.proc.poll(), 20, "the daemon to exit",
                                 detail=daemon.logs)
    assert status == 69, daemon.logs()
    lines = daemon.stderr_text().splitlines()
    assert len(lines) == 1 and f"cap0: fanout group {GROUP} is in use already" in lines[0], \
        lines


def test_a_reload_keeps_its_own_explicit_group(injector, start_daemon, subscribe):
    """fanoutd's own reload with the same explicit group id leaves the group before it
    joins it again: the check for a group in use must not refuse it."""
    with netlab.workdir() as wd:
        config = wd / "fanoutd.yaml"
        ring = "ring: {block_size: 65536, block_count: 8, block_timeout_ms: 5}\n"
        config.write_text(f"workers: 2\nfanout: {{mode: lb, group_id: {GROUP}}}\n{ring}")
        daemon = start_daemon(workers=2, config=config)
        sub = subscribe(daemon)
        config.write_text(f"workers: 3\nfanout: {{mode: lb, group_id: {GROUP}}}\n{ring}")
        os.kill(daemon.pid, signal.SIGHUP)
        netlab.wait_for(lambda: "reloaded the configuration (changed: workers)"
                        in daemon.stderr_text(), 15, "the reload", detail=daemon.logs)
        daemon.workers = 3
        daemon.wait_ready()
        cap = deliver_once(injector, sub, daemon, udp_frames(300))
        assert set(per_worker(cap)) == {0, 1, 2}
        assert daemon.stderr_text().count(f"fanout lb (group {GROUP})") == 2
        assert "ERROR" not in daemon.stderr_text()
