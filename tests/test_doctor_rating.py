"""doctor's ratings: a ring at line rate (pure arithmetic on crafted geometries and
speeds), and the summary and exit status of crafted sections.

The expected numbers are worked out here from the kernel's layout of a TPACKET_V3 block
(a 48-byte block header; each packet at 82 bytes into its slot, stored without its 4-byte
FCS, the next one 8-byte aligned), which tests/integration/test_doctor.py checks against
a real ring.
"""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fanoutd import doctor, exits
from fanoutd.doctor import CHANGE, NEEDS_CAP_NET_RAW, NOTE, OK, UNREADABLE, Section
from fanoutd.ring import RingGeometry

MAX_BLOCK = 4 << 20  # 4 KiB pages, MAX_ORDER 10
TEN_GBPS = 10_000


def geometry(block_size: int, block_count: int) -> RingGeometry:
    return RingGeometry(block_size, block_count, 2048, 10)


def pps(speed_mbps: int, frame: int) -> float:
    return speed_mbps * 1e6 / ((frame + 20) * 8)  # 20 bytes of preamble and gap


@pytest.mark.parametrize(("block_size", "frame", "expected"), [
    (4096, 64, (4096 - 48 - 1) // 144),  # 28: slot = align8(82 + 60) = 144
    (1 << 19, 64, (524288 - 48 - 1) // 144),  # 3640
    (4096, 1518, 2),  # slot = align8(82 + 1514) = 1600
    (4096, 9018, 1),  # larger than the block: cut to fit, one a block
    # 12288 - 48 = 85 x 144 exactly, but a packet must end before the block's end: 84.
    (12288, 64, 84),
])
def test_frames_per_block(block_size, frame, expected):
    assert doctor.frames_per_block(block_size, frame) == expected


def test_line_rate_of_the_smallest_frame():
    assert doctor.frames_per_second(TEN_GBPS, 64) == pytest.approx(14_880_952, abs=1)
    assert doctor.frames_per_second(1_000, 64) == pytest.approx(1_488_095, abs=1)


def test_a_4_x_4_kib_ring_is_a_change_at_any_usual_speed():
    geo = geometry(4096, 4)
    for speed in (100, 1_000, TEN_GBPS, 100_000):
        lasts = doctor.ring_lasts_ms(geo, speed, (64, 1518))
        assert lasts == pytest.approx(4 * 28 / pps(speed, 64) * 1000)
        assert doctor.rate_ring(lasts) == CHANGE, (speed, lasts)


def test_the_default_ring_at_10_and_1_gbps():
    geo = geometry(1 << 19, 128)  # 64 MiB
    lasts = doctor.ring_lasts_ms(geo, TEN_GBPS, (64, 1518))
    assert lasts == pytest.approx(128 * 3640 / pps(TEN_GBPS, 64) * 1000)  # 31.3 ms
    assert doctor.rate_ring(lasts) == NOTE
    assert doctor.rate_ring(doctor.ring_lasts_ms(geo, 1_000, (64, 1518))) == OK  # 313 ms


def test_small_frames_bound_the_ring_before_its_bytes_do():
    """A 64-byte frame takes 144 bytes of a block for 84 on the wire; a 1518-byte one 1600
    for 1538: the ring fills fastest with small frames."""
    geo = geometry(1 << 20, 32)
    small = doctor.ring_lasts_ms(geo, TEN_GBPS, (64,))
    large = doctor.ring_lasts_ms(geo, TEN_GBPS, (1518,))
    assert small < large < geo.size / (TEN_GBPS * 1e6 / 8) * 1000
    assert doctor.ring_lasts_ms(geo, TEN_GBPS, (64, 1518)) == small


@pytest.mark.parametrize(("lasts", "status"), [
    (0.0, CHANGE), (doctor.RING_CHANGE_MS - 0.001, CHANGE), (doctor.RING_CHANGE_MS, NOTE),
    (doctor.RING_NOTE_MS - 0.001, NOTE), (doctor.RING_NOTE_MS, OK), (5000.0, OK),
])
def test_rating_thresholds(lasts, status):
    assert doctor.rate_ring(lasts) == status


def test_the_advice_keeps_large_blocks_and_adds_just_enough_of_them():
    geo = geometry(1 << 20, 8)
    better = doctor.ring_to_last(geo, TEN_GBPS, (64, 1518), 50, MAX_BLOCK)
    per_block = (1048576 - 48 - 1) // 144
    assert better.block_size == 1 << 20
    assert better.block_count == math.ceil(0.050 * pps(TEN_GBPS, 64) / per_block)
    assert doctor.ring_lasts_ms(better, TEN_GBPS, (64, 1518)) >= 50
    fewer = geometry(1 << 20, better.block_count - 1)
    assert doctor.ring_lasts_ms(fewer, TEN_GBPS, (64, 1518)) < 50


def test_the_advice_raises_small_blocks_to_the_default_size():
    better = doctor.ring_to_last(geometry(4096, 4), TEN_GBPS, (64, 1518), 50, MAX_BLOCK)
    assert better.block_size == 1 << 19
    assert better.block_count == math.ceil(0.050 * pps(TEN_GBPS, 64) / 3640)  # 205
    # ... but never beyond what the kernel allows in one block.
    assert doctor.ring_to_last(geometry(4096, 4), TEN_GBPS, (64,), 50, 65536).block_size \
        == 65536


def test_ring_at_line_rate_says_change_and_what_to_set():
    s = doctor.ring_at_line_rate(geometry(4096, 4), 2, 1500, TEN_GBPS,
                                 "the speed eth0 reports", MAX_BLOCK)
    assert s.status == CHANGE
    assert "line rate: 10000 Mb/s (the speed eth0 reports), 14.9 million 64-byte frames/s" \
        in s.found[0]
    assert "holds 112 64-byte frames (28 a block) or 8 of 1518 bytes (2 a block)" in s.found[1]
    assert "full after 0.0075 ms" in s.found[1]
    count = math.ceil(0.050 * pps(TEN_GBPS, 64) / 3640)
    assert s.advice == [f"raise ring.block_size to 524288 and set ring.block_count to {count} "
                        f"(--block-size 524288 --block-count {count}) for 50 ms at line rate: "
                        f"102.5 MiB per worker, 205 MiB for 2 workers"]


def test_ring_at_line_rate_note_raises_the_block_count():
    s = doctor.ring_at_line_rate(geometry(1 << 19, 128), 4, 1500, TEN_GBPS, "", MAX_BLOCK)
    assert s.status == NOTE and "full after 31 ms" in s.found[1], s.found
    assert s.advice[0].startswith("raise ring.block_count to 205 (--block-count 205) for 50 ms")


def test_ring_at_line_rate_ok_on_a_slower_link():
    s = doctor.ring_at_line_rate(geometry(1 << 19, 128), 4, 1500, 1_000, "", MAX_BLOCK)
    assert s.status == OK and s.advice == [] and "full after 313 ms" in s.found[1], s.found


def test_a_link_without_a_speed_is_rated_at_the_assumed_speed(monkeypatch):
    monkeypatch.setattr(doctor.netdev, "speed_mbps", lambda ifname: None)
    speed, source = doctor.line_rate("veth9")
    assert speed == doctor.ASSUMED_SPEED_MBPS == TEN_GBPS
    assert source == "assumed: veth9 reports no link speed"
    monkeypatch.setattr(doctor.netdev, "speed_mbps", lambda ifname: 25_000)
    assert doctor.line_rate("eth0") == (25_000, "the speed eth0 reports")


def section(title: str, status: str = OK, unchecked: tuple = ()) -> Section:
    s = Section(title)
    s.worse(status)
    for what, why in unchecked:
        s.could_not_check(what, why, f"{what}: could not be checked")
    return s


def test_everything_checked_and_fine():
    found = [section("A"), section("B", NOTE)]
    assert doctor.summary(found) == ["nothing to change"]
    assert doctor.exit_status(found) == 0


def test_something_to_change():
    found = [section("A", CHANGE), section("B", NOTE), section("C", CHANGE)]
    assert doctor.summary(found) == ["to change: A, C"]
    assert doctor.exit_status(found) == 1


def test_unchecked_for_lack_of_cap_net_raw_is_not_nothing_to_change():
    found = [section("A", NOTE, [("the a probe", NEEDS_CAP_NET_RAW)]),
             section("B", unchecked=[("the b probe", NEEDS_CAP_NET_RAW)])]
    assert found[0].status == NOTE  # a note outranks unknown in the section's status...
    assert doctor.summary(found) == [  # ... but the summary still names what was not checked
        f"not checked: the a probe, the b probe ({NEEDS_CAP_NET_RAW})"]
    assert "run doctor as root or with CAP_NET_RAW" in NEEDS_CAP_NET_RAW
    assert doctor.exit_status(found) == 77


def test_unchecked_for_another_reason():
    found = [section("A", unchecked=[("the a probe", NEEDS_CAP_NET_RAW)]),
             section("B", unchecked=[("B", UNREADABLE)])]
    assert doctor.summary(found) == [f"not checked: the a probe ({NEEDS_CAP_NET_RAW})",
                                     f"not checked: B ({UNREADABLE})"]
    assert doctor.exit_status(found) == 69  # running as root alone would not do
    assert doctor.exit_status(found[1:]) == 69


def test_change_and_unchecked():
    found = [section("A", CHANGE), section("B", unchecked=[("b", NEEDS_CAP_NET_RAW)])]
    assert doctor.summary(found) == ["to change: A", f"not checked: b ({NEEDS_CAP_NET_RAW})"]
    assert doctor.exit_status(found) == 1


def test_doctor_exit_statuses_are_documented():
    """Every status doctor returns is in its --help and in the README's exit-status table."""
    root = Path(__file__).resolve().parent.parent
    help_text = subprocess.run([sys.executable, "-m", "fanoutd", "doctor", "--help"],
                               capture_output=True, text=True, timeout=30, check=True,
                               cwd=root).stdout
    help_text = " ".join(help_text.split())
    table = dict(re.findall(r"^\| (\d+) \| (.*) \|$", (root / "README.md").read_text(), re.M))
    for status in (exits.CHANGE, exits.UNAVAILABLE, exits.NOPERM):
        assert re.search(rf"\b{status} [a-z]", help_text), (status, help_text)
        assert "doctor" in table[str(status)], (status, table)
