"""Allocator settings for the processes batches pass through (workers and the proxy)."""

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt() parameters


def keep_large_allocations() -> None:
    """Have glibc serve and keep large allocations from the heap.

    Each batch is a few hundred kilobytes, allocated and freed (by us, then by ZeroMQ's
    copy of it) for every ring block. Above glibc's default mmap threshold each would be
    a fresh mapping whose pages fault and are zeroed again: the profile showed that
    costing more than decoding the block.
    """
    libc = ctypes.CDLL(None)
    libc.mallopt(M_MMAP_THRESHOLD, 64 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)
