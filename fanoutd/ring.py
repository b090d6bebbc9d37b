"""RxRing: one AF_PACKET socket's TPACKET_V3 receive ring.

The supervisor calls `open_capture_socket` (socket, ring request, bind) and keeps the
socket for the daemon's life; a worker maps the ring with `RxRing` and walks it. The
geometry rules are the ones packet_set_ring enforces (see the kernel's packet_mmap
document), checked up front by `RingGeometry.problems` so a bad value is reported by
name instead of as EINVAL from setsockopt.
"""

import errno
import mmap
import select
import socket
from dataclasses import dataclass

from fanoutd import _linux, filter, netdev

DEFAULT_MAX_ORDER = 10  # MAX_PAGE_ORDER on current kernels with 4 KiB pages
MAX_U32 = 2**32 - 1


class CaptureError(Exception):
    """A capture socket could not be set up; the message says what and why."""


class CapturePermissionError(CaptureError):
    """The process lacks CAP_NET_RAW."""


@dataclass(frozen=True)
class RingGeometry:
    block_size: int
    block_count: int
    frame_size: int
    block_timeout_ms: int

    @property
    def frames_per_block(self) -> int:
        return self.block_size // self.frame_size

    @property
    def frame_count(self) -> int:
        # tp_frame_nr is redundant for the kernel: it must equal this exactly.
        return self.frames_per_block * self.block_count

    @property
    def size(self) -> int:
        return self.block_size * self.block_count

    def problems(self, page_size: int, max_order: int,
                 unknown: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
        """Every broken kernel rule, as (field, rule) pairs; empty when the ring is valid.
        Rules that read a field named in `unknown` (its value is not known) are skipped."""
        found = []
        max_block = page_size << max_order
        block_ok = False  # block_size is known and valid: rules against it can be checked
        frame_ok = "frame_size" not in unknown
        if "block_size" in unknown:
            pass
        elif self.block_size <= 0 or self.block_size % page_size:
            found.append(("block_size", f"must be a positive multiple of the page size "
                                        f"({page_size} bytes), got {self.block_size}"))
        elif self.block_size > max_block:
            found.append(("block_size", f"must be at most PAGE_SIZE << MAX_ORDER = {max_block} "
                                        f"bytes (one physically contiguous allocation), "
                                        f"got {self.block_size}"))
        elif self.block_size & (self.block_size - 1):
            found.append(("block_size", f"must be a power of two (the kernel allocates whole "
                                        f"page orders, the rest is wasted), got "
                                        f"{self.block_size}"))
        else:
            block_ok = True
        if frame_ok and self.frame_size % _linux.TPACKET_ALIGNMENT:
            found.append(("frame_size", f"must be a multiple of TPACKET_ALIGNMENT "
                                        f"({_linux.TPACKET_ALIGNMENT}), got {self.frame_size}"))
        if not frame_ok:
            pass
        elif self.frame_size <= _linux.TPACKET3_HDRLEN:
            found.append(("frame_size", f"must be larger than the frame header "
                                        f"(TPACKET3_HDRLEN = {_linux.TPACKET3_HDRLEN} bytes), "
                                        f"got {self.frame_size}"))
        elif block_ok and self.frame_size > self.block_size:
            found.append(("frame_size", f"must fit in a block (at most block_size, "
                                        f"{self.block_size}), got {self.frame_size}"))
        elif self.frame_size > max_block:  # block_size unknown or broken: the largest block
            found.append(("frame_size", f"must fit in a block (at most PAGE_SIZE << MAX_ORDER "
                                        f"= {max_block} bytes), got {self.frame_size}"))
        # The kernel counts the ring's frames in 32 bits (tp_frame_nr).
        frames_known = block_ok and frame_ok and 0 < self.frame_size <= self.block_size
        most = MAX_U32 // self.frames_per_block if frames_known else MAX_U32
        if "block_count" in unknown:
            pass
        elif self.block_count < 2:
            found.append(("block_count", f"must be at least 2, so the kernel can fill one block "
                                         f"while the worker reads another, got "
                                         f"{self.block_count}"))
        elif self.block_count > most:
            per_block = (f" with {self.frames_per_block} frames per block"
                         if frames_known else "")
            found.append(("block_count", f"must be at most {most}{per_block} (the kernel "
                                         f"counts the ring's frames in 32 bits), got "
                                         f"{self.block_count}"))
        if "block_timeout_ms" in unknown:
            pass
        elif not 1 <= self.block_timeout_ms <= 60_000:
            found.append(("block_timeout_ms", f"must be between 1 and 60000 ms, got "
                                              f"{self.block_timeout_ms}"))
        return found


def page_size() -> int:
    return mmap.PAGESIZE


def max_page_order() -> int:
    """MAX_ORDER of this kernel: /proc/buddyinfo has one column per order 0..MAX_ORDER."""
    try:
        with open("/proc/buddyinfo") as f:
            line = f.readline().split()
        return len(line) - 4 - 1  # "Node 0, zone DMA" then the columns
    except (OSError, IndexError):
        return DEFAULT_MAX_ORDER


def open_capture_socket(ifname: str, geometry: RingGeometry,
                        rxhash: bool | None) -> socket.socket:
    """An AF_PACKET socket with a TPACKET_V3 RX ring, bound to ifname, not yet in a fanout group.
    Each packet's flow hash is asked for when rxhash says so; None (auto): where the kernel
    has it anyway (netdev.flow_hash_is_free).

    The socket is created with protocol 0 so it receives nothing until bind() gives it
    ETH_P_ALL, and bound with a drop-all filter: a bound socket that is not yet in its
    fanout group would receive every packet of the interface, duplicating what the group
    delivers. The caller opens the socket up (filter.detach or its own filter) once the
    whole group is formed.
    """
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    except PermissionError:
        raise CapturePermissionError("permission denied opening an AF_PACKET socket: capture needs "
                           "CAP_NET_RAW (run as root or grant the capability)") from None
    if rxhash is None:
        rxhash = netdev.flow_hash_is_free(ifname)
    try:
        sock.setsockopt(_linux.SOL_PACKET, _linux.PACKET_VERSION, _linux.TPACKET_V3)
        req = _linux.TpacketReq3(
            tp_block_size=geometry.block_size,
            tp_block_nr=geometry.block_count,
            tp_frame_size=geometry.frame_size,
            tp_frame_nr=geometry.frame_count,
            tp_retire_blk_tov=geometry.block_timeout_ms,
            tp_sizeof_priv=0,
            tp_feature_req_word=_linux.TP_FT_REQ_FILL_RXHASH if rxhash else 0,
        )
        try:
            sock.setsockopt(_linux.SOL_PACKET, _linux.PACKET_RX_RING, bytes(req))
        except OSError as e:
            raise CaptureError(f"the kernel refused the RX ring ({geometry.block_count} blocks "
                               f"of {geometry.block_size} bytes): {e.strerror}") from None
        try:
            filter.attach(sock, filter.DROP_ALL)
            sock.bind((ifname, _linux.ETH_P_ALL))
        except OSError as e:
            if e.errno in (errno.ENODEV, errno.ENXIO):
                raise CaptureError(f"interface {ifname!r} does not exist") from None
            raise CaptureError(f"cannot bind to interface {ifname!r}: {e.strerror}") from None
    except BaseException:
        sock.close()
        raise
    return sock


def read_kernel_stats(sock: socket.socket) -> tuple[int, int, int]:
    """(packets, drops, freeze_q_cnt) since the previous call: PACKET_STATISTICS resets on read.

    The kernel's tp_packets already includes the dropped packets.
    """
    raw = sock.getsockopt(_linux.SOL_PACKET, _linux.PACKET_STATISTICS,
                          _linux.TPACKET_STATS_V3.size)
    return _linux.TPACKET_STATS_V3.unpack(raw)


class RxRing:
    """A worker's view of a slot's ring: map it, find ready blocks in order, hand them back."""

    def __init__(self, sock: socket.socket, geometry: RingGeometry) -> None:
        self.sock = sock
        self.geometry = geometry
        self.map = mmap.mmap(sock.fileno(), geometry.size, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.map)
        # Edge-triggered: the kernel wakes the socket once per block it hands over (TPACKET_V3
        # calls sk_data_ready when it closes a block, not per packet), so the worker sleeps
        # until the next block even while it holds older ones. Level-triggered, the socket
        # reads as ready as long as the block before the kernel's current one is the user's
        # (a held one), and a holding worker could only sleep in steps.
        self.poller = select.epoll(1)
        self.poller.register(sock.fileno(), select.EPOLLIN | select.EPOLLERR | select.EPOLLET)
        self._head = _linux.BLOCK_HEAD.unpack_from
        self.socket_errors: list[int] = []  # errno values poll reported, for the worker
        # A replacement worker resumes where its predecessor stopped.
        oldest = self.oldest_user_block()
        self.cursor = 0 if oldest is None else oldest

    def close(self) -> None:
        self.poller.close()
        self.view.release()
        self.map.close()

    def head(self, index: int) -> tuple[int, int, int, int, int]:
        """(block_status, num_pkts, offset_to_first_pkt, blk_len, seq_num) of a block."""
        return self._head(self.map, index * self.geometry.block_size
                          + _linux.BLOCK_STATUS_OFFSET)

    def handed_over_full(self, index: int) -> tuple[bool, int]:
        """Whether the kernel handed block `index` over because it was full (not by its
        timeout), and the nanoseconds from its opening to its last packet (the kernel
        stamps ts_first_pkt when it opens a block: at once after the previous one closed,
        while traffic flows)."""
        status = self.head(index)[0]
        s0, ns0, s1, ns1 = _linux.BLOCK_TIMES.unpack_from(
            self.map, index * self.geometry.block_size + _linux.BLOCK_TIMES_OFFSET)
        full = not status & _linux.TP_STATUS_BLK_TMO
        return full, (s1 - s0) * 1_000_000_000 + ns1 - ns0

    def oldest_user_block(self) -> int | None:
        """The user-owned block with the lowest seq_num: where reading must continue."""
        best = None
        for index in range(self.geometry.block_count):
            status, _, _, _, seq = self.head(index)
            if status & _linux.TP_STATUS_USER and (best is None or seq < best[0]):
                best = (seq, index)
        return None if best is None else best[1]

    def user_blocks(self) -> int:
        """How many blocks user space holds from the cursor on: the worker's backlog. The
        kernel fills blocks in ring order, so counting stops at the first one it owns,
        which keeps this cheap when the worker keeps up."""
        for count in range(self.geometry.block_count):
            index = (self.cursor + count) % self.geometry.block_count
            if not self.head(index)[0] & _linux.TP_STATUS_USER:
                return count
        return self.geometry.block_count

    def ready(self) -> bool:
        """True when the block at the cursor is the user's to read."""
        return bool(self.head(self.cursor)[0] & _linux.TP_STATUS_USER)

    def wait(self, timeout_s: float, resync: bool) -> None:
        """Sleep until the kernel hands over its next block, or timeout_s passes. Held
        blocks do not wake it (see __init__); a wake-up may be for a block already read.

        resync: nothing is held (every block before the cursor went back to the kernel). A
        wake-up that finds the cursor's block not ready while another block is the user's
        then means the cursor is out of step: it moves to the oldest user block. (With a
        block held, that block is the oldest, and the cursor is past it on purpose.)
        """
        events = self.poller.poll(max(timeout_s, 0.0))
        if not events:
            return
        if events[0][1] & select.EPOLLERR:
            # A pending socket error (ENETDOWN when the link goes down) keeps waking the
            # socket until it is read; reading SO_ERROR clears it.
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.socket_errors.append(err)
        if resync and not self.ready():
            oldest = self.oldest_user_block()
            if oldest is not None:
                self.cursor = oldest

    def read(self, copy: bool = True) -> tuple[bytes | memoryview, int, int, int]:
        """The cursor's block: (its bytes, offset_to_first_pkt, num_pkts, seq_num).

        A copy (one memcpy) lets the Python decoder slice addresses out as bytes; the C
        one reads the ring in place (copy=False: a view, valid until the block is handed
        back). seq_num is the kernel's count of blocks opened on this ring, from 1.
        """
        _, num_pkts, first, blk_len, seq_num = self.head(self.cursor)
        start = self.cursor * self.geometry.block_size
        length = min(blk_len or self.geometry.block_size, self.geometry.block_size)
        if copy:
            return self.map[start:start + length], first, num_pkts, seq_num
        return self.view[start:start + length], first, num_pkts, seq_num

    def advance(self) -> None:
        """Move the cursor to the next block; the current one stays the user's until
        release()."""
        self.cursor = (self.cursor + 1) % self.geometry.block_count

    def release(self, index: int) -> None:
        """Hand a block back to the kernel."""
        _linux.BLOCK_STATUS.pack_into(self.map, index * self.geometry.block_size
                                      + _linux.BLOCK_STATUS_OFFSET, _linux.TP_STATUS_KERNEL)


def memory_total() -> int | None:
    """The machine's memory (MemTotal of /proc/meminfo) in bytes: what rings may take."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None
