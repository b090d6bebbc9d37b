"""Subscriber API: connect to fanoutd's publish endpoint and read packet batches.

    from fanoutd.client import Subscriber
    with Subscriber("tcp://127.0.0.1:7440") as sub:
        for pkt in sub.packets():
            print(pkt["worker"], pkt["proto"], pkt["sport"], pkt["dport"])

`lost` counts batches missing from each worker's `seq` sequence (dropped at a high-water
mark); `duplicates` counts batches seen twice (re-sent after a worker was replaced).
"""

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

HELLO = b"fanoutd.hello"
DEFAULT_ENDPOINT = "tcp://127.0.0.1:7440"


@dataclass(frozen=True)
class Batch:
    topic: str
    iface: str
    worker: int
    seq: int
    fields: list[str]
    packets: list[list]

    def rows(self) -> Iterator[dict[str, Any]]:
        """Each packet as {field: value}, plus iface, worker and seq of its batch."""
        for row in self.packets:
            pkt = dict(zip(self.fields, row, strict=False))
            pkt["iface"] = self.iface
            pkt["worker"] = self.worker
            pkt["seq"] = self.seq
            yield pkt


class Subscriber:
    def __init__(self, endpoint: str | list[str] = DEFAULT_ENDPOINT,
                 topics: tuple[bytes, ...] = (b"pkt.",), rcvhwm: int = 10000,
                 context: zmq.Context | None = None, curve_server_key: str | None = None,
                 curve_client_cert: str | None = None) -> None:
        """curve_server_key: the publisher's public key file (`fanoutd keygen` writes
        NAME.key); curve_client_cert: this client's secret key file (NAME.key_secret), which
        the publisher must know (publish.curve.clients_dir) unless it admits any client."""
        self.ctx = context or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve_server_key is not None:
            self._use_curve(curve_server_key, curve_client_cert)
        for topic in (*topics, HELLO):
            self.sock.subscribe(topic)
        for ep in [endpoint] if isinstance(endpoint, str) else endpoint:
            self.sock.connect(ep)
        self.hellos = 0
        self.last_seq: dict[tuple[str, int], int] = {}
        self.lost: dict[tuple[str, int], int] = {}
        self.duplicates = 0

    def _use_curve(self, server_key: str, client_cert: str | None) -> None:
        import zmq.auth

        server_public, _ = zmq.auth.load_certificate(server_key)
        if client_cert is None:  # an ephemeral identity: fine when any client is admitted
            public, secret = zmq.curve_keypair()
        else:
            public, secret = zmq.auth.load_certificate(client_cert)
            if secret is None:
                raise ValueError(f"{client_cert} holds no secret key (use NAME.key_secret)")
        self.sock.curve_serverkey = server_public
        self.sock.curve_publickey = public
        self.sock.curve_secretkey = secret

    def __enter__(self) -> "Subscriber":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def wait_ready(self, timeout: float = 5.0) -> bool:
        """Wait for the publisher's welcome message: from then on nothing is missed."""
        while self.hellos == 0:
            if self._receive(timeout) is None and self.hellos == 0:
                return False
        return True

    def batches(self, timeout: float | None = None) -> Iterator[Batch]:
        """Yield batches as they come; stop after `timeout` seconds with nothing (None: never)."""
        while True:
            got = self._receive(timeout)
            if got is None:  # only with a timeout
                return
            if isinstance(got, Batch):
                yield got

    def packets(self, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        for batch in self.batches(timeout):
            yield from batch.rows()

    def _receive(self, timeout: float | None) -> Batch | bool | None:
        """One message: a Batch, True for a message that is not a batch, None on timeout."""
        if not self.sock.poll(None if timeout is None else int(timeout * 1000)):
            return None
        frames = self.sock.recv_multipart()
        if len(frames) == 1:
            if frames[0] == HELLO:
                self.hellos += 1
            return True
        if len(frames) != 2 or not frames[0].startswith(b"pkt."):
            return True
        body = msgpack.unpackb(frames[1], raw=False)
        batch = Batch(frames[0].decode(), body["iface"], body["worker"], body["seq"],
                      body["fields"], body["packets"])
        self._track(batch)
        return batch

    def _track(self, batch: Batch) -> None:
        key = (batch.iface, batch.worker)
        last = self.last_seq.get(key)
        if last is None or batch.seq == 0:  # first sight, or the daemon restarted
            self.last_seq[key] = batch.seq
        elif batch.seq > last:
            if batch.seq > last + 1:
                self.lost[key] = self.lost.get(key, 0) + batch.seq - last - 1
            self.last_seq[key] = batch.seq
        else:
            self.duplicates += 1


def format_mac(raw: bytes | None) -> str | None:
    return None if raw is None else raw.hex(":")


def format_ip(raw: bytes | None) -> str | None:
    return None if raw is None else str(ipaddress.ip_address(raw))


TCP_FLAG_LETTERS = ((0x01, "F"), (0x02, "S"), (0x04, "R"), (0x08, "P"), (0x10, "."),
                    (0x20, "U"), (0x40, "E"), (0x80, "W"), (0x100, "N"))


def format_tcp_flags(flags: int | None) -> str:
    """tcpdump's notation: S for SYN, . for ACK, ..."""
    if flags is None:
        return ""
    return "".join(letter for bit, letter in TCP_FLAG_LETTERS if flags & bit) or "none"


def to_json_ready(pkt: dict[str, Any]) -> dict[str, Any]:
    """A packet dict with addresses as text, for JSON output."""
    out = dict(pkt)
    for key in ("eth_src", "eth_dst"):
        if key in out:
            out[key] = format_mac(out[key])
    for key in ("src", "dst"):
        if key in out:
            out[key] = format_ip(out[key])
    return {k: (v.hex() if isinstance(v, bytes) else v) for k, v in out.items()}
