"""HeldBlocks without a daemon: fake ring blocks, a real RingTable standing in for the
proxy's word, a fake clock; which blocks go back to the kernel, when, and what is counted.
Last, the proxy's own acknowledgement feeding it."""

import os

import pytest
import zmq
from fakes import FakeClock

from fanoutd import outbox
from fanoutd.config import CurveConfig
from fanoutd.holding import HOLD_WAIT_S, RETAIN_S, HeldBlocks
from fanoutd.outbox import Outbox
from fanoutd.publish import Proxy, ProxyPlan
from fanoutd.ring import RingGeometry
from fanoutd.slotstats import ProxyStats, RingTable

RING_ID = 3


class FakeRing:
    """What HeldBlocks uses of an RxRing: its geometry, and release() (recorded)."""

    def __init__(self, block_count: int = 16, block_timeout_ms: int = 10) -> None:
        self.geometry = RingGeometry(4096, block_count, 2048, block_timeout_ms)
        self.released: list[int] = []

    def release(self, index: int) -> None:
        self.released.append(index)


@pytest.fixture
def ring():
    return FakeRing()


@pytest.fixture
def rings():
    table = RingTable(8)
    table.assign(RING_ID, b"pkt.eth0.0")
    return table


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def held(ring, rings, clock):
    return HeldBlocks(ring, rings, RING_ID, clock)


def publish(held: HeldBlocks, indexes, first_seq: int = 1) -> None:
    """Blocks at `indexes` published, with consecutive seqs from first_seq."""
    for n, index in enumerate(indexes):
        held.hold(index, first_seq + n)


def test_sizes_follow_the_ring():
    held = HeldBlocks(FakeRing(block_count=128), RingTable(1), 0)
    assert (held.retain, held.reserve) == (16, 16)
    small = HeldBlocks(FakeRing(block_count=4, block_timeout_ms=2), RingTable(1), 0)
    assert (small.retain, small.reserve) == (2, 1)


def test_nothing_goes_back_before_the_proxy_passed_it_on(held, ring, rings):
    publish(held, [5, 6, 7, 8])
    held.release_passed_on()
    assert ring.released == []
    # Waits for the next block (which wakes it) at most RETAIN_S; draining, no block
    # will come: it looks at the proxy's word often.
    assert held.idle(draining=False) == RETAIN_S
    assert held.idle(draining=True) == HOLD_WAIT_S
    assert ring.released == []
    assert len(held) == 4


def test_what_the_proxy_passed_on_goes_back_but_the_newest_retain(held, ring, rings):
    publish(held, [5, 6, 7, 8])
    rings.forwarded[RING_ID] = 3
    held.release_passed_on()
    assert ring.released == [5]  # acknowledged 1..3; the newest 2 (retain) stay
    assert (len(held), held.acknowledged) == (3, 2)
    assert held.idle(draining=False) == RETAIN_S  # seq 4 is not passed on yet
    rings.forwarded[RING_ID] = 4
    held.release_passed_on()
    assert ring.released == [5, 6]
    assert (len(held), held.acknowledged) == (2, 2)


def test_an_older_word_releases_nothing(held, ring, rings):
    rings.forwarded[RING_ID] = 10
    publish(held, [0, 1, 2], first_seq=11)
    held.release_passed_on()
    assert ring.released == []
    assert held.acknowledged == 0


def test_retained_blocks_go_back_once_traffic_pauses(held, ring, rings, clock):
    publish(held, [0, 1])
    rings.forwarded[RING_ID] = 2
    held.release_passed_on()
    assert ring.released == []  # both retained
    clock.now += RETAIN_S / 2
    # Waits for the next block at most until the pause would be over.
    assert held.idle(draining=False) == pytest.approx(RETAIN_S / 2)
    publish(held, [2], first_seq=3)  # traffic again: the pause counts from the last ack
    rings.forwarded[RING_ID] = 3
    held.release_passed_on()
    assert ring.released == [0]
    clock.now += RETAIN_S * 0.9
    assert held.idle(draining=False) == pytest.approx(RETAIN_S * 0.1)
    clock.now += RETAIN_S * 0.2
    assert held.idle(draining=False) == 0.0
    assert ring.released == [0, 1, 2]
    assert (len(held), held.acknowledged) == (0, 0)


def test_a_draining_worker_does_not_retain(held, ring, rings):
    publish(held, [0, 1])
    rings.forwarded[RING_ID] = 2
    held.release_passed_on()
    assert held.idle(draining=True) == 0.0
    assert ring.released == [0, 1]


def test_idle_with_nothing_held_lets_the_worker_poll(held, ring):
    assert held.idle(draining=False) == 0.0
    assert ring.released == []


def test_passed_on_names_blocks_a_replaced_worker_left(held, rings):
    rings.forwarded[RING_ID] = 7
    assert held.passed_on(6) and held.passed_on(7)
    assert not held.passed_on(8)


def test_the_oldest_is_let_go_when_the_ring_is_all_but_full(held, ring, rings):
    # 16 blocks, 2 kept free for the kernel.
    publish(held, range(10))
    held.make_room(unread=4)  # 16 - 10 - 4 = 2 free: enough
    assert ring.released == [] and held.let_go == 0
    held.make_room(unread=5)  # 1 free: let one go
    assert ring.released == [0] and held.let_go == 1
    held.make_room(unread=8)  # 16 - 9 - 8 < 0: three more
    assert ring.released == [0, 1, 2, 3] and held.let_go == 4
    assert len(held) == 6


def test_room_is_made_from_retained_blocks_first(held, ring, rings):
    publish(held, range(12))
    rings.forwarded[RING_ID] = 2
    held.release_passed_on()
    assert ring.released == [] and held.acknowledged == 2
    held.make_room(unread=3)  # 16 - 12 - 3 = 1 free: the oldest, passed on, goes
    assert ring.released == [0] and held.acknowledged == 1
    held.make_room(unread=5)  # 16 - 11 - 5 = 0 free: two more, the retained one first
    assert ring.released == [0, 1, 2] and held.acknowledged == 0
    assert held.let_go == 3
    assert held.idle(draining=False) == RETAIN_S  # the rest still waits for the proxy


def test_the_proxys_acknowledgement_releases_the_block(tmp_path, ring, rings, clock):
    """A batch through a real Proxy and this process's outbox, as ring 3's worker: the
    proxy's word makes the worker's block go back (once out of the retained ones)."""
    rings.pid[RING_ID] = os.getpid()
    stats = ProxyStats()
    stats["block_size"] = 65536
    plan = ProxyPlan(f"{tmp_path}/w.sock", f"ipc://{tmp_path}/p.ipc", 16, 1 << 20, 4,
                     4, 1.0, 1.0, None, CurveConfig())
    held = HeldBlocks(ring, rings, RING_ID, clock)
    ctx = zmq.Context()
    box = Outbox(65536)
    try:
        proxy = Proxy(ctx, plan, rings, stats, ["eth0"])
        assert stats["forwarding"] == 1  # no subscribers to wait for
        conn = outbox.connect(plan.backend, box, RING_ID, b"pkt.eth0.0")
        for index, seq in ((4, 41), (5, 42), (6, 43)):
            held.hold(index, seq)
            assert box.put(seq, b"body")
        for _ in range(50):
            proxy.run_once(100)
            if rings.forwarded[RING_ID] == 43:
                break
        assert rings.forwarded[RING_ID] == 43
        held.release_passed_on()
        assert ring.released == [4]
        conn.close()
        proxy.close()
    finally:
        box.close()
        ctx.destroy(linger=0)
