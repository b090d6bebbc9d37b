"""link.py: rtnetlink messages read right, and each change counted once, also after lost
notifications."""

import errno
import socket

import pytest

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
