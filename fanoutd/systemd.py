"""systemd integration: sd_notify (READY, STATUS, WATCHDOG, STOPPING) and logging to the
journal with structured fields when systemd started us, to stderr otherwise.

Both work without systemd: with no NOTIFY_SOCKET the notifier does nothing, and without a
journal stream logs go to stderr, so `fanoutd run` behaves the same from a terminal.
"""

import logging
import os
import sys
import time
from datetime import datetime

from systemd import daemon, journal

log = logging.getLogger("fanoutd")

# Structured journal fields added to every record of this process (INTERFACE, WORKER).
_context: dict[str, str] = {}


class Notifier:
    """sd_notify for the supervisor (NotifyAccess=main: children never notify)."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self.watchdog_interval = _watchdog_interval()
        self.next_watchdog = 0.0

    def _send(self, message: str) -> None:
        """Fire and forget, as sd_notify is meant: a socket that is gone (an inherited
        NOTIFY_SOCKET, a container without it) must not take the daemon down."""
        if not self.enabled:
            return
        try:
            daemon.notify(message)
        except OSError as e:
            log.warning("cannot notify systemd at %s: %s; no more notifications",
                        os.environ.get("NOTIFY_SOCKET"), e.strerror or e)
            self.enabled = False

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def stopping(self) -> None:
        self._send("STOPPING=1\nSTATUS=stopping")

    def watchdog(self, healthy: bool) -> None:
        """Ping at half the watchdog period, but only while `healthy`: a stuck worker then
        lets the watchdog fire, and systemd restarts the service."""
        if self.watchdog_interval is None or not healthy:
            return
        now = time.monotonic()
        if now >= self.next_watchdog:
            self._send("WATCHDOG=1")
            self.next_watchdog = now + self.watchdog_interval


def _watchdog_interval() -> float | None:
    """Half of WATCHDOG_USEC, in seconds, when the watchdog is meant for this process."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2 / 1_000_000


def journal_wanted() -> bool:
    """True when stderr is the journal stream systemd gave us (JOURNAL_STREAM=dev:ino)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JournalHandler(logging.Handler):
    """Native journal records: the message, its priority and source, and our fields.

    Not systemd-python's JournalHandler, which copies every LogRecord attribute into the
    entry as a lower-case field that journald then throws away.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            journal.send(self.format(record),
                         PRIORITY=str(journal.JournalHandler.map_priority(record.levelno)),
                         SYSLOG_IDENTIFIER="fanoutd", LOGGER=record.name,
                         CODE_FILE=record.pathname, CODE_LINE=record.lineno,
                         CODE_FUNC=record.funcName, **_context)
        except Exception:
            self.handleError(record)


def setup_logging(level: str) -> None:
    """Log to the journal (structured) under systemd, else to stderr."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if journal_wanted():
        handler: logging.Handler = JournalHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_StderrFormatter(
            "%(asctime)s fanoutd[%(process)d]: %(levelname)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())


class _StderrFormatter(logging.Formatter):
    """Records on a terminal or in a file carry their time (the journal keeps its own):
    ISO 8601, local time with its offset, to the millisecond."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        moment = datetime.fromtimestamp(record.created).astimezone()
        return moment.isoformat(timespec="milliseconds")


def set_log_context(**fields: object) -> None:
    """Journal fields for this process's records, e.g. set_log_context(worker=0)."""
    for key, value in fields.items():
        _context[key.upper()] = str(value)
