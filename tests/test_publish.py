"""The proxy without a daemon: its log of refused subscribers (once per client,
rate-limited), the checks of the ipc socket."""

import logging
import os

import pytest
import zmq

from fanoutd.publish import ENVELOPE, Proxy, RefusalLog
from fanoutd.slotstats import ProxyStats, RingTable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def warnings(caplog):
    caplog.set_level(logging.WARNING, logger="fanoutd.proxy")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "fanoutd.proxy"]


def test_one_warning_per_refused_client(warnings):
    clock = Clock()
    refusals = RefusalLog(burst=10, period_s=60, repeat_s=3600, clock=clock)
    for _ in range(5):  # a client that keeps retrying
        refusals.refused("10.0.0.5", "KEY-A", "its key is not in /etc/clients")
        clock.now += 1
    refusals.refused("10.0.0.6", "KEY-B", "its key is not in /etc/clients")
    assert warnings() == [
        "refused subscriber from 10.0.0.5, CURVE client key KEY-A: its key is not in "
        "/etc/clients",
        "refused subscriber from 10.0.0.6, CURVE client key KEY-B: its key is not in "
        "/etc/clients"]
    clock.now += 3600  # still refused an hour later: said again
    refusals.refused("10.0.0.5", "KEY-A", "its key is not in /etc/clients")
    assert len(warnings()) == 3 and refusals.refused_total == 7


def test_a_flood_of_refusals_is_rate_limited(warnings):
    clock = Clock()
    refusals = RefusalLog(burst=3, period_s=60, clock=clock)
    for i in range(100):  # 100 different clients within a second
        refusals.refused(f"10.0.1.{i}", f"KEY-{i}", "not admitted")
    assert len(warnings()) == 3
    clock.now += 60
    refusals.refused("10.0.2.1", "KEY-X", "not admitted")
    assert len(warnings()) == 4
    assert warnings()[-1].endswith("(97 more refused clients were not logged, at most 3 "
                                   "per 60 s)")
    assert refusals.refused_total == 101


def test_the_memory_of_warned_clients_is_bounded():
    refusals = RefusalLog(burst=10**6, clock=Clock())
    for i in range(5000):
        refusals.refused("10.0.0.1", f"KEY-{i}", "not admitted")
    assert len(refusals._warned) <= 4096


# --------------------------------------------------------------------------- the ipc socket


def test_batches_are_taken_only_from_the_rings_worker_on_its_topic(tmp_path):
    """The proxy's checks of what arrives on the workers' socket, with this process as
    the worker of ring 3."""
    rings = RingTable(8)
    rings.assign(3, b"pkt.eth0.1")
    rings.pid[3] = os.getpid()
    backend = f"ipc://{tmp_path}/w.ipc"
    ctx = zmq.Context()
    try:
        proxy = Proxy(ctx, backend, f"ipc://{tmp_path}/p.ipc", 16, rings, ProxyStats())
        push = ctx.socket(zmq.PUSH)
        push.connect(backend)
        envelope = ENVELOPE.pack
        cases = {
            "ours": [envelope(3, 9), b"pkt.eth0.1", b"body"],
            "topic": [envelope(3, 10), b"pkt.eth0.2", b"body"],
            "malformed": [envelope(4, 1), b"pkt.eth0.1", b"body"],
        }
        got = {}
        for name, message in cases.items():
            push.send_multipart(message)
            assert proxy.pull.poll(5000)
            got[name] = proxy._rejected(proxy.pull.recv_multipart(copy=False))
        assert got == {"ours": None, "topic": "topic", "malformed": "malformed"}
        rings.pid[3] = os.getpid() + 1  # the ring has another worker now
        push.send_multipart(cases["ours"])
        assert proxy.pull.poll(5000)
        assert proxy._rejected(proxy.pull.recv_multipart(copy=False)) == "sender"
        push.close(linger=0)
        proxy.close()
    finally:
        ctx.destroy(linger=0)
