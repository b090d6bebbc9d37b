"""What the relay and the JetStream subscriber share: subjects and message ids, the
connection to a NATS cluster, and the stream.

nats-py is an optional extra (`pip install 'fanoutd[nats]'`): it is imported when a NATS
connection is made, never by the daemon or the ZeroMQ subscriber, and its absence is one
line naming the extra (MissingNats).

Subjects. A batch of sensor S, interface I, worker W goes to `fanoutd.S.I.W`. A subject
token must not contain `.`, `*`, `>` or whitespace, and a VLAN interface (`eth0.100`) or a
host name (`a.example.org`) has dots, so each of S and I is percent-encoded as URLs are
(subject_token): `.` is `%2E`, `*` `%2A`, `>` `%3E`, `%` itself `%25`, whitespace and
unprintable characters their UTF-8 bytes' `%XX`. The encoding is one-to-one, so two
names never share a subject. The message id (Nats-Msg-Id), by which JetStream drops a
batch stored already, carries the names as they are: S/I/W/epoch/seq.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger("fanoutd")

SUBJECT_PREFIX = "fanoutd"
STREAM_SUBJECTS = f"{SUBJECT_PREFIX}.>"
DEFAULT_STREAM = "FANOUTD"
DEFAULT_SERVER = "nats://127.0.0.1:4222"
# JetStream drops a message whose Nats-Msg-Id it saw within this window: longer than a
# relay's restart and its retries take (RelayConfig.retry_seconds).
DUPLICATE_WINDOW_S = 300.0
_ESCAPED = frozenset(".*>%")


class MissingNats(ImportError):
    """nats-py is not installed."""

    def __init__(self) -> None:
        super().__init__("needs nats-py: pip install 'fanoutd[nats]'")


def require_nats() -> Any:
    """The nats package, or MissingNats."""
    try:
        import nats
        import nats.js
    except ImportError:
        raise MissingNats() from None
    return nats


def subject_token(name: str) -> str:
    """name as one subject token: `.`, `*`, `>`, `%`, whitespace and unprintable
    characters percent-encoded (see the module docstring)."""
    out = []
    for ch in name:
        if ch in _ESCAPED or ch.isspace() or not ch.isprintable():
            out.append("".join(f"%{b:02X}" for b in ch.encode()))
        else:
            out.append(ch)
    return "".join(out)


def batch_subject(sensor: str, iface: str, worker: int) -> str:
    return f"{SUBJECT_PREFIX}.{subject_token(sensor)}.{subject_token(iface)}.{worker}"


def message_id(sensor: str, iface: str, worker: int, epoch: int | None, seq: int) -> str:
    """The batch's Nats-Msg-Id: (sensor, iface, worker, epoch, seq) names one batch."""
    return f"{sensor}/{iface}/{worker}/{epoch}/{seq}"


def parse_servers(values: str | Iterable[str]) -> list[str]:
    """'nats://a:4222,nats://b:4222' (or a list of such) -> the URLs, in order."""
    items = [values] if isinstance(values, str) else list(values)
    return [url.strip() for item in items for url in item.split(",") if url.strip()]


async def connect(servers: list[str], name: str, connect_seconds: float = 10.0,
                  on_event: Callable[[str], None] | None = None, **options: Any) -> Any:
    """A NATS connection to the first server of `servers` that answers, tried again for
    up to connect_seconds; it then moves between them by itself when one fails (the
    cluster's other members are learnt from the server too). on_event(text) hears of
    disconnections and reconnections. TimeoutError when none answers in time."""
    nats = require_nats()

    def say(text: str) -> Callable[..., Any]:
        async def callback(*_: Any) -> None:
            if on_event is not None:
                on_event(text)
        return callback

    async def error(e: Exception) -> None:
        log.debug("nats: %s", e)

    # Reconnecting forever once connected makes nats-py's first connection try forever
    # too: the deadline bounds it.
    return await asyncio.wait_for(nats.connect(
        servers=servers, name=name, connect_timeout=2, reconnect_time_wait=0.25,
        max_reconnect_attempts=-1, allow_reconnect=True,
        disconnected_cb=say("disconnected"), reconnected_cb=say("reconnected"),
        error_cb=error, **options), timeout=connect_seconds)


async def ensure_stream(js: Any, name: str = DEFAULT_STREAM, replicas: int = 1,
                        max_age_s: float = 0, max_bytes: int = 0,
                        wait_seconds: float = 30.0) -> tuple[Any, bool]:
    """The stream, created when missing (subjects fanoutd.>, file storage, the
    duplicate window the message ids rely on): (its info, whether it was created now).
    A cluster that is still electing its meta leader answers "unavailable" for a moment:
    tried again for up to wait_seconds. An existing stream is left as it is."""
    nats = require_nats()
    from nats.js import api

    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            try:
                return await js.stream_info(name), False
            except nats.js.errors.NotFoundError:
                pass
            config = api.StreamConfig(
                name=name, subjects=[STREAM_SUBJECTS], storage=api.StorageType.FILE,
                num_replicas=replicas, duplicate_window=DUPLICATE_WINDOW_S,
                max_age=max_age_s or None, max_bytes=max_bytes or None,
                discard=api.DiscardPolicy.OLD)
            return await js.add_stream(config), True
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError,
                nats.js.errors.ServerError, nats.errors.NoRespondersError,
                nats.js.errors.NoStreamResponseError):
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.25)
