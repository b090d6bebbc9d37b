"""Test doubles shared by the unit tests."""

import time

import msgpack
import zmq

from fanoutd.wire import HELLO


class FakeClock:
    """A monotonic clock the test moves by hand: `clock.now += 1.5`."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeSensor:
    """An XPUB that answers the welcome subscription as fanoutd's proxy does and
    publishes version 1 batches of the given fields: a publisher for subscribers under
    test (inproc:// within one context, ipc:// for one in another thread's context)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, fields: list[str]) -> None:
        self.endpoint = endpoint
        self.fields = fields
        self.sock = ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)

    def answer_hello(self, timeout: float = 10.0) -> None:
        """Wait for the subscription to the welcome and send it. A subscriber subscribes
        to pkt. before the welcome: once the welcome's subscription is read, so was
        pkt.'s, and nothing published from now on is missed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock.poll(100) and self.sock.recv() == b"\x01" + HELLO:
                self.sock.send(HELLO)
                return
        raise AssertionError(f"no subscription to the welcome on {self.endpoint}")

    def publish(self, seq: int, rows: list, iface: str = "eth0", worker: int = 0) -> None:
        body = {"v": 1, "iface": iface, "worker": worker, "seq": seq, "fields": self.fields,
                "packets": rows}
        self.sock.send_multipart([f"pkt.{iface}.{worker}".encode(), msgpack.packb(body)])
