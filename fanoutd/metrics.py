"""Prometheus exposition: a custom collector over the slot table, and the registry that
the supervisor's metrics endpoint serves (metrics_server.py).

Metric families are built fresh at each scrape from the shared slot counters, so totals
belong to the slot and survive a worker restart, and every counter exists for every worker
from the first scrape, at zero.
"""

import time
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

from fanoutd import __version__, wire
from fanoutd.link import LinkWatch
from fanoutd.slotstats import REJECT_REASONS, ProxyStats, StatsTable
from fanoutd.wire import ERROR_REASONS

# (metric name without _total, slot counter, help)
SLOT_COUNTERS = (
    ("fanoutd_kernel_packets", "kernel_packets",
     "Packets the kernel passed to this worker's socket, including the dropped ones "
     "(PACKET_STATISTICS tp_packets)."),
    ("fanoutd_kernel_drops", "kernel_drops",
     "Packets the kernel dropped because this worker's ring was full (tp_drops)."),
    ("fanoutd_kernel_freezes", "kernel_freezes",
     "Times the kernel froze this worker's ring queue for lack of a free block "
     "(tp_freeze_q_cnt)."),
    ("fanoutd_packets_decoded", "packets", "Frames decoded into summaries."),
    ("fanoutd_bytes", "bytes", "Wire bytes of the decoded frames."),
    ("fanoutd_batches_published", "batches", "Batches (ring blocks) handed to ZeroMQ."),
    ("fanoutd_publish_drops", "publish_drops",
     "Batches refused at the publish high-water mark (their seq is skipped)."),
    ("fanoutd_worker_restarts", "restarts", "Times this worker slot's process was replaced."),
    ("fanoutd_blocks_skipped", "blocks_skipped",
     "Ring blocks skipped because decoding them failed (a decoder bug; their packets are "
     "lost, the worker carries on)."),
)


# The publisher's (the proxy's) counters: (metric name without _total, word, help).
PROXY_COUNTERS = (
    ("fanoutd_proxy_restarts", "restarts",
     "Times the proxy was replaced (it died, or a reload changed publish settings)."),
    ("fanoutd_subscriber_connections_refused", "connections_refused",
     "Subscriber connections closed at once because publish.max_subscribers were "
     "connected."),
    ("fanoutd_subscriptions_refused", "subscriptions_refused",
     "Subscriptions to a topic nothing published matches, not applied."),
    ("fanoutd_subscribers_closed", "subscribers_closed",
     "Subscriber connections closed for sending more than publish.max_subscriptions "
     "subscriptions."),
    ("fanoutd_subscriber_overflows", "subscriber_overflows",
     "Batches passed on while a subscriber's queue was full: that subscriber lost the "
     "batch, and the next ones until it had read part of its queue (seq gaps show them)."),
    ("fanoutd_restart_unwatched_batches", "restart_unwatched",
     "Batches passed on after a proxy restart while fewer subscribers than before it were "
     "back: lost to those not back yet."),
)
# (metric name, word, help) of the publisher's gauges.
PROXY_GAUGES = (
    ("fanoutd_subscribers", "subscribers",
     "Subscriber connections with a subscription to a published topic."),
    ("fanoutd_proxy_forwarding", "forwarding",
     "1 while the proxy passes batches on; 0 while a new proxy waits for the subscribers "
     "of the one it replaced (publish.restart_grace_ms) and while none runs."),
)
REJECTED_HELP = ("Messages on the workers' ipc socket the proxy dropped: malformed (not a "
                 "batch of a ring in use), sender (not from that ring's worker), topic (not "
                 "the ring's topic).")


def publisher_report(proxy: ProxyStats) -> dict:
    """The publisher's counters, named as on /metrics without the fanoutd_ prefix."""
    snap = proxy.snapshot()
    report: dict = {name.removeprefix("fanoutd_"): snap[key] for name, key, _ in PROXY_GAUGES}
    for name, key, _ in PROXY_COUNTERS:
        report[name.removeprefix("fanoutd_") + "_total"] = snap[key]
    report["proxy_rejected_messages_total"] = {r: snap[f"rejected:{r}"]
                                               for r in REJECT_REASONS}
    return report


class CaptureView(Protocol):
    """One interface's capture as the collector sees it (capture.Capture)."""

    interface: str
    slots: list
    link_watch: LinkWatch | None


class StatsSource(Protocol):
    captures: list
    proxy_stats: ProxyStats

    def refresh_kernel_stats(self) -> None: ...


def stats_message(iface: str, table: StatsTable, proxy: ProxyStats) -> dict:
    """The body of the `stats` topic (wire.stats_message): the counters /metrics shows,
    named as there without the fanoutd_ prefix, per worker (the active slots), and the
    publisher's."""
    workers = []
    for index, stats in table.active():
        snap = stats.snapshot()
        report: dict = {"worker": index, "up": bool(snap["up"])}
        for name, key, _ in SLOT_COUNTERS:
            report[name.removeprefix("fanoutd_") + "_total"] = snap[key]
        report["decode_errors_total"] = {r: snap[f"err:{r}"] for r in ERROR_REASONS}
        report["ring_blocks_user"] = snap["blocks_user"]
        workers.append(report)
    return wire.stats_message(iface, workers, __version__, time.time_ns(),
                              publisher_report(proxy))


class SlotCollector:
    def __init__(self, source: StatsSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        self.source.refresh_kernel_stats()
        captures: list[CaptureView] = list(self.source.captures)
        snaps = [(c.interface, str(slot.index), slot.stats.snapshot())
                 for c in captures for slot in c.slots]
        for name, key, doc in SLOT_COUNTERS:
            family = CounterMetricFamily(name, doc, labels=("interface", "worker"))
            for iface, worker, snap in snaps:
                family.add_metric((iface, worker), snap[key])
            yield family
        errors = CounterMetricFamily("fanoutd_decode_errors",
                                     "Frames whose decoding stopped early, by reason.",
                                     labels=("interface", "worker", "reason"))
        for iface, worker, snap in snaps:
            for reason in ERROR_REASONS:
                errors.add_metric((iface, worker, reason), snap[f"err:{reason}"])
        yield errors
        backlog = GaugeMetricFamily("fanoutd_ring_blocks_user",
                                    "Ring blocks held by user space: the worker's backlog.",
                                    labels=("interface", "worker"))
        for iface, worker, snap in snaps:
            backlog.add_metric((iface, worker), snap["blocks_user"])
        yield backlog
        up = GaugeMetricFamily("fanoutd_workers_up",
                               "Workers that have mapped their ring and are capturing.",
                               labels=("interface",))
        for c in captures:
            up.add_metric((c.interface,), sum(slot.stats["up"] for slot in c.slots))
        yield up
        events = CounterMetricFamily("fanoutd_link_events",
                                     "Changes of the capture interface: down, up, gone "
                                     "(deleted), returned (re-created, capture reopened).",
                                     labels=("interface", "event"))
        link_up = GaugeMetricFamily("fanoutd_link_up",
                                    "1 while the capture interface is up with carrier.",
                                    labels=("interface",))
        for c in captures:
            if c.link_watch is not None:
                for event, count in c.link_watch.counts.items():
                    events.add_metric((c.interface, event), count)
                link_up.add_metric((c.interface,), int(c.link_watch.up))
        yield events
        yield link_up
        yield from self._publisher()
        info = GaugeMetricFamily("fanoutd_build_info", "fanoutd version.", labels=("version",))
        info.add_metric((__version__,), 1)
        yield info


    def _publisher(self) -> Iterator[Metric]:
        snap = self.source.proxy_stats.snapshot()
        for name, key, doc in PROXY_GAUGES:
            yield GaugeMetricFamily(name, doc, value=snap[key])
        for name, key, doc in PROXY_COUNTERS:
            yield CounterMetricFamily(name, doc, value=snap[key])
        rejected = CounterMetricFamily("fanoutd_proxy_rejected_messages", REJECTED_HELP,
                                       labels=("reason",))
        for reason in REJECT_REASONS:
            rejected.add_metric((reason,), snap[f"rejected:{reason}"])
        yield rejected


# Why a connection to the metrics endpoint was closed without an answer.
DROP_REASONS = ("limit", "timeout", "oversized", "tls")


class ConnectionCollector:
    """The metrics endpoint's own counters, kept by its server (metrics_server.py)."""

    def __init__(self, dropped: dict[str, int]) -> None:
        self.dropped = dropped

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "fanoutd_metrics_connections_dropped",
            "Connections to the metrics endpoint closed without an answer: over "
            "metrics.max_connections (limit), not done within metrics.request_timeout_ms "
            "(timeout), a request head too large (oversized), a failed TLS handshake (tls).",
            labels=("reason",))
        for reason in DROP_REASONS:
            family.add_metric((reason,), self.dropped[reason])
        yield family


def make_registry(source: StatsSource, dropped: dict[str, int]) -> CollectorRegistry:
    """Everything /metrics serves: the slots' counters, the endpoint's own, and the
    standard process_* metrics (the supervisor's CPU, memory, fds)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SlotCollector(source))
    registry.register(ConnectionCollector(dropped))
    ProcessCollector(registry=registry)
    return registry
