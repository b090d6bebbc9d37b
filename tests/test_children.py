"""The children's state machine (fanoutd/children.py) with a fake clock and fake
processes: the restart policy, stopping and escalation, and the transitions it refuses."""

import os
import signal

import pytest

from fanoutd import exits
from fanoutd.children import Child, ChildState, ChildStateError, RestartPolicy, describe_status

EXITED_3 = 3 << 8  # a wait status: exit(3)
KILLED = signal.SIGKILL  # a wait status: killed by SIGKILL


class FakeKill:
    """os.kill that records the signals sent; `refuse` makes every one fail as without
    CAP_KILL."""

    def __init__(self, refuse: bool = False) -> None:
        self.sent: list[tuple[int, int]] = []
        self.refuse = refuse

    def __call__(self, pid: int, signum: int) -> None:
        self.sent.append((pid, signum))
        if self.refuse:
            raise PermissionError(1, "Operation not permitted")


def child(**policy) -> Child:
    return Child("fanoutd-w0", lambda: 0, policy=RestartPolicy(**policy))


def test_wait_statuses_in_words():
    assert describe_status(EXITED_3) == "exited with status 3"
    assert describe_status(KILLED) == "was killed by SIGKILL"
    assert os.WIFEXITED(EXITED_3) and os.WIFSIGNALED(KILLED)


def test_a_running_child_is_restarted_at_once_a_few_times_then_with_growing_delays():
    c, now, delays = child(), 100.0, []
    for pid in range(1, 9):
        c.spawned(pid, now)
        c.ready()
        result = c.exited(KILLED, now + 1)
        assert result.state is ChildState.BACKOFF and result.how == "was killed by SIGKILL"
        delays.append(result.delay)
        now = c.restart_at
        assert c.due(now) and not c.due(now - 0.01)
    assert delays == [0, 0, 0, 0.1, 0.2, 0.4, 0.8, 1.6]


def test_backoff_stops_growing_at_its_maximum():
    policy = RestartPolicy(backoff_max_s=10.0)
    assert [policy.delay(n, True) for n in (20, 30)] == [10.0, 10.0]


def test_a_child_that_fails_to_start_backs_off_then_goes_fatal():
    c, now, states = child(fatal_after=5), 0.0, []
    for pid in range(1, 6):
        c.spawned(pid, now)
        result = c.exited(EXITED_3, now + 0.5)  # never ready
        states.append((result.state, result.delay))
        now = c.restart_at
    assert states == [(ChildState.BACKOFF, 0.0), (ChildState.BACKOFF, 0.1),
                      (ChildState.BACKOFF, 0.2), (ChildState.BACKOFF, 0.4),
                      (ChildState.FATAL, 0.0)]
    assert c.state is ChildState.FATAL
    with pytest.raises(ChildStateError):
        c.spawned(9, now)


def test_a_child_that_ran_long_enough_has_its_failures_forgotten():
    c = child(stable_after_s=10.0)
    c.spawned(1, 0.0)
    c.ready()
    c.exited(KILLED, 1.0)
    c.spawned(2, 1.0)
    c.ready()
    c.exited(KILLED, 2.0)
    assert c.failures == 2
    c.spawned(3, 2.0)
    c.ready()
    assert c.exited(KILLED, 50.0).delay == 0 and c.failures == 1


def test_terminate_then_escalate():
    kill, c = FakeKill(), child()
    c.spawned(7, 0.0)
    c.ready()
    assert c.terminate(kill, grace=2.0, now=10.0)
    assert c.state is ChildState.STOPPING and kill.sent == [(7, signal.SIGTERM)]
    assert not c.escalate(kill, 11.9, "ignored SIGTERM")
    assert c.escalate(kill, 12.0, "ignored SIGTERM") and kill.sent[-1] == (7, signal.SIGKILL)
    assert not c.escalate(kill, 20.0, "ignored SIGTERM")  # once only
    assert c.exited(KILLED, 12.1).state is ChildState.STOPPED
    assert c.pid is None and c.kill_at is None


def test_a_second_terminate_keeps_the_first_deadline():
    kill, c = FakeKill(), child()
    c.spawned(7, 0.0)
    c.terminate(kill, grace=2.0, now=10.0)
    c.terminate(kill, grace=2.0, now=11.5)
    assert c.kill_at == 12.0


def test_draining_is_its_own_state_and_never_restarts():
    kill, c = FakeKill(), child()
    c.spawned(7, 0.0)
    c.ready()
    c.terminate(kill, grace=5.0, now=1.0, signum=signal.SIGUSR1)
    assert c.state is ChildState.DRAINING and kill.sent == [(7, signal.SIGUSR1)]
    assert c.exited(EXITED_3, 2.0).state is ChildState.STOPPED


def test_a_refused_signal_is_logged_not_raised_and_the_deadline_still_holds(caplog):
    kill, c = FakeKill(refuse=True), child()
    c.spawned(7, 0.0)
    assert not c.terminate(kill, grace=1.0, now=0.0)
    assert c.state is ChildState.STOPPING and c.kill_at == 1.0
    assert c.escalate(kill, 1.0, "ignored SIGTERM")  # due, and tried: refused too
    assert kill.sent == [(7, signal.SIGTERM), (7, signal.SIGKILL)]
    assert "cannot send SIGTERM to fanoutd-w0 (pid 7): permission denied" in caplog.text
    assert "needs CAP_KILL" in caplog.text
    assert "fanoutd-w0 ignored SIGTERM; killing it" in caplog.text


def test_a_signal_to_a_process_already_gone_is_no_error():
    def gone(pid: int, signum: int) -> None:
        raise ProcessLookupError(3, "No such process")
    c = child()
    c.spawned(7, 0.0)
    assert not c.send_signal(gone, signal.SIGTERM) and c.pid == 7  # reaping will tell


def test_a_hung_child_terminated_to_be_replaced_restarts_as_one_that_died():
    kill, c = FakeKill(), child()
    c.spawned(7, 0.0)
    c.ready()
    c.terminate(kill, grace=2.0, now=20.0, replace=True)
    assert c.state is ChildState.STOPPING
    result = c.exited(KILLED, 22.0)
    assert (result.state, result.delay, c.failures) == (ChildState.BACKOFF, 0.0, 1)
    assert not c.replace


def test_a_child_that_outlives_sigkill_is_abandoned():
    kill, c = FakeKill(), child()
    c.spawned(7, 0.0)
    c.terminate(kill, grace=1.0, now=0.0)
    c.abandoned()
    assert (c.state, c.pid) == (ChildState.STOPPED, None)
    c.spawned(8, 5.0)  # it may be started again


def test_every_exit_while_the_daemon_stops_is_final():
    c = child()
    c.spawned(7, 0.0)
    c.ready()
    assert c.exited(KILLED, 1.0, stopping=True).state is ChildState.STOPPED


@pytest.mark.parametrize("ready", [True, False])
def test_an_expected_exit_restarts_at_once_without_a_failure(ready):
    c = child()
    for pid in range(1, 10):  # however often: a reconnect is never a failure
        c.spawned(pid, float(pid))
        if ready:
            c.ready()
        result = c.exited(exits.RECONNECT << 8, pid + 0.5)
        assert result.reconnect and result.state is ChildState.BACKOFF
        assert c.due(pid + 0.5) and c.failures == 0 and c.pid is None


@pytest.mark.parametrize(("setup", "transition"), [
    ("stopped", lambda c: c.ready()),
    ("running", lambda c: c.spawned(8, 1.0)),
    ("running", lambda c: c.ready()),
    ("stopped", lambda c: c.terminate(FakeKill(), 1.0, 1.0)),
    ("stopped", lambda c: c.exited(KILLED, 1.0)),
])
def test_transitions_from_the_wrong_state_are_refused(setup, transition):
    c = child()
    if setup == "running":
        c.spawned(7, 0.0)
        c.ready()
    with pytest.raises(ChildStateError):
        transition(c)
