"""The workers' outboxes (outbox.py) without a daemon: a real Proxy, this process as the
worker of ring 3, a real subscriber on the public endpoint. What the proxy takes, what it
refuses and counts, and how a batch travels: in order, acknowledged, its slot reused; and
the socket buffer towards a local subscriber."""

import fcntl
import mmap
import os
import socket

import pytest
import zmq

from fanoutd import outbox
from fanoutd.config import CurveConfig
from fanoutd.outbox import HEADER_BYTES, SLOT_HEAD, TAKEN, WRITTEN, Outbox
from fanoutd.publish import Proxy, ProxyPlan
from fanoutd.slotstats import ProxyStats, RingTable
from fanoutd.wire import max_batch_bytes

RING = 3
TOPIC = b"pkt.eth0.1"
BLOCK = 65536


@pytest.fixture
def rings():
    table = RingTable(8)
    table.assign(RING, TOPIC)
    table.pid[RING] = os.getpid()
    return table


@pytest.fixture
def stats():
    s = ProxyStats()
    s["block_size"] = BLOCK
    return s


@pytest.fixture
def proxy(tmp_path, rings, stats):
    plan = ProxyPlan(f"{tmp_path}/w.sock", f"ipc://{tmp_path}/p.ipc", 16, 1 << 20, 4, 4,
                     1.0, 1.0, None, CurveConfig())
    ctx = zmq.Context()
    p = Proxy(ctx, plan, rings, stats, ["eth0"])
    assert stats["forwarding"] == 1  # no subscribers to wait for
    yield p
    p.close()
    ctx.destroy(linger=0)


@pytest.fixture
def subscriber(proxy):
    sock = proxy.xpub.context.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"pkt.")
    sock.connect(proxy.plan.frontend)
    for _ in range(100):  # until the proxy has applied the subscription
        proxy.run_once(10)
        if proxy.subscribers.subscribed:
            break
    assert proxy.subscribers.subscribed == 1
    yield sock
    sock.close(linger=0)


def run_until(proxy: Proxy, condition, rounds: int = 100):
    for _ in range(rounds):
        proxy.run_once(10)
        if condition():
            return
    raise AssertionError("the proxy did not get there")


def rejected(stats: ProxyStats) -> dict[str, int]:
    return {r: stats[f"rejected:{r}"] for r in ("malformed", "sender", "topic")}


def connect(proxy: Proxy, box: Outbox, ring: int = RING, topic: bytes = TOPIC):
    return outbox.connect(proxy.plan.backend, box, ring, topic)


def taken_outbox(proxy: Proxy, slots: int = outbox.SLOTS) -> tuple[Outbox, socket.socket]:
    """Ring RING's worker's outbox, handed over and taken in by the proxy."""
    box = Outbox(BLOCK, slots=slots)
    conn = connect(proxy, box)
    run_until(proxy, lambda: proxy.inboxes)
    return box, conn


def test_a_batch_goes_to_the_subscriber_and_is_acknowledged(proxy, rings, subscriber):
    box, conn = taken_outbox(proxy)
    for seq in (41, 42, 43):
        assert box.put(seq, b"body %d" % seq)
    run_until(proxy, lambda: rings.forwarded[RING] == 43)
    got = [subscriber.recv_multipart() for _ in range(3)]
    assert got == [[TOPIC, b"body 41"], [TOPIC, b"body 42"], [TOPIC, b"body 43"]]
    conn.close()
    box.close()


def test_one_signal_wakes_the_proxy_for_every_batch_written_before_it(proxy, rings,
                                                                     subscriber):
    """A worker writes the batches of every ready block, then signals once: the eventfd
    counts one wake-up, a signal with nothing new adds none, and the proxy, woken once,
    passes them all on in order."""
    box, conn = taken_outbox(proxy, slots=4)
    for seq in (11, 12, 13):
        assert box.put(seq, b"body %d" % (seq - 10), signal=False)
    with pytest.raises(BlockingIOError):  # nothing woke the proxy yet
        os.eventfd_read(box.eventfd)
    box.signal()
    box.signal()
    assert os.eventfd_read(box.eventfd) == 1
    os.eventfd_write(box.eventfd, 1)  # the proxy's wake-up, read back above
    run_until(proxy, lambda: rings.forwarded[RING] == 13)
    got = [subscriber.recv_multipart() for _ in range(3)]
    assert got == [[TOPIC, b"body 1"], [TOPIC, b"body 2"], [TOPIC, b"body 3"]]
    conn.close()
    box.close()


def test_a_full_outbox_refuses_until_the_proxy_takes_a_batch(proxy, rings):
    box, conn = taken_outbox(proxy, slots=2)
    proxy._take_in(False)  # as while the proxy waits for its subscribers
    assert box.put(1, b"a") and box.put(2, b"b")
    assert not box.put(3, b"c")  # both slots are the proxy's
    proxy._take_in(True)
    run_until(proxy, lambda: rings.forwarded[RING] == 2)
    assert box.put(3, b"c")  # the slots are free again, and reused
    run_until(proxy, lambda: rings.forwarded[RING] == 3)
    conn.close()
    box.close()


def test_what_a_worker_wrote_before_its_connection_ended_is_taken(proxy, rings):
    box, conn = taken_outbox(proxy)
    proxy._take_in(False)
    assert box.put(7, b"last")
    conn.close()
    box.close()  # the proxy's mapping keeps the memory
    run_until(proxy, lambda: not proxy.connections)
    assert len(proxy.inboxes) == 1
    proxy._take_in(True)
    run_until(proxy, lambda: rings.forwarded[RING] == 7)
    run_until(proxy, lambda: not proxy.inboxes)  # taken, then let go


def test_a_replaced_workers_leftovers_are_not_passed_on(proxy, rings):
    """Its successor publishes again what the ring held: the proxy drops them."""
    box, conn = taken_outbox(proxy)
    proxy._take_in(False)
    assert box.put(9, b"old")
    rings.pid[RING] = os.getpid() + 1  # the supervisor named another worker
    proxy._take_in(True)
    run_until(proxy, lambda: not proxy.inboxes)
    assert rings.forwarded[RING] == 0
    conn.close()  # the replaced worker goes only now
    run_until(proxy, lambda: not proxy.connections)
    box.close()


@pytest.mark.parametrize(("ring", "topic", "pid_offset", "reason"), [
    (RING, b"pkt.eth0.2", 0, "topic"),
    (4, TOPIC, 0, "malformed"),  # no ring 4 in use
    (RING, TOPIC, 1, "sender"),  # ring 3's worker is another process
])
def test_an_outbox_is_taken_only_from_the_rings_worker_on_its_topic(
        proxy, rings, stats, ring, topic, pid_offset, reason):
    rings.pid[RING] = os.getpid() + pid_offset
    box = Outbox(BLOCK)
    conn = connect(proxy, box, ring, topic)
    run_until(proxy, lambda: stats[f"rejected:{reason}"] == 1)
    assert not proxy.inboxes and not proxy.connections
    assert conn.recv(1) == b""  # the proxy closed the connection: the worker sees it
    conn.close()
    box.close()


def hello_with(proxy: Proxy, fds: list[int], slots: int = 8,
               size: int = outbox.slot_bytes(BLOCK)) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(proxy.plan.backend)
    hello = outbox.HELLO.pack(outbox.MAGIC, RING, slots, size) + TOPIC
    socket.send_fds(sock, [hello], fds)
    return sock


def memfd(size: int, seal: bool = True) -> int:
    fd = os.memfd_create("test", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


@pytest.mark.parametrize("case", ["unsealed", "smaller", "pipe", "one fd", "short hello"])
def test_a_hostile_outbox_is_refused(proxy, stats, case):
    """What could make the proxy read past a mapping (SIGBUS), block on a descriptor, or
    misread the hello."""
    size = HEADER_BYTES + 8 * outbox.slot_bytes(BLOCK)
    event = os.eventfd(0)
    read_end, write_end = os.pipe()
    fds = {"unsealed": [memfd(size, seal=False), event],
           "smaller": [memfd(size - mmap.PAGESIZE), event],
           "pipe": [memfd(size), read_end],
           "one fd": [memfd(size)],
           "short hello": [memfd(size), event]}[case]
    if case == "short hello":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(proxy.plan.backend)
        socket.send_fds(sock, [b"FOB1"], fds)
    else:
        sock = hello_with(proxy, fds)
    run_until(proxy, lambda: stats["rejected:malformed"] == 1)
    assert not proxy.inboxes and not proxy.connections
    sock.close()
    for fd in {*fds, event, read_end, write_end}:
        os.close(fd)


def test_a_malformed_batch_is_counted_and_skipped(proxy, rings, stats, subscriber):
    box, conn = taken_outbox(proxy)
    proxy._take_in(False)
    # A slot whose length runs past it, then a good batch.
    SLOT_HEAD.pack_into(box.map, HEADER_BYTES, box.slot_bytes, 5)
    box.written = 1
    outbox.store_release(box.map, WRITTEN, 1)
    assert box.put(6, b"good")
    proxy._take_in(True)
    run_until(proxy, lambda: rings.forwarded[RING] == 6)
    assert rejected(stats) == {"malformed": 1, "sender": 0, "topic": 0}
    assert subscriber.recv_multipart() == [TOPIC, b"good"]
    # A count of written slots no worker writes: counted, and the proxy goes on from it.
    outbox.store_release(box.map, WRITTEN, 1000)
    run_until(proxy, lambda: stats["rejected:malformed"] == 2)
    assert outbox.load_acquire(box.map, TAKEN) == 1000
    box.written = 1000
    assert box.put(7, b"after")
    run_until(proxy, lambda: rings.forwarded[RING] == 7)
    assert subscriber.recv_multipart() == [TOPIC, b"after"]
    conn.close()
    box.close()


def test_an_ipc_subscribers_connection_queues_two_batches(proxy, subscriber):
    """The other side of the proxy: the kernel's send buffer towards a subscriber on an
    ipc:// endpoint holds two of the largest batches (publish.widen_local_send_buffer),
    where the default holds about one and the I/O thread would wake again for the rest.
    (The kernel doubles what it is asked for.)"""
    (fd,) = proxy.subscribers.connections
    with socket.socket(fileno=os.dup(fd)) as conn:
        assert conn.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 4 * max_batch_bytes(BLOCK)
