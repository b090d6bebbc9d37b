"""Dropping privileges in a child once it holds what it needs (a mapped ring, bound or
connected sockets): it then parses hostile input, or talks to the network, as an
unprivileged user with no capabilities and no way to gain any."""

import ctypes
import errno
import os
import pwd
import signal

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class PrivilegeError(Exception):
    pass


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg: int, arg3: int = 0) -> int:
    return _libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(arg3), 0, 0)


def die_with_parent() -> None:
    """Have the kernel send SIGTERM when the parent dies (cleared by a credential change,
    so call it again after drop())."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def resolve_user(name: str) -> tuple[int, int]:
    """(uid, gid) of a user name; PrivilegeError naming it if there is no such user."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise PrivilegeError(f"no such user {name!r}") from None
    return entry.pw_uid, entry.pw_gid


def drop(user: str | None) -> None:
    """Become `user` (when running as root and a user is given), then give up every
    capability, including the bounding set and the ambient set, and set no_new_privs.

    From uid 0, setuid() to another uid already clears the permitted and effective sets;
    the explicit capset covers a supervisor that runs as a non-root user with ambient
    capabilities (e.g. AmbientCapabilities=CAP_NET_RAW).
    """
    last_cap = _last_cap()
    for cap in range(last_cap + 1):  # needs CAP_SETPCAP: best effort, so before setuid
        if _prctl(PR_CAPBSET_DROP, cap) != 0 and ctypes.get_errno() not in (errno.EPERM,
                                                                           errno.EINVAL):
            raise PrivilegeError(f"cannot drop capability {cap} from the bounding set")
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    if user and os.geteuid() == 0:
        uid, gid = resolve_user(user)
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise PrivilegeError(f"cannot clear capabilities: {os.strerror(ctypes.get_errno())}")
    if _prctl(PR_SET_NO_NEW_PRIVS, 1) != 0:
        raise PrivilegeError(f"cannot set no_new_privs: {os.strerror(ctypes.get_errno())}")
    die_with_parent()


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40
