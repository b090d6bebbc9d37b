"""Watching the capture interface: down, up, gone, and back (deleted and re-created).

The kernel takes a packet socket off a link that goes down and puts it back, fanout
membership included, when the link comes up again: nothing to do but tell. A link that is
deleted detaches its sockets for good; when an interface of that name exists again (a new
ifindex), the supervisor opens new sockets for it. Checked with ioctls on a socket of the
daemon's own network namespace, each supervisor tick.
"""

import fcntl
import socket
import struct

from fanoutd._linux import IFF_RUNNING, IFF_UP, SIOCGIFFLAGS

EVENTS = ("down", "up", "gone", "returned")


def probe(name: str, sock: socket.socket) -> tuple[int | None, bool]:
    """(ifindex, up) of the interface called name now; ifindex None when there is none."""
    try:
        ifindex = socket.if_nametoindex(name)
        raw = fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, struct.pack("16sh", name.encode(), 0))
    except OSError:
        return None, False
    flags = struct.unpack_from("16sh", raw)[1]
    return ifindex, bool(flags & IFF_UP and flags & IFF_RUNNING)


class LinkWatch:
    """Turns successive probes into events, counted per kind."""

    def __init__(self, name: str, ifindex: int, up: bool) -> None:
        self.name = name
        self.ifindex: int | None = ifindex
        self.up = up
        self.counts = dict.fromkeys(EVENTS, 0)

    def check(self, sock: socket.socket) -> str | None:
        """Probe the interface; the event since the last check, if any."""
        ifindex, up = probe(self.name, sock)
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
