"""Ring geometry: the kernel's packet_set_ring rules, checked before any socket exists."""

import pytest

from fanoutd.ring import RingGeometry

PAGE = 4096
MAX_ORDER = 10


def fields_of(geometry):
    return [name for name, _ in geometry.problems(PAGE, MAX_ORDER)]


def test_default_geometry_is_valid_and_derives_frame_count():
    g = RingGeometry(1 << 20, 32, 2048, 10)
    assert g.problems(PAGE, MAX_ORDER) == []
    assert g.frames_per_block == 512
    assert g.frame_count == 512 * 32  # tp_frame_nr must equal frames_per_block * tp_block_nr
    assert g.size == 32 << 20


def test_frame_count_rounds_down_when_frames_do_not_divide_the_block():
    g = RingGeometry(8192, 3, 3008, 10)
    assert g.problems(PAGE, MAX_ORDER) == []
    assert g.frames_per_block == 2
    assert g.frame_count == 6


@pytest.mark.parametrize("geometry, field", [
    (RingGeometry(4095, 4, 2048, 10), "block_size"),
    (RingGeometry(0, 4, 2048, 10), "block_size"),
    (RingGeometry(PAGE << (MAX_ORDER + 1), 4, 2048, 10), "block_size"),
    (RingGeometry(3 * PAGE, 4, 2048, 10), "block_size"),
    (RingGeometry(PAGE, 4, 2040, 10), "frame_size"),
    (RingGeometry(PAGE, 4, 64, 10), "frame_size"),
    (RingGeometry(PAGE, 4, 68, 10), "frame_size"),
    (RingGeometry(PAGE, 4, 2 * PAGE, 10), "frame_size"),
    (RingGeometry(PAGE, 1, 2048, 10), "block_count"),
    (RingGeometry(PAGE, 4, 2048, 0), "block_timeout_ms"),
    (RingGeometry(PAGE, 4, 2048, 60001), "block_timeout_ms"),
])
def test_each_kernel_rule(geometry, field):
    assert set(fields_of(geometry)) == {field}


def test_largest_block_the_kernel_allows_is_accepted():
    assert fields_of(RingGeometry(PAGE << MAX_ORDER, 2, 2048, 10)) == []


def test_smallest_frame_is_the_first_aligned_size_above_the_header():
    assert fields_of(RingGeometry(PAGE, 2, 80, 10)) == []


def test_rules_on_an_unknown_field_are_skipped():
    """The config marks a value that failed its type check as unknown: no rule reads it."""
    g = RingGeometry(1 << 19, 1, 1 << 20, 0)  # frame_size does not fit in the block
    assert fields_of(g) == ["frame_size", "block_count", "block_timeout_ms"]
    assert [n for n, _ in g.problems(PAGE, MAX_ORDER, frozenset({"block_size"}))] == [
        "block_count", "block_timeout_ms"]
    assert g.problems(PAGE, MAX_ORDER, frozenset({"frame_size", "block_count",
                                                  "block_timeout_ms"})) == []
