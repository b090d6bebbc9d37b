"""Prometheus exposition: a custom collector over the slot table, and the registry that
the supervisor's metrics endpoint serves (metrics_server.py).

Metric families are built fresh at each scrape from the shared slot counters, so totals
belong to the slot and survive a worker restart, and every counter exists for every worker
from the first scrape, at zero.
"""

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry

from fanoutd import __version__
from fanoutd.encoder import IMPLEMENTATION
from fanoutd.link import LinkWatch
from fanoutd.slotstats import (
    PROXY_COUNTERS,
    PROXY_GAUGES,
    REJECT_REASONS,
    REJECTED_HELP,
    SLOT_COUNTERS,
    ProxyStats,
)
from fanoutd.wire import ERROR_REASONS


class CaptureView(Protocol):
    """One interface's capture as the collector sees it (capture.Capture)."""

    interface: str
    slots: list
    link_watch: LinkWatch | None


class StatsSource(Protocol):
    captures: list
    proxy_stats: ProxyStats

    def refresh_kernel_stats(self) -> None: ...


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
        yield InfoMetricFamily("fanoutd_build", "This fanoutd: its version and the "
                               "implementation of its block encoder (C or Python).",
                               value={"version": __version__, "encoder": IMPLEMENTATION})


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
