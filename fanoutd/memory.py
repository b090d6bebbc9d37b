"""Allocator settings for the workers, which make a batch for every ring block.

Not for the proxy: it passes on the buffers libzmq received without copying them, so it
gains nothing from them, while M_TRIM_THRESHOLD below lets the heap keep up to 256 MiB it
has freed (the proxy sat at 288 MB after its queues had once been full)."""

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
