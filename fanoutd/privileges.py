"""Dropping privileges in the supervisor's children. lock_down() right after the fork
takes away every way to gain privilege; become() takes the rest once the child holds what
it needs (a mapped ring, bound or connected sockets): from then on it parses hostile input,
or talks to the network, as an unprivileged user with no capabilities.

Also the signals a child handles itself (CHILD_SIGNALS): blocked across the fork, until
the child has installed its handlers (handlers_installed())."""

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
CAP_KILL = 5


# Signals a child handles (or ignores) itself. The supervisor blocks them across fork()
# and the child unblocks them once its handlers are in place: until then their default
# action, death, would take a SIGUSR1 (drain) or SIGTERM sent the instant it exists.
CHILD_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1})


def handlers_installed() -> None:
    """In a child, once its handlers for CHILD_SIGNALS are set: let those signals in (one
    sent meanwhile is delivered now)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, CHILD_SIGNALS)


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
    """Have the kernel send SIGKILL when the parent dies (cleared by a credential change,
    so call it again after become()).

    SIGKILL, not SIGTERM: a stopped child (SIGSTOP) acts on no other signal, and would
    stay, stopped, holding its capture socket. A child whose supervisor is gone has
    nobody to report to anyway: its ring goes with the supervisor's socket."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def resolve_user(name: str) -> tuple[int, int]:
    """(uid, gid) of a user name; PrivilegeError naming it if there is no such user."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise PrivilegeError(f"no such user {name!r}") from None
    return entry.pw_uid, entry.pw_gid


def lock_down() -> None:
    """First thing in a forked child, before it starts any thread (ZeroMQ's I/O threads):
    no_new_privs, an empty capability bounding set, no ambient capabilities. These are
    per-thread attributes that threads inherit, so setting them before any thread exists
    covers the whole process. As root, the effective capabilities stay until become()
    (setuid() needs them, and then clears them in every thread); not root, every
    capability goes here: such a child switches to no other user, needs no capability
    for what it still does (map its ring, connect to or bind ZeroMQ sockets of its own
    user), and a capset() after ZeroMQ has started its threads would miss them."""
    if _prctl(PR_SET_NO_NEW_PRIVS, 1) != 0:
        raise PrivilegeError(f"cannot set no_new_privs: {os.strerror(ctypes.get_errno())}")
    for cap in range(_last_cap() + 1):  # needs CAP_SETPCAP; without it, best effort
        if _prctl(PR_CAPBSET_DROP, cap) != 0 and ctypes.get_errno() not in (errno.EPERM,
                                                                           errno.EINVAL):
            raise PrivilegeError(f"cannot drop capability {cap} from the bounding set")
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    # The inheritable set too (a unit's AmbientCapabilities= puts CAP_NET_RAW there):
    # setuid() later clears permitted and effective in every thread, but not this, and a
    # capset() then reaches only the thread that calls it.
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        raise PrivilegeError(f"cannot read capabilities: {os.strerror(ctypes.get_errno())}")
    keep = os.geteuid() == 0
    for half in data:
        half.inheritable = 0
        if not keep:
            half.permitted = half.effective = 0
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise PrivilegeError(f"cannot clear capabilities: {os.strerror(ctypes.get_errno())}")


def become(user: str | None) -> None:
    """Once the child holds what it needs: become `user` (when running as root and a user
    is given) and give up every capability.

    glibc applies setuid() to every thread, and from uid 0 to another uid the kernel then
    clears each thread's permitted and effective capabilities. Not root, lock_down()
    cleared them before any thread existed (see switch_problem); the capset here is a
    second guard for the calling thread.
    """
    if user and os.geteuid() == 0:
        uid, gid = resolve_user(user)
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise PrivilegeError(f"cannot clear capabilities: {os.strerror(ctypes.get_errno())}")
    die_with_parent()  # the credential change cleared it


def signalling_problem(user: str | None) -> str | None:
    """Why the supervisor could not signal children that run as `user`, or None.

    Children drop from root to `user`; the kernel then lets root signal them only with
    CAP_KILL (a sandbox's bounding set may lack it). Without it the supervisor could
    neither stop nor replace its workers, nor would their death signal reach them.
    """
    if not user or os.geteuid() != 0:
        return None  # the children keep the supervisor's uid
    try:
        if resolve_user(user)[0] == 0:
            return None
    except PrivilegeError:
        return None  # the configuration check reports an unknown user
    if has_capability(CAP_KILL):
        return None
    return (f"user: the workers and the proxy would run as {user!r}, but fanoutd lacks "
            f"CAP_KILL, so it could not stop or replace them; grant CAP_KILL (the units "
            f"in deploy/systemd do) or set user: none")


def switch_problem(user: str | None) -> str | None:
    """Why the children could not become `user`, or None.

    Only root switches them to another user (setuid() from uid 0 clears every thread's
    capabilities). A supervisor started as another user (with ambient capabilities, say)
    keeps its own uid for them: `user` must then be that user, or none.
    """
    euid = os.geteuid()
    if not user or euid == 0:
        return None
    try:
        if resolve_user(user)[0] == euid:
            return None
    except PrivilegeError:
        return None  # the configuration check reports an unknown user
    try:
        me = pwd.getpwuid(euid).pw_name
    except KeyError:
        me = f"uid {euid}"
    return (f"user: fanoutd runs as {me}, not root, so its workers and the proxy cannot "
            f"become {user!r}; run it as root (the units in deploy/systemd do) or set "
            f"user: none (they stay {me}, with no capability)")


def has_capability(cap: int) -> bool:
    """Whether this process has capability `cap` in its effective set."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40
