"""What the daemon says about its own health: READY to systemd (and a log line) once every
worker captures, a STATUS line every status interval, the watchdog fed only while every
worker heartbeats and the proxy runs, and on exit a summary of what was captured."""

import logging
from collections.abc import Callable

from fanoutd.capture import Capture, Slot
from fanoutd.children import Child, ChildState
from fanoutd.config import Config
from fanoutd.runtime import metrics_url
from fanoutd.systemd import Notifier

log = logging.getLogger("fanoutd")


class Health:
    """The daemon's word to systemd, kept from one supervisor tick to the next."""

    def __init__(self, notifier: Notifier | None = None) -> None:
        self.notifier = notifier or Notifier()
        self.announced_ready = False
        self.status_at = 0.0  # when the last STATUS line went out
        self.status_packets = 0  # the packet count it reported

    def capture_changed(self) -> None:
        """Capture moved or was added: log (and tell systemd) again once it is back."""
        self.announced_ready = False

    def tick(self, now: float, cfg: Config, captures: list[Capture], proxy: Child | None,
             refresh: Callable[[], None]) -> None:
        """READY once every worker is up, then STATUS every status interval; the watchdog
        each tick. refresh reads the kernel's counters (for the status line)."""
        slots = _slots(captures)
        if not self.announced_ready and all(s.up for s in slots):
            self.announced_ready = True
            for capture in captures:
                log.info("capturing on %s: %s, fanout %s (group %d), publishing on %s, "
                         "metrics on %s", capture.interface,
                         count(len(capture.slots), "worker"), capture.cfg.fanout.mode,
                         capture.group_id, cfg.publish.endpoint, metrics_url(cfg.metrics))
            self.notifier.ready(self.status_line(now, captures, refresh))
        elif self.announced_ready and (now - self.status_at
                                       >= cfg.supervisor.status_interval_ms / 1000):
            self.notifier.status(self.status_line(now, captures, refresh))
        self.notifier.watchdog(healthy(now, cfg, captures, proxy))

    def status_line(self, now: float, captures: list[Capture],
                    refresh: Callable[[], None]) -> str:
        """One line for systemctl status: workers up, capture rate since the last line,
        drops."""
        refresh()
        slots = _slots(captures)
        packets = sum(s.stats["kernel_packets"] for s in slots)
        drops = sum(s.stats["kernel_drops"] for s in slots)
        rate = (packets - self.status_packets) / (now - self.status_at) if self.status_at else 0
        self.status_at, self.status_packets = now, packets
        up = sum(s.up for s in slots)
        where = ", ".join(c.interface for c in captures)
        return f"{up}/{len(slots)} workers up on {where}, {rate:.0f} packets/s, {drops} dropped"


def healthy(now: float, cfg: Config, captures: list[Capture], proxy: Child | None) -> bool:
    """Every worker capturing and heartbeating, and the proxy running: feed the watchdog."""
    if proxy is None or proxy.state is not ChildState.RUNNING:
        return False
    stale_before = ns(now) - cfg.supervisor.heartbeat_timeout_ms * 1_000_000
    return all(s.up and s.stats["heartbeat_ns"] > stale_before for s in _slots(captures))


def log_summary(captures: list[Capture]) -> None:
    """On exit, as tcpdump does: what the kernel passed on and dropped, and what was
    published, per interface (the current worker slots' counters)."""
    for capture in captures:
        total = {key: sum(slot.stats[key] for slot in capture.slots)
                 for key in ("kernel_packets", "kernel_drops", "packets", "batches")}
        log.info("%s: %s received by the kernel, %s dropped by the kernel, %s decoded, "
                 "%s published",
                 capture.interface, count(total["kernel_packets"], "packet"),
                 count(total["kernel_drops"], "packet"), count(total["packets"], "packet"),
                 count(total["batches"], "batch", "batches"))


def ns(seconds: float) -> int:
    """A CLOCK_MONOTONIC time in ns, as workers stamp their heartbeat."""
    return int(seconds * 1_000_000_000)


def count(n: int, singular: str, plural: str | None = None) -> str:
    """'1 worker', '2 workers'."""
    return f"{n:,} {singular if n == 1 else plural or singular + 's'}"


def _slots(captures: list[Capture]) -> list[Slot]:
    return [slot for capture in captures for slot in capture.slots]
