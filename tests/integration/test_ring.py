"""RxRing against a real TPACKET_V3 socket on a veth: how a worker sleeps until the kernel
hands over a block, also while it holds older blocks (holding.py)."""

import time

import netlab
import pytest

from fanoutd import ring

BLOCK_TIMEOUT_MS = 20


def timed_wait(rx: ring.RxRing, timeout_s: float, resync: bool) -> float:
    start = time.monotonic()
    rx.wait(timeout_s, resync=resync)
    return time.monotonic() - start


@pytest.fixture
def rx(ns):
    """A real TPACKET_V3 ring on cap0, open to all traffic, closed at teardown."""
    with netlab.capture_ring(ns, ring.RingGeometry(1 << 16, 8, 2048, BLOCK_TIMEOUT_MS)) as rx:
        yield rx


def test_a_worker_holding_a_block_sleeps_until_the_next_one(rx, injector):
    """A held block keeps a level-triggered poll of the socket returning at once; the
    ring's wait sleeps through it and wakes when the kernel closes the next block (on its
    block timeout here), long before its own timeout."""
    injector.send(netlab.filler_frame())
    netlab.wait_for(lambda: rx.wait(0.5, resync=True) or rx.ready(), 5,
                    "the first block to be handed over")
    _, _, num_pkts, first_seq = rx.read(copy=True)
    assert num_pkts == 1
    rx.advance()  # the first block stays the user's: held, as the worker does

    slept = timed_wait(rx, 0.4, resync=False)
    assert slept >= 0.35, f"woke after {slept:.3f} s with no new block"
    assert not rx.ready()

    injector.send(netlab.filler_frame())
    slept = timed_wait(rx, 10.0, resync=False)
    assert slept < 5.0, "the next block's hand-over did not wake the wait"
    assert rx.ready()
    assert rx.head(rx.cursor)[4] == first_seq + 1


def test_a_wait_with_nothing_held_finds_the_block_handed_over_before_it(rx, injector):
    """The block closed before the wait began: its wake-up is not lost."""
    injector.send(netlab.filler_frame())
    netlab.wait_for(rx.ready, 5, "the block to be handed over")
    assert timed_wait(rx, 10.0, resync=True) < 5.0


def test_a_full_block_is_told_from_one_handed_over_by_its_timeout(rx, injector):
    """What a worker goes by to pause after a block (worker.pause_after_block): the
    kernel's TP_STATUS_BLK_TMO, and the time from a block's opening to its last packet."""
    injector.send(netlab.filler_frame())
    netlab.wait_for(rx.ready, 5, "the one-frame block to be handed over")
    assert not rx.handed_over_full(rx.cursor)[0]
    rx.release(rx.cursor)
    rx.advance()

    # Three blocks' worth at once (a frame takes at least 128 bytes of the ring). The
    # block open since the last one went may be cut short by its timeout as the burst
    # begins; the next one is filled by the burst.
    injector.send_all([netlab.filler_frame()] * (3 * rx.geometry.block_size // 128))
    seen = []
    for _ in range(2):
        netlab.wait_for(rx.ready, 5, "a block of the burst to be handed over")
        seen.append(rx.handed_over_full(rx.cursor))
        rx.release(rx.cursor)
        rx.advance()
    assert any(full and 0 < fill_ns < 5_000_000_000 for full, fill_ns in seen), seen
