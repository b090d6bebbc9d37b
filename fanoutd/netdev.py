"""What the kernel says of a network device, through ioctls on a socket (they answer for
the caller's network namespace) and sysfs: MTU, flags, link speed, the legacy ethtool
commands and the hardware timestamping the driver offers. Read only; nothing is set."""

from __future__ import annotations

import ctypes
import fcntl
import socket
import struct
from pathlib import Path

from fanoutd import _linux

IFNAMSIZ = 16
IFREQ_SIZE = 40  # struct ifreq on 64-bit Linux


def ifreq(ifname: str, request: int, payload: bytes = b"") -> bytes:
    """One SIOC* ioctl with a struct ifreq for ifname; OSError when the kernel refuses."""
    buf = ifname.encode()[:IFNAMSIZ - 1].ljust(IFNAMSIZ, b"\0") + payload
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        return fcntl.ioctl(s, request, buf.ljust(IFREQ_SIZE, b"\0"))


def mtu(ifname: str) -> int:
    """The interface's MTU (SIOCGIFMTU)."""
    return struct.unpack_from("i", ifreq(ifname, _linux.SIOCGIFMTU), IFNAMSIZ)[0]


def flags(ifname: str) -> int:
    """The interface's IFF_* flags (SIOCGIFFLAGS)."""
    return struct.unpack_from("H", ifreq(ifname, _linux.SIOCGIFFLAGS), IFNAMSIZ)[0]


def speed_mbps(ifname: str) -> int | None:
    """Link speed from sysfs (right under `ip netns exec`, which remounts /sys); None when
    the driver reports none."""
    try:
        with open(f"/sys/class/net/{ifname}/speed") as f:
            speed = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return speed if speed > 0 else None


def ethtool_value(ifname: str, cmd: int) -> int | None:
    """One legacy SIOCETHTOOL command (struct ethtool_value {u32 cmd; u32 data}); None
    when the driver does not answer it."""
    value = ctypes.create_string_buffer(struct.pack("II", cmd, 0), 8)
    try:
        ifreq(ifname, _linux.SIOCETHTOOL, struct.pack("P", ctypes.addressof(value)))
    except OSError:
        return None
    return struct.unpack("II", value.raw)[1]


def flow_hash_is_free(ifname: str) -> bool:
    """Whether the kernel has each packet's flow hash before a capture socket asks for it:
    the NIC supplies one (receive-hashing on), or RPS, which hashes every packet, is on
    for one of its receive queues. Elsewhere (a veth, a NIC without hashing) asking for
    it (TP_FT_REQ_FILL_RXHASH) makes the kernel dissect each packet: docs/performance.md
    measures that cost. PACKET_FANOUT_HASH does not count: it takes a symmetric hash of
    its own, which the socket's skb_get_hash() cannot reuse."""
    flags = ethtool_value(ifname, _linux.ETHTOOL_GFLAGS)
    if flags is not None and flags & _linux.ETH_FLAG_RXHASH:
        return True
    try:
        queues = list(Path(f"/sys/class/net/{ifname}/queues").glob("rx-*"))
        return any(int((q / "rps_cpus").read_text().replace(",", "").strip() or "0", 16)
                   for q in queues)
    except (OSError, ValueError):
        return False


def hardware_rx_timestamps(ifname: str) -> bool:
    """Whether the interface's driver can timestamp received packets in hardware
    (ETHTOOL_GET_TS_INFO: SOF_TIMESTAMPING_RAW_HARDWARE and an rx filter)."""
    info = bytearray(_linux.ETHTOOL_TS_INFO.size)
    _linux.ETHTOOL_TS_INFO.pack_into(info, 0, _linux.ETHTOOL_GET_TS_INFO, 0, -1, 0, 0)
    buf = ctypes.create_string_buffer(bytes(info))
    try:
        ifreq(ifname, _linux.SIOCETHTOOL, struct.pack("P", ctypes.addressof(buf)))
    except OSError:
        return False
    _, so_timestamping, _, _, rx_filters = _linux.ETHTOOL_TS_INFO.unpack_from(buf.raw)
    return bool(so_timestamping & _linux.SOF_TIMESTAMPING_RAW_HARDWARE and rx_filters)
