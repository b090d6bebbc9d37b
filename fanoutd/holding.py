"""Holding a ring block until the proxy has passed its batch on: lossless worker replacement.

How a block travels and when it goes back to the kernel (told here only; publish.py,
slotstats.py and worker.py point here):

1. A worker publishes each ring block as one batch, written into its outbox with the
   block's kernel seq (outbox.py, publish.BatchPublisher).
2. The proxy took the outbox only from the ring's worker, on the ring's topic
   (outbox.take_hello); it passes the batch on to its subscribers, and writes the block's
   seq into the ring's `forwarded` word of the shared RingTable (slotstats.py): every
   block up to that seq is passed on. The word is out of the workers' reach
   (SharedWords.read_only).
3. Only then does the worker hand the block back to the kernel. Until then the batch may
   sit in the outbox, and a worker killed at that moment would leave it there (the proxy
   takes it only while the ring is still that worker's, Proxy._take_batches); held in
   the ring, it is published again by the replacement worker, which starts at the
   oldest block user space holds (RxRing) and skips what the proxy already passed on.
   The kernel's seq continues across the replacement, so a block published again carries
   the same seq and subscribers drop duplicates by it.
4. The newest `retain` blocks passed on stay held a little longer (RETAIN_S once traffic
   pauses): a proxy that is killed loses what it had handed to ZeroMQ but not yet sent to
   its subscribers. The supervisor then clears the ring's word; the workers, which cannot
   reconnect to root's socket, leave (exits.RECONNECT) with their blocks held, and
   their successors publish every block still held again.
5. A new proxy passes nothing on, and so acknowledges nothing, until its predecessor's
   subscribers are back (publish.StartGate); it clears ProxyStats `forwarding` meanwhile,
   and workers take no new block: the kernel fills the ring, and counts what it drops once
   it is full.
6. Holding costs ring space for the microseconds the proxy takes. A stalled proxy makes a
   worker hold until the ring is all but full (`reserve` free blocks); then the oldest
   held block is let go: its batch still waits in the outbox, lost only if the worker
   dies. Once the outbox is full too, the worker waits for a free slot and reads no new
   block: the kernel fills the ring, and counts what it drops once it is full.

While blocks are held, a level-triggered poll of the socket would return at once (the
kernel reports it readable as long as the block before its current one is the user's), so
the worker waits edge-triggered (RxRing.wait): the kernel wakes it once per block it hands
over, and HeldBlocks.idle bounds the wait, so that the proxy's word is looked at even when
no block comes.
"""

import time
from collections import deque
from collections.abc import Callable

from fanoutd.ring import RxRing
from fanoutd.slotstats import RingTable

HOLD_WAIT_S = 0.0002  # how often a draining worker looks for the proxy's word
RETAIN_S = 0.1  # how long blocks the proxy passed on stay held once traffic pauses


class HeldBlocks:
    """The blocks of one ring a worker has published and not yet handed back to the
    kernel, oldest first, and what the proxy's word in `rings` says of them."""

    def __init__(self, ring: RxRing, rings: RingTable, ring_id: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._release = ring.release
        self._forwarded = rings.forwarded
        self._ring_id = ring_id
        self._clock = clock
        self._held: deque[tuple[int, int]] = deque()  # (block index, kernel seq)
        self._acked = 0  # how many of the oldest held blocks the proxy has passed on
        self._last_ack = 0.0  # when the proxy last passed on a block of ours
        geometry = ring.geometry
        self.block_count = geometry.block_count
        self.retain = max(2, self.block_count // 8)  # passed on, yet held (step 4)
        self.reserve = max(1, self.block_count // 8)  # blocks kept free for the kernel
        self.let_go = 0  # blocks handed back early to keep `reserve` free (step 6)

    def __len__(self) -> int:
        return len(self._held)

    @property
    def acknowledged(self) -> int:
        """How many of the held blocks the proxy has passed on (retained ones)."""
        return self._acked

    def passed_on(self, seq: int) -> bool:
        """Whether the proxy has passed block `seq` on: one a replaced worker left held."""
        return seq <= self._forwarded[self._ring_id]

    def hold(self, index: int, seq: int) -> None:
        """Block `index` (kernel seq `seq`, newer than every held one) was published."""
        self._held.append((index, seq))

    def release_passed_on(self) -> None:
        """Take in the proxy's word: hand back what it passed on but the newest `retain`."""
        held, acked = self._held, self._acked
        if acked < len(held) and held[acked][1] <= (passed_on := self._forwarded[self._ring_id]):
            self._last_ack = self._clock()
            acked += 1
            while acked < len(held) and held[acked][1] <= passed_on:
                acked += 1
            while acked > self.retain:
                self._release(held.popleft()[0])
                acked -= 1
            self._acked = acked

    def idle(self, draining: bool) -> float:
        """No new block is ready: the longest to wait for one before calling again, or 0.0
        once every block is handed back. The proxy's word needs no wake-up of its own:
        while traffic flows, the next block's hand-over wakes the worker, which then
        releases what the proxy passed on. Retained blocks go back once traffic has paused
        for RETAIN_S, at once when draining (nothing follows); a draining worker looks for
        the proxy's word often, since no block will wake it."""
        if self._acked < len(self._held):  # the proxy has yet to pass a block on
            return HOLD_WAIT_S if draining else RETAIN_S
        if self._held and not draining:
            left = RETAIN_S - (self._clock() - self._last_ack)
            if left > 0:
                return left
        while self._held:  # traffic paused: the proxy has had time to send them
            self._release(self._held.popleft()[0])
        self._acked = 0
        return 0.0

    def make_room(self, unread: int) -> None:
        """Keep `reserve` blocks free for the kernel, `unread` blocks being ready and not
        read yet: rather than have the kernel drop for lack of a free block, let the
        oldest held blocks go (retained ones first)."""
        held = self._held
        while held and self.block_count - len(held) - unread < self.reserve:
            self._release(held.popleft()[0])
            self._acked = max(0, self._acked - 1)
            self.let_go += 1
