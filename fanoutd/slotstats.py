"""Per-slot counters in shared memory, written by the worker, read by the supervisor.

The counters live in a page of anonymous shared memory that the supervisor maps before
it forks, rather than in reports a worker sends, because:
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
    "batches",           # batches handed to the proxy (written into the outbox)
    "publish_drops",     # batches not handed to the proxy (none: a full outbox makes it wait)
    "blocks",            # ring blocks walked
    "blocks_skipped",    # blocks whose decoding raised (a decoder bug): their packets are lost
    "blocks_user",       # blocks held by user space at the last look: the backlog
    "outbox_full",       # times the worker waited for a free outbox slot (the proxy is behind)
    "active",            # the rest is written by the supervisor: 1 while the slot exists
    "up",                # 1 while its worker is RUNNING
    "kernel_packets",
    "kernel_drops",
    "kernel_freezes",
    "restarts",
    *(f"err:{reason}" for reason in ERROR_REASONS),
)
INDEX = {name: i for i, name in enumerate(FIELDS)}


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
    """Per ring: `forwarded`, the kernel seq of the last block the proxy passed on (its
    acknowledgement: holding.py), the pid of the ring's worker and the topic of its
    batches (the supervisor writes both; the proxy forwards a batch for the ring only from
    that process, on that topic). Indexed by a ring id the supervisor gives each capture
    socket, not by slot: on a reload a slot's old ring drains while its new ring is read,
    and the two must not share these words."""

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
    "rejected:malformed",      # worker connections (or batches) that are no outbox of a known ring
    "rejected:sender",         # ... from a process that is not the ring's worker
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


# --- the counters' public names: /metrics and the `stats` topic (wire.stats_message) ----

# (metric name without _total, slot counter, help)
SLOT_COUNTERS = (
    ("fanoutd_kernel_packets", "kernel_packets",
     "Packets the kernel passed to this worker's socket, including the dropped ones "
     "(PACKET_STATISTICS tp_packets)."),
    ("fanoutd_kernel_drops", "kernel_drops",
     "Packets the kernel dropped because this worker's ring was full (tp_drops)."),
    ("fanoutd_kernel_freezes", "kernel_freezes",
     "Times the kernel froze this worker's ring queue for lack of a free block "
     "(tp_freeze_q_cnt)."),
    ("fanoutd_packets_decoded", "packets", "Frames decoded into summaries."),
    ("fanoutd_bytes", "bytes", "Wire bytes of the decoded frames."),
    ("fanoutd_batches_published", "batches", "Batches (ring blocks) handed to the proxy."),
    ("fanoutd_publish_drops", "publish_drops",
     "Batches a worker could not hand to the proxy (their seq is skipped); a full outbox "
     "makes the worker wait instead, so this stays 0."),
    ("fanoutd_outbox_full", "outbox_full",
     "Times this worker found every slot of its outbox still waiting for the proxy and "
     "waited 0.5 ms, the next ring block unread: the proxy does not keep up with it."),
    ("fanoutd_worker_restarts", "restarts", "Times this worker slot's process was replaced."),
    ("fanoutd_blocks_skipped", "blocks_skipped",
     "Ring blocks skipped because decoding them failed (a decoder bug; their packets are "
     "lost, the worker carries on)."),
)


# The publisher's (the proxy's) counters: (metric name without _total, word, help).
PROXY_COUNTERS = (
    ("fanoutd_proxy_restarts", "restarts",
     "Times the proxy was replaced (it died, or a reload changed publish settings)."),
    ("fanoutd_subscriber_connections_refused", "connections_refused",
     "Subscriber connections closed at once because publish.max_subscribers were "
     "connected."),
    ("fanoutd_subscriptions_refused", "subscriptions_refused",
     "Subscriptions to a topic nothing published matches, not applied."),
    ("fanoutd_subscribers_closed", "subscribers_closed",
     "Subscriber connections closed for sending more than publish.max_subscriptions "
     "subscriptions."),
    ("fanoutd_subscriber_overflows", "subscriber_overflows",
     "Batches passed on while a subscriber's queue was full: that subscriber lost the "
     "batch, and the next ones until it had read part of its queue (seq gaps show them)."),
    ("fanoutd_restart_unwatched_batches", "restart_unwatched",
     "Batches passed on after a proxy restart while fewer subscribers than before it were "
     "back: lost to those not back yet."),
)
# (metric name, word, help) of the publisher's gauges.
PROXY_GAUGES = (
    ("fanoutd_subscribers", "subscribers",
     "Subscriber connections with a subscription to a published topic."),
    ("fanoutd_proxy_forwarding", "forwarding",
     "1 while the proxy passes batches on; 0 while a new proxy waits for the subscribers "
     "of the one it replaced (publish.restart_grace_ms) and while none runs."),
)
REJECTED_HELP = ("Worker connections the proxy refused, and batches it dropped from an "
                 "outbox: malformed (no outbox or batch of a ring in use), sender (not from "
                 "that ring's worker), topic (not the ring's topic).")


def publisher_report(proxy: ProxyStats) -> dict:
    """The publisher's counters, named as on /metrics without the fanoutd_ prefix."""
    snap = proxy.snapshot()
    report: dict = {name.removeprefix("fanoutd_"): snap[key] for name, key, _ in PROXY_GAUGES}
    for name, key, _ in PROXY_COUNTERS:
        report[name.removeprefix("fanoutd_") + "_total"] = snap[key]
    report["proxy_rejected_messages_total"] = {r: snap[f"rejected:{r}"]
                                               for r in REJECT_REASONS}
    return report


def worker_reports(table: StatsTable) -> list[dict]:
    """Each active slot's counters for the `stats` topic (wire.stats_message), named as
    on /metrics without the fanoutd_ prefix."""
    workers = []
    for index, stats in table.active():
        snap = stats.snapshot()
        report: dict = {"worker": index, "up": bool(snap["up"])}
        for name, key, _ in SLOT_COUNTERS:
            report[name.removeprefix("fanoutd_") + "_total"] = snap[key]
        report["decode_errors_total"] = {r: snap[f"err:{r}"] for r in ERROR_REASONS}
        report["ring_blocks_user"] = snap["blocks_user"]
        workers.append(report)
    return workers
