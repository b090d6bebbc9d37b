"""The supervisor: owns the capture sockets, forks the proxy and the workers, keeps them
alive.

Shaped after gunicorn's arbiter: signal handlers only record the signal (and wake the loop
through the wakeup fd); one loop does all the work; children are reaped with
waitpid(-1, WNOHANG) until none is left. Child states follow supervisord: STARTING,
RUNNING, BACKOFF (waiting for a growing restart delay), STOPPING, FATAL (it kept failing
to start, so the daemon gives up and exits non-zero for systemd to see).
"""

import ipaddress
import logging
import os
import select
import shutil
import signal
import socket
import stat
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import fields, replace

from fanoutd import exits, fanout, link, privileges, publish, ring, wire, worker
from fanoutd.capture import Capture, Child, Retiring, Slot
from fanoutd.config import (
    CAPTURE_KEYS,
    MAX_WORKERS,
    CaptureConfig,
    Config,
    ConfigError,
    parse_host_port,
)
from fanoutd.filter import FilterError
from fanoutd.metrics_server import MetricsServer
from fanoutd.slotstats import ProxyStats, RingTable
from fanoutd.systemd import Notifier, set_log_context

log = logging.getLogger("fanoutd")

TICK_S = 0.25  # supervisor loop period
KERNEL_STATS_EVERY_S = 1.0
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 10.0
STABLE_AFTER_S = 10.0  # a child that ran this long resets its failure count
FATAL_AFTER = 5  # consecutive failed starts before a child goes FATAL
# Every slot's ring, and its predecessor draining after a reload, on up to 16 interfaces.
RING_IDS = 2 * MAX_WORKERS * 16
QUICK_RESTARTS = 3  # a running child that dies is replaced at once this many times in a row
PROXY_READY_TIMEOUT_S = 10.0
HUNG_KILL_AFTER_S = 2.0  # SIGTERM to a worker that stopped heartbeating, then SIGKILL
KILL_WAIT_S = 2.0  # how long stopping waits for a SIGKILLed child to be reaped
RUNTIME_MARK = "fanoutd.pid"  # in each runtime directory a daemon makes: its pid


class StartupError(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Supervisor:
    def __init__(self, cfg: Config, load_config: Callable[[], Config] | None = None) -> None:
        """load_config reads the configuration again, for SIGHUP (None: reload is off)."""
        self.cfg = cfg
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
        self.announced_ready = False
        self.kernel_stats_at = 0.0
        self.notifier = Notifier()
        self.status_at = 0.0
        self.status_packets = 0
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
                self._open_capture(capture_cfg)
            names = [c.interface for c in self.cfg.interfaces]
            self.captures.sort(key=lambda c: names.index(c.interface))
            # Once capture is known to work: without CAP_NET_RAW, that is the problem.
            problem = privileges.switch_problem(self.cfg.user)
            if problem:
                raise StartupError(problem, exits.NOPERM)
            self._warn_if_exposed()
            self._open_metrics()
            self._make_runtime_dir()
            self._start_proxy()
            for capture in self.captures:
                self._start_workers(capture)
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

    def _open_capture(self, cfg: CaptureConfig) -> Capture:
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
        self._tell_proxy_block_size()
        return capture

    def _tell_proxy_block_size(self) -> None:
        """The proxy sizes subscriber queues by the largest batch: that of the largest
        ring block in use when it starts."""
        self.proxy_stats["block_size"] = max(c.cfg.ring.block_size for c in self.captures)

    def _replace_rings(self, capture: Capture, cfg: CaptureConfig) -> bool:
        """Move a capture to new sockets, rings and fanout group for cfg, losing nothing.

        The new sockets form their group behind a drop-all filter; then, in one quick
        pass, their filters come off and the old sockets get one, so each packet lands in
        at least one ring (in both during the instant in between). New workers start on
        the new rings at once while the old ones drain theirs (SIGUSR1) and exit. With an
        explicit fanout.group_id that stays the same, the old sockets must leave the
        group before the new ones can join it, so capture pauses while they drain.
        Returns False when the new sockets cannot be opened: capture then goes on as
        before, or, in the same group, stays paused and retries on its own.
        """
        same_group = (cfg.fanout.group_id is not None
                      and cfg.fanout.group_id == capture.group_id)
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
        self._retire_slots(capture)
        capture.cfg = cfg
        if socks is None:
            self._wait_retired(capture)
            try:
                socks = capture.open_sockets(cfg)
                capture.open_up(socks, program)
            except (ring.CaptureError, fanout.FanoutError, OSError) as e:
                log.error("cannot capture on %s: %s; retrying", cfg.interface, e)
                capture.set_slots([])
                capture.reopen_pending = True
                return False
        capture.set_slots(socks)
        self._tell_proxy_block_size()
        self._start_workers(capture)
        self.announced_ready = False  # logs (and tells systemd) when capture is back
        return True

    def _check_retiring(self, now: float) -> None:
        """SIGKILL an old worker that did not finish draining in time."""
        for capture in self.captures:
            for old in capture.retiring:
                if now >= old.kill_at and old.child.pid is not None:
                    log.warning("%s did not finish draining its old ring; killing it",
                                old.child.name)
                    _kill(old.child, signal.SIGKILL)
                    old.kill_at = float("inf")

    def _wait_retired(self, capture: Capture) -> None:
        while capture.retiring:
            self._check_retiring(time.monotonic())
            self._reap()
            time.sleep(0.01)

    def _start_workers(self, capture: Capture) -> None:
        for slot in capture.slots:
            if slot.child is None:
                slot.child = Child(capture.process_name(slot.index),
                                   self._worker_main(capture, slot))
            self._spawn_worker(slot)

    def _spawn_worker(self, slot: Slot) -> None:
        assert slot.child is not None
        self._spawn_for_ring(slot.child, slot.ring_id)

    def _spawn_for_ring(self, child: Child, ring_id: int) -> None:
        """Fork a worker of ring ring_id (its slot's, or one draining an old ring) and
        name it the ring's worker: the proxy takes the ring's batches from this process
        only (the worker waits for this before publishing)."""
        self._spawn(child)
        self.rings.pid[ring_id] = child.pid or 0

    def _retire_slots(self, capture: Capture) -> None:
        """Cut the capture's current sockets off from traffic and have their workers drain
        them (SIGUSR1); each socket closes once its worker has drained it
        (_drainer_exited). A slot whose worker is between restarts gets one to drain it:
        its ring may hold blocks."""
        deadline = self._drain_deadline(capture)
        capture.close_off()
        for slot in capture.slots:
            child = slot.child
            if child is None:
                capture.close_ring(slot.sock, slot.ring_id, slot.stats)
                continue
            child.failures = 0  # now counts failed drains
            child.main = self._worker_main(capture, slot, drain=True)  # for any successor
            if child.pid is None:
                self._spawn_for_ring(child, slot.ring_id)
            self._drain(child)
            capture.retiring.append(Retiring(child, slot.sock, slot.ring_id, slot.stats,
                                             deadline))

    @staticmethod
    def _drain_deadline(capture: Capture) -> float:
        return time.monotonic() + capture.cfg.ring.block_timeout_ms / 500 + STOP_GRACE_S

    @staticmethod
    def _drain(child: Child) -> None:
        """Tell a worker (maybe just forked: it takes the signal once its handler is in
        place) to publish what its ring holds, then exit. One forked to drain knows it
        from its plan already."""
        child.state = "DRAINING"
        _kill(child, signal.SIGUSR1)

    def _drainer_exited(self, capture: Capture, old: Retiring, status: int) -> None:
        """A worker draining an old ring exited. Status 0: the ring is drained, it closes.
        Anything else (killed, failed to start, left to reconnect to a new proxy) leaves
        blocks in the ring: another worker drains it, so that every block is published,
        up to FATAL_AFTER failures in a row; only then is the ring closed as it is."""
        child = old.child
        child.pid = None
        drained = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        reconnect = os.WIFEXITED(status) and os.WEXITSTATUS(status) == exits.RECONNECT
        if not (drained or reconnect or self.stopping):
            child.failures += 1
            old.stats.add("restarts")
        if drained or self.stopping or child.failures >= FATAL_AFTER:
            if not (drained or self.stopping):
                log.error("%s failed to drain its old ring %d times in a row (last: %s); "
                          "closing it with what it still holds", child.name, child.failures,
                          _describe_status(status))
            capture.retiring.remove(old)
            capture.close_ring(old.sock, old.ring_id, old.stats)
            child.state = "STOPPED"
            return
        if reconnect:
            log.info("%s restarts to reconnect to the new proxy and go on draining its old "
                     "ring", child.name)
        else:
            log.warning("%s %s while draining its old ring; starting another worker to "
                        "drain it", child.name, _describe_status(status))
        self._spawn_for_ring(child, old.ring_id)
        self._drain(child)
        old.kill_at = self._drain_deadline(capture)

    def _retire_capture(self, capture: Capture) -> None:
        """Stop capturing on an interface taken out of the configuration: its workers
        drain their rings, then its sockets close."""
        self._retire_slots(capture)
        capture.slots = []
        self._wait_retired(capture)
        self.captures.remove(capture)

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
                if not self._replace_rings(capture, capture.cfg):
                    capture.reopen_pending = True

    def _reload(self) -> None:
        """SIGHUP: read the configuration again. Invalid: say why and keep running as
        before. Valid: apply it without dropping capture."""
        try:
            cfg = self.load_config()
        except ConfigError as e:
            for key, reason in e.problems:
                log.error("reload rejected, still running on the previous configuration: "
                          "%s: %s", key, reason)
            return
        old = self.cfg
        if cfg == old and not self.reload_failed:
            log.info("reload: the configuration is unchanged")
            return
        problem = privileges.signalling_problem(cfg.user) or privileges.switch_problem(cfg.user)
        if problem:
            log.error("reload rejected, still running on the previous configuration: %s",
                      problem)
            return
        if cfg.metrics != old.metrics and not self._swap_metrics(cfg):
            return
        logging.getLogger().setLevel(cfg.log.level.upper())
        self.cfg = cfg  # what children forked from now on see
        by_name = {c.interface: c for c in self.captures}
        wanted = {c.interface for c in cfg.interfaces}
        for capture in [c for c in self.captures if c.interface not in wanted]:
            log.info("no longer capturing on %s", capture.interface)
            self._retire_capture(capture)
        failed = []  # interfaces whose capture could not take the new settings
        for capture_cfg in cfg.interfaces:
            capture = by_name.get(capture_cfg.interface)
            if capture is None:
                applied = self._reload_new_capture(capture_cfg)
            elif (capture_cfg != capture.cfg or capture.interface in self.reload_failed
                  or cfg.user != old.user
                  or cfg.publish.format != old.publish.format):  # workers see these
                applied = self._replace_rings(capture, capture_cfg)
            else:
                applied = True
            if not applied:
                failed.append(capture_cfg.interface)
        self.reload_failed = set(failed)
        for capture in self.captures:
            capture.several = len(self.captures) > 1
        proxy = (cfg.publish, cfg.user, cfg.supervisor.status_interval_ms) != (
            old.publish, old.user, old.supervisor.status_interval_ms) or (
            [c.interface for c in cfg.interfaces] != [c.interface for c in old.interfaces])
        if proxy and self.proxy is not None:
            self._stop_children([self.proxy])
            self._spawn_proxy()  # workers that dropped privileges reconnect by restarting
        # The configuration in force is what runs: each interface's capture as applied
        # (a failed one keeps its previous settings, or is not there), so that the same
        # file reloaded again is not "unchanged" but tried again.
        running = {c.interface: c.cfg for c in self.captures}
        self.cfg = replace(cfg, interfaces=tuple(running[c.interface] for c in cfg.interfaces
                                                 if c.interface in running))
        if failed:
            log.error("reload incomplete: the new capture settings of %s could not be "
                      "applied (see above), so %s as before; the rest of the configuration "
                      "is applied; another reload tries again", ", ".join(failed),
                      "it goes on" if len(failed) == 1 else "they go on")
            return
        log.info("reloaded the configuration (changed: %s)",
                 ", ".join(_changes(old, self.cfg)))

    def _reload_new_capture(self, cfg: CaptureConfig) -> bool:
        """Start capturing on an interface a reload added; False if it cannot."""
        try:
            capture = self._open_capture(cfg)
        except StartupError as e:
            log.error("cannot capture on %s: %s", cfg.interface,
                      str(e).removeprefix(f"{cfg.interface}: "))
            return False
        self._start_workers(capture)
        self.announced_ready = False
        return True

    def _swap_metrics(self, cfg: Config) -> bool:
        """Serve metrics with cfg's settings; False (reload rejected) if it cannot."""
        assert self.metrics is not None
        if cfg.metrics.listen == self.cfg.metrics.listen:
            self.metrics.configure(cfg.metrics)  # same socket: new TLS and credentials
            return True
        try:
            server = MetricsServer(cfg.metrics, self)
        except OSError as e:
            log.error("reload rejected, still running on the previous configuration: "
                      "metrics.listen: cannot listen on %s: %s", cfg.metrics.listen,
                      e.strerror)
            return False
        self.metrics.close()
        self.metrics = server
        return True

    def _warn_if_exposed(self) -> None:
        """Endpoints bind to loopback by default; say so when one is opened wider without
        the protection configured for it."""
        publish_cfg, metrics_cfg = self.cfg.publish, self.cfg.metrics
        scheme, _, rest = publish_cfg.endpoint.partition("://")
        if (scheme == "tcp" and not _is_loopback(parse_host_port(rest)[0])
                and publish_cfg.curve.secret_key_file is None):
            log.warning("publishing on %s without CURVE: anyone who can reach it reads the "
                        "packet summaries (see publish.curve)", publish_cfg.endpoint)
        if (not _is_loopback(parse_host_port(metrics_cfg.listen)[0])
                and metrics_cfg.tls_cert_file is None):
            log.warning("serving metrics on %s without TLS (see metrics.tls_cert_file)",
                        metrics_cfg.listen)

    def _open_metrics(self) -> None:
        try:
            self.metrics = MetricsServer(self.cfg.metrics, self)
        except OSError as e:
            raise StartupError(f"metrics.listen: cannot listen on {self.cfg.metrics.listen}: "
                               f"{e.strerror}", exits.UNAVAILABLE) from None

    def _make_runtime_dir(self) -> None:
        base = (self.cfg.runtime_dir or os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
                or ("/run/fanoutd" if os.geteuid() == 0 else tempfile.gettempdir()))
        first = self.cfg.interfaces[0].interface
        try:
            os.makedirs(base, mode=0o755, exist_ok=True)
            _remove_stale_runtime_dirs(base)
            self.runtime_dir = tempfile.mkdtemp(prefix=f"{os.getpid()}-{first}-", dir=base)
            _mark_runtime_dir(self.runtime_dir)
        except OSError as e:
            raise StartupError(f"runtime_dir: cannot create a directory in {base}: {e.strerror}",
                               exits.UNAVAILABLE) from None
        self.backend = f"ipc://{self.runtime_dir}/workers.ipc"

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
        self._spawn_proxy(startup=True)

    def _spawn_proxy(self, startup: bool = False) -> None:
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
            self.proxy.state = "RUNNING"
        elif startup:
            raise StartupError(answer or "the proxy did not start", exits.UNAVAILABLE)
        else:
            log.error("fanoutd-proxy could not start: %s", answer or "no answer")

    def _worker_main(self, capture: Capture, slot: Slot,
                     drain: bool = False) -> Callable[[], int]:
        """A worker's main for the slot's current ring (drain: only to drain it). The
        ring's own settings are taken now: after a reload the slot holds a new ring while
        this one may still need a worker to drain it (_drainer_exited)."""
        index, sock, ring_id, epoch, stats = (slot.index, slot.sock, slot.ring_id,
                                              slot.epoch, slot.stats)
        cfg, name = capture.cfg, capture.process_name(slot.index)

        def main() -> int:  # in the child: the daemon's settings current at the fork
            self._close_rings_in_child(keep=sock)  # a worker touches its own ring only
            self.rings.read_only()  # written by the proxy and the supervisor only
            self.proxy_stats.read_only()
            plan = worker.WorkerPlan(capture.interface, ring_id, cfg.ring.geometry,
                                     self.backend, self.cfg.publish.sndhwm, self.cfg.user,
                                     cfg.payload_bytes, name,
                                     wire.FORMATS[self.cfg.publish.format], epoch, drain,
                                     self.cfg.sensor or "")
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
            pid = os.fork()
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
        child.pid = pid
        child.state = "STARTING"
        child.started_at = time.monotonic()
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
        due = [c.restart_at for c in self._children() if c.state == "BACKOFF"]
        return max(0.0, min([TICK_S, *(at - time.monotonic() for at in due)]))

    def _handle_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            log.info("%s received: stopping", signal.Signals(signum).name)
            self.stopping = True
        elif signum == signal.SIGCHLD:
            self._reap()
        elif signum == signal.SIGHUP:
            log.info("SIGHUP received: reloading the configuration")
            self._reload()

    def _children(self) -> list[Child]:
        found = [child for capture in self.captures for child in capture.children()]
        return [*found, self.proxy] if self.proxy is not None else found

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for child in self._children():
                if child.pid == pid:
                    self._child_exited(child, status)
                    break

    def _child_exited(self, child: Child, status: int) -> None:
        for capture in self.captures:
            for old in capture.retiring:
                if old.child is child:
                    self._drainer_exited(capture, old, status)
                    return
        child.pid = None
        child.kill_at = None
        if child is self.proxy:
            self._proxy_exited(clean=self.stopping or child.state == "STOPPING")
        if self.stopping or child.state == "STOPPING":
            child.state = "STOPPED"
            return
        how = _describe_status(status)
        now = time.monotonic()
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == exits.RECONNECT:
            # An unprivileged worker leaving to reconnect to a new proxy: not a failure.
            log.info("%s restarts to reconnect to the new proxy", child.name)
            child.state, child.restart_at = "BACKOFF", now
            return
        booted = child.state == "RUNNING"
        if now - child.started_at >= STABLE_AFTER_S:
            child.failures = 0
        child.failures += 1
        if not booted and child.failures >= FATAL_AFTER:
            child.state = "FATAL"
            log.error("%s failed to start %d times in a row (last: %s); giving up",
                      child.name, child.failures, how)
            self.exit_status = exits.SOFTWARE
            self.stopping = True
            return
        # A child that was running is replaced at once, a few times in a row: the ring
        # keeps filling while no worker reads it. Failing to start, or crashing again and
        # again, backs off: 0.1 s, 0.2 s, 0.4 s, ... up to BACKOFF_MAX_S.
        quick = QUICK_RESTARTS if booted else 1
        delay = (0.0 if child.failures <= quick
                 else min(BACKOFF_FIRST_S * 2 ** (child.failures - quick - 1), BACKOFF_MAX_S))
        child.state = "BACKOFF"
        child.restart_at = now + delay
        log.warning("%s %s; restarting in %.1f s", child.name, how, delay)

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
        now = time.monotonic()
        for slot in self._slots():
            child = slot.child
            if child is None:
                continue
            if child.state == "STARTING" and slot.stats["capturing"] == child.pid:
                child.state = "RUNNING"
            elif child.state == "BACKOFF" and now >= child.restart_at:
                slot.stats.add("restarts")
                slot.stats["capturing"] = 0  # the dead worker's flag; the new one sets it
                self._spawn_worker(slot)
            elif child.state == "RUNNING":
                self._check_heartbeat(slot, child, now)
            slot.stats["up"] = int(child.state == "RUNNING")
        self._check_retiring(now)
        proxy = self.proxy
        if proxy is not None and proxy.state == "BACKOFF" and now >= proxy.restart_at:
            self._spawn_proxy()
        if now - self.kernel_stats_at >= KERNEL_STATS_EVERY_S:
            self.refresh_kernel_stats()
        self._watch_links()
        if not self.announced_ready and all(s.up for s in self._slots()):
            self.announced_ready = True
            for capture in self.captures:
                log.info("capturing on %s: %s, fanout %s (group %d), publishing on %s, "
                         "metrics on %s", capture.interface,
                         _count(len(capture.slots), "worker"), capture.cfg.fanout.mode,
                         capture.group_id, self.cfg.publish.endpoint, self._metrics_url())
            self.notifier.ready(self._status_line(now))
        elif self.announced_ready and (now - self.status_at
                                       >= self.cfg.supervisor.status_interval_ms / 1000):
            self.notifier.status(self._status_line(now))
        self.notifier.watchdog(self._healthy())

    def _slots(self) -> list[Slot]:
        return [slot for capture in self.captures for slot in capture.slots]

    def _check_heartbeat(self, slot: Slot, child: Child, now: float) -> None:
        """A worker that stopped turning its loop gets SIGTERM, then SIGKILL; either way
        it is then reaped and replaced like a worker that died."""
        if child.pid is None:
            return
        if child.kill_at is not None:
            if now >= child.kill_at:
                log.warning("%s ignored SIGTERM; killing it", child.name)
                _kill(child, signal.SIGKILL)
                child.kill_at = float("inf")
            return
        timeout_ms = self.cfg.supervisor.heartbeat_timeout_ms
        if slot.stats["heartbeat_ns"] < time.monotonic_ns() - timeout_ms * 1_000_000:
            log.warning("%s has not heartbeaten for %d ms; terminating it", child.name,
                        timeout_ms)
            _kill(child, signal.SIGTERM)
            child.kill_at = now + HUNG_KILL_AFTER_S

    def _status_line(self, now: float) -> str:
        """One line for systemctl status: workers up, capture rate since the last line, drops."""
        self.refresh_kernel_stats()
        slots = self._slots()
        packets = sum(s.stats["kernel_packets"] for s in slots)
        drops = sum(s.stats["kernel_drops"] for s in slots)
        rate = (packets - self.status_packets) / (now - self.status_at) if self.status_at else 0
        self.status_at, self.status_packets = now, packets
        up = sum(s.up for s in slots)
        where = ", ".join(c.interface for c in self.captures)
        return f"{up}/{len(slots)} workers up on {where}, {rate:.0f} packets/s, {drops} dropped"

    def _healthy(self) -> bool:
        """Every worker capturing and heartbeating, and the proxy running: feed the watchdog."""
        if self.proxy is None or self.proxy.state != "RUNNING":
            return False
        stale_before = time.monotonic_ns() - self.cfg.supervisor.heartbeat_timeout_ms * 1_000_000
        return all(s.up and s.stats["heartbeat_ns"] > stale_before for s in self._slots())

    def refresh_kernel_stats(self) -> None:
        """Fold every socket's PACKET_STATISTICS into its slot's running totals."""
        self.kernel_stats_at = time.monotonic()
        for capture in self.captures:
            capture.refresh_kernel_stats()

    # -- stopping -----------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Workers first (they flush their last batches to the proxy), then the proxy."""
        self.notifier.stopping()
        self._stop_children([c for capture in self.captures for c in capture.children()])
        if self.proxy is not None:
            self._stop_children([self.proxy])
        self.refresh_kernel_stats()
        if self.capturing:
            self._log_summary()
        for capture in self.captures:
            for sock in capture.sockets():
                sock.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def _log_summary(self) -> None:
        """On exit, as tcpdump does: what the kernel passed on and dropped, and what was
        published, per interface (the current worker slots' counters)."""
        for capture in self.captures:
            total = {key: sum(slot.stats[key] for slot in capture.slots)
                     for key in ("kernel_packets", "kernel_drops", "packets", "batches",
                                 "publish_drops")}
            log.info("%s: %s received by the kernel, %s dropped by the kernel, %s decoded, "
                     "%s published, %s dropped at the publish high-water mark",
                     capture.interface, _count(total["kernel_packets"], "packet"),
                     _count(total["kernel_drops"], "packet"), _count(total["packets"], "packet"),
                     _count(total["batches"], "batch", "batches"),
                     _count(total["publish_drops"], "batch", "batches"))

    def _metrics_url(self) -> str:
        scheme = "https" if self.cfg.metrics.tls_cert_file else "http"
        return f"{scheme}://{self.cfg.metrics.listen}/metrics"

    def _stop_children(self, children: list[Child], signum: int = signal.SIGTERM,
                       grace_s: float = STOP_GRACE_S) -> None:
        """Signal the children (SIGTERM: stop; SIGUSR1: a worker drains its ring first),
        reap them, and SIGKILL any still there after grace_s. One that outlives even
        SIGKILL (a signal refused, a process stuck in the kernel) is given up on after
        KILL_WAIT_S, so stopping always ends: it exits on its own once the supervisor is
        gone (it watches its parent)."""
        for child in children:
            if child.pid is not None:
                child.state = "STOPPING"
                _kill(child, signum)
        deadline = time.monotonic() + grace_s
        killed = False
        while any(c.pid is not None for c in children):
            if time.monotonic() >= deadline:
                left = [c for c in children if c.pid is not None]
                if killed:
                    for child in left:
                        log.error("%s (pid %d) is still there %.0f s after SIGKILL; leaving "
                                  "it", child.name, child.pid, KILL_WAIT_S)
                        child.pid = None
                    return
                for child in left:
                    log.warning("%s did not stop in %.0f s; killing it", child.name, grace_s)
                    _kill(child, signal.SIGKILL)
                killed, deadline = True, time.monotonic() + KILL_WAIT_S
            self._reap()
            time.sleep(0.01)


def _changes(old: Config, new: Config) -> list[str]:
    """The keys a reload changed, in their order in the file: top-level keys, and the keys
    of a capture whose running settings changed (also after a reload that could not move
    it); `interfaces` when an interface was added or removed."""
    changed = {f.name for f in fields(new) if getattr(new, f.name) != getattr(old, f.name)}
    before = {c.interface: c for c in old.interfaces}
    after = {c.interface: c for c in new.interfaces}
    changed.discard("interfaces")
    if before.keys() != after.keys():
        changed.add("interfaces")
    for name in before.keys() & after.keys():
        changed |= {f.name for f in fields(CaptureConfig)
                    if getattr(before[name], f.name) != getattr(after[name], f.name)}
    order = [*CAPTURE_KEYS, *(f.name for f in fields(Config))]  # as a file lists them
    return [name for name in order if name in changed]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", a name or an interface: assume reachable from elsewhere


def _mark_runtime_dir(path: str) -> None:
    """Say in the directory that this daemon made it (see _remove_stale_runtime_dirs)."""
    with open(os.path.join(path, RUNTIME_MARK), "x") as f:
        f.write(f"{os.getpid()}\n")


def _remove_stale_runtime_dirs(base: str) -> None:
    """Remove what daemons that were killed (no clean stop) left in base: directories
    PID-... that a fanoutd made (they are ours and hold RUNTIME_MARK naming that PID)
    and whose PID no longer runs. base may be shared (the temp dir): nothing else in it
    is touched, whatever its name."""
    for name in os.listdir(base):
        pid, sep, _ = name.partition("-")
        path = os.path.join(base, name)
        if not (sep and pid.isdigit()) or os.path.exists(f"/proc/{pid}"):
            continue
        try:
            st = os.lstat(path)
            fd = os.open(os.path.join(path, RUNTIME_MARK), os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd) as f:
                marked = f.read(32).strip() == pid
        except (OSError, UnicodeDecodeError):
            continue
        if marked and stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
            shutil.rmtree(path, ignore_errors=True)


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL the child if the supervisor dies, so no child outlives it,
    not even a stopped one."""
    privileges.die_with_parent()
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _kill(child: Child, signum: int) -> bool:
    """Send signum to the child; False when it could not be sent. A refused signal is
    logged, never raised: the supervisor must go on (and stop cleanly) whatever happens."""
    if child.pid is None:
        return False
    try:
        os.kill(child.pid, signum)
    except ProcessLookupError:  # it exited already; reaping will tell
        return False
    except PermissionError:
        log.error("cannot send %s to %s (pid %d): permission denied; signalling a child "
                  "that runs as another user needs CAP_KILL", signal.Signals(signum).name,
                  child.name, child.pid)
        return False
    return True


def _count(n: int, singular: str, plural: str | None = None) -> str:
    """'1 worker', '2 workers'."""
    return f"{n:,} {singular if n == 1 else plural or singular + 's'}"


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.WEXITSTATUS(status)}"
