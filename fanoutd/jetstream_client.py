"""JetStreamSubscriber: the batches `fanoutd relay` stored in a JetStream stream, read as
the same Batch objects as fanoutd.client.Subscriber yields.

    from fanoutd.client import JetStreamSubscriber
    with JetStreamSubscriber("nats://n1:4222,nats://n2:4222", durable="flows") as sub:
        for batch in sub.batches():
            table = batch.to_arrow()   # acknowledged when the loop asks for the next one

A pull consumer of the stream. With a `durable` name the consumer lives in the cluster:
it resumes where it was acknowledged (a consumer that was down catches up from the
stream), and every process that uses the same name shares its batches, each batch going
to one of them. Without one, an ephemeral consumer sees what arrives from now on
(deliver="new") or the whole stream (deliver="all"), and the server forgets it soon after.

Each batch is acknowledged when the caller asks for the next one: a batch the caller
did not finish (it stopped, or died) is delivered again, to this process or another of
the durable, after `ack_wait` seconds. So delivery is at least once: `redelivered`
counts the batches that came a second time; (sensor, iface, worker, epoch, seq) names a
batch, to drop those where it matters. `Batch.sensor` is the name the sensor stamped.

nats-py is imported here, when a subscriber is made: `pip install 'fanoutd[nats]'`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import unquote

from fanoutd import jetstream
from fanoutd.batch import Batch, BatchSource


def cluster_busy_errors() -> tuple[type[BaseException], ...]:
    """What a JetStream API request raises while the cluster cannot answer it yet (a
    member just died and the meta leader is being elected again, or a consumer's leader
    is): worth asking again."""
    nats = jetstream.require_nats()
    return (TimeoutError, nats.errors.NoRespondersError,
            nats.js.errors.ServiceUnavailableError, nats.js.errors.ServerError)


class JetStreamSubscriber(BatchSource):
    def __init__(self, servers: str | Iterable[str] = jetstream.DEFAULT_SERVER,
                 stream: str = jetstream.DEFAULT_STREAM, durable: str | None = None,
                 subject: str = jetstream.STREAM_SUBJECTS, deliver: str = "all",
                 fetch: int = 16, ack_wait: float = 30.0,
                 connect_seconds: float = 30.0) -> None:
        """servers: NATS URLs (a list or "URL,URL"); the connection moves between them.
        subject: a filter within the stream, e.g. fanoutd.rack-7.> for one sensor
        (jetstream.batch_subject names them). deliver: "all" or "new", where a consumer
        made now starts (a durable that exists resumes where it was). fetch: batches
        asked for at a time; each is held for this process until acknowledged.
        connect_seconds: how long to keep trying to connect and to bind the consumer."""
        nats = jetstream.require_nats()
        from nats.js import api

        if deliver not in ("all", "new"):
            raise ValueError(f"deliver must be all or new, got {deliver!r}")
        self._errors = nats.errors
        self.fetch_size = fetch
        self.redelivered = 0
        self.unreadable = 0  # messages in the stream that are no batch this library reads
        self._loop = asyncio.new_event_loop()
        self.nc: Any = None
        try:
            self.nc = self._run(jetstream.connect(jetstream.parse_servers(servers),
                                                  "fanoutd-subscriber", connect_seconds))
            config = api.ConsumerConfig(
                ack_policy=api.AckPolicy.EXPLICIT, ack_wait=ack_wait,
                deliver_policy=api.DeliverPolicy.ALL if deliver == "all"
                else api.DeliverPolicy.NEW,
                max_ack_pending=max(1000, 4 * fetch),
                inactive_threshold=None if durable else 60.0)
            self._sub = self._run(self._subscribe(subject, durable, stream, config,
                                                  connect_seconds))
            self._run(self._led(connect_seconds))
        except BaseException:
            self.close()
            raise

    async def _subscribe(self, subject: str, durable: str | None, stream: str, config: Any,
                         seconds: float) -> Any:
        """The pull subscription, tried again for up to seconds while the cluster cannot
        answer (a member just died: its JetStream meta leader is being elected again)."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                return await self.nc.jetstream().pull_subscribe(
                    subject, durable=durable, stream=stream, config=config)
            except cluster_busy_errors():
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.25)

    async def _led(self, seconds: float) -> None:
        """Wait (up to seconds) until a consumer just made in a cluster has elected its
        leader: a pull request sent before that goes unanswered for the whole wait. Its
        info request can go unanswered too meanwhile (then it is asked again)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                info = await self._sub.consumer_info()
            except cluster_busy_errors():
                await asyncio.sleep(0.05)
                continue
            if info.cluster is None or info.cluster.leader:
                return
            await asyncio.sleep(0.05)

    def _run(self, coro: Any) -> Any:
        return self._loop.run_until_complete(coro)

    def __enter__(self) -> JetStreamSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Send the acknowledgements still buffered, then disconnect."""
        if self._loop.is_closed():
            return
        try:
            if self.nc is not None and not self.nc.is_closed:
                # What was not acknowledged is delivered again: nothing is lost.
                with contextlib.suppress(self._errors.Error, TimeoutError):
                    self._run(self.nc.flush(timeout=5))
                self._run(self.nc.close())
        finally:
            self._loop.close()

    def batches(self, timeout: float | None = None) -> Iterator[Batch]:
        """Yield batches as the stream has them; stop after `timeout` seconds with none
        (None: never). Each is acknowledged when the next one is asked for (or the loop
        ends normally)."""
        last = time.monotonic()
        while True:
            wait = 1.0 if timeout is None else max(0.05, min(1.0, last + timeout
                                                             - time.monotonic()))
            try:
                msgs = self._run(self._sub.fetch(self.fetch_size, timeout=wait))
            except TimeoutError:  # nats-py raises its own subclass, or the builtin
                msgs = []
            if not msgs:
                # Nothing came. nats-py's fetch() can also return nothing at once: its
                # request expires as its wait ends, so the server's 408 ending it comes
                # just after, to the next fetch(), which takes it for its own answer. That
                # is no batch: it must not restart the idle clock, or a consumer told to
                # stop after `timeout` idle seconds can go on for minutes.
                if timeout is not None and time.monotonic() - last >= timeout:
                    return
                continue
            last = time.monotonic()
            yield from self._deliver(msgs)

    def _deliver(self, msgs: list[Any]) -> Iterator[Batch]:
        done = 0
        try:
            for msg in msgs:
                batch = self._batch(msg)
                if batch is not None:
                    yield batch
                self._run(msg.ack())
                done += 1
        finally:  # the caller stopped: what it did not finish goes back at once
            if done < len(msgs) and not self._loop.is_closed():
                for msg in msgs[done:]:
                    self._run(msg.nak())

    def _batch(self, msg: Any) -> Batch | None:
        if msg.metadata.num_delivered > 1:
            self.redelivered += 1
        try:
            batch = Batch.from_message(msg.subject, msg.data)
        except ValueError:
            self.unreadable += 1
            return None
        tokens = msg.subject.split(".")
        batch.sensor = batch.sensor_name or (unquote(tokens[1]) if len(tokens) > 1 else "")
        return batch

