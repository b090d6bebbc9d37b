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
import os
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


class SharedWords:
    """64-bit words in shared memory that the supervisor maps before it forks, backed by a
    memfd so that a worker can swap its copy of the mapping for a read-only one
    (read_only()): what the proxy and the supervisor write here (which blocks were passed
    on, which process is a ring's worker, whether the proxy forwards) is then out of a
    compromised worker's reach."""

    def __init__(self, words: int, name: str) -> None:
        self.size = words * 8
        self._fd = os.memfd_create(f"fanoutd-{name}")
        os.ftruncate(self._fd, self.size)
        self._map = mmap.mmap(self._fd, self.size)
        self._views: list[memoryview] = []
        self.words = self._view(memoryview(self._map).cast("Q"))

    def _view(self, view: memoryview) -> memoryview:
        self._views.append(view)
        return view

    def read_only(self) -> None:
        """In a worker, right after fork: map the words again from a read-only file
        description, which mprotect() cannot make writable, and close the memfd, so this
        process keeps no way to write them. Views made before this call are released."""
        ro = os.open(f"/proc/self/fd/{self._fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            ro_map = mmap.mmap(ro, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(ro)
        for view in reversed(self._views):
            view.release()
        self._views.clear()
        self._map.close()
        os.close(self._fd)
        self._fd = -1
        self._map = ro_map
        self.words = self._view(memoryview(ro_map).cast("Q"))
        self._remap()

    def _remap(self) -> None:
        """Subclasses: make their views of self.words again."""


class RingTable(SharedWords):
    """Per ring: the kernel seq of the last block the proxy passed on (the proxy writes it,
    the ring's worker reads it to know which blocks it may hand back), the pid of the
    ring's worker and the topic of its batches (the supervisor writes both; the proxy
    forwards a batch for the ring only from that process, on that topic). Indexed by a ring
    id the supervisor gives each capture socket, not by slot: on a reload a slot's old ring
    drains while its new ring is read, and the two must not share these words."""

    STRIDE = 8  # words per ring: forwarded, pid, topic length, topic (up to 40 bytes)
    TOPIC_MAX = 40

    def __init__(self, rings: int) -> None:
        self.count = rings
        super().__init__(rings * self.STRIDE, "rings")
        self._remap()

    def _remap(self) -> None:
        self.forwarded = self._view(self.words[0::self.STRIDE])
        self.pid = self._view(self.words[1::self.STRIDE])
        self._topic_len = self._view(self.words[2::self.STRIDE])
        self._bytes = self._view(self.words.cast("B"))

    def assign(self, ring_id: int, topic: bytes) -> None:
        """A new ring: nothing passed on yet (it numbers its blocks from 1), no worker yet."""
        assert len(topic) <= self.TOPIC_MAX
        self.forwarded[ring_id] = 0
        self.pid[ring_id] = 0
        start = ring_id * self.STRIDE * 8 + 24
        self._bytes[start:start + len(topic)] = topic
        self._topic_len[ring_id] = len(topic)

    def topic(self, ring_id: int) -> bytes:
        start = ring_id * self.STRIDE * 8 + 24
        return bytes(self._bytes[start:start + self._topic_len[ring_id]])


PROXY_FIELDS = (
    "forwarding",              # 1 while the proxy passes batches on; workers hold until then
    "subscribers",             # connections with a subscription to a published topic, now
    "restarts",                # times the proxy was replaced (the supervisor counts them)
    "block_size",              # the largest ring block in use: sizes subscriber queues
    "connections_refused",     # subscriber connections closed at once: publish.max_subscribers
    "subscriptions_refused",   # subscriptions to a topic that is never published
    "subscribers_closed",      # connections closed for publish.max_subscriptions
    "subscriber_overflows",    # batches dropped for a subscriber whose queue was full
    "restart_unwatched",       # batches passed on after a restart before the subscribers were back
    "rejected:malformed",      # ipc messages that are no batch of a known ring
    "rejected:sender",         # ... sent by a process that is not the ring's worker
    "rejected:topic",          # ... on another topic than the ring's
)
PROXY_INDEX = {name: i for i, name in enumerate(PROXY_FIELDS)}
REJECT_REASONS = tuple(n.split(":", 1)[1] for n in PROXY_FIELDS if n.startswith("rejected:"))


class ProxyStats(SharedWords):
    """The proxy's counters and state, one page that outlives any proxy process (the
    supervisor maps it): the supervisor serves it on /metrics, the proxy publishes it on
    the `stats` topic, workers read `forwarding`."""

    def __init__(self) -> None:
        super().__init__(mmap.PAGESIZE // 8, "proxy")
        assert len(PROXY_FIELDS) <= len(self.words)

    def __getitem__(self, name: str) -> int:
        return self.words[PROXY_INDEX[name]]

    def __setitem__(self, name: str, value: int) -> None:
        self.words[PROXY_INDEX[name]] = value

    def add(self, name: str, n: int = 1) -> None:
        self.words[PROXY_INDEX[name]] += n

    def snapshot(self) -> dict[str, int]:
        values = self.words.tolist()
        return {name: values[i] for i, name in enumerate(PROXY_FIELDS)}
