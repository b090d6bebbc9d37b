"""Hostile traffic and hostile subscribers: the daemon keeps capturing, decoding and
publishing whatever arrives on the wire and however slowly a subscriber reads.

All traffic is written on inj0 inside the test's own namespace (fixtures `ns`, `injector`).
"""

import contextlib
import itertools
import random
import struct
import threading
import time
from collections import Counter
from pathlib import Path

import frames as F
import msgpack
import netlab
import pytest
import zmq

from fanoutd.client import StreamKey
from fanoutd.client import Subscriber as ClientSubscriber
from fanoutd.wire import ERROR_REASONS, HELLO

pytestmark = pytest.mark.integration

CAP_MAC = bytes.fromhex(netlab.CAP_MAC.replace(":", ""))
# The receiving kernel untags 802.1Q / 802.1ad frames before any packet socket sees them
# (skb_vlan_untag in __netif_receive_skb_core) and silently frees one too short for the tag
# plus the two bytes after it: such a frame never reaches a capture ring at all.
KERNEL_UNTAGGED = (b"\x81\x00", b"\x88\xa8")
KERNEL_MIN_TAGGED_LEN = 14 + 4 + 2


# --------------------------------------------------------------------------- hostile frames


def valid_templates() -> list[bytes]:
    """Well-formed frames of many kinds, the raw material for byte flips and truncations."""
    s4, d4, s6, d6 = "192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2"
    udp4 = F.ipv4(s4, d4, 17, F.udp(1000, 53, b"u" * 12))
    return [
        F.udp4_frame(payload=b"u" * 18),
        F.tcp4_frame(flags=0x018, payload=b"t" * 10),
        F.ipv4_frame(s4, d4, 6, F.tcp(1000, 443, options=b"\x01\x01\x01\x00"),
                     options=b"\x01\x01\x01\x00"),
        F.ipv4_frame(s4, d4, 17, F.udp(1000, 53), flags_frag=0x2000),
        F.ipv4_frame(s4, d4, 1, F.icmp(8, 0)),
        F.ipv4_frame(s4, d4, 132, F.sctp(1000, 2000)),
        F.ipv4_frame(s4, d4, 33, F.dccp(1000, 2000)),
        F.ipv6_frame(s6, d6, 17, F.udp(1000, 53, b"x" * 4)),
        F.ipv6_frame(s6, d6, 6, F.tcp(1000, 22, 0x012)),
        F.ipv6_frame(s6, d6, 0, F.ipv6_ext(60) + F.ipv6_ext(44)
                     + F.ipv6_frag(6, offset=0, more=True) + F.tcp(1000, 22)),
        F.ipv6_frame(s6, d6, 51, F.ipv6_ah(17) + F.udp(1000, 4789)),
        F.ipv6_frame(s6, d6, 58, F.icmp(128, 0)),
        F.udp4_frame(vlans=((0x8100, 100),)),
        F.eth(F.MAC_B, F.MAC_A, 0x0800, udp4, vlans=((0x88A8, 10), (0x8100, 20))),
        F.eth(F.MAC_B, F.MAC_A, 0x86DD, F.ipv6(s6, d6, 17, F.udp(1, 2)),
              vlans=((0x9100, 7),)),
        F.arp_frame(1, s4, d4),
        F.arp_frame(2, s4, d4, eth_dst=F.MAC_B),
        F.dot3(F.MAC_B, F.MAC_A, F.snap(F.OUI_ZERO, 0x0800, udp4)),
        F.dot3(F.MAC_B, F.MAC_A, F.llc(0x42, 0x42, 0x03, b"\x00" * 35)),
    ]


def random_dst(rng: random.Random) -> bytes:
    """A unicast MAC that is not cap0's: the frame is PACKET_OTHERHOST on cap0, so the
    namespace's own stack drops it at once and never answers anything."""
    while True:
        dst = bytearray(rng.randbytes(6))
        dst[0] = (dst[0] & 0xFC) | 0x02  # unicast, locally administered
        if bytes(dst) != CAP_MAC:
            return bytes(dst)


def mutate(rng: random.Random, body: bytes) -> bytes:
    """Random byte flips (a flipped bit or a random byte), sometimes a random truncation."""
    out = bytearray(body)
    flips = rng.randint(0, 6)
    for _ in range(flips):
        at = rng.randrange(len(out))
        if rng.random() < 0.5:
            out[at] ^= 1 << rng.randrange(8)
        else:
            out[at] = rng.randrange(256)
    if flips == 0 or rng.random() < 0.6:
        out = out[:rng.randint(2, len(out) - 1)]  # at least the type field stays
    return bytes(out)


def hostile_frames(n: int, seed: int) -> list[bytes]:
    """n frames of garbage, each carrying its index i in its source MAC (frames.mac(i)).

    A quarter are random bytes (14..300), a quarter random bytes behind an ethertype
    the decoder follows, half mutated well-formed frames. The source MAC (bytes 6..12)
    is the identity: the decoder reports it as eth_src for any frame of 12 bytes or
    more, and a VLAN tag the kernel moves into the ring header comes after it.
    """
    rng = random.Random(seed)
    templates = [t[12:] for t in valid_templates()]  # type field onwards
    types = (0x0800, 0x86DD, 0x0806, 0x8100, 0x88A8, 0x9100, 0x0030)
    out = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.25:
            body = rng.randbytes(rng.randint(14, 300) - 12)
        elif kind < 0.5:
            body = struct.pack("!H", rng.choice(types)) + rng.randbytes(rng.randint(0, 286))
            if body[:2] == b"\x08\x00" and rng.random() < 0.7:
                body = body[:2] + b"\x45" + body[3:]  # a plausible IPv4 version/IHL
        else:
            body = mutate(rng, rng.choice(templates))
        frame = random_dst(rng) + F.mac(i) + body
        if frame[12:14] in KERNEL_UNTAGGED and len(frame) < KERNEL_MIN_TAGGED_LEN:
            frame += rng.randbytes(KERNEL_MIN_TAGGED_LEN - len(frame))
        out.append(frame)
    return out


def metric_per_worker(m: dict, name: str) -> dict[str, float]:
    """{worker label: value} of one per-worker metric."""
    return {dict(lbl)["worker"]: v for lbl, v in netlab.samples(m, name).items()}


def metrics_once_decoded(daemon: netlab.Daemon, n: int, timeout: float = 15) -> dict:
    """A scrape taken once fanoutd_packets_decoded_total has reached n. A worker counts
    a block's packets just after publishing it, so the counter may trail the rows a
    subscriber already holds by a moment."""
    def scrape() -> dict | None:
        m = daemon.try_metrics()
        return m if m and netlab.metric_sum(m, "fanoutd_packets_decoded_total") >= n else None
    return netlab.wait_for(scrape, timeout, f"fanoutd_packets_decoded_total >= {n}",
                           detail=daemon.logs)


def test_thousands_of_random_frames(injector, start_daemon, subscribe):
    """~5000 frames of random bytes and mutated valid frames: every one is summarised
    exactly once with a known error reason (or none), nothing crashes a worker or skips
    a block, the counters agree with what was sent, and a normal frame still decodes."""
    workers = 2
    daemon = start_daemon(workers=workers, fanout="lb", extra=("--block-count", "64"))
    sub = subscribe(daemon)
    frames = hostile_frames(5000, seed=20261125)
    sent = {f[6:12]: f for f in frames}
    assert len(sent) == len(frames)

    injector.send_all(frames)
    cap = sub.collect(netlab.all_keys(set(sent), lambda r: r["eth_src"]), timeout=30,
                      detail=daemon.logs)

    seen = Counter(r["eth_src"] for r in cap.rows)
    twice = [k.hex(":") for k, n in seen.items() if n > 1]
    unknown = [k for k in seen if k not in sent]
    assert not twice, f"{len(twice)} frames summarised more than once, e.g. {twice[:5]}"
    assert not unknown, f"rows for frames never sent: {unknown[:5]}"
    bad_err = [(r["eth_src"].hex(":"), r["err"]) for r in cap.rows
               if r["err"] is not None and r["err"] not in ERROR_REASONS]
    assert not bad_err, f"err values not in ERROR_REASONS: {bad_err[:10]}"
    wrong_len = [(r["eth_src"].hex(":"), len(sent[r["eth_src"]]), r["len"], r["caplen"])
                 for r in cap.rows if not r["len"] == r["caplen"] == len(sent[r["eth_src"]])]
    assert not wrong_len, f"len/caplen differ from the injected length: {wrong_len[:10]}"

    # The daemon is still fine: a normal frame afterwards is summarised correctly.
    probe_mac = F.mac(len(frames))
    injector.send(F.ipv4_frame("198.51.100.7", "198.51.100.8", 17, F.udp(4321, 53),
                               eth_src=probe_mac))
    cap = sub.collect(lambda rows: any(r["eth_src"] == probe_mac for r in rows), timeout=10,
                      detail=daemon.logs)
    (probe,) = [r for r in cap.rows if r["eth_src"] == probe_mac]
    assert (probe["err"], probe["proto"], probe["sport"], probe["dport"], probe["src"]) == (
        None, 17, 4321, 53, F.ip_bytes("198.51.100.7")), probe
    daemon.check_running()

    total = len(frames) + 1
    m = metrics_once_decoded(daemon, total)
    assert netlab.metric_sum(m, "fanoutd_packets_decoded_total") == total
    assert netlab.metric_sum(m, "fanoutd_kernel_packets_total") == total
    assert netlab.metric_sum(m, "fanoutd_kernel_drops_total") == 0
    restarts = metric_per_worker(m, "fanoutd_worker_restarts_total")
    assert restarts == {str(w): 0 for w in range(workers)}, restarts
    skipped = metric_per_worker(m, "fanoutd_blocks_skipped_total")
    assert skipped == {str(w): 0 for w in range(workers)}, skipped
    errors = Counter(r["err"] for r in cap.rows if r["err"] is not None)
    counted = {reason: netlab.metric_sum(m, "fanoutd_decode_errors_total", reason=reason)
               for reason in ERROR_REASONS}
    assert {k: v for k, v in counted.items() if v} == dict(errors), \
        "fanoutd_decode_errors_total disagrees with the rows' err values"
    assert len(errors) >= 10, f"the garbage should hit most error paths; hit {dict(errors)}"
    assert "Traceback" not in daemon.stderr_text(), daemon.logs()


# --------------------------------------------------------------------------- slow subscriber

SLOW_TOTAL = 40_000
SLOW_TAIL = 400  # frames sent after the stalled subscriber resumes reading
SLOW_BLOCK_SIZE = 8192


def numbered(i: int) -> bytes:
    """Frame i: a small UDP frame whose source MAC is frames.mac(i)."""
    return F.ipv4_frame("192.0.2.1", "192.0.2.2", 17, F.udp(1000 + i % 50000, 2000),
                        eth_src=F.mac(i))


class Pump:
    """Injects frames first..last-1 from a thread at a bounded pace: a pause every
    `every` frames (by default ~20k frames/s)."""

    def __init__(self, injector: netlab.Injector, first: int, last: int, every: int = 50,
                 pause: float = 0.002) -> None:
        self.injector, self.first, self.last = injector, first, last
        self.every, self.pause = every, pause
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            for i in range(self.first, self.last):
                self.injector.send(numbered(i))
                if i % self.every == self.every - 1:
                    time.sleep(self.pause)
        except BaseException as e:  # shown by __exit__, not lost in the thread
            self.error = e
        finally:
            self.done.set()

    def __enter__(self) -> "Pump":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the pump thread did not finish"
        if self.error is not None and exc[0] is None:
            raise self.error


def blocks_per_worker(m: dict) -> dict[int, int]:
    """Ring blocks each worker turned into a batch (published or refused at the HWM):
    its batches carry seq 0 .. that number - 1."""
    pub = metric_per_worker(m, "fanoutd_batches_published_total")
    drops = metric_per_worker(m, "fanoutd_publish_drops_total")
    return {int(w): int(pub[w] + drops.get(w, 0)) for w in pub}


def test_slow_subscriber_does_not_stall_capture(ns, injector, start_daemon, subscribe):
    """A subscriber that stops reading (high-water mark 4) does not stall capture or the
    subscriber that keeps reading; when it resumes, the batches it missed show up as
    `lost` (seq gaps) in fanoutd.client.Subscriber, exactly as many as it did not get."""
    workers = 2
    daemon = start_daemon(workers=workers, fanout="lb", extra=(
        "--hwm", "4", "--block-size", str(SLOW_BLOCK_SIZE), "--block-count", "64",
        "--block-timeout", "2"))
    reader = subscribe(daemon)
    ctx = zmq.Context()
    stalled = ClientSubscriber(daemon.endpoint, rcvhwm=4, context=ctx)
    try:
        assert stalled.wait_ready(timeout=10), "no fanoutd.hello for the stalled subscriber"
        # From here on `stalled` reads nothing until the pump is over.
        started = time.monotonic()
        with Pump(injector, 0, SLOW_TOTAL) as pump:
            cap = reader.collect(lambda rows: pump.done.is_set(), timeout=60, settle=0.5,
                                 detail=daemon.logs)
        pump_end = time.monotonic()
        daemon.check_running()

        # Capture was not stalled: nothing dropped in the kernel, everything decoded.
        m = metrics_once_decoded(daemon, SLOW_TOTAL)
        assert netlab.metric_sum(m, "fanoutd_kernel_drops_total") == 0, daemon.logs()
        assert netlab.metric_sum(m, "fanoutd_kernel_packets_total") == SLOW_TOTAL
        assert netlab.metric_sum(m, "fanoutd_packets_decoded_total") == SLOW_TOTAL

        # The reading subscriber received batches all along while the other one stalled.
        during = [t for t in cap.arrived if started <= t <= pump_end]
        assert len(during) >= 100, f"only {len(during)} batches while pumping; {cap.summary()}"
        longest = max(b - a for a, b in itertools.pairwise([started, *during]))
        assert longest < 1.0, f"the reading subscriber got nothing for {longest:.2f}s"

        # ... and got every frame, or saw a seq gap for what it did not get.
        blocks = blocks_per_worker(m)
        got_seqs = {w: {b["seq"] for b in cap.batches if b["worker"] == w}
                    for w in range(workers)}
        missed_batches = sum(blocks[w] - len(got_seqs[w]) for w in range(workers))
        assert all(s <= set(range(blocks[w])) for w, s in got_seqs.items()), got_seqs
        ids = Counter(r["eth_src"] for r in cap.rows)
        assert max(ids.values()) == 1, "the reading subscriber got a frame twice"
        missed_frames = SLOW_TOTAL - len(ids)
        frames_per_block = SLOW_BLOCK_SIZE // 128  # a small UDP frame takes 128 ring bytes
        assert missed_frames <= missed_batches * frames_per_block, (
            f"the reading subscriber is missing {missed_frames} frames but only "
            f"{missed_batches} batches (seq gaps): frames vanished without a gap")
        drops = netlab.metric_sum(m, "fanoutd_publish_drops_total")
        assert missed_batches >= drops

        # The stalled subscriber resumes: first what was queued for it, then new traffic.
        seqs: dict[int, list[int]] = {w: [] for w in range(workers)}
        for batch in stalled.batches(timeout=0.5):
            seqs[batch.worker].append(batch.seq)
        queued = sum(map(len, seqs.values()))
        tail = {F.mac(i) for i in range(SLOW_TOTAL, SLOW_TOTAL + SLOW_TAIL)}
        got_tail: set[bytes] = set()
        lost_before = sum(stalled.lost.values())
        with Pump(injector, SLOW_TOTAL, SLOW_TOTAL + SLOW_TAIL) as pump:
            deadline = time.monotonic() + 15
            quiet_since = None  # the pump is done and nothing has come for a while
            while not tail <= got_tail and time.monotonic() < deadline:
                got_any = False
                for batch in stalled.batches(timeout=0.5):
                    got_any = True
                    seqs[batch.worker].append(batch.seq)
                    got_tail |= {pkt["eth_src"] for pkt in batch.rows()} & tail
                    if tail <= got_tail:
                        break
                if got_any or not pump.done.is_set():
                    quiet_since = None
                elif quiet_since is None:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since > 1.0:
                    break
        # It receives again. Under load a subscriber with a 4-message queue may still fall
        # behind the burst, as any slow subscriber: what it misses then shows as seq gaps.
        assert len(got_tail) >= SLOW_TAIL // 2, (
            f"the resumed subscriber got {len(got_tail)} of the {SLOW_TAIL} frames sent "
            "after it resumed")
        lost_after = sum(stalled.lost.values()) - lost_before
        assert SLOW_TAIL - len(got_tail) <= lost_after * frames_per_block, (
            f"the resumed subscriber is missing {SLOW_TAIL - len(got_tail)} of the frames "
            f"sent after it resumed but saw only {lost_after} batches lost: frames vanished "
            "without a gap")

        lost = sum(stalled.lost.values())
        assert lost > 0, (f"the stalled subscriber reports no lost batches (it got {queued} "
                          f"batches queued from the stall); seqs {seqs}")
        assert stalled.duplicates == 0
        for w in range(workers):
            got = seqs[w]
            assert got and got[0] == 0, f"worker {w}: first batch seen {got[:1]}, want seq 0"
            assert got == sorted(set(got)), f"worker {w}: seqs out of order or repeated"
            # Every batch it did not get up to the last it saw is counted as lost.
            key = StreamKey(daemon.endpoint, daemon.interface, w)
            assert stalled.lost.get(key, 0) == got[-1] + 1 - len(got)
        restarts = metric_per_worker(daemon.metrics(), "fanoutd_worker_restarts_total")
        assert restarts == {str(w): 0 for w in range(workers)}, restarts
    finally:
        stalled.close()
        ctx.term()


# --------------------------------------------------------------------------- hostile subscribers


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def test_a_flood_of_subscriptions_does_not_grow_the_proxy(injector, start_daemon, subscribe):
    """A client sending 100,000 distinct subscriptions (each cost the proxy about 1 KiB,
    for as long as the connection lasted) is cut off past publish.max_subscriptions,
    counted, and the proxy's memory stays put; a subscriber that behaves is served."""
    daemon = start_daemon(workers=1)
    reader = subscribe(daemon)
    proxy = daemon.children_by_comm()["fanoutd-proxy"]
    before = rss_mib(proxy)
    ctx = zmq.Context()
    try:
        flood = ctx.socket(zmq.SUB)
        flood.setsockopt(zmq.LINGER, 0)
        flood.setsockopt(zmq.SNDHWM, 0)  # queue every subscription, none dropped
        monitor = flood.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        flood.connect(daemon.endpoint)
        rng = random.Random(12)
        for _ in range(100_000):
            flood.subscribe(rng.randbytes(16))

        def cut_off_or_grown() -> bool:
            return bool(monitor.poll(100)) or rss_mib(proxy) - before > 64
        netlab.wait_for(cut_off_or_grown, 30, "the flood to be cut off", detail=daemon.logs)
        flood.disable_monitor()
        monitor.close()
        flood.close()
    finally:
        ctx.destroy(linger=0)
    grown = rss_mib(proxy) - before
    assert grown < 16, f"the proxy grew by {grown:.0f} MiB"
    m = daemon.metrics()
    assert netlab.metric_sum(m, "fanoutd_subscribers_closed_total") >= 1
    assert netlab.metric_sum(m, "fanoutd_subscriptions_refused_total") >= 64
    assert netlab.metric_sum(m, "fanoutd_subscribers") == 1  # the reader
    assert daemon.children_by_comm()["fanoutd-proxy"] == proxy
    injector.send_all(numbered(i) for i in range(10))
    reader.collect(netlab.at_least(10), timeout=10, detail=daemon.logs)


def test_the_welcome_goes_only_to_the_connection_that_asked(start_daemon, subscribe):
    """A client asking for the welcome again and again (an XSUB may send a subscription
    many times) gets its welcomes; other subscribers get none of them."""
    daemon = start_daemon(workers=1)
    innocent = subscribe(daemon)  # has had its own welcome
    ctx = zmq.Context()
    try:
        asker = ctx.socket(zmq.XSUB)
        asker.setsockopt(zmq.LINGER, 0)
        asker.connect(daemon.endpoint)
        asks = 50  # within publish.max_subscriptions
        for _ in range(asks):
            asker.send(b"\x01" + HELLO)
        welcomes = 0

        def all_welcomed() -> bool:
            nonlocal welcomes
            while asker.poll(50):
                welcomes += asker.recv_multipart() == [HELLO]
            return welcomes == asks
        netlab.wait_for(all_welcomed, 10, f"{asks} welcomes", detail=daemon.logs)
    finally:
        ctx.destroy(linger=0)
    extra = 0
    while innocent.sock.poll(300):
        extra += innocent.sock.recv_multipart() == [HELLO]
    assert extra == 0, f"another subscriber's {extra} welcomes reached the innocent one"


def test_subscribers_past_max_subscribers_are_refused(start_daemon):
    """With publish.max_subscribers: 2, a third subscriber's connection is closed at once
    (counted) for as long as two are there; its SUB socket keeps reconnecting, as after
    any lost connection, and gets in once one of the two has left."""
    with netlab.workdir() as wd:
        config = wd / "fanoutd.yaml"
        config.write_text("publish:\n  max_subscribers: 2\n")
        daemon = start_daemon(workers=1, extra=("-c", str(config)))
        with contextlib.ExitStack() as stack:
            first, second = (stack.enter_context(ClientSubscriber(daemon.endpoint))
                             for _ in range(2))
            assert first.wait_ready(10) and second.wait_ready(10), daemon.logs()
            third = stack.enter_context(netlab.Subscriber(daemon.endpoint))
            with pytest.raises(netlab.WaitTimeout):
                third.wait_hello(timeout=2)
            m = daemon.metrics()
            assert netlab.metric_sum(m, "fanoutd_subscriber_connections_refused_total") >= 1
            assert netlab.metric_sum(m, "fanoutd_subscribers") == 2
            second.close()
            third.wait_hello(timeout=10, detail=daemon.logs)


def test_batches_dropped_for_a_full_subscriber_queue_are_counted(injector, start_daemon):
    """A subscriber that stops reading loses batches at its queue in the proxy (1 MiB of
    8 KiB blocks here: about 80 batches), all of them acknowledged to the workers, so no
    worker counts them: the proxy does, on /metrics and on the stats topic."""
    with netlab.workdir() as wd:
        config = wd / "fanoutd.yaml"
        config.write_text("publish:\n  subscriber_queue_bytes: 1048576\n"
                          "supervisor:\n  status_interval_ms: 200\n")
        daemon = start_daemon(workers=2, fanout="lb", extra=(
            "-c", str(config), "--block-size", str(SLOW_BLOCK_SIZE), "--block-count", "64",
            "--block-timeout", "2"))
        ctx = zmq.Context()
        try:
            stalled = ClientSubscriber(daemon.endpoint, rcvhwm=4, context=ctx)
            stats = ctx.socket(zmq.SUB)
            stats.setsockopt(zmq.LINGER, 0)
            stats.subscribe(b"stats")
            stats.connect(daemon.endpoint)
            assert stalled.wait_ready(timeout=10), daemon.logs()
            # 1 MiB / (17/16 of an 8 KiB block + 4 KiB batch overhead + 256 B topic and
            # bookkeeping: wire.max_batch_bytes, publish.MESSAGE_OVERHEAD)
            assert "each subscriber's queue holds at most 80 batches" in daemon.logs()
            with Pump(injector, 0, 20_000):
                pass
            m = metrics_once_decoded(daemon, 20_000)
            for name in ("fanoutd_kernel_drops_total", "fanoutd_publish_drops_total"):
                assert netlab.metric_sum(m, name) == 0, (name, daemon.logs())
            # It reads again: what its queue held, then newer batches after a gap.
            queued = len(list(stalled.batches(timeout=0.5)))
            tail = {F.mac(i) for i in range(20_000, 20_100)}
            got: set[bytes] = set()
            with Pump(injector, 20_000, 20_100):
                deadline = time.monotonic() + 15
                while not tail <= got and time.monotonic() < deadline:
                    for batch in stalled.batches(timeout=0.5):
                        got |= {pkt["eth_src"] for pkt in batch.rows()} & tail
            assert tail <= got, daemon.logs()
            lost = sum(stalled.lost.values())
            assert lost > 0, f"the stalled subscriber lost nothing (it got {queued} queued)"
            overflows = netlab.metric_sum(m, "fanoutd_subscriber_overflows_total")
            assert overflows >= 1, daemon.logs()

            def counted_in_stats() -> bool:
                while stats.poll(100):
                    _, body = stats.recv_multipart()
                    publisher = msgpack.unpackb(body)["publisher"]
                    if publisher["subscriber_overflows_total"] >= overflows:
                        return True
                return False
            netlab.wait_for(counted_in_stats, 10, "the count on the stats topic",
                            detail=daemon.logs)
            stalled.close()
        finally:
            ctx.destroy(linger=0)


def test_a_stalled_subscribers_backlog_is_given_back_once_it_leaves(injector, start_daemon):
    """A subscriber that stops reading makes the proxy hold up to its queue's bytes of
    batches; once it leaves, libzmq frees them and the proxy hands the pages back to the
    system (memory.release_freed_memory) instead of glibc keeping them."""
    with netlab.workdir() as wd:
        config = wd / "fanoutd.yaml"
        config.write_text("publish:\n  subscriber_queue_bytes: 33554432\n"
                          "supervisor:\n  status_interval_ms: 200\n")
        daemon = start_daemon(workers=1, fanout="lb", extra=(
            "-c", str(config), "--payload-bytes", "1400", "--block-count", "64"))
        ctx = zmq.Context()
        try:
            stalled = ClientSubscriber(daemon.endpoint, rcvhwm=2, context=ctx)
            assert stalled.wait_ready(timeout=10), daemon.logs()
            proxy = daemon.children_by_comm()["fanoutd-proxy"]
            idle = rss_mib(proxy)
            frame = F.udp4_frame(payload=b"\xab" * 1400)
            for _ in range(20):  # ~30 MB of batches (the queue keeps 256: ~16 MB), bounded
                injector.send_all([frame] * 1000)
                time.sleep(0.05)
            netlab.wait_for(lambda: rss_mib(proxy) > idle + 10, 15,
                            "the proxy to hold the stalled subscriber's batches",
                            detail=lambda: f"{rss_mib(proxy):.1f} MiB, idle "
                                           f"{idle:.1f}\n{daemon.logs()}")
            held = rss_mib(proxy)
            stalled.close()
            netlab.wait_for(lambda: rss_mib(proxy) < idle + 4, 15,
                            "the proxy to give the memory back",
                            detail=lambda: f"{rss_mib(proxy):.1f} MiB, idle "
                                           f"{idle:.1f}, held {held:.1f}\n{daemon.logs()}")
        finally:
            ctx.destroy(linger=0)
