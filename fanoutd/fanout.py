"""PACKET_FANOUT: modes, flags, and joining every slot socket to one group.

The kernel spreads an interface's packets over the sockets of a group by the mode: hash
(symmetric flow hash, so both directions of a flow meet in one worker), lb (round robin),
cpu (the CPU the packet arrived on), rnd (random), qm (the NIC's recorded queue), rollover
(fill one socket, then the next). Flags: defrag reassembles IP fragments before hashing so a
fragmented datagram lands in one worker; rollover moves packets to another socket when the
chosen one's ring is full.
"""

import errno
import socket
import struct

from fanoutd import _linux

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
    the others join that id.
    """
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


def _explain(e: OSError, mode: str, flags: tuple[str, ...], group_id: int | None) -> str:
    what = f"fanout group {group_id}" if group_id is not None else "a new fanout group"
    if e.errno == errno.EINVAL and group_id is not None:
        return (f"cannot join {what} (mode {mode}, flags {','.join(flags) or 'none'}): "
                f"that id is in use on this interface with another mode or flags; "
                f"choose another fanout.group_id or use auto")
    if e.errno == errno.ENOSPC:
        return f"cannot join {what}: the group is full (the kernel allows at most 256 members)"
    return f"cannot join {what} (mode {mode}): {e.strerror}"
