"""`fanoutd doctor`: what affects capture on an interface, and what to change.

One section per topic, each with a status: ok, note (worth knowing, nothing required),
change (capture loses or alters packets as things are: the advice says what to do) or
unknown (could not be checked, and why). The last lines sum up what to change and what
could not be checked; `exit_status` turns that into the exit status.

Nothing here sends a packet. The kernel's fanout support is probed with AF_PACKET sockets
that carry a drop-all filter before they are bound, join groups of their own (the kernel
picks unused ids), and are closed at once: they receive nothing and touch no other group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import TextIO

from fanoutd import exits, fanout, netdev, ring
from fanoutd._linux import IFF_RUNNING, IFF_UP
from fanoutd.config import CaptureConfig, Config, RingConfig

OK, NOTE, CHANGE, UNKNOWN = "ok", "note", "change", "unknown"

# A check that could not be made is not a pass: doctor exits exits.NOPERM when it needed
# CAP_NET_RAW, exits.UNAVAILABLE for any other reason.
# Why a check could not be made.
NEEDS_CAP_NET_RAW = "AF_PACKET sockets need CAP_NET_RAW: run doctor as root or with CAP_NET_RAW"
UNREADABLE = "neither ethtool nor the driver's ethtool ioctls answered"

# Legacy ethtool commands (struct ethtool_value), used when the ethtool tool is missing.
ETHTOOL_GFLAGS = 0x25
ETHTOOL_GGRO = 0x2B
ETH_FLAG_RXVLAN = 1 << 8
ETH_FLAG_LRO = 1 << 15

# The kernel's layout of a TPACKET_V3 block: a 48-byte block header, then each packet at
# tp_mac = TPACKET_ALIGN(TPACKET3_HDRLEN + 16) - 14 = 82 bytes into its frame (for an
# Ethernet header, no PACKET_RESERVE). A packet longer than block_size - 48 - 82 is cut.
BLOCK_HEADER = 48
FRAME_MAC_OFFSET = 82
GRO_MAX_DEFAULT = 65536
ETHERNET_HEADER = 14
VLAN_TAG = 4

# How long a ring lasts at line rate. Line rate is the link's speed filled with the
# smallest Ethernet frame: 64 bytes (FCS included) plus 20 bytes of preamble and
# inter-frame gap on the wire. In a block the kernel stores the frame without its FCS
# after the 82-byte frame header, and starts the next packet 8-byte aligned
# (TOTAL_PKT_LEN_INCL_ALIGN in af_packet.c): a 64-byte frame takes 144 bytes.
SMALLEST_FRAME = 64
WIRE_OVERHEAD = 20  # preamble and start delimiter (8) + inter-frame gap (12)
FCS = 4  # the NIC strips it before the kernel stores the frame
V3_ALIGNMENT = 8
# An interface that reports no speed (/sys/class/net/IF/speed is -1 or unreadable) is
# rated as a 10 Gb/s link. A veth reports a nominal 10000 Mb/s of its own.
ASSUMED_SPEED_MBPS = 10_000
# A worker's ring that fills in under RING_CHANGE_MS at line rate drops packets whenever
# its worker is descheduled for a moment: change. Under RING_NOTE_MS: a note. The advice
# aims at RING_NOTE_MS.
RING_CHANGE_MS = 5
RING_NOTE_MS = 50

# How each fanout mode places the two directions of a flow.
SYMMETRY = {
    "hash": (True, "the kernel's symmetric flow hash (addresses and ports in a canonical "
                   "order) picks the worker, so both directions of a flow reach the same one"),
    "lb": (False, "round robin, packet by packet: a flow is spread over every worker"),
    "cpu": (False, "the CPU that received the packet: both directions meet only if the NIC's "
                   "RSS (or RPS) steers them to one CPU, which needs a symmetric RSS key "
                   "(not the default on most NICs)"),
    "rnd": (False, "a random worker per packet"),
    "qm": (False, "the NIC's receive queue: both directions meet only if its RSS hash is "
                  "symmetric (not the default on most NICs)"),
    "rollover": (False, "fills one worker until its ring is full, then the next: flows "
                        "move between workers with the load"),
}


@dataclass
class Section:
    """One topic of the report."""

    title: str
    status: str = OK
    found: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    unchecked: list[tuple[str, str]] = field(default_factory=list)  # (what, why)

    def worse(self, status: str) -> None:
        """Raise the status to `status` if that is more serious."""
        order = (OK, UNKNOWN, NOTE, CHANGE)
        if order.index(status) > order.index(self.status):
            self.status = status

    def could_not_check(self, what: str, why: str, text: str) -> None:
        """Record a check that could not be made: `text` in the section, `what` and `why`
        in the summary."""
        self.worse(UNKNOWN)
        self.found.append(text)
        self.unchecked.append((what, why))


@dataclass
class Offloads:
    """Receive offload settings: {ethtool feature name: (on, fixed)}, and where from."""

    features: dict[str, tuple[bool, bool]]
    source: str  # "ethtool", "ioctl" or "" (nothing could be read)
    note: str = ""


# --------------------------------------------------------------------------- probes


def find_ethtool() -> str | None:
    """The ethtool program on PATH (Debian: /usr/sbin/ethtool, package ethtool)."""
    return shutil.which("ethtool")


def read_offloads(ifname: str) -> Offloads:
    """Receive offloads from `ethtool -k`, or from the legacy ethtool ioctls without it."""
    tool = find_ethtool()
    missing = ("ethtool is not installed (apt-get install ethtool): read with the legacy "
               "ethtool ioctls instead, which cover VLAN offload, GRO and LRO only")
    if tool is not None:
        try:
            proc = subprocess.run([tool, "-k", ifname], capture_output=True, text=True,
                                  timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            missing = f"ethtool -k {ifname} failed ({e}): read with the legacy ioctls"
        else:
            if proc.returncode == 0:
                return Offloads(parse_ethtool_features(proc.stdout), "ethtool")
            missing = (f"ethtool -k {ifname} failed: {proc.stderr.strip() or proc.returncode}"
                       f"; read with the legacy ioctls")
    return Offloads(read_offloads_ioctl(ifname), "ioctl", missing)


def parse_ethtool_features(text: str) -> dict[str, tuple[bool, bool]]:
    """`ethtool -k` output -> {feature: (on, fixed)}."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"\s*([\w-]+): (on|off)(?: \[(.*)\])?\s*$", line)
        if m:
            out[m.group(1)] = (m.group(2) == "on", m.group(3) == "fixed")
    return out


def read_offloads_ioctl(ifname: str) -> dict[str, tuple[bool, bool]]:
    """VLAN offload, LRO and GRO from the legacy ioctls; `fixed` is not known here."""
    out = {}
    flags = netdev.ethtool_value(ifname, ETHTOOL_GFLAGS)
    if flags is not None:
        out["rx-vlan-offload"] = (bool(flags & ETH_FLAG_RXVLAN), False)
        out["large-receive-offload"] = (bool(flags & ETH_FLAG_LRO), False)
    gro = netdev.ethtool_value(ifname, ETHTOOL_GGRO)
    if gro is not None:
        out["generic-receive-offload"] = (bool(gro), False)
    return out


def gro_max_size(ifname: str) -> int:
    """The largest packet GRO builds on the interface (gro_max_size, BIG TCP raises it)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError, IndexError,
                             KeyError, TypeError):
        proc = subprocess.run(["ip", "-d", "-j", "link", "show", "dev", ifname],
                              capture_output=True, text=True, timeout=10, check=True)
        return int(json.loads(proc.stdout)[0]["gro_max_size"])
    return GRO_MAX_DEFAULT


def line_rate(ifname: str) -> tuple[int, str]:
    """(Mb/s, where that figure comes from) for rating the ring."""
    speed = netdev.speed_mbps(ifname)
    if speed is None:
        return ASSUMED_SPEED_MBPS, f"assumed: {ifname} reports no link speed"
    return speed, f"the speed {ifname} reports"


def try_fanout(ifname: str, word: int) -> str | None:
    """None when the kernel accepts a new fanout group of type `word`, else its reason."""
    error = fanout.try_new_group(ifname, word)
    return None if error is None else error.strerror or str(error)


# --------------------------------------------------------------------------- sections


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            text = f"{n:.0f}" if n == int(n) else f"{n:.1f}"
            return f"{text} {unit}"
        n /= 1024
    raise AssertionError


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def frames_per_block(block_size: int, frame: int) -> int:
    """How many frames of `frame` bytes (on the wire, FCS included) one block holds."""
    slot = _align(FRAME_MAC_OFFSET + frame - FCS, V3_ALIGNMENT)
    # The kernel closes a block unless the packet ends strictly before the block's end;
    # a packet larger than the block is cut to fit one alone.
    return max(1, (block_size - BLOCK_HEADER - 1) // slot)


def frames_per_second(speed_mbps: int, frame: int) -> float:
    """Line rate in frames of `frame` bytes (FCS included) per second."""
    return speed_mbps * 1e6 / ((frame + WIRE_OVERHEAD) * 8)


def ring_lasts_ms(geo: ring.RingGeometry, speed_mbps: int, frames: tuple[int, ...]) -> float:
    """How long one ring that nobody reads takes to fill at line rate, in ms: the least
    over frame sizes, as what it holds is bounded by its packet count (small frames) and
    by its bytes (large ones)."""
    return min(geo.block_count * frames_per_block(geo.block_size, frame)
               / frames_per_second(speed_mbps, frame) * 1000 for frame in frames)


def rate_ring(lasts_ms: float) -> str:
    """The status of a ring that fills in lasts_ms at line rate."""
    if lasts_ms < RING_CHANGE_MS:
        return CHANGE
    return NOTE if lasts_ms < RING_NOTE_MS else OK


def ring_to_last(geo: ring.RingGeometry, speed_mbps: int, frames: tuple[int, ...],
                 target_ms: int, largest_block: int) -> ring.RingGeometry:
    """The geometry to advise: blocks at least as large as the default (smaller blocks
    make more, smaller batches) and just enough of them to last target_ms at line rate."""
    block = max(geo.block_size, min(RingConfig.block_size, largest_block))
    count = max(math.ceil(target_ms * frames_per_second(speed_mbps, frame) / 1000
                          / frames_per_block(block, frame)) for frame in frames)
    return dataclasses.replace(geo, block_size=block, block_count=max(count, 2))


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _ms(ms: float) -> str:
    if ms >= 1000:
        return f"{ms / 1000:.1f} s"
    return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.2g} ms"


def ring_section(cfg: CaptureConfig, mtu: int, speed: int, speed_source: str) -> Section:
    """Page size, the largest block, the configured ring: valid, memory, how long it lasts
    at line rate and at low rates."""
    s = Section("Ring and page size")
    page, order = ring.page_size(), ring.max_page_order()
    largest = page << order
    geo = cfg.ring.geometry
    workers = cfg.workers or 1
    s.found.append(f"page size {page} bytes, MAX_ORDER {order}: a block must be a power of "
                   f"two from {_size(page)} to {_size(largest)} (one physically contiguous "
                   f"allocation)")
    s.found.append(f"ring: {geo.block_count} blocks of {_size(geo.block_size)}, frame_size "
                   f"{geo.frame_size}, block_timeout {geo.block_timeout_ms} ms")
    problems = geo.problems(page, order)
    for name, rule in problems:
        s.worse(CHANGE)
        s.found.append(f"ring.{name}: {rule}")
    if not problems:
        s.found.append("it follows every rule of this kernel")
    memory = ring.memory_total()
    share = f" ({100 * geo.size * workers / memory:.1f}% of {_size(memory)} of RAM)" \
        if memory else ""
    s.found.append(f"memory: {_size(geo.size)} per worker, {_size(geo.size * workers)} for "
                   f"{workers} workers{share}, locked in the kernel")
    if memory and geo.size * workers > memory // 4:
        s.worse(NOTE)
        s.advice.append("the rings take over a quarter of RAM: lower ring.block_count or "
                        "workers unless this machine does nothing else")
    if not problems:
        try:
            sock = ring.open_capture_socket(cfg.interface, geo, cfg.ring.rxhash)
        except ring.CapturePermissionError:
            s.could_not_check("the ring's test allocation", NEEDS_CAP_NET_RAW,
                              "could not test-allocate the ring: opening an AF_PACKET "
                              "socket needs CAP_NET_RAW (run doctor as root or with "
                              "CAP_NET_RAW)")
        except ring.CaptureError as e:
            s.worse(CHANGE)
            s.found.append(f"the kernel refused a ring of this geometry: {e}")
            s.advice.append("lower ring.block_size or ring.block_count")
        else:
            sock.close()
            s.found.append(f"the kernel allocated one such ring on {cfg.interface} (and it "
                           f"was freed at once)")
    low = geo.block_count * geo.block_timeout_ms / 1000
    s.found.append(f"at low rates the ring covers {low:g} s: the kernel retires a block "
                   f"after {geo.block_timeout_ms} ms however little it holds, so "
                   f"{geo.block_count} blocks x {geo.block_timeout_ms} ms is how long a "
                   f"worker may stall before packets are dropped")
    if low < 1:
        s.worse(NOTE)
        s.advice.append(f"a worker that stalls {low:g} s loses packets even at a trickle: "
                        f"raise ring.block_count or ring.block_timeout_ms")
    if not problems:
        rated = ring_at_line_rate(geo, workers, mtu, speed, speed_source, largest)
        s.worse(rated.status)
        s.found += rated.found
        s.advice += rated.advice
    return s


def ring_at_line_rate(geo: ring.RingGeometry, workers: int, mtu: int, speed: int,
                      speed_source: str, largest_block: int) -> Section:
    """How long one worker's ring lasts at line rate (fanout may send a whole burst to
    one worker), rated, and the ring to configure when that is short: the lines of the
    ring section that say so."""
    s = Section("Ring at line rate")
    full = mtu + ETHERNET_HEADER + FCS
    frames = (SMALLEST_FRAME, full)
    small, large = (frames_per_block(geo.block_size, f) for f in frames)
    lasts = ring_lasts_ms(geo, speed, frames)
    s.found.append(f"line rate: {speed} Mb/s ({speed_source}), "
                   f"{frames_per_second(speed, SMALLEST_FRAME) / 1e6:.3g} million "
                   f"{SMALLEST_FRAME}-byte frames/s ({SMALLEST_FRAME + WIRE_OVERHEAD} bytes "
                   f"each on the wire)")
    s.found.append(f"a worker's ring holds {geo.block_count * small} {SMALLEST_FRAME}-byte "
                   f"frames ({small} a block) or {geo.block_count * large} of {full} bytes "
                   f"({large} a block): at line rate it is full after {_ms(lasts)} if its "
                   f"worker stalls, and fanout may send a whole burst to one worker")
    status = rate_ring(lasts)
    if status == OK:
        return s
    s.worse(status)
    if status == CHANGE:
        s.found.append(f"under {RING_CHANGE_MS} ms: the ring overflows whenever its worker "
                       f"is off the CPU for a moment, so bursts are dropped")
    else:
        s.found.append(f"under {RING_NOTE_MS} ms: enough for a steady load, tight for "
                       f"bursts")
    better = ring_to_last(geo, speed, frames, RING_NOTE_MS, largest_block)
    keys = f"ring.block_count to {better.block_count}"
    flags = f"--block-count {better.block_count}"
    if better.block_size != geo.block_size:
        keys = f"ring.block_size to {better.block_size} and set {keys}"
        flags = f"--block-size {better.block_size} {flags}"
    s.advice.append(f"raise {keys} ({flags}) for {RING_NOTE_MS} ms at line rate: "
                    f"{_size(better.size)} per worker, {_size(better.size * workers)} for "
                    f"{workers} workers")
    return s


def packet_size_section(cfg: CaptureConfig, mtu: int, offloads: Offloads, gro_max: int) -> Section:
    """MTU (and GRO/LRO merged packets) versus what one block can hold."""
    s = Section("MTU and packet size")
    geo = cfg.ring.geometry
    holds = geo.block_size - BLOCK_HEADER - FRAME_MAC_OFFSET
    wire = mtu + ETHERNET_HEADER + 2 * VLAN_TAG
    s.found.append(f"MTU {mtu}: frames up to {wire} bytes on the wire (with two VLAN tags)")
    s.found.append(f"a block holds one packet of up to {holds} bytes (block_size "
                   f"{geo.block_size} minus the {BLOCK_HEADER}-byte block header and the "
                   f"{FRAME_MAC_OFFSET}-byte frame header); longer packets are truncated")
    s.found.append(f"frame_size ({geo.frame_size}) does not limit packets: with TPACKET_V3 "
                   f"packets are packed into the block one after another, and frame_size "
                   f"only sets how the kernel counts frames")
    merging = [name for name in ("generic-receive-offload", "large-receive-offload",
                                 "rx-gro-hw") if offloads.features.get(name, (False,))[0]]
    largest = wire
    if merging:
        largest = max(wire, gro_max + ETHERNET_HEADER)
        s.found.append(f"with {', '.join(merging)} on, merged packets reach "
                       f"{largest} bytes (gro_max_size {gro_max})")
    if largest > holds:
        s.worse(CHANGE)
        need = _next_power_of_two(largest + BLOCK_HEADER + FRAME_MAC_OFFSET)
        s.advice.append(f"packets up to {largest} bytes do not fit a block: raise "
                        f"ring.block_size to {need} (--block-size {need})"
                        + (", or turn GRO/LRO off (see below)" if merging else ""))
    else:
        s.found.append(f"the largest packet expected ({largest} bytes) fits")
    return s


def vlan_section(ifname: str, offloads: Offloads) -> Section:
    s = Section("VLAN offload")
    state = offloads.features.get("rx-vlan-offload")
    if state is None:
        s.could_not_check("VLAN offload", UNREADABLE,
                          f"rx-vlan-offload (VLAN tag stripping): could not be read "
                          f"({UNREADABLE})")
        return s
    s.found.append(f"rx-vlan-offload (VLAN tag stripping): {_onoff(state)}")
    stag = offloads.features.get("rx-vlan-stag-hw-parse")
    if stag is not None:
        s.found.append(f"rx-vlan-stag-hw-parse (802.1ad outer tags): {_onoff(stag)}")
    if state[0]:
        s.found.append("the driver strips the outer VLAN tag into the packet's metadata; "
                       "the kernel passes it in the ring header and fanoutd reports it in "
                       "`vlan` (outermost first) and counts its 4 bytes back into `len`, as "
                       "tcpdump does: nothing to change")
        s.found.append("a classic BPF capture filter sees the frame without the stripped "
                       "tag (match it with the vlan ancillary fields, not by offset)")
    else:
        s.found.append("tags stay in the frame and fanoutd parses them into `vlan`: "
                       "nothing to change")
    return s


def gro_section(ifname: str, offloads: Offloads) -> Section:
    s = Section("GRO and LRO")
    names = {"generic-receive-offload": "GRO", "large-receive-offload": "LRO",
             "rx-gro-hw": "hardware GRO", "rx-gro-list": "GRO fraglist"}
    to_turn_off, fixed_on = [], []
    for name, label in names.items():
        state = offloads.features.get(name)
        if state is None:
            continue
        s.found.append(f"{name} ({label}): {_onoff(state)}")
        if state[0] and name != "rx-gro-list":
            (fixed_on if state[1] else to_turn_off).append(name)
    if not s.found:
        s.could_not_check("GRO and LRO", UNREADABLE,
                          f"GRO and LRO: could not be read ({UNREADABLE})")
        return s
    if to_turn_off or fixed_on:
        s.found.append("merging is on: the capture sees fewer, larger packets than the wire "
                       "carried (counts, sizes, timing and TCP flags per segment are lost)")
    if to_turn_off:
        s.worse(CHANGE)
        short = {"generic-receive-offload": "gro", "large-receive-offload": "lro",
                 "rx-gro-hw": "rx-gro-hw"}
        words = " ".join(f"{short[n]} off" for n in to_turn_off)
        s.advice.append(f"for a sensor, turn merging off: ethtool -K {ifname} {words}")
    if fixed_on:
        s.worse(NOTE)
        s.found.append(f"{', '.join(fixed_on)} is fixed on by the driver and cannot be "
                       f"turned off")
    if not (to_turn_off or fixed_on):
        s.found.append("no merging: the capture sees the packets the wire carried")
    return s


def symmetry_section(cfg: CaptureConfig) -> Section:
    s = Section("Flow symmetry")
    mode, flags = cfg.fanout.mode, cfg.fanout.flags
    symmetric, how = SYMMETRY[mode]
    s.found.append(f"configured: fanout {mode}, flags {','.join(flags) or 'none'}")
    s.found.append(f"{mode}: {how}")
    if not symmetric:
        s.worse(NOTE)
        s.advice.append("if each worker (or a consumer per worker) must see whole flows, "
                        "use fanout.mode hash (--fanout hash)")
    if "rollover" in flags:
        s.worse(NOTE)
        s.found.append("the rollover flag moves packets to another worker while the chosen "
                       "worker's ring is full: a flow may then be split")
    if mode == "hash" and "defrag" not in flags:
        s.found.append("IP fragments carry no ports, so they hash on addresses alone and may "
                       "reach another worker than the rest of their flow; the defrag flag "
                       "reassembles them first (fanout.flags: [defrag])")
    for other, (sym, _) in SYMMETRY.items():
        if other != mode:
            s.found.append(f"{other}: {'both directions together' if sym else 'not guaranteed'}")
    return s


def fanout_section(cfg: CaptureConfig, up: bool) -> Section:
    s = Section("Kernel fanout support")
    ifname = cfg.interface
    s.found.append(f"kernel {os.uname().release}")
    try:
        modes = {m: try_fanout(ifname, word) for m, word in fanout.MODES.items()}
        flags = {f: try_fanout(ifname, fanout.MODES["hash"] | word)
                 for f, word in fanout.FLAGS.items()}
        configured = try_fanout(ifname, fanout.type_word(cfg.fanout.mode, cfg.fanout.flags))
    except PermissionError:
        s.could_not_check("the fanout modes and flags this kernel accepts",
                          NEEDS_CAP_NET_RAW, "could not probe: AF_PACKET sockets need "
                          "CAP_NET_RAW (run doctor as root or with CAP_NET_RAW)")
        return s
    for m, reason in modes.items():
        s.found.append(f"mode {m}: {'supported' if reason is None else 'refused: ' + reason}")
    # Every probe asks for a kernel-chosen id: if the base probe worked, uniqueid did.
    s.found.append(f"flag uniqueid: {'supported' if modes['hash'] is None else 'unknown'}")
    for f, reason in flags.items():
        s.found.append(f"flag {f}: {'supported' if reason is None else 'refused: ' + reason}")
    combo = f"{cfg.fanout.mode}" + "".join(f"+{f}" for f in cfg.fanout.flags)
    if configured is None:
        s.found.append(f"the configured {combo}: accepted")
    else:
        s.worse(CHANGE)
        s.found.append(f"the configured {combo}: refused: {configured}")
        s.advice.append("choose a fanout mode and flags this kernel accepts (above)")
    refused = [r for r in (*modes.values(), *flags.values(), configured) if r is not None]
    if refused and configured is None:
        s.worse(NOTE)
    if refused and not up:
        s.found.append(f"{ifname} is down: some kernels refuse to start a fanout group on "
                       f"a socket whose interface is down")
        s.advice.append(f"bring it up (ip link set {ifname} up) and run doctor again")
    return s


def _onoff(state: tuple[bool, bool]) -> str:
    return ("on" if state[0] else "off") + (" [fixed]" if state[1] else "")


# --------------------------------------------------------------------------- report


def capture_to_examine(cfg: Config) -> CaptureConfig:
    """The capture doctor examines, with its own ring, fanout and workers. load_config
    keeps only the `interfaces` entry that --interface names, so it is the first (or
    only) one."""
    return cfg.interfaces[0]


def examine(config: Config) -> tuple[str, list[Section]]:
    """Every section for the capture doctor examines, and a one-line headline."""
    cfg = capture_to_examine(config)
    ifname = cfg.interface
    index = socket.if_nametoindex(ifname)
    flags = netdev.flags(ifname)
    mtu = netdev.mtu(ifname)
    up = bool(flags & IFF_UP)
    state = ("up" if up else "down") + ("" if flags & IFF_RUNNING or not up else ", no carrier")
    offloads = read_offloads(ifname)
    speed = netdev.speed_mbps(ifname)
    rate, rate_source = line_rate(ifname)
    headline = (f"fanoutd doctor: {ifname} (index {index}, {state}, MTU {mtu}"
                f"{f', {speed} Mb/s' if speed else ''}); {cfg.workers} workers, fanout "
                f"{cfg.fanout.mode}")
    if len(config.interfaces) > 1:
        headline += (f" (the first of {len(config.interfaces)} interfaces in the "
                     f"configuration; --interface picks another)")
    sections = [
        ring_section(cfg, mtu, rate, rate_source),
        packet_size_section(cfg, mtu, offloads, gro_max_size(ifname)),
        vlan_section(ifname, offloads),
        gro_section(ifname, offloads),
        symmetry_section(cfg),
        fanout_section(cfg, up),
    ]
    if offloads.note:
        for s in sections[2:4]:
            s.found.insert(0, offloads.note)
    return headline, sections


def summary(sections: list[Section]) -> list[str]:
    """The report's last lines: what to change, and what could not be checked and why.
    "nothing to change" only when every check was made."""
    lines = []
    to_change = [s.title for s in sections if s.status == CHANGE]
    if to_change:
        lines.append(f"to change: {', '.join(to_change)}")
    unchecked: dict[str, list[str]] = {}
    for s in sections:
        for what, why in s.unchecked:
            unchecked.setdefault(why, []).append(what)
    for why, what in unchecked.items():
        lines.append(f"not checked: {', '.join(what)} ({why})")
    return lines or ["nothing to change"]


def exit_status(sections: list[Section]) -> int:
    """1 when something should change; else 77 when checks needed CAP_NET_RAW (and that
    alone kept them from being made), 69 when others could not be made; else 0."""
    if any(s.status == CHANGE for s in sections):
        return exits.CHANGE
    why = {why for s in sections for _, why in s.unchecked}
    if not why:
        return 0
    return exits.NOPERM if why == {NEEDS_CAP_NET_RAW} else exits.UNAVAILABLE


def render(headline: str, sections: list[Section]) -> str:
    """The report as text: the headline, then each section and its advice, then the
    summary."""
    lines = [headline]
    for s in sections:
        lines += ["", f"[{s.status}] {s.title}"]
        lines += [f"    {text}" for text in s.found]
        lines += [f"    -> {text}" for text in s.advice]
    lines.append("")
    lines += summary(sections)
    return "\n".join(lines) + "\n"


def run_doctor(cfg: Config, out: TextIO) -> int:
    """Write the report for the capture doctor examines (its interface must exist) on
    `out`; return the exit status (see exit_status; 69 when there is no such
    interface)."""
    try:
        headline, sections = examine(cfg)
    except OSError as e:
        if e.errno in (errno.ENODEV, errno.ENXIO):
            print(f"fanoutd doctor: interface {capture_to_examine(cfg).interface!r} does "
                  f"not exist",
                  file=sys.stderr)
            return exits.UNAVAILABLE
        raise
    out.write(render(headline, sections))
    out.flush()
    return exit_status(sections)
