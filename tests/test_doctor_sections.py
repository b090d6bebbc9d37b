"""doctor's sections without a namespace: each built from crafted readings (ethtool's
output, offloads, MTU, the kernel's page size and memory, fanout probe answers), its
status, its lines and its advice; the whole report from crafted readings; the exit
statuses of an invalid ring and a missing interface.

What doctor reads is replaced where it reads it (the probes of doctor, ring and netdev).
tests/integration/test_doctor.py runs doctor on a real veth; test_doctor_rating.py has the
ring's arithmetic.
"""

import re
from dataclasses import dataclass, field

import pytest

from fanoutd import cli, doctor, fanout, ring
from fanoutd._linux import IFF_RUNNING, IFF_UP
from fanoutd.config import CaptureConfig, Config, FanoutConfig, RingConfig
from fanoutd.doctor import CHANGE, NEEDS_CAP_NET_RAW, NOTE, OK, UNKNOWN, UNREADABLE, Offloads

TITLES = ["Ring and page size", "MTU and packet size", "VLAN offload", "GRO and LRO",
          "Flow symmetry", "Kernel fanout support"]
GRO, LRO = "generic-receive-offload", "large-receive-offload"
VETH = {"rx-vlan-offload": (True, False), GRO: (False, False), LRO: (False, True),
        "rx-gro-hw": (False, True), "rx-gro-list": (False, False)}  # a veth's, GRO off


def capture(workers: int = 2, mode: str = "hash", flags: tuple[str, ...] = (),
            **ring_keys: int) -> CaptureConfig:
    return CaptureConfig(interface="cap0", workers=workers, fanout=FanoutConfig(mode, flags),
                         ring=RingConfig(**ring_keys))


def offloads(**features: tuple[bool, bool]) -> Offloads:
    return Offloads({**VETH, **{k.replace("_", "-"): v for k, v in features.items()}},
                    "ethtool")


@dataclass
class Kernel:
    """What doctor reads, as the tests set it; `allocated` records the test allocations."""

    page: int = 4096
    order: int = 10
    memory: int | None = 8 << 30
    allocation: Exception | None = None  # what opening the test ring raises
    refused: dict[int, str] = field(default_factory=dict)  # fanout type word -> reason
    probe_error: Exception | None = None  # what every fanout probe raises
    allocated: list[tuple[str, ring.RingGeometry, bool]] = field(default_factory=list)
    index: int = 7
    flags: int = IFF_UP | IFF_RUNNING
    mtu: int = 1500
    speed: int | None = 10_000
    offloads: Offloads = field(default_factory=offloads)
    gro_max: int = 65536


class ClosedOnce:
    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


@pytest.fixture
def kernel(monkeypatch) -> Kernel:
    k = Kernel()

    def open_capture_socket(ifname, geo, rxhash):
        k.allocated.append((ifname, geo, rxhash))
        if k.allocation is not None:
            raise k.allocation
        return ClosedOnce()

    def try_fanout(ifname, word):
        if k.probe_error is not None:
            raise k.probe_error
        return k.refused.get(word)

    monkeypatch.setattr(ring, "page_size", lambda: k.page)
    monkeypatch.setattr(ring, "max_page_order", lambda: k.order)
    monkeypatch.setattr(ring, "memory_total", lambda: k.memory)
    monkeypatch.setattr(ring, "open_capture_socket", open_capture_socket)
    monkeypatch.setattr(doctor, "try_fanout", try_fanout)
    monkeypatch.setattr(doctor.socket, "if_nametoindex", lambda name: k.index)
    monkeypatch.setattr(doctor.netdev, "flags", lambda name: k.flags)
    monkeypatch.setattr(doctor.netdev, "mtu", lambda name: k.mtu)
    monkeypatch.setattr(doctor.netdev, "speed_mbps", lambda name: k.speed)
    monkeypatch.setattr(doctor, "read_offloads", lambda name: k.offloads)
    monkeypatch.setattr(doctor, "gro_max_size", lambda name: k.gro_max)
    return k


def ring_section(kernel: Kernel, cfg: CaptureConfig | None = None) -> doctor.Section:
    return doctor.ring_section(cfg or capture(), kernel.mtu, 10_000, "the speed cap0 reports")


# --------------------------------------------------------------------------- ring


def test_the_default_ring(kernel):
    s = ring_section(kernel)
    assert s.status == NOTE and s.unchecked == []
    assert s.found[0] == ("page size 4096 bytes, MAX_ORDER 10: a block must be a power of "
                          "two from 4 KiB to 4 MiB (one physically contiguous allocation)")
    assert s.found[1:3] == ["ring: 128 blocks of 512 KiB, frame_size 2048, block_timeout 10 ms",
                            "it follows every rule of this kernel"]
    assert s.found[3] == ("memory: 64 MiB per worker, 128 MiB for 2 workers (1.6% of 8 GiB "
                          "of RAM), locked in the kernel")
    assert "the kernel allocated one such ring on cap0 (and it was freed at once)" in s.found
    assert any(line.startswith("at low rates the ring covers 1.28 s") for line in s.found)
    assert s.advice == ["raise ring.block_count to 205 (--block-count 205) for 50 ms at line "
                        "rate: 102.5 MiB per worker, 205 MiB for 2 workers"]
    assert [(name, geo) for name, geo, _ in kernel.allocated] == [
        ("cap0", RingConfig().geometry)]


def test_a_ring_against_the_kernels_rules_is_not_allocated(kernel):
    """8 MiB blocks are more than PAGE_SIZE << MAX_ORDER: change, and neither a test
    allocation nor a rating of a ring that cannot exist. A larger MAX_ORDER allows them."""
    big = capture(block_size=8 << 20, block_count=8)
    s = ring_section(kernel, big)
    assert s.status == CHANGE and kernel.allocated == []
    assert any(line.startswith("ring.block_size: must be at most PAGE_SIZE << MAX_ORDER "
                               "= 4194304 bytes") for line in s.found), s.found
    assert not any("line rate" in line for line in s.found)
    kernel.order = 11
    assert ring_section(kernel, big).status != CHANGE and len(kernel.allocated) == 1


def test_the_kernel_refusing_the_ring_is_a_change(kernel):
    kernel.allocation = ring.CaptureError("the kernel refused the RX ring (Cannot allocate "
                                          "memory)")
    s = ring_section(kernel)
    assert s.status == CHANGE
    assert ("the kernel refused a ring of this geometry: the kernel refused the RX ring "
            "(Cannot allocate memory)") in s.found
    assert "lower ring.block_size or ring.block_count" in s.advice


def test_no_cap_net_raw_leaves_the_allocation_unchecked(kernel):
    kernel.allocation = ring.CapturePermissionError("permission denied")
    s = ring_section(kernel)
    assert s.status == NOTE  # the ring's own note outranks unknown
    assert s.unchecked == [("the ring's test allocation", NEEDS_CAP_NET_RAW)]
    assert any(line.startswith("could not test-allocate the ring") for line in s.found)


def test_rings_over_a_quarter_of_ram_are_a_note(kernel):
    kernel.memory = 500 << 20  # 2 x 64 MiB: 25.6%
    s = ring_section(kernel)
    assert "(25.6% of 500 MiB of RAM)" in s.found[3]
    assert s.advice[0].startswith("the rings take over a quarter of RAM")
    kernel.memory = None  # /proc/meminfo unreadable: no share, no advice about it
    s = ring_section(kernel)
    assert s.found[3] == "memory: 64 MiB per worker, 128 MiB for 2 workers, locked in the kernel"
    assert not any("quarter" in a for a in s.advice)


def test_small_short_blocks_are_a_change_and_a_short_stall_a_note(kernel):
    """test_doctor.py's 'what to change' ring: 64 blocks of 8 KiB, 5 ms timeout."""
    s = ring_section(kernel, capture(block_size=8192, block_count=64, block_timeout_ms=5))
    assert s.status == CHANGE
    assert any(line.startswith("at low rates the ring covers 0.32 s") for line in s.found)
    assert ("a worker that stalls 0.32 s loses packets even at a trickle: raise "
            "ring.block_count or ring.block_timeout_ms") in s.advice
    assert any("full after 0.24 ms" in line for line in s.found), s.found


# --------------------------------------------------------------------------- packet size


def test_mtu_1500_fits_the_default_block():
    s = doctor.packet_size_section(capture(), 1500, offloads(), 65536)
    assert s.status == OK and s.advice == []
    assert s.found[0] == "MTU 1500: frames up to 1522 bytes on the wire (with two VLAN tags)"
    assert "a block holds one packet of up to 524158 bytes" in s.found[1]
    assert s.found[-1] == "the largest packet expected (1522 bytes) fits"


def test_jumbo_frames_and_gro_need_a_larger_block():
    cfg = capture(block_size=8192)
    s = doctor.packet_size_section(cfg, 9000, offloads(generic_receive_offload=(True, False)),
                                   65536)
    assert s.status == CHANGE
    assert s.found[0].startswith("MTU 9000: frames up to 9022 bytes")
    assert "up to 8062 bytes" in s.found[1]
    assert ("with generic-receive-offload on, merged packets reach 65550 bytes "
            "(gro_max_size 65536)") in s.found
    assert s.advice == ["packets up to 65550 bytes do not fit a block: raise ring.block_size "
                        "to 131072 (--block-size 131072), or turn GRO/LRO off (see below)"]
    s = doctor.packet_size_section(cfg, 9000, offloads(), 65536)  # no merging
    assert s.advice == ["packets up to 9022 bytes do not fit a block: raise ring.block_size "
                        "to 16384 (--block-size 16384)"]


def test_big_tcp_and_hardware_gro_count_as_merging():
    s = doctor.packet_size_section(capture(block_size=1 << 17), 1500,
                                   offloads(rx_gro_hw=(True, True)), 185_000)
    assert s.status == CHANGE and "merged packets reach 185014 bytes" in " ".join(s.found)
    assert "raise ring.block_size to 262144" in s.advice[0]


# --------------------------------------------------------------------------- offloads


def test_vlan_offload_on_off_and_unreadable():
    s = doctor.vlan_section("cap0", offloads(rx_vlan_stag_hw_parse=(False, True)))
    assert s.status == OK
    assert s.found[:2] == ["rx-vlan-offload (VLAN tag stripping): on",
                           "rx-vlan-stag-hw-parse (802.1ad outer tags): off [fixed]"]
    assert "reports it in `vlan`" in s.found[2]
    s = doctor.vlan_section("cap0", offloads(rx_vlan_offload=(False, False)))
    assert s.status == OK and s.found[-1].startswith("tags stay in the frame")
    s = doctor.vlan_section("cap0", Offloads({}, ""))
    assert s.status == UNKNOWN and s.unchecked == [("VLAN offload", UNREADABLE)]


@pytest.mark.parametrize(("features", "status", "advice"), [
    ({}, OK, []),  # a veth's: GRO off, LRO and hardware GRO fixed off
    ({GRO: (True, False)}, CHANGE, ["for a sensor, turn merging off: ethtool -K cap0 gro off"]),
    ({GRO: (True, False), LRO: (True, False), "rx-gro-hw": (True, False)}, CHANGE,
     ["for a sensor, turn merging off: ethtool -K cap0 gro off lro off rx-gro-hw off"]),
    ({LRO: (True, True)}, NOTE, []),  # fixed on: nothing to turn off
    ({"rx-gro-list": (True, False)}, OK, []),  # fraglist GRO keeps the packets apart
])
def test_gro_and_lro(features, status, advice):
    s = doctor.gro_section("cap0", Offloads({**VETH, **features}, "ethtool"))
    assert (s.status, s.advice) == (status, advice), s.found
    merging = any(line.startswith("merging is on") for line in s.found)
    assert merging == (status != OK)
    assert ("large-receive-offload is fixed on by the driver and cannot be turned off"
            in s.found) == (status == NOTE)
    assert (s.found[-1] == "no merging: the capture sees the packets the wire carried") \
        == (status == OK)


def test_gro_unreadable():
    s = doctor.gro_section("cap0", Offloads({"rx-vlan-offload": (True, False)}, "ioctl"))
    assert s.status == UNKNOWN and s.unchecked == [("GRO and LRO", UNREADABLE)]


ETHTOOL_K = """Features for cap0:
rx-checksumming: on
tx-checksumming: on
\ttx-checksum-ipv4: off [fixed]
generic-receive-offload: off
large-receive-offload: off [fixed]
rx-vlan-offload: on
rx-vlan-stag-hw-parse: on [requested off]
rx-gro-hw: off [fixed]
"""


def test_parse_ethtool_features():
    got = doctor.parse_ethtool_features(ETHTOOL_K)
    assert got["generic-receive-offload"] == (False, False)
    assert got["large-receive-offload"] == (False, True)
    assert got["tx-checksum-ipv4"] == (False, True)
    assert got["rx-vlan-stag-hw-parse"] == (True, False)  # requested, not fixed
    assert "Features for cap0" not in " ".join(got) and len(got) == 8


def test_offloads_from_the_legacy_ioctls_without_ethtool(monkeypatch):
    monkeypatch.setattr(doctor, "find_ethtool", lambda: None)
    values = {doctor.ETHTOOL_GFLAGS: doctor.ETH_FLAG_RXVLAN, doctor.ETHTOOL_GGRO: 1}
    monkeypatch.setattr(doctor.netdev, "ethtool_value", lambda ifname, cmd: values.get(cmd))
    got = doctor.read_offloads("cap0")
    assert got.source == "ioctl" and got.note.startswith("ethtool is not installed")
    assert got.features == {"rx-vlan-offload": (True, False), LRO: (False, False),
                            GRO: (True, False)}
    values.clear()  # the driver answers none
    assert doctor.read_offloads("cap0").features == {}


def test_offloads_when_ethtool_fails(monkeypatch):
    monkeypatch.setattr(doctor, "find_ethtool", lambda: "/bin/false")
    monkeypatch.setattr(doctor.netdev, "ethtool_value", lambda ifname, cmd: None)
    got = doctor.read_offloads("cap0")
    assert (got.source, got.note) == ("ioctl",
                                      "ethtool -k cap0 failed: 1; read with the legacy ioctls")


# --------------------------------------------------------------------------- fanout


def test_flow_symmetry():
    s = doctor.symmetry_section(capture())
    assert s.status == OK and s.advice == []
    assert s.found[:2] == ["configured: fanout hash, flags none",
                           "hash: " + doctor.SYMMETRY["hash"][1]]
    assert any("the defrag flag reassembles them first" in line for line in s.found)
    assert "lb: not guaranteed" in s.found and "hash: both directions together" not in s.found
    s = doctor.symmetry_section(capture(flags=("defrag",)))
    assert not any("defrag flag" in line for line in s.found)
    for mode in ("lb", "cpu", "rnd", "qm", "rollover"):
        s = doctor.symmetry_section(capture(mode=mode))
        assert s.status == NOTE and "--fanout hash" in s.advice[0], mode
        assert "hash: both directions together" in s.found
    s = doctor.symmetry_section(capture(flags=("rollover",)))
    assert s.status == NOTE and any("flow may then be split" in line for line in s.found)


def test_fanout_all_supported(kernel):
    s = doctor.fanout_section(capture(), True)
    assert s.status == OK and s.advice == []
    for mode in fanout.MODES:
        assert f"mode {mode}: supported" in s.found
    for flag in ("uniqueid", *fanout.FLAGS):
        assert f"flag {flag}: supported" in s.found
    assert s.found[-1] == "the configured hash: accepted"


def test_fanout_refusals(kernel):
    """A mode or flag this kernel refuses is a note, unless the configuration uses it:
    then a change. Refusals on a down interface say to bring it up and try again."""
    outgoing = fanout.MODES["hash"] | fanout.FLAGS["ignore-outgoing"]
    kernel.refused = {outgoing: "Invalid argument"}
    s = doctor.fanout_section(capture(), True)
    assert s.status == NOTE and s.advice == []
    assert "flag ignore-outgoing: refused: Invalid argument" in s.found
    s = doctor.fanout_section(capture(flags=("ignore-outgoing",)), True)
    assert s.status == CHANGE
    assert "the configured hash+ignore-outgoing: refused: Invalid argument" in s.found
    assert s.advice == ["choose a fanout mode and flags this kernel accepts (above)"]
    s = doctor.fanout_section(capture(), False)
    assert s.advice == ["bring it up (ip link set cap0 up) and run doctor again"]
    kernel.refused = {}
    assert doctor.fanout_section(capture(), False).advice == []  # down, but nothing refused


def test_fanout_without_cap_net_raw(kernel):
    kernel.probe_error = PermissionError(1, "Operation not permitted")
    s = doctor.fanout_section(capture(), True)
    assert s.status == UNKNOWN
    assert s.unchecked == [("the fanout modes and flags this kernel accepts",
                            NEEDS_CAP_NET_RAW)]


# --------------------------------------------------------------------------- report


def sections_of(report: str) -> dict[str, tuple[str, list[str]]]:
    """{title: (status, lines)} of a rendered report, as test_doctor.py reads it."""
    found = {}
    for m in re.finditer(r"^\[(\w+)\] (.+)\n((?:    .*\n)*)", report, re.M):
        found[m.group(2)] = (m.group(1), [line[4:] for line in m.group(3).splitlines()])
    return found


def test_the_report_of_a_veth(kernel):
    """The readings of test_doctor.py's veth: every section in order, one note, exit 0."""
    cfg = Config(interfaces=(capture(),))
    headline, sections = doctor.examine(cfg)
    assert headline == ("fanoutd doctor: cap0 (index 7, up, MTU 1500, 10000 Mb/s); 2 workers, "
                        "fanout hash")
    assert [s.title for s in sections] == TITLES
    assert [s.status for s in sections] == [NOTE, OK, OK, OK, OK, OK]
    report = doctor.render(headline, sections)
    found = sections_of(report)
    assert list(found) == TITLES
    assert "-> raise ring.block_count to 205 (--block-count 205) for 50 ms at line rate: " \
           "102.5 MiB per worker, 205 MiB for 2 workers" in found["Ring and page size"][1]
    assert report.startswith(headline + "\n\n[note] Ring and page size\n")
    assert report.endswith("\n\nnothing to change\n")
    assert doctor.exit_status(sections) == 0


def test_the_report_headline_and_the_ioctl_note(kernel):
    """No carrier, no speed (rated at 10 Gb/s), offloads from the ioctls: the note heads
    the two sections that use them, and only those."""
    kernel.flags, kernel.speed = IFF_UP, None
    kernel.offloads = Offloads({"rx-vlan-offload": (True, False), GRO: (True, False)}, "ioctl",
                               "ethtool is not installed (...)")
    cfg = Config(interfaces=(capture(workers=3, mode="lb"), capture()))
    headline, sections = doctor.examine(cfg)
    assert headline == ("fanoutd doctor: cap0 (index 7, up, no carrier, MTU 1500); 3 workers, "
                        "fanout lb (the first of 2 interfaces in the configuration; "
                        "--interface picks another)")
    assert any("line rate: 10000 Mb/s (assumed: cap0 reports no link speed)" in line
               for line in sections[0].found)
    assert [s.found[0] == "ethtool is not installed (...)" for s in sections] == [
        False, False, True, True, False, False]
    kernel.flags = 0
    assert "(index 7, down, MTU 1500);" in doctor.examine(cfg)[0]


def test_the_report_of_what_to_change(kernel):
    """test_doctor.py's 'what to change' readings: the summary and exit 1."""
    kernel.mtu = 9000
    kernel.offloads = offloads(generic_receive_offload=(True, False))
    cfg = Config(interfaces=(capture(mode="lb", flags=("defrag",), block_size=8192,
                                     block_count=64, block_timeout_ms=5),))
    headline, sections = doctor.examine(cfg)
    assert [s.status for s in sections] == [CHANGE, CHANGE, OK, CHANGE, NOTE, OK]
    assert doctor.summary(sections) == [
        "to change: Ring and page size, MTU and packet size, GRO and LRO"]
    assert doctor.exit_status(sections) == 1
    report = doctor.render(headline, sections)
    assert ("    -> packets up to 65550 bytes do not fit a block: raise ring.block_size "
            "to 131072") in report
    assert "    -> for a sensor, turn merging off: ethtool -K cap0 gro off\n" in report


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_doctor_invalid_ring_exits_78(capsys):
    """Checked before anything is read: no namespace needed."""
    status, out, err = run(capsys, "doctor", "--interface", "lo", "--block-size", "1000")
    assert (status, out) == (78, ""), err
    assert "ring.block_size (--block-size): must be a positive multiple of the page size" \
        in err


def test_doctor_missing_interface_exits_69(capsys):
    status, out, err = run(capsys, "doctor", "--interface", "fo-nosuch0")
    assert (status, out) == (69, ""), err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "fo-nosuch0" in lines[0] and "does not exist" in lines[0], lines
