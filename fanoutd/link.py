"""Watching the capture interface: down, up, gone, and back (deleted and re-created).

The kernel takes a packet socket off a link that goes down and puts it back, fanout
membership included, when the link comes up again: nothing to do but tell. A link that is
deleted detaches its sockets for good; when an interface of that name exists again (a new
ifindex), the supervisor opens new sockets for it.

Changes come from the kernel itself: rtnetlink notifications (RTM_NEWLINK, RTM_DELLINK of
the RTMGRP_LINK group) on a socket the supervisor's loop reads, so a change is seen however
quickly the next one follows (polling the state missed most of a fast down/up series).
When the supervisor falls so far behind that the socket's queue overflows (ENOBUFS), the
notifications in between are lost: each watch then re-reads the interface's state
(RTM_GETLINK) and counts what differs from the state it knew, once, so nothing is counted
twice.
"""

import errno
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from fanoutd._linux import (
    IFF_LOWER_UP,
    IFF_UP,
    IFINFOMSG,
    IFLA_IFNAME,
    NETLINK_ROUTE,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    NLMSGERR_ERROR,
    NLMSGHDR,
    RTATTR,
    RTM_DELLINK,
    RTM_GETLINK,
    RTM_NEWLINK,
    RTMGRP_LINK,
    SO_RCVBUFFORCE,
)

EVENTS = ("down", "up", "gone", "returned")
# Room for the notifications that pile up while the loop is busy (a fork, a scrape): a
# down/up cycle of a veth sends about 6 of some 2 KiB each, for its two ends.
RCVBUF_BYTES = 4 << 20
RECV_BYTES = 1 << 16  # one notification is a few KiB
MAX_READS = 4096  # per read(): a storm of notifications cannot hold the loop
QUERY_TIMEOUT_S = 2.0  # the kernel answers RTM_GETLINK at once; never wait for ever


@dataclass(frozen=True)
class LinkState:
    """What one rtnetlink message says of an interface."""

    ifindex: int
    name: str
    up: bool  # administratively up, with carrier (IFF_UP and IFF_LOWER_UP)
    deleted: bool = False  # RTM_DELLINK: gone (or moved to another network namespace)


def _messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(nlmsg_type, payload) of each netlink message in one datagram."""
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            return
        yield kind, data[offset + NLMSGHDR.size:offset + length]
        offset += (length + 3) & ~3


def _attribute(payload: bytes, wanted: int) -> bytes | None:
    """The value of the rtattr `wanted` among those that follow a struct ifinfomsg."""
    offset = IFINFOMSG.size
    while offset + RTATTR.size <= len(payload):
        length, kind = RTATTR.unpack_from(payload, offset)
        if length < RTATTR.size:
            return None
        if kind == wanted:
            return payload[offset + RTATTR.size:offset + length]
        offset += (length + 3) & ~3
    return None


def parse(data: bytes) -> list[LinkState]:
    """The link messages of one datagram (anything else is skipped); an NLMSG_ERROR
    carrying an error raises it as OSError."""
    states = []
    for kind, payload in _messages(data):
        if kind == NLMSG_ERROR and len(payload) >= NLMSGERR_ERROR.size:
            error = -NLMSGERR_ERROR.unpack_from(payload)[0]
            if error:
                raise OSError(error, os.strerror(error))
        elif kind in (RTM_NEWLINK, RTM_DELLINK) and len(payload) >= IFINFOMSG.size:
            _family, _type, ifindex, flags, _change = IFINFOMSG.unpack_from(payload)
            name = (_attribute(payload, IFLA_IFNAME) or b"").split(b"\0", 1)[0]
            states.append(LinkState(ifindex, name.decode(errors="replace"),
                                    bool(flags & IFF_UP and flags & IFF_LOWER_UP),
                                    kind == RTM_DELLINK))
    return states


def query(name: str) -> LinkState | None:
    """The interface called name now (RTM_GETLINK), or None when there is none."""
    attr = name.encode() + b"\0"
    attr_len = RTATTR.size + len(attr)
    body = (IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + RTATTR.pack(attr_len, IFLA_IFNAME)
            + attr + b"\0" * (-attr_len % 4))
    request = NLMSGHDR.pack(NLMSGHDR.size + len(body), RTM_GETLINK, NLM_F_REQUEST, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       NETLINK_ROUTE) as sock:
        sock.settimeout(QUERY_TIMEOUT_S)
        sock.sendto(request, (0, 0))  # to the kernel
        try:
            states = parse(sock.recv(RECV_BYTES))
        except OSError as e:
            if e.errno == errno.ENODEV:
                return None
            raise
    return next((s for s in states if s.name == name), None)


class LinkMonitor:
    """The kernel's link notifications, on a non-blocking socket for the supervisor's
    loop (fileno() for poll)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK,
                                  socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                  NETLINK_ROUTE)
        try:  # beyond net.core.rmem_max needs CAP_NET_ADMIN; else as much as it allows
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF_BYTES)
        except PermissionError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
        self.sock.bind((0, RTMGRP_LINK))
        self._lost = False  # notifications were lost; resync once the queue is drained

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> tuple[list[LinkState], bool]:
        """The notifications queued, in order, and whether the watches must now re-read
        the state: some were lost, and every one queued after the loss has been read
        (a state read earlier could be older than a notification still queued)."""
        states: list[LinkState] = []
        for _ in range(MAX_READS):
            try:
                data = self.sock.recv(RECV_BYTES)
            except BlockingIOError:
                resync, self._lost = self._lost, False
                return states, resync
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                self._lost = True
                continue
            states += parse(data)
        return states, False  # more to read: the next turn of the loop goes on

    def close(self) -> None:
        self.sock.close()


class LinkWatch:
    """One interface's state as the notifications tell it; each change counted by kind."""

    def __init__(self, name: str, ifindex: int | None, up: bool) -> None:
        self.name = name
        self.ifindex = ifindex  # None while no interface has that name
        self.up = up
        self.counts = dict.fromkeys(EVENTS, 0)

    def apply(self, state: LinkState) -> str | None:
        """Take one notification; the event it makes, if any."""
        if state.name == self.name and not state.deleted:
            return self._become(state.ifindex, state.up)
        if state.ifindex == self.ifindex:  # deleted, moved away or renamed
            return self._become(None, False)
        return None

    def resync(self, state: LinkState | None) -> str | None:
        """After lost notifications: the state now (query()), as one event at most."""
        if state is None:
            return self._become(None, False)
        return self._become(state.ifindex, state.up)

    def _become(self, ifindex: int | None, up: bool) -> str | None:
        event = None
        if ifindex is None:
            if self.ifindex is not None:
                event = "gone"
        elif ifindex != self.ifindex:
            event = "returned"  # the sockets must be opened again, on the new ifindex
        elif up != self.up:
            event = "up" if up else "down"
        self.ifindex, self.up = ifindex, up
        if event:
            self.counts[event] += 1
        return event
