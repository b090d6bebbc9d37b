"""Moving a capture to new sockets, rings and fanout group (a reload, an interface that
was re-created) without losing a packet: the new rings open before the old ones close,
and each old ring's worker drains it (SIGUSR1) before its socket closes. Also taking an
interface out of capture altogether."""

from __future__ import annotations

import logging
import os
import signal
from typing import TYPE_CHECKING

from fanoutd import exits, fanout, ring
from fanoutd.capture import Capture, Retiring
from fanoutd.children import Child, describe_status
from fanoutd.config import CaptureConfig
from fanoutd.filter import FilterError

if TYPE_CHECKING:
    from fanoutd.supervisor import Supervisor

log = logging.getLogger("fanoutd")

DRAIN_GRACE_S = 5.0  # beyond two block timeouts, before a draining worker is killed
FAILED_DRAINS = 5  # failed drains of an old ring in a row before it is closed as it is


def replace_rings(sup: Supervisor, capture: Capture, cfg: CaptureConfig) -> bool:
    """Move a capture to new sockets, rings and fanout group for cfg, losing nothing.

    The new sockets form their group behind a drop-all filter; then, in one quick pass,
    their filters come off and the old sockets get one, so each packet lands in at least
    one ring (in both during the instant in between). New workers start on the new rings
    at once while the old ones drain theirs (SIGUSR1) and exit. With an explicit
    fanout.group_id that stays the same, the old sockets must leave the group before the
    new ones can join it, so capture pauses while they drain. Returns False when the new
    sockets cannot be opened: capture then goes on as before, or, in the same group,
    stays paused and retries on its own.
    """
    same_group = cfg.fanout.group_id is not None and cfg.fanout.group_id == capture.group_id
    socks = None
    try:
        program = capture.program(cfg)
        if not same_group:
            socks = capture.open_sockets(cfg)
    except (ring.CaptureError, fanout.FanoutError, FilterError, OSError) as e:
        log.error("cannot capture on %s with the new settings: %s", cfg.interface, e)
        return False
    if socks is not None:  # the switch: the new rings open, then the old ones close
        capture.open_up(socks, program)
    retire_slots(sup, capture)
    capture.cfg = cfg
    if socks is None:
        wait_retired(sup, capture)
        try:
            socks = capture.open_sockets(cfg)
            capture.open_up(socks, program)
        except (ring.CaptureError, fanout.FanoutError, OSError) as e:
            log.error("cannot capture on %s: %s; retrying", cfg.interface, e)
            capture.set_slots([])
            capture.reopen_pending = True
            return False
    capture.set_slots(socks)
    sup.tell_proxy_block_size()
    sup.start_workers(capture)
    sup.health.capture_changed()
    return True


def retire_capture(sup: Supervisor, capture: Capture) -> None:
    """Stop capturing on an interface taken out of the configuration: its workers drain
    their rings, then its sockets close."""
    retire_slots(sup, capture)
    capture.slots = []
    wait_retired(sup, capture)
    sup.captures.remove(capture)


def retire_slots(sup: Supervisor, capture: Capture) -> None:
    """Cut the capture's current sockets off from traffic and have their workers drain
    them (SIGUSR1); each socket closes once its worker has drained it (drainer_exited). A
    slot whose worker is between restarts gets one to drain it: its ring may hold
    blocks."""
    capture.close_off()
    for slot in capture.slots:
        child = slot.child
        if child is None:
            capture.close_ring(slot.sock, slot.ring_id, slot.stats)
            continue
        child.failures = 0  # now counts failed drains
        child.main = sup.worker_main(capture, slot, drain=True)  # for any successor
        if child.pid is None:
            sup.spawn_for_ring(child, slot.ring_id)
        _drain(sup, capture, child)
        capture.retiring.append(Retiring(child, slot.sock, slot.ring_id, slot.stats))


def _drain(sup: Supervisor, capture: Capture, child: Child) -> None:
    """Tell a worker (maybe just forked: it takes the signal once its handler is in place)
    to publish what its ring holds, then exit; SIGKILL if it takes longer than its ring's
    block timeout allows. One forked to drain knows it from its plan already."""
    grace = capture.cfg.ring.block_timeout_ms / 500 + DRAIN_GRACE_S
    child.terminate(sup.system.kill, grace, sup.system.monotonic(), signal.SIGUSR1)


def drainer_exited(sup: Supervisor, capture: Capture, old: Retiring, status: int) -> None:
    """A worker draining an old ring exited. Status 0: the ring is drained, it closes.
    Anything else (killed, failed to start, left to reconnect to a new proxy) leaves
    blocks in the ring: another worker drains it, so that every block is published, up
    to FAILED_DRAINS failures in a row; only then is the ring closed as it is."""
    child = old.child
    child.exited(status, sup.system.monotonic())  # DRAINING or STOPPING: now STOPPED
    drained = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    reconnect = os.WIFEXITED(status) and os.WEXITSTATUS(status) == exits.RECONNECT
    if not (drained or reconnect or sup.stopping):
        child.failures += 1
        old.stats.add("restarts")
    if drained or sup.stopping or child.failures >= FAILED_DRAINS:
        if not (drained or sup.stopping):
            log.error("%s failed to drain its old ring %d times in a row (last: %s); "
                      "closing it with what it still holds", child.name, child.failures,
                      describe_status(status))
        capture.retiring.remove(old)
        capture.close_ring(old.sock, old.ring_id, old.stats)
        return
    if reconnect:
        log.info("%s restarts to reconnect to the new proxy and go on draining its old "
                 "ring", child.name)
    else:
        log.warning("%s %s while draining its old ring; starting another worker to "
                    "drain it", child.name, describe_status(status))
    sup.spawn_for_ring(child, old.ring_id)  # named the ring's worker: the proxy checks
    _drain(sup, capture, child)


def check_retiring(sup: Supervisor, now: float) -> None:
    """SIGKILL an old worker that did not finish draining in time."""
    for capture in sup.captures:
        for old in capture.retiring:
            old.child.escalate(sup.system.kill, now, "did not finish draining its old ring")


def wait_retired(sup: Supervisor, capture: Capture) -> None:
    """Reap until every old worker of the capture is done (drained, or killed)."""
    while capture.retiring:
        check_retiring(sup, sup.system.monotonic())
        sup.reap()
        sup.system.sleep(0.01)


def drainer(captures: list[Capture], child: Child) -> tuple[Capture, Retiring] | None:
    """The capture and old ring that `child` drains, if it is draining one."""
    for capture in captures:
        for old in capture.retiring:
            if old.child is child:
                return capture, old
    return None
