"""PACKET_FANOUT: modes, flags, and joining every slot socket to one group.

The kernel spreads an interface's packets over the sockets of a group by the mode: hash
(symmetric flow hash, so both directions of a flow meet in one worker), lb (round robin),
cpu (the CPU the packet arrived on), rnd (random), qm (the NIC's recorded queue), rollover
(fill one socket, then the next). Flags: defrag reassembles IP fragments before hashing so a
fragmented datagram lands in one worker; rollover moves packets to another socket when the
chosen one's ring is full.
"""

import contextlib
import errno
import socket
import struct
from collections.abc import Iterator

from fanoutd import _linux, filter

MODES = {
    "hash": _linux.PACKET_FANOUT_HASH,
    "lb": _linux.PACKET_FANOUT_LB,
    "cpu": _linux.PACKET_FANOUT_CPU,
    "rollover": _linux.PACKET_FANOUT_ROLLOVER,
    "rnd": _linux.PACKET_FANOUT_RND,
    "qm": _linux.PACKET_FANOUT_QM,
}
FLAGS = {
    "defrag": _linux.PACKET_FANOUT_FLAG_DEFRAG,
    "rollover": _linux.PACKET_FANOUT_FLAG_ROLLOVER,
    "ignore-outgoing": _linux.PACKET_FANOUT_FLAG_IGNORE_OUTGOING,
}
MAX_GROUP_ID = 0xFFFF
MAX_MEMBERS = 256  # PACKET_FANOUT_MAX: sockets in one group


class FanoutError(Exception):
    """Joining the fanout group failed; the message says why."""


def type_word(mode: str, flags: tuple[str, ...]) -> int:
    word = MODES[mode]
    for flag in flags:
        word |= FLAGS[flag]
    return word


def join_group(socks: list[socket.socket], mode: str, flags: tuple[str, ...],
               group_id: int | None) -> int:
    """Join every socket to one fanout group and return its id.

    With group_id None the first socket asks the kernel for an unused id
    (PACKET_FANOUT_FLAG_UNIQUEID), so two daemons on one interface never share a group;
    the others join that id. An explicit group_id must not be in use yet (check_unused).
    """
    if group_id is not None and socks:
        check_unused(socks[0].getsockname()[0], group_id)
    word = type_word(mode, flags)
    for i, sock in enumerate(socks):
        if group_id is None:
            arg = (word | _linux.PACKET_FANOUT_FLAG_UNIQUEID) << 16
        else:
            arg = group_id | (word << 16)
        try:
            # As bytes: with the defrag flag the word no longer fits a signed int.
            sock.setsockopt(_linux.SOL_PACKET, _linux.PACKET_FANOUT, struct.pack("=I", arg))
        except OSError as e:
            raise FanoutError(_explain(e, mode, flags, group_id)) from None
        if i == 0 and group_id is None:
            group_id = sock.getsockopt(_linux.SOL_PACKET, _linux.PACKET_FANOUT) & MAX_GROUP_ID
    assert group_id is not None
    return group_id


def check_unused(ifname: str, group_id: int) -> None:
    """Raise FanoutError if fanout group group_id exists already.

    Joining an existing group with the same mode and flags just works, and its members
    then share the traffic: a second daemon given the same id would silently see part of
    it, and so would the first. So a throw-away socket that receives nothing (drop-all
    filter before bind) joins group_id asking for a group of at most one member
    (struct fanout_args, Linux 5.12): the kernel refuses that for any existing group,
    EINVAL when the group was made for more members (or another mode or flags), ENOSPC
    when its one place is taken, and never adds the probe to someone's group. Accepted,
    there was no such group: the probe made one, gone as it closes. Group ids are per
    network namespace, so the holder may capture on another interface.
    """
    if _probe(ifname, group_id, 0) is None:
        return
    if _probe(ifname, 0, _linux.PACKET_FANOUT_FLAG_UNIQUEID) is not None:
        return  # not even a new group with fanout_args: a kernel too old to tell
    raise FanoutError(f"fanout group {group_id} is in use already (another capture joined "
                      f"it, on {ifname} or another interface); sharing it, each would see "
                      f"only part of {ifname}'s traffic: choose another fanout.group_id or "
                      f"use auto")


@contextlib.contextmanager
def silent_socket(ifname: str) -> Iterator[socket.socket]:
    """An AF_PACKET socket bound to ifname that receives nothing (the drop-all filter is
    attached before bind() starts delivery), for probing the kernel's fanout: joining
    needs a bound socket. Closed on leaving, and with it any group it made."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        filter.attach(sock, filter.DROP_ALL)
        sock.bind((ifname, _linux.ETH_P_ALL))
        yield sock
    finally:
        sock.close()


def _probe(ifname: str, group_id: int, flags: int) -> OSError | None:
    """Join group_id (mode hash, at most one member) with a socket that receives
    nothing, then close it: None if the kernel accepted it, else its error."""
    with silent_socket(ifname) as probe:
        args = struct.pack("=HHI", group_id, _linux.PACKET_FANOUT_HASH | flags, 1)
        try:
            probe.setsockopt(_linux.SOL_PACKET, _linux.PACKET_FANOUT, args)
        except OSError as e:
            return e
    return None


def try_new_group(ifname: str, word: int) -> OSError | None:
    """Make a new fanout group of type `word` (mode | flags) with a silent socket: None
    when the kernel accepts it, else its error (PermissionError without CAP_NET_RAW).
    The kernel picks an unused id (PACKET_FANOUT_FLAG_UNIQUEID), so no existing group
    is ever joined."""
    try:
        with silent_socket(ifname) as sock:
            arg = (word | _linux.PACKET_FANOUT_FLAG_UNIQUEID) << 16
            sock.setsockopt(_linux.SOL_PACKET, _linux.PACKET_FANOUT, struct.pack("=I", arg))
    except PermissionError:
        raise
    except OSError as e:
        return e
    return None


def _explain(e: OSError, mode: str, flags: tuple[str, ...], group_id: int | None) -> str:
    what = f"fanout group {group_id}" if group_id is not None else "a new fanout group"
    if e.errno == errno.EINVAL and group_id is not None:
        return (f"cannot join {what} (mode {mode}, flags {','.join(flags) or 'none'}): "
                f"that id is in use with another mode or flags, or on another interface; "
                f"choose another fanout.group_id or use auto")
    if e.errno == errno.ENOSPC:
        return f"cannot join {what}: the group is full (the kernel allows at most 256 members)"
    return f"cannot join {what} (mode {mode}): {e.strerror}"
