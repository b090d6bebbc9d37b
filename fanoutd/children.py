"""The life of a child the supervisor keeps alive (a worker or the proxy), as a state
machine, in the manner of supervisord's process states.

    STOPPED --spawned--> STARTING --ready--> RUNNING
       ^                    |                   |
       |                 exited              exited, or terminate(): STOPPING, DRAINING
       |                    v                   v
       +------------- BACKOFF <-------------- (restart policy) --> FATAL

Every change of state goes through one method here, which checks the state it leaves
(`_leave`). The restart policy is one pure function of the failures and the clock, and
stopping a child is one pair: `terminate(...)` then `escalate(now)` (SIGKILL once the
grace has run out). The processes are reached through `System` (fork, waitpid, kill, the
clock), so the supervisor's child handling is tested with fakes.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fanoutd import exits

log = logging.getLogger("fanoutd")


class ChildState(enum.Enum):
    STOPPED = "stopped"  # not running, not to be started (yet)
    STARTING = "starting"  # forked, not ready yet (a worker maps its ring, the proxy binds)
    RUNNING = "running"  # ready
    BACKOFF = "backoff"  # exited; to be started again at restart_at
    STOPPING = "stopping"  # told to stop (SIGTERM); SIGKILL at kill_at
    DRAINING = "draining"  # a worker told to drain its old ring and exit (SIGUSR1)
    FATAL = "fatal"  # kept failing to start: given up


class ChildStateError(RuntimeError):
    """A transition from a state that does not allow it: a bug in the supervisor."""


@dataclass(frozen=True)
class RestartPolicy:
    """When a child that exited starts again.

    A child that was running is started again at once, `quick_restarts` times in a row (a
    worker's ring fills while no one reads it); after that, and for a child that failed
    to start, the delay doubles from `backoff_first_s` up to `backoff_max_s`. A child that
    ran `stable_after_s` has its failures forgotten. `fatal_after` failed starts in a row
    give up on it.
    """

    backoff_first_s: float = 0.1
    backoff_max_s: float = 10.0
    stable_after_s: float = 10.0
    fatal_after: int = 5
    quick_restarts: int = 3

    def delay(self, failures: int, was_running: bool) -> float | None:
        """Seconds until the next start after `failures` in a row; None: give up."""
        if not was_running and failures >= self.fatal_after:
            return None
        quick = self.quick_restarts if was_running else 1
        if failures <= quick:
            return 0.0
        return min(self.backoff_first_s * 2 ** (failures - quick - 1), self.backoff_max_s)


@dataclass(frozen=True)
class Exit:
    """What exited() decided: the state the child is in now, and for BACKOFF the delay."""

    state: ChildState
    delay: float = 0.0
    how: str = ""  # "exited with status 3", "was killed by SIGKILL"
    reconnect: bool = False  # an expected exit (exits.RECONNECT): restarts, no failure


class System:
    """The calls that reach processes and the clock. Tests pass a fake."""

    def fork(self) -> int:
        return os.fork()

    def waitpid(self, pid: int, options: int) -> tuple[int, int]:
        return os.waitpid(pid, options)

    def kill(self, pid: int, signum: int) -> None:
        os.kill(pid, signum)

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@dataclass
class Child:
    """A forked process the supervisor keeps alive."""

    name: str
    main: Callable[[], int]  # runs in the forked child; returns its exit status
    state: ChildState = ChildState.STOPPED
    pid: int | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float = 0.0
    kill_at: float | None = None  # SIGKILL then, unless it has exited
    killed: bool = False  # SIGKILL was sent (or refused): escalate() does it once
    replace: bool = False  # terminated because it hung: its exit is a failure, it restarts
    policy: RestartPolicy = field(default_factory=RestartPolicy)

    def _leave(self, *allowed: ChildState) -> None:
        if self.state not in allowed:
            raise ChildStateError(f"{self.name}: cannot leave {self.state.name} this way "
                                  f"(expected {', '.join(s.name for s in allowed)})")

    # -- starting

    def spawned(self, pid: int, now: float) -> None:
        """Forked as `pid`."""
        self._leave(ChildState.STOPPED, ChildState.BACKOFF)
        self.state, self.pid, self.started_at = ChildState.STARTING, pid, now
        self.kill_at, self.killed, self.replace = None, False, False

    def ready(self) -> None:
        """It said it works (a worker maps its ring, the proxy has bound its endpoints)."""
        self._leave(ChildState.STARTING)
        self.state = ChildState.RUNNING

    def due(self, now: float) -> bool:
        """In BACKOFF, and its restart time has come."""
        return self.state is ChildState.BACKOFF and now >= self.restart_at

    # -- stopping

    def send_signal(self, kill: Callable[[int, int], None], signum: int) -> bool:
        """Send signum; False when it could not be sent. A refused signal is logged, never
        raised: the supervisor must go on (and stop cleanly) whatever happens."""
        if self.pid is None:
            return False
        try:
            kill(self.pid, signum)
        except ProcessLookupError:  # it exited already; reaping will tell
            return False
        except PermissionError:
            log.error("cannot send %s to %s (pid %d): permission denied; signalling a child "
                      "that runs as another user needs CAP_KILL",
                      signal.Signals(signum).name, self.name, self.pid)
            return False
        return True

    def terminate(self, kill: Callable[[int, int], None], grace: float, now: float,
                  signum: int = signal.SIGTERM, replace: bool = False) -> bool:
        """Ask it to stop (SIGTERM) or, with SIGUSR1, to drain its ring and exit; SIGKILL
        follows `grace` seconds later (escalate), or sooner if an earlier terminate said
        so. replace: it hung, so once it exits it is restarted as one that died. False
        when the signal could not be sent."""
        self._leave(ChildState.STARTING, ChildState.RUNNING, ChildState.STOPPING,
                    ChildState.DRAINING)
        self.state = ChildState.DRAINING if signum == signal.SIGUSR1 else ChildState.STOPPING
        self.replace = replace
        self.kill_at = now + grace if self.kill_at is None else min(self.kill_at, now + grace)
        return self.send_signal(kill, signum)

    def escalate(self, kill: Callable[[int, int], None], now: float, reason: str) -> bool:
        """SIGKILL, once, when the grace given by terminate() has run out, logged as
        "NAME reason; killing it". True when that was due now."""
        if self.pid is None or self.kill_at is None or self.killed or now < self.kill_at:
            return False
        self.killed = True
        log.warning("%s %s; killing it", self.name, reason)
        self.send_signal(kill, signal.SIGKILL)
        return True

    def abandoned(self) -> None:
        """It outlived SIGKILL (a signal refused, a process stuck in the kernel): stop
        waiting for it. It exits on its own once the supervisor is gone."""
        self._leave(ChildState.STOPPING, ChildState.DRAINING)
        self.state, self.pid, self.kill_at = ChildState.STOPPED, None, None

    # -- exiting

    def exited(self, status: int, now: float, stopping: bool = False) -> Exit:
        """It was reaped with wait status `status`: decide what comes next. `stopping`:
        the daemon is stopping, so nothing starts again."""
        how = describe_status(status)
        was_running = self.state is ChildState.RUNNING or self.replace
        told_to_stop = self.state in (ChildState.STOPPING, ChildState.DRAINING)
        self.pid, self.kill_at, self.killed = None, None, False
        if stopping or (told_to_stop and not self.replace):
            self.state, self.replace = ChildState.STOPPED, False
            return Exit(ChildState.STOPPED, how=how)
        self._leave(ChildState.STARTING, ChildState.RUNNING, ChildState.STOPPING)
        self.replace = False
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == exits.RECONNECT:
            # A worker that dropped privileges leaving to reconnect to a new proxy.
            self.state, self.restart_at = ChildState.BACKOFF, now
            return Exit(ChildState.BACKOFF, 0.0, how, reconnect=True)
        if now - self.started_at >= self.policy.stable_after_s:
            self.failures = 0
        self.failures += 1
        delay = self.policy.delay(self.failures, was_running)
        if delay is None:
            self.state = ChildState.FATAL
            return Exit(ChildState.FATAL, how=how)
        self.state, self.restart_at = ChildState.BACKOFF, now + delay
        return Exit(ChildState.BACKOFF, delay, how)


def describe_status(status: int) -> str:
    """A wait status in words."""
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.WEXITSTATUS(status)}"
