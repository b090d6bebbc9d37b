"""The supervisor's child handling with a fake clock and fake fork, waitpid and kill: no
root, no namespace, no process started. Workers are restarted by the restart policy, hung
ones terminated then killed, stop honours its grace, a FATAL child ends the daemon with
exit status 70, a RECONNECT exit is no failure, and an old ring's drainer that dies is
replaced by one the proxy recognises."""

import logging
import signal
import socket

import pytest

from fanoutd import exits, handover
from fanoutd.children import ChildState, System
from fanoutd.config import CaptureConfig, Config, SupervisorConfig
from fanoutd.supervisor import HUNG_KILL_AFTER_S, KILL_WAIT_S, STOP_GRACE_S, Supervisor

KILLED = signal.SIGKILL  # wait statuses
DRAINED = 0


class FakeSystem(System):
    """Processes that exist as pids only. SIGTERM and SIGKILL end one, but only SIGKILL
    one in `stopped` (as SIGSTOP would have it); `refuse` makes every signal fail as
    without CAP_KILL."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.next_pid = 100
        self.alive: set[int] = set()
        self.reaped: list[tuple[int, int]] = []  # what waitpid returns next
        self.sent: list[tuple[int, int]] = []
        self.stopped: set[int] = set()
        self.refuse = False

    def fork(self) -> int:
        self.next_pid += 1
        self.alive.add(self.next_pid)
        return self.next_pid

    def exit(self, pid: int, status: int) -> None:
        self.alive.discard(pid)
        self.reaped.append((pid, status))

    def waitpid(self, pid: int, options: int) -> tuple[int, int]:
        if self.reaped:
            return self.reaped.pop(0)
        if not self.alive:
            raise ChildProcessError(10, "No child processes")
        return 0, 0

    def kill(self, pid: int, signum: int) -> None:
        self.sent.append((pid, signum))
        if pid not in self.alive:
            raise ProcessLookupError(3, "No such process")
        if self.refuse:
            raise PermissionError(1, "Operation not permitted")
        if signum == signal.SIGKILL or (signum == signal.SIGTERM and pid not in self.stopped):
            self.exit(pid, signum)  # the wait status of a death by that signal

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def daemon():
    """A supervisor with one capture of two worker slots, its workers forked (fakes)."""
    cfg = Config(interfaces=(CaptureConfig(interface="cap0", workers=2),), user=None,
                 supervisor=SupervisorConfig(heartbeat_timeout_ms=500))
    system = FakeSystem()
    sup = Supervisor(cfg, system=system)
    capture = sup._new_capture(cfg.interfaces[0])
    # Any socket stands in for a capture socket: the supervisor only filters and closes it.
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    capture.set_slots(socks)
    sup.captures.append(capture)
    sup.start_workers(capture)
    yield sup, system, capture
    for sock in capture.sockets():
        sock.close()
    sup.links.close()


def pids(capture) -> list[int | None]:
    return [slot.child.pid for slot in capture.slots]


def mark_ready(sup, capture) -> None:
    """Each worker says it captures (as a real one does in its counters), and heartbeats."""
    for slot in capture.slots:
        slot.stats["capturing"] = slot.child.pid or 0
        slot.stats["heartbeat_ns"] = int(sup.system.now * 1e9)
    sup._tick_children(sup.system.now)


def test_workers_start_and_become_ready(daemon):
    sup, _, capture = daemon
    assert pids(capture) == [101, 102]
    assert [sup.rings.pid[s.ring_id] for s in capture.slots] == [101, 102]
    assert all(s.child.state is ChildState.STARTING for s in capture.slots)
    mark_ready(sup, capture)
    assert all(s.up and s.stats["up"] == 1 for s in capture.slots)


def test_a_worker_that_keeps_dying_is_restarted_at_once_then_backs_off(daemon, caplog):
    sup, system, capture = daemon
    slot = capture.slots[0]
    delays = []
    for _ in range(6):
        mark_ready(sup, capture)
        died_at = system.now
        system.exit(slot.child.pid, KILLED)
        sup.reap()
        assert slot.child.state is ChildState.BACKOFF and not slot.up
        delays.append(round(slot.child.restart_at - died_at, 3))
        if slot.child.restart_at > died_at:  # nothing before its time
            sup._tick_children(slot.child.restart_at - 0.01)
            assert slot.child.state is ChildState.BACKOFF
        system.now = slot.child.restart_at
        before = slot.child.pid
        sup._tick_children(system.now)
        assert slot.child.state is ChildState.STARTING and slot.child.pid != before
        assert sup.rings.pid[slot.ring_id] == slot.child.pid
    assert delays == [0, 0, 0, 0.1, 0.2, 0.4]
    assert slot.stats["restarts"] == 6 and capture.slots[1].stats["restarts"] == 0
    assert "fanoutd-w0 was killed by SIGKILL; restarting in 0.0 s" in caplog.text
    assert "fanoutd-w0 was killed by SIGKILL; restarting in 0.4 s" in caplog.text
    assert sup.exit_status == exits.OK and not sup.stopping


def test_a_worker_that_ran_long_enough_starts_counting_again(daemon):
    sup, system, capture = daemon
    slot = capture.slots[0]
    for _ in range(4):
        mark_ready(sup, capture)
        system.exit(slot.child.pid, KILLED)
        sup.reap()
        system.now = slot.child.restart_at
        sup._tick_children(system.now)
    mark_ready(sup, capture)
    system.now += 10.0  # stable now
    system.exit(slot.child.pid, KILLED)
    sup.reap()
    assert slot.child.failures == 1 and slot.child.restart_at == system.now


def test_a_worker_that_never_starts_goes_fatal_and_the_daemon_exits_70(daemon, caplog):
    sup, system, capture = daemon
    slot = capture.slots[1]
    for attempt in range(1, 6):
        system.exit(slot.child.pid, exits.BOOT_FAILED << 8)
        sup.reap()
        if attempt < 5:
            assert slot.child.state is ChildState.BACKOFF and not sup.stopping
            system.now = slot.child.restart_at
            sup._tick_children(system.now)
    assert slot.child.state is ChildState.FATAL
    assert sup.stopping and sup.exit_status == exits.SOFTWARE == 70
    assert "fanoutd-w1 failed to start 5 times in a row (last: exited with status 3); " \
           "giving up" in caplog.text


def test_a_reconnect_exit_restarts_at_once_and_is_no_failure(daemon, caplog):
    sup, system, capture = daemon
    caplog.set_level(logging.INFO, "fanoutd")
    slot = capture.slots[0]
    for _ in range(8):  # more than would make failures FATAL
        system.exit(slot.child.pid, exits.RECONNECT << 8)
        sup.reap()
        assert slot.child.due(system.now) and slot.child.failures == 0
        sup._tick_children(system.now)
    assert slot.child.state is ChildState.STARTING and not sup.stopping
    assert "fanoutd-w0 restarts to reconnect to the new proxy" in caplog.text


def test_a_hung_worker_gets_sigterm_then_sigkill_and_is_replaced(daemon, caplog):
    sup, system, capture = daemon
    mark_ready(sup, capture)
    hung = capture.slots[1].child.pid
    system.stopped.add(hung)
    healthy = capture.slots[0]

    def tick(now: float) -> None:
        healthy.stats["heartbeat_ns"] = int(now * 1e9)
        sup._tick_children(now)
    system.now += 0.6  # past heartbeat_timeout_ms: 500
    tick(system.now)
    assert system.sent == [(hung, signal.SIGTERM)]  # ignored: it is stopped
    assert "fanoutd-w1 has not heartbeaten for 500 ms; terminating it" in caplog.text
    tick(system.now + HUNG_KILL_AFTER_S - 0.01)
    assert system.sent == [(hung, signal.SIGTERM)]
    system.now += HUNG_KILL_AFTER_S
    tick(system.now)
    assert system.sent == [(hung, signal.SIGTERM), (hung, signal.SIGKILL)]
    assert "fanoutd-w1 ignored SIGTERM; killing it" in caplog.text
    sup.reap()
    tick(system.now)  # replaced at once, as a worker that died
    slot = capture.slots[1]
    assert slot.child.pid not in (None, hung) and slot.stats["restarts"] == 1
    assert capture.slots[0].child.pid == 101 and capture.slots[0].up


def test_stop_honours_the_grace_then_kills(daemon, caplog):
    sup, system, capture = daemon
    mark_ready(sup, capture)
    obedient, stuck = pids(capture)
    system.stopped.add(stuck)
    started = system.now
    sup.stop_children([s.child for s in capture.slots])
    assert system.now - started == pytest.approx(STOP_GRACE_S, abs=0.02)
    assert (stuck, signal.SIGKILL) in system.sent and (obedient, signal.SIGKILL) not in \
        system.sent
    assert "fanoutd-w1 did not stop in 5 s; killing it" in caplog.text
    assert all(s.child.state is ChildState.STOPPED and s.child.pid is None
               for s in capture.slots)


def test_stop_ends_even_when_no_signal_can_be_sent(daemon, caplog):
    """Without CAP_KILL every signal is refused: logged, never raised, and stopping gives
    up on the children once SIGKILL has had its time."""
    sup, system, capture = daemon
    system.refuse = True
    started = system.now
    sup.stop_children([s.child for s in capture.slots])
    assert system.now - started == pytest.approx(STOP_GRACE_S + KILL_WAIT_S, abs=0.02)
    assert "cannot send SIGTERM to fanoutd-w0 (pid 101): permission denied" in caplog.text
    assert "cannot send SIGKILL to fanoutd-w1 (pid 102)" in caplog.text
    assert "fanoutd-w0 (pid 101) is still there 2 s after SIGKILL; leaving it" in caplog.text
    assert all(s.child.state is ChildState.STOPPED for s in capture.slots)


def test_a_drainer_that_dies_is_replaced_by_one_the_proxy_recognises(daemon, caplog):
    """After a reload the old workers drain their rings (SIGUSR1); one that dies instead
    is replaced by a worker named the ring's (the proxy takes its batches from that pid
    only); one that drained has its ring closed."""
    sup, system, capture = daemon
    mark_ready(sup, capture)
    old = pids(capture)
    handover.retire_slots(sup, capture)
    assert system.sent == [(old[0], signal.SIGUSR1), (old[1], signal.SIGUSR1)]
    first, second = capture.retiring
    assert all(r.child.state is ChildState.DRAINING for r in capture.retiring)
    system.exit(old[0], KILLED)
    system.exit(old[1], DRAINED)
    sup.reap()
    assert capture.retiring == [first]
    assert first.child.pid not in (None, old[0])
    assert sup.rings.pid[first.ring_id] == first.child.pid
    assert first.child.state is ChildState.DRAINING and first.stats["restarts"] == 1
    assert second.sock.fileno() == -1  # drained: its socket is closed
    assert "fanoutd-w0 was killed by SIGKILL while draining its old ring; starting " \
           "another worker to drain it" in caplog.text


def test_a_drainer_past_its_time_is_killed(daemon, caplog):
    sup, system, capture = daemon
    mark_ready(sup, capture)
    handover.retire_slots(sup, capture)
    grace = capture.cfg.ring.block_timeout_ms / 500 + handover.DRAIN_GRACE_S
    handover.check_retiring(sup, system.now + grace - 0.01)
    assert all(signum == signal.SIGUSR1 for _, signum in system.sent)
    handover.check_retiring(sup, system.now + grace)
    assert [signum for _, signum in system.sent[2:]] == [signal.SIGKILL] * 2
    assert "fanoutd-w0 did not finish draining its old ring; killing it" in caplog.text
