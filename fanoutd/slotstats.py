"""Per-slot counters in shared memory, written by the worker, read by the supervisor.

DESIGN.md has workers report counters over a socketpair. We keep them in a page of
anonymous shared memory that the supervisor maps before it forks instead, because:
- a counter belongs to the slot, not the process: it survives a worker being replaced,
  and nothing counted between the last report and a SIGKILL is lost;
- reading is free for the supervisor at scrape time, and the heartbeat is just the
  timestamp the worker writes on each turn of its loop.
Each value is a native 64-bit word written with a single store (memoryview cast 'Q'),
so a reader never sees a torn value. The supervisor writes the kernel counters it reads
from the slot's socket into the same page, so every child can publish the lot.
"""

import mmap
import time

from fanoutd.wire import ERROR_REASONS

FIELDS = (
    "heartbeat_ns",      # CLOCK_MONOTONIC of the worker's last loop turn
    "capturing",         # pid of the worker that mapped the slot's ring and captures
    "pid",
    "packets",           # frames decoded
    "bytes",             # wire bytes of those frames
    "batches",           # batches handed to ZeroMQ
    "publish_drops",     # batches refused at the high-water mark
    "blocks",            # ring blocks walked
    "blocks_skipped",    # blocks whose decoding raised (a decoder bug): their packets are lost
    "blocks_user",       # blocks held by user space at the last look: the backlog
    "active",            # the rest is written by the supervisor: 1 while the slot exists
    "up",                # 1 while its worker is RUNNING
    "kernel_packets",
    "kernel_drops",
    "kernel_freezes",
    "restarts",
    *(f"err:{reason}" for reason in ERROR_REASONS),
)
INDEX = {name: i for i, name in enumerate(FIELDS)}
ERROR_INDEX = {reason: INDEX[f"err:{reason}"] for reason in ERROR_REASONS}


class SlotStats:
    """One slot's counters: a page of a StatsTable."""

    def __init__(self, page: memoryview) -> None:
        self.words = page.cast("Q")
        assert len(FIELDS) <= len(self.words)

    def __getitem__(self, name: str) -> int:
        return self.words[INDEX[name]]

    def __setitem__(self, name: str, value: int) -> None:
        self.words[INDEX[name]] = value

    def add(self, name: str, n: int = 1) -> None:
        self.words[INDEX[name]] += n

    def beat(self) -> None:
        self.words[INDEX["heartbeat_ns"]] = time.monotonic_ns()

    def snapshot(self) -> dict[str, int]:
        values = self.words.tolist()
        return {name: values[i] for i, name in enumerate(FIELDS)}


class StatsTable:
    """A page of counters for every slot an interface can ever have (a fanout group holds
    at most 256 sockets), mapped once before the first fork: every child, including ones
    forked before a slot was added, sees every slot. Untouched pages cost no memory."""

    def __init__(self, slots: int) -> None:
        self._map = mmap.mmap(-1, slots * mmap.PAGESIZE,
                              flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        view = memoryview(self._map)
        self._slots = [SlotStats(view[i * mmap.PAGESIZE:(i + 1) * mmap.PAGESIZE])
                       for i in range(slots)]

    def __getitem__(self, index: int) -> SlotStats:
        return self._slots[index]

    def active(self) -> list[tuple[int, SlotStats]]:
        """(index, stats) of the slots that exist now (the supervisor marks them)."""
        return [(i, s) for i, s in enumerate(self._slots) if s["active"]]


class RingTable:
    """Per ring, the kernel seq of the last block the proxy passed on: the proxy writes it,
    the ring's worker reads it to know which blocks it may hand back. Indexed by a ring id
    the supervisor gives each capture socket, not by slot: on a reload a slot's old ring
    drains while its new ring is read, and the two must not share this word."""

    def __init__(self, rings: int) -> None:
        self._map = mmap.mmap(-1, rings * 8, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self.forwarded = memoryview(self._map).cast("Q")
