"""A worker's batches to the proxy through shared memory: the outbox.

Each worker makes an outbox for its ring: a sealed memfd holding a few slots, each big
enough for the largest batch of its ring's blocks, and an eventfd. It writes a batch into
the next free slot, publishes the count of slots written (store_release), and signals
the eventfd; the proxy, woken by the eventfd, sends each written slot on to its
subscribers and publishes the count of slots it took, which frees them. No ZeroMQ thread
on either side touches a batch on its way: the hop costs one wake-up of the proxy per
batch (docs/performance.md, "round 2").

The outbox reaches the proxy once, when the worker connects: over a SOCK_SEQPACKET unix
socket in the runtime directory (root's: the worker connects before it drops its
privileges), one hello message names the ring and its topic and carries the two file
descriptors (SCM_RIGHTS). The proxy takes the outbox only from the process the
supervisor named the ring's worker (SO_PEERCRED), on the ring's topic, sealed against
shrinking (a shrunk mapping would kill the proxy with SIGBUS), and checks every count
and length it reads from it: a worker can spoil only its own ring's batches. The
connection stays open while the worker lives: its end tells the proxy to take what is
left and let the outbox go, and tells the worker that the proxy is gone.

Layout: a header page (the two counters on cache lines of their own), then the slots,
each a (length, kernel block seq) head and the batch. What the acknowledgement to the
worker is, and why a worker holds each block until then: holding.py.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import struct
from collections.abc import Callable
from contextlib import suppress

from fanoutd.wire import max_batch_bytes

try:
    from fanoutd._fastpath import load_acquire, store_release
except ImportError:  # no C extension: plain loads and stores, ordered as such on x86-64
    def load_acquire(buffer: object, offset: int) -> int:
        return _COUNTER.unpack_from(buffer, offset)[0]

    def store_release(buffer: object, offset: int, value: int) -> None:
        _COUNTER.pack_into(buffer, offset, value)

_COUNTER = struct.Struct("<Q")
SLOT_HEAD = struct.Struct("<QQ")  # batch length, kernel block seq
HEADER_BYTES = mmap.PAGESIZE
WRITTEN = 64  # slots the worker has written, ever (the worker's cache line)
TAKEN = 128  # slots the proxy has taken, ever (the proxy's)
SLOTS = 4  # batches in flight: beyond that the worker waits, and the ring buffers
MAX_SLOTS = 64
MAX_SLOT_BYTES = 1 << 30

HELLO = struct.Struct("<4sHIQ")  # magic, ring id, slots, slot bytes; then the topic
MAGIC = b"FOB1"
MAX_HELLO_BYTES = HELLO.size + 64
_PEERCRED = struct.Struct("3i")  # pid, uid, gid
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def slot_start(count: int, slots: int, slot_bytes: int) -> int:
    """Where the slot of the count-th batch ever written starts: its head, then the batch."""
    return HEADER_BYTES + (count % slots) * slot_bytes


def slot_bytes(block_size: int) -> int:
    """A slot: its head and the largest batch of a block_size ring block, in pages."""
    need = SLOT_HEAD.size + max_batch_bytes(block_size)
    return -(-need // mmap.PAGESIZE) * mmap.PAGESIZE


class Outbox:
    """The worker's side: write batches, signal the proxy."""

    def __init__(self, block_size: int, slots: int = SLOTS) -> None:
        self.slots = slots
        self.slot_bytes = slot_bytes(block_size)
        size = HEADER_BYTES + slots * self.slot_bytes
        self.memfd = os.memfd_create("fanoutd-outbox", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self.eventfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        os.ftruncate(self.memfd, size)
        fcntl.fcntl(self.memfd, fcntl.F_ADD_SEALS, _SEALS)
        self.map = mmap.mmap(self.memfd, size)
        self.view = memoryview(self.map)
        self.written = 0
        self.unsignalled = False

    def free_slot(self) -> memoryview | None:
        """Room for the next batch in the next free slot (release it before close), or
        None when every slot is still the proxy's."""
        if self.written - load_acquire(self.map, TAKEN) >= self.slots:
            return None
        start = slot_start(self.written, self.slots, self.slot_bytes) + SLOT_HEAD.size
        return self.view[start:start + self.slot_bytes - SLOT_HEAD.size]

    def commit(self, seq: int, length: int, signal: bool = True) -> None:
        """The batch of kernel block `seq` is the first `length` bytes of free_slot():
        the proxy's to take from now on, and it is told so (signal), or at the next
        signal() (one wake-up of the proxy for several batches)."""
        SLOT_HEAD.pack_into(self.map, slot_start(self.written, self.slots, self.slot_bytes),
                            length, seq)
        self.written += 1
        store_release(self.map, WRITTEN, self.written)
        self.unsignalled = True
        if signal:
            self.signal()

    def signal(self) -> None:
        """Wake the proxy for the batches committed since the last signal, if any."""
        if self.unsignalled:
            self.unsignalled = False
            os.eventfd_write(self.eventfd, 1)

    def put(self, seq: int, body: bytes, signal: bool = True) -> bool:
        """free_slot() and commit() for a batch made elsewhere: False when no slot is
        free (nothing was written)."""
        room = self.free_slot()
        if room is None:
            return False
        with room:
            room[:len(body)] = body
        self.commit(seq, len(body), signal)
        return True

    def hello(self, ring_id: int, topic: bytes) -> bytes:
        return HELLO.pack(MAGIC, ring_id, self.slots, self.slot_bytes) + topic

    def close(self) -> None:
        self.view.release()
        self.map.close()
        os.close(self.memfd)
        os.close(self.eventfd)


class Rejected(Exception):
    """A hello the proxy refuses; reason is one of slotstats.REJECT_REASONS."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Inbox:
    """The proxy's side of one worker's outbox: take the batches in order."""

    def __init__(self, ring_id: int, topic: bytes, pid: int, memfd: int, eventfd: int,
                 slots: int, slot_bytes: int) -> None:
        self.ring_id, self.topic = ring_id, topic
        self.pid = pid  # the worker's: its batches go on while it is the ring's
        self.eventfd = eventfd
        self.slots, self.slot_bytes = slots, slot_bytes
        self.map = mmap.mmap(memfd, HEADER_BYTES + slots * slot_bytes)
        os.close(memfd)  # the mapping keeps the memory
        self.view = memoryview(self.map)
        self.taken = load_acquire(self.map, TAKEN)
        self.closing = False  # the worker's connection ended: take what is left, then go

    def next(self) -> tuple[int, memoryview] | str | None:
        """The oldest batch not taken yet as (seq, a view of it), None when there is none,
        or "malformed" for what cannot be a batch (skipped: call done())."""
        written = load_acquire(self.map, WRITTEN)
        ahead = written - self.taken
        if ahead == 0:
            return None
        if not 0 < ahead <= self.slots:  # a count no worker of ours writes: go on from it
            self.taken = written - 1  # done() takes it to `written`
            return "malformed"
        start = slot_start(self.taken, self.slots, self.slot_bytes)
        length, seq = SLOT_HEAD.unpack_from(self.map, start)
        if length > self.slot_bytes - SLOT_HEAD.size:
            return "malformed"
        start += SLOT_HEAD.size
        return seq, self.view[start:start + length]

    def empty(self) -> bool:
        return load_acquire(self.map, WRITTEN) == self.taken

    def done(self) -> None:
        """The oldest batch is sent on: its slot is the worker's again."""
        self.taken += 1
        store_release(self.map, TAKEN, self.taken)

    def clear_signal(self) -> None:
        with suppress(BlockingIOError):
            os.eventfd_read(self.eventfd)

    def close(self) -> None:
        self.view.release()
        self.map.close()
        os.close(self.eventfd)


def connect(path: str, outbox: Outbox, ring_id: int, topic: bytes) -> socket.socket:
    """The worker's connection to the proxy, the outbox handed over (OSError if not)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
        socket.send_fds(sock, [outbox.hello(ring_id, topic)], [outbox.memfd, outbox.eventfd])
    except OSError:
        sock.close()
        raise
    return sock


def listen(path: str) -> socket.socket:
    """The proxy's socket for the workers' connections (OSError if it cannot be bound)."""
    with suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(64)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def peer_pid(conn: socket.socket) -> int:
    return _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                            _PEERCRED.size))[0]


def take_hello(conn: socket.socket, ring_pid: Callable[[int], int],
               ring_topic: Callable[[int], bytes | None]) -> Inbox:
    """Read a worker's hello from conn and map its outbox; Rejected (its fds closed)
    unless it comes from the ring's worker (ring_pid(ring id)), on the ring's topic
    (ring_topic(ring id), None for a ring not in use), with an outbox of the size it
    says, sealed against shrinking."""
    message, fds, _, _ = socket.recv_fds(conn, MAX_HELLO_BYTES, 2)
    try:
        if len(message) < HELLO.size or len(fds) != 2:
            raise Rejected("malformed")
        magic, ring_id, slots, size = HELLO.unpack_from(message)
        topic = message[HELLO.size:]
        if (magic != MAGIC or not 0 < slots <= MAX_SLOTS
                or not SLOT_HEAD.size < size <= MAX_SLOT_BYTES or size % mmap.PAGESIZE):
            raise Rejected("malformed")
        expected_topic = ring_topic(ring_id)
        if expected_topic is None:
            raise Rejected("malformed")
        pid = peer_pid(conn)
        if pid != ring_pid(ring_id):
            raise Rejected("sender")
        if topic != expected_topic:
            raise Rejected("topic")
        memfd, eventfd = fds
        if (not os.readlink(f"/proc/self/fd/{memfd}").startswith("/memfd:")
                or os.readlink(f"/proc/self/fd/{eventfd}") != "anon_inode:[eventfd]"
                or os.fstat(memfd).st_size != HEADER_BYTES + slots * size
                or not fcntl.fcntl(memfd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK):
            raise Rejected("malformed")
        os.set_blocking(eventfd, False)
        return Inbox(ring_id, topic, pid, memfd, eventfd, slots, size)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
