"""Classic BPF socket filters: attaching a program to a capture socket.

SO_ATTACH_FILTER takes a struct sock_fprog { unsigned short len; struct sock_filter *filter; }
whose instructions are struct sock_filter { u16 code; u8 jt; u8 jf; u32 k; }.
"""

import ctypes
import ctypes.util
import socket

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
BPF_RET_K = 0x06  # BPF_RET | BPF_K: return the constant k (bytes to keep; 0 drops)

Instruction = tuple[int, int, int, int]  # (code, jt, jf, k)

DROP_ALL: list[Instruction] = [(BPF_RET_K, 0, 0, 0)]


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def attach(sock: socket.socket, program: list[Instruction]) -> None:
    """Attach a classic BPF program; the kernel copies it, so nothing needs to outlive
    the call."""
    instructions = (_SockFilter * len(program))(*program)
    fprog = _SockFprog(len(program), instructions)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                    ctypes.string_at(ctypes.addressof(fprog), ctypes.sizeof(fprog)))


def detach(sock: socket.socket) -> None:
    """Remove the socket's filter: it receives every packet again."""
    sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)


class FilterError(Exception):
    """The expression does not compile; the message is libpcap's."""


DLT_EN10MB = 1
PCAP_NETMASK_UNKNOWN = 0xFFFFFFFF
SNAPLEN = 262144  # libpcap's default: keep whole packets


class _BpfProgram(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.POINTER(_SockFilter))]


def _libpcap() -> ctypes.CDLL:
    name = ctypes.util.find_library("pcap") or "libpcap.so.0.8"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        raise FilterError("libpcap is not installed (Debian package libpcap0.8): it compiles "
                          "capture filters") from None
    lib.pcap_open_dead.restype = ctypes.c_void_p
    lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.pcap_compile.argtypes = [ctypes.c_void_p, ctypes.POINTER(_BpfProgram), ctypes.c_char_p,
                                 ctypes.c_int, ctypes.c_uint32]
    lib.pcap_geterr.restype = ctypes.c_char_p
    lib.pcap_geterr.argtypes = [ctypes.c_void_p]
    lib.pcap_freecode.argtypes = [ctypes.POINTER(_BpfProgram)]
    lib.pcap_close.argtypes = [ctypes.c_void_p]
    return lib


def compile_expression(expression: str) -> list[Instruction]:
    """tcpdump-syntax expression -> classic BPF, by libpcap's own compiler (optimised),
    for Ethernet frames as an AF_PACKET socket sees them.

    A VLAN tag the kernel moved into metadata is not in the packet the filter sees: write
    the filter for the inner packet (`udp port 53` matches tagged and untagged alike);
    `vlan` matches only tags still in the frame.
    """
    lib = _libpcap()
    handle = lib.pcap_open_dead(DLT_EN10MB, SNAPLEN)
    if not handle:
        raise FilterError("libpcap could not open a compiler handle")
    program = _BpfProgram()
    try:
        if lib.pcap_compile(handle, ctypes.byref(program), expression.encode(), 1,
                            PCAP_NETMASK_UNKNOWN) != 0:
            raise FilterError(lib.pcap_geterr(handle).decode(errors="replace"))
        try:
            return [(i.code, i.jt, i.jf, i.k) for i in program.bf_insns[:program.bf_len]]
        finally:
            lib.pcap_freecode(ctypes.byref(program))
    finally:
        lib.pcap_close(handle)
