"""The supervisor: owns the capture sockets, forks the proxy and the workers, keeps them
alive.

Shaped after gunicorn's arbiter: signal handlers only record the signal (and wake the loop
through the wakeup fd); one loop does all the work; children are reaped with
waitpid(-1, WNOHANG) until none is left. Each child's states and restart policy are
children.py's (after supervisord); one that goes FATAL (it kept failing to start) makes
the daemon give up and exit non-zero for systemd to see.

Its other jobs live beside it: moving a capture to new rings (handover.py), SIGHUP
(reload.py), the runtime directory and endpoints (runtime.py), and what it tells systemd
(health.py).
"""

import logging
import os
import select
import shutil
import signal
import socket
import traceback
from collections.abc import Callable

from fanoutd import exits, fanout, handover, link, privileges, publish, ring, wire, worker
from fanoutd.capture import Capture, Slot
from fanoutd.children import Child, ChildState, System
from fanoutd.config import MAX_WORKERS, CaptureConfig, Config
from fanoutd.filter import FilterError
from fanoutd.health import Health, log_summary, ns
from fanoutd.metrics_server import MetricsServer
from fanoutd.reload import apply_reload
from fanoutd.runtime import StartupError, make_runtime_dir, open_metrics, warn_if_exposed
from fanoutd.slotstats import ProxyStats, RingTable
from fanoutd.systemd import set_log_context

log = logging.getLogger("fanoutd")

TICK_S = 0.25  # supervisor loop period
KERNEL_STATS_EVERY_S = 1.0
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long
# Every slot's ring, and its predecessor draining after a reload, on up to 16 interfaces.
RING_IDS = 2 * MAX_WORKERS * 16
PROXY_READY_TIMEOUT_S = 10.0
HUNG_KILL_AFTER_S = 2.0  # SIGTERM to a worker that stopped heartbeating, then SIGKILL
KILL_WAIT_S = 2.0  # how long stopping waits for a SIGKILLed child to be reaped


class Supervisor:
    def __init__(self, cfg: Config, load_config: Callable[[], Config] | None = None,
                 system: System | None = None) -> None:
        """load_config reads the configuration again, for SIGHUP (None: reload is off);
        system forks, reaps and signals the children, and tells the time (tests fake it)."""
        self.cfg = cfg
        self.system = system or System()
        self.load_config = load_config or (lambda: cfg)
        self.links = link.LinkMonitor()  # before any capture: no change goes unseen
        # Shared memory, mapped before any fork so every child sees all of it.
        self.rings = RingTable(RING_IDS)
        self.proxy_stats = ProxyStats()
        self.free_ring_ids = list(range(RING_IDS))
        self.captures: list[Capture] = []
        self.proxy: Child | None = None
        self.metrics: MetricsServer | None = None
        self.runtime_dir: str | None = None
        self.backend = ""
        self.signals: list[int] = []
        self.stopping = False
        self.exit_status = exits.OK
        self.kernel_stats_at = 0.0
        self.health = Health()
        self.capturing = False  # the loop ran: on exit, say what was captured
        self.reload_failed: set[str] = set()  # interfaces the last reload could not move

    # -- life cycle ---------------------------------------------------------------------

    def run(self) -> int:
        if len(self.cfg.interfaces) == 1:  # its records carry the field; with several, the text
            set_log_context(interface=self.cfg.interfaces[0].interface)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self._wake_r, self._wake_w = wake_r, wake_w
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(signum, self._record_signal)
        try:
            problem = privileges.signalling_problem(self.cfg.user)
            if problem:
                raise StartupError(problem, exits.NOPERM)
            # Explicit group ids first: an auto group could be given one of them.
            for capture_cfg in sorted(self.cfg.interfaces,
                                      key=lambda c: c.fanout.group_id is None):
                self.open_capture(capture_cfg)
            names = [c.interface for c in self.cfg.interfaces]
            self.captures.sort(key=lambda c: names.index(c.interface))
            # Once capture is known to work: without CAP_NET_RAW, that is the problem.
            problem = privileges.switch_problem(self.cfg.user)
            if problem:
                raise StartupError(problem, exits.NOPERM)
            warn_if_exposed(self.cfg)
            self.metrics = open_metrics(self.cfg.metrics, self)
            self.runtime_dir = make_runtime_dir(self.cfg)
            self.backend = f"{self.runtime_dir}/workers.sock"
            self._start_proxy()
            for capture in self.captures:
                self.start_workers(capture)
            self.capturing = True
            while not self.stopping:
                self._loop_once()
        except StartupError as e:
            log.error("%s", e)
            self.exit_status = e.status
        finally:
            self._shutdown()
            signal.set_wakeup_fd(-1)
            os.close(wake_r)
            os.close(wake_w)
        return self.exit_status

    def _new_capture(self, cfg: CaptureConfig) -> Capture:
        several = len(self.cfg.interfaces) > 1
        return Capture(cfg, self.rings, self.free_ring_ids, several)

    def open_capture(self, cfg: CaptureConfig) -> Capture:
        """Open an interface's sockets into their fanout group and let traffic in."""
        capture = self._new_capture(cfg)
        try:
            socks = capture.open_sockets(cfg)
            capture.open_up(socks, capture.program())
            self._read_links()  # what is queued so far concerns the other captures
            capture.watch_link()  # from the state now; notifications tell the rest
        except ring.CapturePermissionError as e:
            raise StartupError(str(e), exits.NOPERM) from None
        except (ring.CaptureError, fanout.FanoutError, FilterError, OSError) as e:
            raise StartupError(f"{cfg.interface}: {e}", exits.UNAVAILABLE) from None
        capture.set_slots(socks)
        self.captures.append(capture)
        self.tell_proxy_block_size()
        return capture

    def tell_proxy_block_size(self) -> None:
        """The proxy sizes subscriber queues by the largest batch: that of the largest
        ring block in use when it starts."""
        self.proxy_stats["block_size"] = max(c.cfg.ring.block_size for c in self.captures)

    def start_workers(self, capture: Capture) -> None:
        """Fork a worker for each of the capture's slots (new slots get their Child)."""
        for slot in capture.slots:
            if slot.child is None:
                slot.child = Child(capture.process_name(slot.index),
                                   self.worker_main(capture, slot))
            self._spawn_worker(slot)

    def _spawn_worker(self, slot: Slot) -> None:
        assert slot.child is not None
        self.spawn_for_ring(slot.child, slot.ring_id)

    def spawn_for_ring(self, child: Child, ring_id: int) -> None:
        """Fork a worker of ring ring_id (its slot's, or one draining an old ring) and
        name it the ring's worker: the proxy takes the ring's batches from this process
        only (the worker waits for this before publishing)."""
        self._spawn(child)
        self.rings.pid[ring_id] = child.pid or 0

    def _read_links(self) -> None:
        """Hand the kernel's link notifications to every capture, which logs and counts
        each change once."""
        states, resync = self.links.read()
        if resync:
            log.warning("link notifications were lost (the supervisor fell behind); "
                        "reading the interfaces' state again")
        for capture in self.captures:
            capture.follow_link(states, resync)

    def _watch_links(self) -> None:
        """Reopen capture on an interface that was re-created."""
        for capture in self.captures:
            watch = capture.link_watch
            if capture.reopen_pending and watch is not None and watch.ifindex is not None:
                capture.reopen_pending = False
                if not handover.replace_rings(self, capture, capture.cfg):
                    capture.reopen_pending = True

    def _start_proxy(self) -> None:
        self._proxy_ready_w = -1

        def main() -> int:  # in the child: the configuration current at the fork
            self._close_rings_in_child(keep=None)  # the proxy reads counters, never rings
            cfg = self.cfg.publish
            plan = publish.ProxyPlan(
                self.backend, cfg.endpoint, cfg.sndhwm, cfg.subscriber_queue_bytes,
                cfg.max_subscribers, cfg.max_subscriptions, cfg.restart_grace_ms / 1000,
                self.cfg.supervisor.status_interval_ms / 1000, self.cfg.user, cfg.curve)
            tables = [(c.interface, c.table) for c in self.captures]
            return publish.run_proxy(plan, self._proxy_ready_w, tables, self.rings,
                                     self.proxy_stats)

        self.proxy = Child("fanoutd-proxy", main)
        self.spawn_proxy(startup=True)

    def spawn_proxy(self, startup: bool = False) -> None:
        """Fork the proxy and wait until it has bound the public endpoint (or failed to).

        At start-up a failure ends the daemon with the proxy's reason. Later (a restart)
        it is logged, and the proxy's exit is reaped like any failed start: backoff, then
        FATAL if it keeps failing.
        """
        assert self.proxy is not None
        if not startup:
            self.proxy_stats.add("restarts")
        ready_r, self._proxy_ready_w = os.pipe()
        try:
            self._spawn(self.proxy)
        finally:
            os.close(self._proxy_ready_w)
        try:
            readable, _, _ = select.select([ready_r], [], [], PROXY_READY_TIMEOUT_S)
            answer = os.read(ready_r, 4096).decode(errors="replace") if readable else ""
        finally:
            os.close(ready_r)
        if answer == "ok":
            self.proxy.ready()
        elif startup:
            raise StartupError(answer or "the proxy did not start", exits.UNAVAILABLE)
        else:
            log.error("fanoutd-proxy could not start: %s", answer or "no answer")

    def worker_main(self, capture: Capture, slot: Slot,
                     drain: bool = False) -> Callable[[], int]:
        """A worker's main for the slot's current ring (drain: only to drain it). The
        ring's own settings are taken now: after a reload the slot holds a new ring while
        this one may still need a worker to drain it (handover.drainer_exited)."""
        index, sock, ring_id, epoch, stats = (slot.index, slot.sock, slot.ring_id,
                                              slot.epoch, slot.stats)
        cfg, name = capture.cfg, capture.process_name(slot.index)

        def main() -> int:  # in the child: the daemon's settings current at the fork
            self._close_rings_in_child(keep=sock)  # a worker touches its own ring only
            self.rings.read_only()  # written by the proxy and the supervisor only
            self.proxy_stats.read_only()
            plan = worker.WorkerPlan(capture.interface, ring_id, cfg.ring.geometry,
                                     self.backend, self.cfg.user,
                                     cfg.payload_bytes, name,
                                     wire.FORMATS[self.cfg.publish.format], epoch, drain,
                                     self.cfg.sensor or "", tunnel_depth=cfg.tunnel_depth)
            return worker.run_worker(index, sock, stats, self.rings, self.proxy_stats, plan)

        return main

    def _close_rings_in_child(self, keep: socket.socket | None) -> None:
        """In a new child: close every inherited capture socket but `keep`, so a ring's
        memory goes as soon as the supervisor closes it."""
        for capture in self.captures:
            for sock in capture.sockets():
                if sock is not keep:
                    sock.close()

    def _spawn(self, child: Child) -> None:
        parent = os.getpid()
        # Blocked across the fork: the child unblocks them once its handlers are in place,
        # so a drain or stop request sent at once is not taken with the default action.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, privileges.CHILD_SIGNALS)
        try:
            pid = self.system.fork()
        finally:
            if os.getpid() == parent:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if pid == 0:  # the child never returns into the supervisor's code
            status = 1
            try:
                _die_with_parent(parent)
                privileges.lock_down()  # before any thread exists in the child
                signal.set_wakeup_fd(-1)
                for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
                    signal.signal(signum, signal.SIG_DFL)
                os.close(self._wake_r)
                os.close(self._wake_w)
                if self.metrics is not None:
                    self.metrics.close_inherited()
                self.links.close()
                status = child.main()
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        child.spawned(pid, self.system.monotonic())
        log.debug("started %s (pid %d)", child.name, pid)

    # -- the loop -----------------------------------------------------------------------

    def _record_signal(self, signum: int, frame: object) -> None:
        self.signals.append(signum)

    def _loop_once(self) -> None:
        """Wait for a signal, a link notification, a metrics client or the next tick, then
        do what is due. No socket here ever makes the loop wait: all are non-blocking.
        poll, not select: descriptors above FD_SETSIZE (many capture sockets) are fine."""
        poller = select.poll()
        waiting = {self._wake_r: select.POLLIN, self.links.fileno(): select.POLLIN}
        if self.metrics is not None:
            waiting.update(self.metrics.wanted())
        for fd, events in waiting.items():
            poller.register(fd, events)
        ready = dict(poller.poll(self._next_wakeup() * 1000))
        if self._wake_r in ready:
            while True:
                try:
                    if not os.read(self._wake_r, 512):
                        break
                except BlockingIOError:
                    break
        while self.signals:
            self._handle_signal(self.signals.pop(0))
        if self.stopping:
            return
        if self.links.fileno() in ready:
            self._read_links()
        if self.metrics is not None:
            self.metrics.serve(ready)  # also closes connections past their deadline
        self._tick()

    def _next_wakeup(self) -> float:
        """Seconds until the loop has something to do: a tick, or a restart falling due."""
        due = [c.restart_at for c in self._children() if c.state is ChildState.BACKOFF]
        now = self.system.monotonic()
        return max(0.0, min([TICK_S, *(at - now for at in due)]))

    def _handle_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            log.info("%s received: stopping", signal.Signals(signum).name)
            self.stopping = True
        elif signum == signal.SIGCHLD:
            self.reap()
        elif signum == signal.SIGHUP and not self.stopping:  # a child went FATAL: no reload
            log.info("SIGHUP received: reloading the configuration")
            apply_reload(self)

    def _children(self) -> list[Child]:
        found = [child for capture in self.captures for child in capture.children()]
        return [*found, self.proxy] if self.proxy is not None else found

    def reap(self) -> None:
        """waitpid(-1, WNOHANG) until no exited child is left, handling each exit."""
        while True:
            try:
                pid, status = self.system.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for child in self._children():
                if child.pid == pid:
                    self._child_exited(child, status)
                    break

    def _child_exited(self, child: Child, status: int) -> None:
        draining = handover.drainer(self.captures, child)
        if draining is not None:
            handover.drainer_exited(self, *draining, status)
            return
        clean = self.stopping or child.state is ChildState.STOPPING
        result = child.exited(status, self.system.monotonic(), stopping=self.stopping)
        if child is self.proxy:
            self._proxy_exited(clean)
        if result.state is ChildState.STOPPED:
            return
        if result.reconnect:
            log.info("%s restarts to reconnect to the new proxy", child.name)
        elif result.state is ChildState.FATAL:
            log.error("%s failed to start %d times in a row (last: %s); giving up",
                      child.name, child.failures, result.how)
            self.exit_status = exits.SOFTWARE
            self.stopping = True
        else:
            log.warning("%s %s; restarting in %.1f s", child.name, result.how, result.delay)

    def _proxy_exited(self, clean: bool) -> None:
        """Workers hold their blocks until the next proxy forwards. A proxy that died may
        have taken batches it had acknowledged (queued towards subscribers, not yet sent)
        with it: nothing is known to be passed on any more, so the next workers publish
        again every block their rings still hold (subscribers drop the duplicates)."""
        self.proxy_stats["forwarding"] = 0
        if not clean:
            for capture in self.captures:
                for ring_id in [s.ring_id for s in capture.slots] + [
                        old.ring_id for old in capture.retiring]:
                    self.rings.forwarded[ring_id] = 0

    def _tick(self) -> None:
        now = self.system.monotonic()
        self._tick_children(now)
        if now - self.kernel_stats_at >= KERNEL_STATS_EVERY_S:
            self.refresh_kernel_stats()
        self._watch_links()
        self.health.tick(now, self.cfg, self.captures, self.proxy, self.refresh_kernel_stats)

    def _tick_children(self, now: float) -> None:
        """Mark workers ready, restart those whose backoff is over, terminate hung ones
        and SIGKILL those past their grace."""
        for slot in self._slots():
            child = slot.child
            if child is None:
                continue
            if child.state is ChildState.STARTING and slot.stats["capturing"] == child.pid:
                child.ready()
            elif child.due(now):
                slot.stats.add("restarts")
                slot.stats["capturing"] = 0  # the dead worker's flag; the new one sets it
                self._spawn_worker(slot)
            elif child.state is ChildState.RUNNING:
                self._check_heartbeat(slot, child, now)
            child.escalate(self.system.kill, now, "ignored SIGTERM")
            slot.stats["up"] = int(child.state is ChildState.RUNNING)
        handover.check_retiring(self, now)
        proxy = self.proxy
        if proxy is not None and proxy.due(now):
            self.spawn_proxy()

    def _slots(self) -> list[Slot]:
        return [slot for capture in self.captures for slot in capture.slots]

    def _check_heartbeat(self, slot: Slot, child: Child, now: float) -> None:
        """A worker that stopped turning its loop gets SIGTERM, then SIGKILL; either way
        it is then reaped and replaced like a worker that died."""
        timeout_ms = self.cfg.supervisor.heartbeat_timeout_ms
        if slot.stats["heartbeat_ns"] < ns(now) - timeout_ms * 1_000_000:
            log.warning("%s has not heartbeaten for %d ms; terminating it", child.name,
                        timeout_ms)
            child.terminate(self.system.kill, HUNG_KILL_AFTER_S, now, replace=True)

    def refresh_kernel_stats(self) -> None:
        """Fold every socket's PACKET_STATISTICS into its slot's running totals."""
        self.kernel_stats_at = self.system.monotonic()
        for capture in self.captures:
            capture.refresh_kernel_stats()

    # -- stopping -----------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Workers first (they flush their last batches to the proxy), then the proxy."""
        self.health.notifier.stopping()
        self.stop_children([c for capture in self.captures for c in capture.children()])
        if self.proxy is not None:
            self.stop_children([self.proxy])
        self.refresh_kernel_stats()
        if self.capturing:
            log_summary(self.captures)
        for capture in self.captures:
            for sock in capture.sockets():
                sock.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def stop_children(self, children: list[Child], grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the children, reap them, and SIGKILL any still there after grace_s.
        One that outlives even SIGKILL (a signal refused, a process stuck in the kernel)
        is given up on after KILL_WAIT_S, so stopping always ends: it exits on its own
        once the supervisor is gone (it watches its parent)."""
        now = self.system.monotonic()
        for child in children:
            if child.pid is not None:
                child.terminate(self.system.kill, grace_s, now)
        give_up_at = now + grace_s + KILL_WAIT_S
        while any(c.pid is not None for c in children):
            now = self.system.monotonic()
            left = [c for c in children if c.pid is not None]
            for child in left:
                if now >= give_up_at:
                    log.error("%s (pid %d) is still there %.0f s after SIGKILL; leaving it",
                              child.name, child.pid, KILL_WAIT_S)
                    child.abandoned()
                else:
                    child.escalate(self.system.kill, now, f"did not stop in {grace_s:.0f} s")
            self.reap()
            self.system.sleep(0.01)


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL the child if the supervisor dies, so no child outlives it,
    not even a stopped one."""
    privileges.die_with_parent()
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)
