"""Allocator settings for the workers, which make a batch for every ring block, and
giving freed memory back for the proxy.

keep_large_allocations is not for the proxy: it passes on the buffers libzmq received
without copying them, so it gains nothing from it, while M_TRIM_THRESHOLD below lets the
heap keep up to 256 MiB it has freed (the proxy sat at 288 MB after its queues had once
been full). The proxy calls release_freed_memory instead, once queues have emptied."""

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


def release_freed_memory() -> None:
    """malloc_trim(0): give the pages glibc holds free, in every arena, back to the
    system. A subscriber that stalled leaves a queue of batches in the proxy; once they
    are freed glibc keeps them (146 MiB after 16 such subscribers had left, in
    benchmarks/memory_bench.py) unless asked."""
    ctypes.CDLL(None).malloc_trim(0)
