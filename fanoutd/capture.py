"""One interface's capture: its slots (sockets, rings, counters), fanout group, link watch.

The supervisor owns one Capture per configured interface and does the process work
(forking, reaping, restarting); a Capture does what concerns its sockets: opening them
into a fanout group, opening them up to traffic, closing them while keeping their kernel
counters, and telling which processes are its workers.
"""

import contextlib
import logging
import socket
import time
from dataclasses import dataclass, field

from fanoutd import _linux, fanout, link, ring
from fanoutd.children import Child, ChildState
from fanoutd.config import CaptureConfig
from fanoutd.filter import DROP_ALL, Instruction, attach, compile_expression, detach
from fanoutd.slotstats import RingTable, SlotStats, StatsTable
from fanoutd.wire import batch_topic

log = logging.getLogger("fanoutd")


@dataclass
class Slot:
    """Worker slot `index` of a capture: its socket and ring, counters and process."""

    index: int
    sock: socket.socket
    ring_id: int
    stats: SlotStats
    epoch: int = 0  # names this ring's seq numbering (wire format: the batch's epoch)
    child: Child | None = None

    @property
    def up(self) -> bool:
        return self.child is not None and self.child.state is ChildState.RUNNING


@dataclass
class Retiring:
    """A worker draining its old ring after a reload, and what to close once it exits."""

    child: Child
    sock: socket.socket
    ring_id: int
    stats: SlotStats


@dataclass
class Capture:
    cfg: CaptureConfig
    rings: RingTable  # shared by every capture: ring ids are daemon-wide
    free_ring_ids: list[int]
    several: bool  # more than one capture: process names carry the interface
    table: StatsTable = field(default_factory=lambda: StatsTable(fanout.MAX_MEMBERS))
    slots: list[Slot] = field(default_factory=list)
    retiring: list[Retiring] = field(default_factory=list)
    link_watch: link.LinkWatch | None = None
    group_id: int | None = None
    reopen_pending: bool = False

    @property
    def interface(self) -> str:
        return self.cfg.interface

    def process_name(self, index: int) -> str:
        """What `ps` and /proc/PID/comm show for worker `index` (15 characters at most)."""
        if self.several:
            return f"fd-{self.interface}-w{index}"[:15]
        return f"fanoutd-w{index}"

    def program(self, cfg: CaptureConfig | None = None) -> list[Instruction] | None:
        """The compiled capture filter, or None to take everything."""
        expression = (cfg or self.cfg).filter
        return compile_expression(expression) if expression else None

    def open_sockets(self, cfg: CaptureConfig) -> list[socket.socket]:
        """cfg.workers capture sockets on cfg's interface, all in one new fanout group,
        still closed to traffic (drop-all filter) until open_up()."""
        socks: list[socket.socket] = []
        try:
            for _ in range(cfg.workers or 1):
                sock = ring.open_capture_socket(cfg.interface, cfg.ring.geometry,
                                                cfg.ring.rxhash)
                socks.append(sock)
                _set_timestamping(sock, cfg.timestamp)
                if cfg.promisc:  # per socket: the kernel counts, and undoes it on close
                    sock.setsockopt(_linux.SOL_PACKET, _linux.PACKET_ADD_MEMBERSHIP,
                                    _linux.packet_mreq(socket.if_nametoindex(cfg.interface),
                                                       _linux.PACKET_MR_PROMISC))
            self.group_id = fanout.join_group(socks, cfg.fanout.mode, cfg.fanout.flags,
                                              cfg.fanout.group_id)
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        return socks

    @staticmethod
    def open_up(socks: list[socket.socket], program: list[Instruction] | None) -> None:
        """Let traffic in: the capture filter in place of the drop-all one, or none."""
        for sock in socks:
            if program is None:
                detach(sock)
            else:
                attach(sock, program)

    def set_slots(self, socks: list[socket.socket]) -> None:
        """Slot i gets socks[i], with a fresh ring id; slots keep their counters, missing
        ones are created, extra ones dropped. Nothing is started here.

        Each new ring gets a new epoch: its blocks' seq start again from 0, and
        (iface, worker, epoch, seq) must name one batch forever. The wall clock in ns
        keeps epochs distinct across reloads and daemon restarts, and in practice ordered.
        """
        epoch = _new_epoch()
        for index, sock in enumerate(socks):
            ring_id = self.free_ring_ids.pop(0)
            self.rings.assign(ring_id, batch_topic(self.interface, index))
            if index < len(self.slots):
                slot = self.slots[index]
                slot.sock, slot.ring_id, slot.child = sock, ring_id, None
            else:
                slot = Slot(index, sock, ring_id, self.table[index])
                self.slots.append(slot)
            slot.epoch = epoch
            self.table[index]["active"] = 1
        for slot in self.slots[len(socks):]:
            slot.stats["active"] = slot.stats["up"] = 0
        del self.slots[len(socks):]

    def close_off(self) -> None:
        """Cut every current socket off from traffic (before its worker drains it)."""
        for slot in self.slots:
            with contextlib.suppress(OSError):
                attach(slot.sock, DROP_ALL)

    def close_ring(self, sock: socket.socket, ring_id: int, stats: SlotStats) -> None:
        """Close a slot's capture socket, keeping its last kernel counts."""
        with contextlib.suppress(OSError):
            add_kernel_stats(sock, stats)
        sock.close()
        # The ring's worker stays named: its last batches may still wait in the proxy's
        # queue. The id is used again (and renamed) only after every other one.
        self.free_ring_ids.append(ring_id)

    def refresh_kernel_stats(self) -> None:
        """Fold PACKET_STATISTICS (reset by each read) into each slot's running totals,
        old rings still draining included."""
        for slot in self.slots:
            add_kernel_stats(slot.sock, slot.stats)
        for old in self.retiring:
            add_kernel_stats(old.sock, old.stats)

    def sockets(self) -> list[socket.socket]:
        return [s.sock for s in self.slots] + [old.sock for old in self.retiring]

    def children(self) -> list[Child]:
        found = [s.child for s in self.slots if s.child is not None]
        return found + [old.child for old in self.retiring]

    def watch_link(self) -> None:
        """Follow the interface from its state now (the notifications tell the rest)."""
        state = link.query(self.interface)
        self.link_watch = link.LinkWatch(self.interface, state and state.ifindex,
                                         bool(state and state.up))

    def follow_link(self, states: list[link.LinkState], resync: bool) -> None:
        """Apply the kernel's link notifications in order, logging each change once; with
        resync (some were lost), then the state now."""
        if self.link_watch is None:
            return
        for state in states:
            self._link_event(self.link_watch.apply(state))
        if resync:
            try:
                now = link.query(self.interface)
            except OSError as e:
                log.warning("cannot read the state of %s: %s", self.interface, e)
                return
            self._link_event(self.link_watch.resync(now))

    def _link_event(self, event: str | None) -> None:
        assert self.link_watch is not None
        if event == "down":
            log.warning("%s went down; capture resumes when it comes back up", self.interface)
        elif event == "up":
            log.info("%s is up again; capturing", self.interface)
        elif event == "gone":
            log.warning("%s was deleted; waiting for an interface of that name",
                        self.interface)
        elif event == "returned":
            log.warning("%s exists again (ifindex %d): opening new capture sockets",
                        self.interface, self.link_watch.ifindex)
            self.reopen_pending = True


_last_epoch = 0


def _new_epoch() -> int:
    """time.time_ns(), but never the same twice in this process."""
    global _last_epoch
    _last_epoch = max(time.time_ns(), _last_epoch + 1)
    return _last_epoch


def add_kernel_stats(sock: socket.socket, stats: SlotStats) -> None:
    packets, drops, freezes = ring.read_kernel_stats(sock)
    stats.add("kernel_packets", packets)
    stats.add("kernel_drops", drops)
    stats.add("kernel_freezes", freezes)


def _set_timestamping(sock: socket.socket, source: str) -> None:
    """Ask for receive timestamps from the kernel's receive path (software) or the NIC
    (hardware), and have the ring header carry them (PACKET_TIMESTAMP). Without this the
    packet socket stamps packets itself when it delivers them."""
    if source == "hardware":
        flags = _linux.SOF_TIMESTAMPING_RX_HARDWARE | _linux.SOF_TIMESTAMPING_RAW_HARDWARE
    else:
        flags = _linux.SOF_TIMESTAMPING_RX_SOFTWARE | _linux.SOF_TIMESTAMPING_SOFTWARE
    sock.setsockopt(socket.SOL_SOCKET, _linux.SO_TIMESTAMPING, flags)
    sock.setsockopt(_linux.SOL_PACKET, _linux.PACKET_TIMESTAMP, flags)
