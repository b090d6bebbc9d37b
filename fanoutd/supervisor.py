"""The supervisor: owns the slot sockets, forks the proxy and the workers, keeps them alive.

Shaped after gunicorn's arbiter: signal handlers only record the signal (and wake the loop
through the wakeup fd); one loop does all the work; children are reaped with
waitpid(-1, WNOHANG) until none is left. Child states follow supervisord: STARTING,
RUNNING, BACKOFF (waiting for a growing restart delay), STOPPING, FATAL (it kept failing
to start, so the daemon gives up and exits non-zero for systemd to see).
"""

import contextlib
import ipaddress
import logging
import os
import select
import shutil
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, fields

from fanoutd import fanout, link, privileges, publish, ring, worker
from fanoutd.config import MAX_WORKERS, Config, ConfigError, parse_host_port
from fanoutd.filter import DROP_ALL
from fanoutd.filter import attach as attach_filter
from fanoutd.filter import detach as detach_filter
from fanoutd.metrics import MetricsServer
from fanoutd.slotstats import RingTable, SlotStats, StatsTable
from fanoutd.systemd import Notifier, set_log_context

log = logging.getLogger("fanoutd")

# Exit statuses of `fanoutd run` (documented in the README).
EXIT_OK = 0
EXIT_UNAVAILABLE = 69  # the interface, an endpoint or a port cannot be used
EXIT_SOFTWARE = 70  # a worker or the proxy went FATAL
EXIT_NOPERM = 77  # missing privilege (CAP_NET_RAW)

TICK_S = 0.25  # supervisor loop period
KERNEL_STATS_EVERY_S = 1.0
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 10.0
STABLE_AFTER_S = 10.0  # a child that ran this long resets its failure count
FATAL_AFTER = 5  # consecutive failed starts before a child goes FATAL
RING_IDS = 2 * MAX_WORKERS  # every slot's ring, and its predecessor draining after a reload
QUICK_RESTARTS = 3  # a running child that dies is replaced at once this many times in a row
PROXY_READY_TIMEOUT_S = 10.0
HUNG_KILL_AFTER_S = 2.0  # SIGTERM to a worker that stopped heartbeating, then SIGKILL


class StartupError(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Child:
    name: str
    main: Callable[[], int]
    state: str = "STOPPED"
    pid: int | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float = 0.0
    kill_at: float | None = None  # when a hung child that was sent SIGTERM gets SIGKILL


@dataclass
class Retiring:
    """A worker draining its old ring after a reload, and what to close once it exits."""

    child: Child
    sock: socket.socket
    ring_id: int
    stats: SlotStats
    kill_at: float


@dataclass
class Slot:
    index: int
    sock: socket.socket
    ring_id: int
    stats: SlotStats
    child: Child | None = None

    @property
    def up(self) -> bool:
        return self.child is not None and self.child.state == "RUNNING"


class Supervisor:
    def __init__(self, cfg: Config, load_config: Callable[[], Config] | None = None) -> None:
        """load_config reads the configuration again, for SIGHUP (None: reload is off)."""
        self.cfg = cfg
        self.load_config = load_config or (lambda: cfg)
        self.interface = cfg.interface
        self.slot_list: list[Slot] = []
        self._ioctl_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # interface ioctls
        self.link_watch: link.LinkWatch | None = None
        self.reopen_pending = False
        self.table = StatsTable(MAX_WORKERS)  # before any fork: every child sees every slot
        self.rings = RingTable(RING_IDS)
        self.free_ring_ids = list(range(RING_IDS))
        self.retiring: list[Retiring] = []
        self.proxy: Child | None = None
        self.metrics: MetricsServer | None = None
        self.runtime_dir: str | None = None
        self.backend = ""
        self.group_id: int | None = None
        self.signals: list[int] = []
        self.stopping = False
        self.exit_status = EXIT_OK
        self.announced_ready = False
        self.kernel_stats_at = 0.0
        self.notifier = Notifier()
        self.status_at = 0.0
        self.status_packets = 0

    @property
    def slots(self) -> list[Slot]:
        return self.slot_list

    # -- life cycle ---------------------------------------------------------------------

    def run(self) -> int:
        set_log_context(interface=self.interface)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self._wake_r, self._wake_w = wake_r, wake_w
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(signum, self._record_signal)
        try:
            self._open_slots()
            self._warn_if_exposed()
            self._open_metrics()
            self._make_runtime_dir()
            self._start_proxy()
            self._start_workers()
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

    def _open_slots(self) -> None:
        try:
            socks = self._open_sockets(self.cfg, self.cfg.workers or 1)
        except ring.CapturePermissionError as e:
            raise StartupError(str(e), EXIT_NOPERM) from None
        except (ring.CaptureError, fanout.FanoutError) as e:
            raise StartupError(str(e), EXIT_UNAVAILABLE) from None
        for sock in socks:
            detach_filter(sock)
        self._set_slots(socks)
        ifindex, up = link.probe(self.interface, self._ioctl_sock)
        self.link_watch = link.LinkWatch(self.interface, ifindex or 0, up)

    def _open_sockets(self, cfg: Config, count: int) -> list[socket.socket]:
        """count capture sockets on cfg's interface, all in one new fanout group."""
        socks: list[socket.socket] = []
        try:
            for _ in range(count):
                socks.append(ring.open_capture_socket(cfg.interface, cfg.ring.geometry,
                                                      cfg.ring.rxhash))
            self.group_id = fanout.join_group(socks, cfg.fanout.mode, cfg.fanout.flags,
                                              cfg.fanout.group_id)
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        return socks

    def _set_slots(self, socks: list[socket.socket]) -> None:
        """Slot i gets socks[i], with a fresh ring id; slots keep their counters, missing
        ones are created, extra ones dropped. Nothing is started here."""
        for index, sock in enumerate(socks):
            ring_id = self.free_ring_ids.pop(0)
            self.rings.forwarded[ring_id] = 0  # a new ring numbers its blocks from 1
            if index < len(self.slot_list):
                slot = self.slot_list[index]
                slot.sock, slot.ring_id, slot.child = sock, ring_id, None
            else:
                self.slot_list.append(Slot(index, sock, ring_id, self.table[index]))
            self.table[index]["active"] = 1
        for slot in self.slot_list[len(socks):]:
            slot.stats["active"] = slot.stats["up"] = 0
        del self.slot_list[len(socks):]

    def _close_ring(self, sock: socket.socket, ring_id: int, stats: SlotStats) -> None:
        """Close a slot's capture socket, keeping its last kernel counts."""
        with contextlib.suppress(OSError):
            self._add_kernel_stats(sock, stats)
        sock.close()
        self.free_ring_ids.append(ring_id)

    def _replace_rings(self, cfg: Config) -> bool:
        """Move capture to new sockets, rings and fanout group for cfg, losing nothing.

        The new sockets form their group behind a drop-all filter; then, in one quick
        pass, their filters come off and the old sockets get one, so each packet lands in
        at least one ring (in both during the instant in between). New workers start on
        the new rings at once while the old ones drain theirs (SIGUSR1) and exit. With an
        explicit fanout.group_id that stays the same, the old sockets must leave the
        group before the new ones can join it, so capture pauses while they drain.
        Returns False when the new sockets cannot be opened; capture then goes on as
        before.
        """
        same_group = cfg.fanout.group_id is not None and cfg.fanout.group_id == self.group_id
        count = cfg.workers or 1
        socks = None
        if not same_group:
            try:
                socks = self._open_sockets(cfg, count)
            except (ring.CaptureError, fanout.FanoutError) as e:
                log.error("cannot capture on %s with the new settings: %s", cfg.interface, e)
                return False
        deadline = time.monotonic() + cfg.ring.block_timeout_ms / 500 + STOP_GRACE_S
        for sock in socks or ():  # the switch: new rings open, then the old ones close
            detach_filter(sock)
        for slot in self.slot_list:
            with contextlib.suppress(OSError):
                attach_filter(slot.sock, DROP_ALL)
        for slot in self.slot_list:
            if slot.child is not None and slot.child.pid is not None:
                slot.child.state = "DRAINING"
                _kill(slot.child.pid, signal.SIGUSR1)
                self.retiring.append(Retiring(slot.child, slot.sock, slot.ring_id,
                                              slot.stats, deadline))
            else:
                self._close_ring(slot.sock, slot.ring_id, slot.stats)
        self.cfg, self.interface = cfg, cfg.interface
        if socks is None:
            self._wait_retired()
            try:
                socks = self._open_sockets(cfg, count)
            except (ring.CaptureError, fanout.FanoutError) as e:
                log.error("cannot capture on %s: %s; retrying", cfg.interface, e)
                self.reopen_pending = True
                return True
            for sock in socks:
                detach_filter(sock)
        self._set_slots(socks)
        self._start_workers()
        self.announced_ready = False  # logs (and tells systemd) when capture is back
        return True

    def _check_retiring(self, now: float) -> None:
        """SIGKILL an old worker that did not finish draining in time."""
        for old in self.retiring:
            if now >= old.kill_at and old.child.pid is not None:
                log.warning("%s did not finish draining its old ring; killing it",
                            old.child.name)
                _kill(old.child.pid, signal.SIGKILL)
                old.kill_at = float("inf")

    def _wait_retired(self) -> None:
        while self.retiring:
            self._check_retiring(time.monotonic())
            self._reap()
            time.sleep(0.01)

    def _start_workers(self) -> None:
        for slot in self.slot_list:
            if slot.child is None:
                slot.child = Child(f"fanoutd-w{slot.index}", self._worker_main(slot))
            self._spawn(slot.child)

    def _watch_link(self) -> None:
        """Log and count each change of the interface once; reopen after a re-creation."""
        event = self.link_watch.check(self._ioctl_sock)
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
        if self.reopen_pending and self.link_watch.ifindex is not None:
            self.reopen_pending = False
            if not self._replace_rings(self.cfg):
                self.reopen_pending = True

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
        if cfg == old:
            log.info("reload: the configuration is unchanged")
            return
        if cfg.metrics != old.metrics and not self._swap_metrics(cfg):
            return
        logging.getLogger().setLevel(cfg.log.level.upper())
        rings = (cfg.interface, cfg.workers, cfg.ring, cfg.fanout, cfg.user) != (
            old.interface, old.workers, old.ring, old.fanout, old.user)
        proxy = (cfg.publish, cfg.user, cfg.interface, cfg.supervisor.status_interval_ms) != (
            old.publish, old.user, old.interface, old.supervisor.status_interval_ms)
        if rings and not self._replace_rings(cfg):
            log.error("reload rejected, still running on the previous configuration")
            return
        self.cfg = cfg
        if cfg.interface != old.interface:
            set_log_context(interface=cfg.interface)
            ifindex, up = link.probe(cfg.interface, self._ioctl_sock)
            self.link_watch = link.LinkWatch(cfg.interface, ifindex or 0, up)
        if proxy and self.proxy is not None:
            self._stop_children([self.proxy])
            self._spawn_proxy()  # workers that dropped privileges reconnect by restarting
        changed = [f.name for f in fields(cfg) if getattr(cfg, f.name) != getattr(old, f.name)]
        log.info("reloaded the configuration (changed: %s)", ", ".join(changed))

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
        self.metrics.server_close()
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
                               f"{e.strerror}", EXIT_UNAVAILABLE) from None

    def _make_runtime_dir(self) -> None:
        base = (self.cfg.runtime_dir or os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
                or ("/run/fanoutd" if os.geteuid() == 0 else tempfile.gettempdir()))
        try:
            os.makedirs(base, mode=0o755, exist_ok=True)
            _remove_stale_runtime_dirs(base)
            self.runtime_dir = tempfile.mkdtemp(prefix=f"{os.getpid()}-{self.interface}-",
                                                dir=base)
        except OSError as e:
            raise StartupError(f"runtime_dir: cannot create a directory in {base}: {e.strerror}",
                               EXIT_UNAVAILABLE) from None
        self.backend = f"ipc://{self.runtime_dir}/workers.ipc"

    def _start_proxy(self) -> None:
        self._proxy_ready_w = -1

        def main() -> int:  # in the child: the configuration current at the fork
            self._close_rings_in_child(keep=None)  # the proxy reads counters, never rings
            cfg = self.cfg.publish
            plan = publish.ProxyPlan(self.backend, cfg.endpoint, cfg.sndhwm, self.interface,
                                     self.cfg.supervisor.status_interval_ms / 1000,
                                     self.cfg.user, cfg.curve)
            return publish.run_proxy(plan, self._proxy_ready_w, self.table, self.rings)

        self.proxy = Child("fanoutd-proxy", main)
        self._spawn_proxy(startup=True)

    def _spawn_proxy(self, startup: bool = False) -> None:
        """Fork the proxy and wait until it has bound the public endpoint (or failed to).

        At start-up a failure ends the daemon with the proxy's reason. Later (a restart)
        it is logged, and the proxy's exit is reaped like any failed start: backoff, then
        FATAL if it keeps failing.
        """
        assert self.proxy is not None
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
            raise StartupError(answer or "the proxy did not start", EXIT_UNAVAILABLE)
        else:
            log.error("fanoutd-proxy could not start: %s", answer or "no answer")

    def _worker_main(self, slot: Slot) -> Callable[[], int]:
        def main() -> int:  # in the child: the configuration current at the fork
            self._close_rings_in_child(keep=slot.sock)  # a worker touches its own ring only
            cfg = self.cfg
            plan = worker.WorkerPlan(self.interface, slot.ring_id, cfg.ring.geometry,
                                     self.backend, cfg.publish.sndhwm, cfg.user)
            return worker.run_worker(slot.index, slot.sock, slot.stats, self.rings, plan)

        return main

    def _close_rings_in_child(self, keep: socket.socket | None) -> None:
        """In a new child: close every inherited capture socket but `keep`, so a ring's
        memory goes as soon as the supervisor closes it."""
        for sock in [s.sock for s in self.slot_list] + [old.sock for old in self.retiring]:
            if sock is not keep:
                sock.close()

    def _spawn(self, child: Child) -> None:
        parent = os.getpid()
        pid = os.fork()
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
                    self.metrics.socket.close()
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
        waiting = [self._wake_r]
        if self.metrics is not None:
            waiting.append(self.metrics.socket)
        readable, _, _ = select.select(waiting, [], [], self._next_wakeup())
        if self._wake_r in readable:
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
        if self.metrics is not None and self.metrics.socket in readable:
            self.metrics.handle_request()
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
        found = [s.child for s in self.slot_list if s.child is not None]
        found += [old.child for old in self.retiring]
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
        for old in self.retiring:
            if old.child is child:  # an old worker done draining: close its ring
                self.retiring.remove(old)
                self._close_ring(old.sock, old.ring_id, old.stats)
                child.pid, child.state = None, "STOPPED"
                return
        child.pid = None
        child.kill_at = None
        if self.stopping or child.state == "STOPPING":
            child.state = "STOPPED"
            return
        how = _describe_status(status)
        now = time.monotonic()
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == worker.EXIT_RECONNECT:
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
            self.exit_status = EXIT_SOFTWARE
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

    def _tick(self) -> None:
        now = time.monotonic()
        for slot in self.slot_list:
            child = slot.child
            if child is None:
                continue
            if child.state == "STARTING" and slot.stats["capturing"] == child.pid:
                child.state = "RUNNING"
            elif child.state == "BACKOFF" and now >= child.restart_at:
                slot.stats.add("restarts")
                slot.stats["capturing"] = 0  # the dead worker's flag; the new one sets it
                self._spawn(child)
            elif child.state == "RUNNING":
                self._check_heartbeat(slot, child, now)
            slot.stats["up"] = int(child.state == "RUNNING")
        self._check_retiring(now)
        proxy = self.proxy
        if proxy is not None and proxy.state == "BACKOFF" and now >= proxy.restart_at:
            self._spawn_proxy()
        if now - self.kernel_stats_at >= KERNEL_STATS_EVERY_S:
            self.refresh_kernel_stats()
        if self.link_watch is not None:
            self._watch_link()
        if not self.announced_ready and all(s.up for s in self.slot_list):
            self.announced_ready = True
            log.info("capturing on %s: %d workers, fanout %s (group %d), publishing on %s",
                     self.interface, len(self.slot_list), self.cfg.fanout.mode,
                     self.group_id, self.cfg.publish.endpoint)
            self.notifier.ready(self._status_line(now))
        elif self.announced_ready and (now - self.status_at
                                       >= self.cfg.supervisor.status_interval_ms / 1000):
            self.notifier.status(self._status_line(now))
        self.notifier.watchdog(self._healthy())

    def _check_heartbeat(self, slot: Slot, child: Child, now: float) -> None:
        """A worker that stopped turning its loop gets SIGTERM, then SIGKILL; either way
        it is then reaped and replaced like a worker that died."""
        if child.pid is None:
            return
        if child.kill_at is not None:
            if now >= child.kill_at:
                log.warning("%s ignored SIGTERM; killing it", child.name)
                _kill(child.pid, signal.SIGKILL)
                child.kill_at = float("inf")
            return
        timeout_ms = self.cfg.supervisor.heartbeat_timeout_ms
        if slot.stats["heartbeat_ns"] < time.monotonic_ns() - timeout_ms * 1_000_000:
            log.warning("%s has not heartbeaten for %d ms; terminating it", child.name,
                        timeout_ms)
            _kill(child.pid, signal.SIGTERM)
            child.kill_at = now + HUNG_KILL_AFTER_S

    def _status_line(self, now: float) -> str:
        """One line for systemctl status: workers up, capture rate since the last line, drops."""
        self.refresh_kernel_stats()
        packets = sum(s.stats["kernel_packets"] for s in self.slot_list)
        drops = sum(s.stats["kernel_drops"] for s in self.slot_list)
        rate = (packets - self.status_packets) / (now - self.status_at) if self.status_at else 0
        self.status_at, self.status_packets = now, packets
        up = sum(s.up for s in self.slot_list)
        return (f"{up}/{len(self.slot_list)} workers up on {self.interface}, "
                f"{rate:.0f} packets/s, {drops} dropped")

    def _healthy(self) -> bool:
        """Every worker capturing and heartbeating, and the proxy running: feed the watchdog."""
        if self.proxy is None or self.proxy.state != "RUNNING":
            return False
        stale_before = time.monotonic_ns() - self.cfg.supervisor.heartbeat_timeout_ms * 1_000_000
        return all(s.up and s.stats["heartbeat_ns"] > stale_before for s in self.slot_list)

    def refresh_kernel_stats(self) -> None:
        """Fold PACKET_STATISTICS (reset by each read) into each slot's running totals,
        old rings still draining included."""
        self.kernel_stats_at = time.monotonic()
        for slot in self.slot_list:
            self._add_kernel_stats(slot.sock, slot.stats)
        for old in self.retiring:
            self._add_kernel_stats(old.sock, old.stats)

    @staticmethod
    def _add_kernel_stats(sock: socket.socket, stats: SlotStats) -> None:
        packets, drops, freezes = ring.read_kernel_stats(sock)
        stats.add("kernel_packets", packets)
        stats.add("kernel_drops", drops)
        stats.add("kernel_freezes", freezes)

    # -- stopping -----------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Workers first (they flush their last batches to the proxy), then the proxy."""
        self.notifier.stopping()
        workers = [s.child for s in self.slot_list if s.child is not None]
        self._stop_children(workers + [old.child for old in self.retiring])
        if self.proxy is not None:
            self._stop_children([self.proxy])
        if self.slot_list:
            self.refresh_kernel_stats()
        for slot in self.slot_list:
            slot.sock.close()
        if self.metrics is not None:
            self.metrics.server_close()
        if self.runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def _stop_children(self, children: list[Child], signum: int = signal.SIGTERM,
                       grace_s: float = STOP_GRACE_S) -> None:
        """Signal the children (SIGTERM: stop; SIGUSR1: a worker drains its ring first),
        reap them, and SIGKILL any still there after grace_s."""
        for child in children:
            if child.pid is not None:
                child.state = "STOPPING"
                _kill(child.pid, signum)
        deadline = time.monotonic() + grace_s
        while any(c.pid is not None for c in children):
            if time.monotonic() >= deadline:
                for child in children:
                    if child.pid is not None:
                        log.warning("%s did not stop in %.0f s; killing it", child.name,
                                    grace_s)
                        _kill(child.pid, signal.SIGKILL)
                deadline = float("inf")
            self._reap()
            time.sleep(0.01)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", a name or an interface: assume reachable from elsewhere


def _remove_stale_runtime_dirs(base: str) -> None:
    """Remove what daemons that were killed (no clean stop) left in base: directories
    named PID-... whose PID no longer runs."""
    for name in os.listdir(base):
        pid, sep, _ = name.partition("-")
        if sep and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)


def _die_with_parent(parent: int) -> None:
    """Have the kernel send SIGTERM if the supervisor dies, so no child outlives it."""
    privileges.die_with_parent()
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it may have exited already
        os.kill(pid, signum)


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.WEXITSTATUS(status)}"
