"""How long a worker leaves its ring alone after a block (worker.pause_after_block)."""

from fanoutd.worker import pause_after_block

MS = 1_000_000  # ns


def test_after_a_block_handed_over_by_its_timeout_the_worker_does_not_pause():
    """Light traffic: the next block is taken the moment it comes (latency)."""
    assert pause_after_block(False, 4 * MS, 10, spare_blocks=3) == 0.0


def test_after_a_full_block_the_worker_pauses_one_block_timeout():
    """Heavy traffic: the next blocks are taken together, one wake-up for them all."""
    assert pause_after_block(True, 5 * MS, 10, spare_blocks=3) == 0.010


def test_the_pause_ends_before_the_spare_blocks_fill():
    """At 1 ms a block, 3 spare blocks (the outbox's free slots) last 3 ms: the pause
    must not let more pile up, whatever the block timeout."""
    assert pause_after_block(True, 1 * MS, 10, spare_blocks=3) == 0.003
    assert pause_after_block(True, 1 * MS, 60_000, spare_blocks=3) == 0.003


def test_no_pause_without_a_fill_time_or_room():
    """A full block with no fill time, timestamps out of order (a clock set back), or no
    spare block: take the next block when it comes."""
    assert pause_after_block(True, 0, 10, spare_blocks=3) == 0.0
    assert pause_after_block(True, -5 * MS, 10, spare_blocks=3) == 0.0
    assert pause_after_block(True, 5 * MS, 10, spare_blocks=0) == 0.0
