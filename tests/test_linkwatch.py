"""link.py: rtnetlink messages read right (crafted bytes, cut and unaligned ones too), each
change counted once, also after lost notifications, and LinkMonitor.read() over a fake
socket: order, the resync after ENOBUFS, the bound per call.

tests/integration/test_link.py proves the same against the kernel and the daemon."""

import errno
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fanoutd import _linux as L
from fanoutd import link
from fanoutd.link import LinkState, LinkWatch

UP = L.IFF_UP | L.IFF_LOWER_UP | L.IFF_RUNNING


def message(kind: int, ifindex: int, flags: int, name: str | None) -> bytes:
    """One RTM_NEWLINK/RTM_DELLINK as the kernel sends it: an attribute before the name."""
    attrs = L.RTATTR.pack(8, 4) + (1500).to_bytes(4, "little")  # IFLA_MTU
    if name is not None:
        value = name.encode() + b"\0"
        attrs += L.RTATTR.pack(4 + len(value), L.IFLA_IFNAME) + value
        attrs += b"\0" * (-len(attrs) % 4)
    body = L.IFINFOMSG.pack(socket.AF_UNSPEC, 1, ifindex, flags, 0) + attrs
    return L.NLMSGHDR.pack(L.NLMSGHDR.size + len(body), kind, 0, 0, 0) + body


def test_parse_reads_index_name_and_state():
    data = (message(L.RTM_NEWLINK, 7, UP, "cap0")
            + message(L.RTM_NEWLINK, 7, L.IFF_UP, "cap0")  # up, no carrier yet
            + message(L.RTM_NEWLINK, 7, L.IFF_LOWER_UP, "cap0")  # carrier, set down
            + message(L.RTM_DELLINK, 7, 0, "cap0")
            + message(99, 7, UP, "cap0"))  # not a link message: skipped
    assert link.parse(data) == [LinkState(7, "cap0", True), LinkState(7, "cap0", False),
                                LinkState(7, "cap0", False),
                                LinkState(7, "cap0", False, deleted=True)]


def test_parse_raises_the_error_of_an_nlmsg_error():
    body = L.NLMSGERR_ERROR.pack(-errno.ENODEV) + b"\0" * 16
    data = L.NLMSGHDR.pack(L.NLMSGHDR.size + len(body), L.NLMSG_ERROR, 0, 1, 0) + body
    with pytest.raises(OSError) as info:
        link.parse(data)
    assert info.value.errno == errno.ENODEV


def test_query_reads_the_state_now():
    lo = link.query("lo")
    assert lo is not None and lo.ifindex == socket.if_nametoindex("lo") and lo.name == "lo"
    assert link.query("nosuch-fo0") is None


def test_each_change_counted_once():
    """Repeated notifications of one state (the kernel sends several per change) count
    once; other interfaces are ignored; deletion and re-creation are gone and returned."""
    watch = LinkWatch("cap0", 7, True)
    events = [watch.apply(s) for s in [
        LinkState(7, "cap0", False), LinkState(7, "cap0", False),
        LinkState(8, "inj0", True), LinkState(8, "inj0", False),
        LinkState(7, "cap0", True), LinkState(7, "cap0", True),
        LinkState(7, "cap0", False), LinkState(7, "cap0", False, deleted=True),
        LinkState(7, "cap0", False, deleted=True),
        LinkState(9, "cap0", False), LinkState(9, "cap0", True),
        LinkState(9, "eth9", True),  # renamed away
    ]]
    assert [e for e in events if e] == ["down", "up", "down", "gone", "returned", "up", "gone"]
    assert watch.counts == {"down": 2, "up": 2, "gone": 2, "returned": 1}
    assert watch.ifindex is None and not watch.up


def test_resync_counts_only_what_differs():
    """After lost notifications the state now is counted as one change at most, and a
    notification of that same change read later is not counted again."""
    watch = LinkWatch("cap0", 7, True)
    assert watch.resync(LinkState(7, "cap0", True)) is None
    assert watch.resync(LinkState(7, "cap0", False)) == "down"
    assert watch.apply(LinkState(7, "cap0", False)) is None
    assert watch.resync(None) == "gone"
    assert watch.resync(LinkState(9, "cap0", True)) == "returned"
    assert watch.counts == {"down": 1, "up": 0, "gone": 1, "returned": 1}


def test_parse_skips_what_is_not_a_link_message_and_stops_at_a_cut_one():
    ack = L.NLMSGHDR.pack(L.NLMSGHDR.size + 20, L.NLMSG_ERROR, 0, 1, 0) + b"\0" * 20  # error 0
    done = L.NLMSGHDR.pack(L.NLMSGHDR.size + 4, L.NLMSG_DONE, 0, 1, 0) + b"\0" * 4
    short = L.NLMSGHDR.pack(L.NLMSGHDR.size + 4, L.RTM_NEWLINK, 0, 0, 0) + b"\0" * 4
    up = message(L.RTM_NEWLINK, 7, UP, "cap0")
    assert link.parse(ack + done + short + up) == [LinkState(7, "cap0", True)]
    # A message that claims more than the datagram holds, or less than its own header,
    # ends the datagram: what came before it stands.
    assert link.parse(up + up[:-1]) == [LinkState(7, "cap0", True)]
    bogus = L.NLMSGHDR.pack(4, L.RTM_NEWLINK, 0, 0, 0)
    assert link.parse(up + bogus + up) == [LinkState(7, "cap0", True)]
    assert link.parse(b"") == link.parse(up[:L.NLMSGHDR.size - 1]) == []


def test_parse_steps_over_unaligned_messages_and_attributes():
    """Messages and attributes start 4-byte aligned whatever the length before them says;
    the name is read up to its NUL."""
    qdisc, name = b"noop\0", b"cap0\0"  # rta_len 9: the next one starts 3 bytes later
    attrs = (L.RTATTR.pack(4 + len(qdisc), 6) + qdisc + b"\0" * 3  # IFLA_QDISC
             + L.RTATTR.pack(4 + len(name), L.IFLA_IFNAME) + name)
    body = L.IFINFOMSG.pack(socket.AF_UNSPEC, 1, 7, UP, 0) + attrs
    unaligned = L.NLMSGHDR.pack(L.NLMSGHDR.size + len(body), L.RTM_NEWLINK, 0, 0, 0) + body
    assert len(unaligned) % 4 == 1
    data = unaligned + b"\0" * 3 + message(L.RTM_DELLINK, 8, 0, "inj0")
    assert link.parse(data) == [LinkState(7, "cap0", True),
                                LinkState(8, "inj0", False, deleted=True)]


def test_parse_without_a_name_or_with_a_broken_attribute():
    assert link.parse(message(L.RTM_NEWLINK, 7, UP, None)) == [LinkState(7, "", True)]
    name = L.RTATTR.pack(9, L.IFLA_IFNAME) + b"cap0\0" + b"\0" * 3
    for broken in (L.RTATTR.pack(2, 6), L.RTATTR.pack(0, 6)):  # rta_len under 4
        body = L.IFINFOMSG.pack(socket.AF_UNSPEC, 1, 7, UP, 0) + broken + name
        data = L.NLMSGHDR.pack(L.NLMSGHDR.size + len(body), L.RTM_NEWLINK, 0, 0, 0) + body
        # The attributes after a broken one cannot be trusted: no name (and no endless loop).
        assert link.parse(data) == [LinkState(7, "", True)]


def test_up_needs_both_flags():
    for flags, up in ((0, False), (L.IFF_UP, False), (L.IFF_LOWER_UP, False),
                      (L.IFF_UP | L.IFF_LOWER_UP, True), (L.IFF_UP | L.IFF_RUNNING, False)):
        assert link.parse(message(L.RTM_NEWLINK, 7, flags, "cap0"))[0].up is up, hex(flags)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_parse_never_fails_on_arbitrary_bytes(data):
    """A datagram is either parsed or, for an NLMSG_ERROR carrying an error, an OSError."""
    try:
        states = link.parse(data)
    except OSError:
        return
    assert all(isinstance(s, LinkState) for s in states)


def test_the_kernels_messages_for_a_delete_and_re_create_make_down_gone_returned_up():
    """What the kernel sends when a veth end is deleted and a new one of that name is made
    and set up (it takes a link down before deleting it, and repeats states), as bytes."""
    datagrams = [
        message(L.RTM_NEWLINK, 7, L.IFF_UP, "cap0"),  # carrier lost: down
        message(L.RTM_NEWLINK, 7, 0, "cap0") + message(L.RTM_DELLINK, 7, 0, "cap0"),
        message(L.RTM_DELLINK, 8, 0, "inj0"),  # the peer: another interface
        message(L.RTM_NEWLINK, 9, 0, "cap0"),  # created, down: returned
        message(L.RTM_NEWLINK, 9, L.IFF_UP, "cap0"),  # set up, no carrier yet
        message(L.RTM_NEWLINK, 9, UP, "cap0") + message(L.RTM_NEWLINK, 9, UP, "cap0"),
    ]
    watch = LinkWatch("cap0", 7, True)
    events = [watch.apply(s) for d in datagrams for s in link.parse(d)]
    assert [e for e in events if e] == ["down", "gone", "returned", "up"]
    assert (watch.ifindex, watch.up) == (9, True)


def test_fast_flaps_each_counted_once_from_their_messages():
    """30 down/up cycles, each change notified twice as the kernel does for a veth."""
    cycle = (message(L.RTM_NEWLINK, 7, L.IFF_UP, "cap0") * 2
             + message(L.RTM_NEWLINK, 7, UP, "cap0") * 2)
    watch = LinkWatch("cap0", 7, True)
    for state in link.parse(cycle * 30):
        watch.apply(state)
    assert watch.counts == {"down": 30, "up": 30, "gone": 0, "returned": 0}


class FakeNetlink:
    """What LinkMonitor.read() receives: datagrams, and errors raised in their place."""

    def __init__(self, items: list) -> None:
        self.items = list(items)

    def recv(self, size: int) -> bytes:
        if not self.items:
            raise BlockingIOError(errno.EAGAIN, "empty")
        item = self.items.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        pass


@pytest.fixture
def monitor():
    mon = link.LinkMonitor()  # a real socket (no privilege needed), replaced by the fake
    mon.sock.close()
    yield mon
    mon.close()


DOWN7, UP7 = message(L.RTM_NEWLINK, 7, 0, "cap0"), message(L.RTM_NEWLINK, 7, UP, "cap0")
ENOBUFS = OSError(errno.ENOBUFS, "No buffer space available")


def test_read_returns_every_queued_notification_in_order(monitor):
    monitor.sock = FakeNetlink([DOWN7, UP7 + DOWN7, UP7])
    assert monitor.read() == ([LinkState(7, "cap0", False), LinkState(7, "cap0", True),
                               LinkState(7, "cap0", False), LinkState(7, "cap0", True)],
                              False)
    assert monitor.read() == ([], False)


def test_read_asks_for_a_resync_once_the_queue_after_a_loss_is_drained(monitor):
    """ENOBUFS: notifications were lost. The ones queued after it are still read, and the
    state is to be read again only then (it could be older than one still queued), once."""
    monitor.sock = FakeNetlink([DOWN7, ENOBUFS, UP7])
    assert monitor.read() == ([LinkState(7, "cap0", False), LinkState(7, "cap0", True)], True)
    assert monitor.read() == ([], False)


def test_read_is_bounded_and_a_loss_carries_over(monitor, monkeypatch):
    """A storm cannot hold the supervisor's loop: at most MAX_READS datagrams a call; a
    loss seen in one call is reported by the call that drains the queue."""
    monkeypatch.setattr(link, "MAX_READS", 3)
    monitor.sock = FakeNetlink([DOWN7, ENOBUFS, UP7, DOWN7, UP7])
    states, resync = monitor.read()
    assert (len(states), resync) == (2, False)  # DOWN7, the loss, UP7: three reads
    assert monitor.read() == ([LinkState(7, "cap0", False), LinkState(7, "cap0", True)], True)


def test_read_raises_any_other_error(monitor):
    monitor.sock = FakeNetlink([OSError(errno.EBADF, "Bad file descriptor")])
    with pytest.raises(OSError) as info:
        monitor.read()
    assert info.value.errno == errno.EBADF
