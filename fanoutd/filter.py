"""Classic BPF socket filters: attaching a program to a capture socket.

SO_ATTACH_FILTER takes a struct sock_fprog { unsigned short len; struct sock_filter *filter; }
whose instructions are struct sock_filter { u16 code; u8 jt; u8 jf; u32 k; }.
"""

import ctypes
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
