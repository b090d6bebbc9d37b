"""The proxy without a daemon: its log of refused subscribers (once per client, rate-limited),
the limits on subscribers, the restart gate, queue sizes (the workers' outboxes: test_outbox.py)."""

import logging

import pytest
from fakes import FakeClock

from fanoutd.publish import (
    MESSAGE_OVERHEAD,
    UNWATCHED_WINDOW_S,
    FreedMemory,
    RefusalLog,
    StartGate,
    Subscribers,
    SubscriptionChange,
    subscriber_hwm,
    subscription_topics,
)
from fanoutd.slotstats import ProxyStats
from fanoutd.wire import max_batch_bytes


@pytest.fixture
def warnings(caplog):
    caplog.set_level(logging.WARNING, logger="fanoutd.proxy")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "fanoutd.proxy"]


def test_one_warning_per_refused_client(warnings):
    clock = FakeClock()
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
    clock = FakeClock()
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
    refusals = RefusalLog(burst=10**6, clock=FakeClock())
    for i in range(5000):
        refusals.refused("10.0.0.1", f"KEY-{i}", "not admitted")
    assert len(refusals._warned) <= 4096


# --------------------------------------------------------------------------- subscribers

IFACES = [b"eth0", b"cap1"]


@pytest.mark.parametrize("topic", [b"", b"p", b"pkt", b"pkt.", b"pkt.e", b"pkt.eth0",
                                   b"pkt.eth0.", b"pkt.eth0.0", b"pkt.eth0.1",
                                   b"pkt.eth0.25", b"pkt.eth0.255", b"pkt.cap1.7", b"s",
                                   b"stats"])
def test_subscriptions_to_what_is_published_are_applied(topic):
    applied = subscription_topics(topic, IFACES)
    assert applied == ((b"pkt.", b"stats") if topic == b"" else (topic,))


@pytest.mark.parametrize("topic", [b"f", b"fanoutd.", b"fanoutd.hello.x", b"x",
                                   b"pkt.eth1", b"pkt.eth0.256", b"pkt.eth0.01",
                                   b"pkt.eth0.1000", b"pkt.eth0.a", b"statsx",
                                   bytes(range(256))])
def test_subscriptions_nothing_published_matches_are_refused(topic):
    assert subscription_topics(topic, IFACES) is None


def subscribers(max_connections: int = 3, max_subscriptions: int = 4):
    closed: list[int] = []
    stats = ProxyStats()
    return Subscribers(IFACES, max_connections, max_subscriptions, stats, closed.append), \
        stats, closed


def test_a_subscription_applies_to_its_connection_and_counts_it_as_a_subscriber():
    subs, stats, closed = subscribers()
    subs.accepted(10)
    assert subs.message(10, b"\x01pkt.").subscribe == [b"pkt."]
    assert stats["subscribers"] == 1
    welcome = subs.message(10, b"\x01fanoutd.hello")
    assert welcome.welcome and not welcome.subscribe
    assert subs.message(10, b"\x00pkt.").unsubscribe == [b"pkt."]
    assert stats["subscribers"] == 0 and not closed


def test_the_empty_prefix_and_an_explicit_topic_overlap():
    """`` means pkt. and stats; unsubscribing it keeps an explicit pkt. in effect."""
    subs, _, _ = subscribers()
    subs.accepted(10)
    assert subs.message(10, b"\x01").subscribe == [b"pkt.", b"stats"]
    assert subs.message(10, b"\x01pkt.").subscribe == []
    assert subs.message(10, b"\x00").unsubscribe == [b"stats"]
    assert subs.message(10, b"\x00pkt.").unsubscribe == [b"pkt."]


def test_refused_topics_are_counted_and_not_applied():
    subs, stats, _ = subscribers()
    subs.accepted(10)
    change = subs.message(10, b"\x01garbage")
    assert change.subscribe == [] and not change.welcome
    assert stats["subscriptions_refused"] == 1 and stats["subscribers"] == 0


def test_a_connection_past_max_subscriptions_is_closed():
    subs, stats, closed = subscribers(max_subscriptions=4)
    subs.accepted(10)
    for i in range(4):
        subs.message(10, b"\x01x%d" % i)
    assert closed == []
    subs.message(10, b"\x01x4")
    assert closed == [10] and stats["subscribers_closed"] == 1
    assert subs.message(10, b"\x01pkt.").subscribe == []  # nothing more from it
    subs.disconnected(10)
    subs.accepted(10)  # a new connection on the same descriptor starts afresh
    assert subs.message(10, b"\x01pkt.").subscribe == [b"pkt."]


def test_unsubscribing_gives_room_for_more_subscriptions():
    subs, _, closed = subscribers(max_subscriptions=2)
    subs.accepted(10)
    for _ in range(10):
        subs.message(10, b"\x01pkt.")
        subs.message(10, b"\x00pkt.")
    assert closed == []


def test_connections_past_max_subscribers_are_refused():
    subs, stats, closed = subscribers(max_connections=2)
    subs.accepted(10)
    subs.accepted(11)
    subs.accepted(12)
    assert closed == [12] and stats["connections_refused"] == 1
    assert subs.message(12, b"\x01pkt.").subscribe == []  # queued before it ended
    subs.disconnected(12)
    subs.disconnected(10)
    subs.accepted(13)
    assert closed == [12]


def test_messages_without_a_live_connection_are_ignored():
    """libzmq hands up unsubscriptions of its own for a connection that ended (without a
    descriptor), and a connection's last messages may come after it ended."""
    subs, stats, _ = subscribers()
    assert subs.message(None, b"\x00pkt.") == SubscriptionChange()
    assert subs.message(None, b"\x01pkt.") == SubscriptionChange()
    subs.accepted(10)
    subs.disconnected(10)
    assert not subs.knows(10)
    assert subs.message(10, b"\x01pkt.") == SubscriptionChange()
    assert stats["subscribers"] == 0


# --------------------------------------------------------------------------- the restart gate


def test_the_gate_opens_once_the_previous_subscribers_are_back():
    gate = StartGate(expected=2, grace_s=1.0, now=100.0)
    assert not gate.try_open(1, 100.5)
    assert gate.try_open(2, 100.6)
    assert not gate.unwatched(2, 100.7)


def test_the_gate_opens_after_the_grace_and_counts_what_goes_unwatched():
    gate = StartGate(expected=2, grace_s=1.0, now=100.0)
    assert not gate.unwatched(0, 100.5)  # nothing passes on while closed
    assert gate.try_open(1, 101.0)
    assert gate.unwatched(1, 101.1)
    assert not gate.unwatched(2, 101.2)
    assert not gate.unwatched(1, 101.0 + UNWATCHED_WINDOW_S)  # taken to have left


def test_a_first_start_does_not_wait():
    gate = StartGate(expected=0, grace_s=1.0, now=0.0)
    assert gate.try_open(0, 0.0)
    assert not gate.catching_up(0.1)


def test_after_a_restart_the_proxy_catches_up_for_the_grace_period():
    gate = StartGate(expected=1, grace_s=1.0, now=100.0)
    assert not gate.catching_up(100.1)  # closed: nothing is passed on at all
    gate.try_open(1, 100.2)
    assert gate.catching_up(100.3) and gate.catching_up(101.1)
    assert not gate.catching_up(101.2)


# --------------------------------------------------------------------------- queues


def test_subscriber_queues_follow_their_byte_budget():
    block = 1 << 19
    per_message = max_batch_bytes(block) + MESSAGE_OVERHEAD
    assert subscriber_hwm(32 << 20, block, 0) == (32 << 20) // per_message
    assert subscriber_hwm(32 << 20, block, 10) == 10  # sndhwm caps it
    assert subscriber_hwm(1 << 16, block, 256) == 1  # never 0 (which means no limit)


def test_freed_memory_goes_back_after_a_subscriber_left_and_now_and_then():
    trim = FreedMemory(subscribers=3, now=100.0)
    assert not trim.due(3, 105.0)
    assert trim.due(2, 110.0)  # one left: at every tick for LEAVING_WINDOW_S
    assert trim.due(2, 115.0)
    assert trim.due(2, 139.9)
    assert not trim.due(2, 140.0)  # the window is over
    assert not trim.due(4, 145.0)  # more came: nothing was freed
    assert not trim.due(4, 169.8)
    assert trim.due(4, 169.9)  # TRIM_INTERVAL_S after the last
