"""The worker: a forked child that maps one slot's ring, decodes, and publishes.

The supervisor opened the socket and joined the fanout group; the worker only maps the
ring, so a replacement worker picks up the same ring (and so the same flows) at the
oldest block its predecessor had not handed back.
"""

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass

from fanoutd import exits, privileges, slotstats
from fanoutd.encoder import IMPLEMENTATION, READS_IN_PLACE, BlockEncoder
from fanoutd.holding import HeldBlocks
from fanoutd.memory import keep_large_allocations
from fanoutd.proctitle import set_process_name
from fanoutd.publish import BatchPublisher
from fanoutd.ring import RingGeometry, RxRing
from fanoutd.systemd import set_log_context

log = logging.getLogger("fanoutd.worker")

POLL_S = 0.1  # the longest a worker goes without a heartbeat or checking for stop
GATE_WAIT_S = 0.005  # how often a worker looks whether the proxy forwards again
OUTBOX_WAIT_S = 0.0005  # how often a worker with a full outbox looks for a free slot
CONNECT_TIMEOUT_S = 10.0


def pause_after_block(full: bool, fill_ns: int, block_timeout_ms: int,
                      spare_blocks: int) -> float:
    """Seconds a worker may leave the ring alone after reading a block, before it looks
    for the next ones: 0 after a block the kernel handed over by its timeout (traffic is
    light: take the next block the moment it comes).

    After a full block traffic is heavy, and every wake-up costs the worker, the proxy and
    the subscriber tens of microseconds of CPU each (docs/performance.md, "the fourth
    day"): taking the next blocks together, after a pause, wakes each of them once for
    them all. The pause is the block timeout, which bounds what a packet waits for its
    block's hand-over anyway, but no longer than `spare_blocks` blocks take to fill at
    the rate this one filled (fill_ns, from its opening to its last packet), so that they
    never outgrow the outbox or the ring meanwhile."""
    if not full or fill_ns <= 0 or spare_blocks <= 0:
        return 0.0
    return min(block_timeout_ms / 1000, fill_ns * spare_blocks / 1e9)


class _Stop:
    """SIGTERM: stop after the current block. SIGUSR1: drain, i.e. stop once every block
    the ring holds is published and the kernel has handed over no more for a while (the
    supervisor first cut the socket off with a drop-all filter: a reload)."""

    requested = False
    drain_since: float | None = None
    name = ""

    def __call__(self, signum: int, frame: object) -> None:
        if signum == signal.SIGUSR1:
            if self.drain_since is None:
                self.drain_since = time.monotonic()
                set_process_name(f"{self.name}-old")  # its successor is fanoutd-wN now
        else:
            self.requested = True


@dataclass(frozen=True)
class WorkerPlan:
    """What a worker needs besides its slot: where to publish and who to become."""

    iface: str
    ring_id: int  # this ring's words in the RingTable (see holding.py)
    geometry: RingGeometry
    backend: str  # the proxy's socket for the workers' outboxes (outbox.py)
    user: str | None  # drop to this user once set up; None keeps the supervisor's
    payload_bytes: int  # > 0: rows get a payload column
    name: str  # process name: fanoutd-w0, or fd-eth1-w0 with several interfaces
    version: int  # wire-format version of the batches (wire.FORMATS)
    epoch: int  # the ring's epoch: changes whenever its seq numbering starts again
    drain: bool = False  # started to drain an old ring: as if told so (SIGUSR1) at once
    sensor: str = ""  # config `sensor`: this machine's name in every batch
    tunnel_depth: int = 1  # encapsulations to decode through (config tunnel_depth)


def run_worker(index: int, sock: socket.socket, stats: slotstats.SlotStats,
               rings: slotstats.RingTable, proxy: slotstats.ProxyStats,
               plan: WorkerPlan) -> int:
    """The worker process's main; returns its exit status."""
    keep_large_allocations()
    set_process_name(plan.name)
    set_log_context(interface=plan.iface, worker=index)
    stop = _Stop()
    stop.name = plan.name
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGUSR1, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the supervisor decides
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    privileges.handlers_installed()  # blocked since the fork (supervisor._spawn)
    if plan.drain:
        stop(signal.SIGUSR1, None)
    try:
        rx = RxRing(sock, plan.geometry)
    except OSError as e:
        log.error("worker %d: cannot map the ring of %s: %s", index, plan.iface, e.strerror)
        return exits.BOOT_FAILED
    try:
        pub = BatchPublisher(plan.backend, plan.iface, index, plan.ring_id,
                             plan.geometry.block_size)
    except OSError as e:
        log.error("worker %d: cannot make its outbox: %s", index, e.strerror)
        rx.close()
        return exits.BOOT_FAILED
    status = exits.BOOT_FAILED
    try:
        # The proxy takes the outbox only from the process the supervisor named the
        # ring's worker: be that before handing it over.
        if not _named_the_rings_worker(rings, plan.ring_id, stats):
            log.error("worker %d: the supervisor did not name this process the worker of "
                      "ring %d", index, plan.ring_id)
            return exits.BOOT_FAILED
        # Everything privileged happens before this point: the ring is mapped and the
        # proxy's socket (root's) connected. From here on the worker parses hostile
        # input as an unprivileged user with no capabilities.
        if not pub.wait_connected(CONNECT_TIMEOUT_S):
            return exits.BOOT_FAILED
        if plan.user:
            try:
                privileges.become(plan.user)
            except (privileges.PrivilegeError, OSError) as e:
                log.error("worker %d: cannot drop privileges to %s: %s", index, plan.user, e)
                return exits.BOOT_FAILED
        stats["pid"] = os.getpid()
        # Beat before saying it captures: from then on the supervisor holds it to its
        # heartbeat, and a new slot's word is still 0 (a hung worker, to it).
        stats.beat()
        if stop.drain_since is None:  # one started to drain an old ring leaves the slot's
            stats["capturing"] = os.getpid()  # flag to the worker of its new ring
        log.info("worker %d capturing on %s from ring block %d (%s decoder)", index,
                 plan.iface, rx.cursor, IMPLEMENTATION)
        encoder = BlockEncoder(plan.version, plan.iface, index, plan.epoch, plan.payload_bytes,
                               plan.sensor, tunnel_depth=plan.tunnel_depth)
        status = _capture(rx, pub, encoder, stats, rings, proxy, stop, plan, index)
        return status
    finally:
        if stats["capturing"] == os.getpid():  # not a successor's (a reload overlaps them)
            stats["capturing"] = 0
        pub.close()  # the proxy takes what is left in the outbox
        rx.close()


def _named_the_rings_worker(rings: slotstats.RingTable, ring_id: int,
                            stats: slotstats.SlotStats) -> bool:
    """Wait until the supervisor has named this process the ring's worker (it does so
    right after fork): the proxy takes the ring's outbox from that process only."""
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while rings.pid[ring_id] != os.getpid():
        if time.monotonic() >= deadline:
            return False
        stats.beat()
        time.sleep(0.001)
    return True


def _capture(rx: RxRing, pub: BatchPublisher, encoder: BlockEncoder,
             stats: slotstats.SlotStats, rings: slotstats.RingTable,
             proxy: slotstats.ProxyStats, stop: _Stop, plan: WorkerPlan, index: int) -> int:
    """Walk the ring: read, decode, publish, and hand each block back once the proxy has
    it (holding.py tells when).

    Returns the worker's exit status: 0 on stop, exits.RECONNECT when the proxy went away:
    a new worker connects to the new proxy (an unprivileged one could not reconnect to
    root's socket) and publishes again what the ring holds.
    """
    errors: dict[str, int] = {}
    held = HeldBlocks(rx, rings, plan.ring_id)
    # Once drained: the kernel hands over a partly filled block after block_timeout_ms.
    drain_quiet_s = 2 * rx.geometry.block_timeout_ms / 1000 + 0.02
    supervisor = os.getppid()
    # Blocks that may pile up during a pause (pause_after_block): all but one of the
    # outbox's slots, and no more than a quarter of the ring.
    spare_blocks = min(pub.outbox.slots - 1, rx.geometry.block_count // 4)
    look_again_at = 0.0  # after a full block: when to look for the next ones
    while not stop.requested:
        stats.beat()
        if os.getppid() != supervisor:
            # The supervisor died without stopping us (its death signal can be refused
            # once we run as another user): nobody reaps, counts or replaces us any more.
            log.warning("worker %d: the supervisor is gone; stopping", index)
            return 0
        if pub.lost_connection():
            log.info("worker %d: the proxy was replaced; restarting to reconnect", index)
            return exits.RECONNECT
        held.release_passed_on()
        if not proxy["forwarding"]:
            pub.flush()
            time.sleep(GATE_WAIT_S)  # a new proxy waits for its subscribers: hold
            continue
        if not rx.ready():
            pub.flush()  # the proxy hears of the batches written since it last did
            pause = look_again_at - time.monotonic()
            if pause > 0 and stop.drain_since is None:
                time.sleep(min(pause, POLL_S))  # the next blocks, taken together
                continue
            wait_s = held.idle(draining=stop.drain_since is not None)
            if wait_s:
                rx.wait(min(wait_s, POLL_S), resync=False)
            elif stop.drain_since is not None:
                if time.monotonic() - stop.drain_since >= drain_quiet_s:
                    return 0  # drained: everything this ring got is published
                rx.wait(drain_quiet_s, resync=True)
            else:
                rx.wait(POLL_S, resync=True)
            if rx.socket_errors:
                _report_socket_errors(rx, plan.iface, index)
            continue
        slot = pub.free_slot()
        if slot is None:
            pub.flush()
            # The outbox is full: the proxy has yet to take the batches before. Wait, the
            # block unread: the ring buffers meanwhile (the kernel counts what it drops
            # once it is full).
            held.make_room(rx.user_blocks())
            stats.add("outbox_full")
            time.sleep(OUTBOX_WAIT_S)
            continue
        block, first, num_pkts, block_seq = rx.read(copy=not READS_IN_PLACE)
        full, fill_ns = rx.handed_over_full(rx.cursor)
        look_again_at = time.monotonic() + pause_after_block(
            full, fill_ns, rx.geometry.block_timeout_ms, spare_blocks)
        if held.passed_on(block_seq):
            # Left behind by a replaced worker after the proxy had passed it on.
            slot.release()
            rx.release(rx.cursor)
            rx.advance()
            continue
        try:
            # seq: the kernel's block sequence number - 1, which needs no bookkeeping: it
            # continues across a worker replacement, a block published again carries the
            # same seq, and a batch lost on the way leaves a gap subscribers can see.
            with slot:
                length, rows, wire_bytes = encoder.encode_into(slot, block, first, num_pkts,
                                                               errors, block_seq - 1)
        except Exception:
            # decode never raises on wire input (property-tested); if a bug makes it, skip
            # the block rather than crash on it again in every replacement worker.
            log.exception("worker %d: decoding ring block %d failed; skipping its %d "
                          "packets", index, block_seq, num_pkts)
            stats.add("blocks_skipped")
            errors.clear()
            rx.release(rx.cursor)
            rx.advance()
            continue
        del block  # a view of the ring: the block may go back to the kernel from here on
        pub.publish(block_seq, length)
        stats.add("batches")
        held.hold(rx.cursor, block_seq)
        # Counters change once per block: one store each (slotstats.py).
        stats.add("packets", rows)
        stats.add("bytes", wire_bytes)
        if errors:
            for reason, n in errors.items():
                stats.add(f"err:{reason}", n)
            errors.clear()
        stats.add("blocks")
        rx.advance()
        unread = stats["blocks_user"] = rx.user_blocks()
        held.make_room(unread)
    pub.flush()
    return 0


def _report_socket_errors(rx: RxRing, iface: str, index: int) -> None:
    """Debug only: the supervisor watches the link, and logs and counts its changes once
    for all workers (fanoutd_link_events_total)."""
    for err in rx.socket_errors:
        log.debug("worker %d: socket error on %s: %s", index, iface, os.strerror(err))
    rx.socket_errors.clear()
