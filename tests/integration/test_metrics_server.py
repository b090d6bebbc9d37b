"""metrics_server.MetricsServer on its own, driven as the supervisor's loop drives it (poll
what it wants, hand back what is ready), in the test's namespace: what it answers, and the
connections it drops (head too large, past the deadline, over the bound)."""

import gzip
import hashlib
import select
import socket
import time

import netlab
import pytest

from fanoutd.config import MetricsConfig
from fanoutd.metrics_server import MetricsServer
from fanoutd.slotstats import ProxyStats

pytestmark = pytest.mark.integration

SCRAPE = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"


class NoCaptures:
    captures: list = []
    proxy_stats = ProxyStats()

    def refresh_kernel_stats(self) -> None:
        pass


@pytest.fixture
def serve(ns):
    """Factory: serve(**MetricsConfig keys) -> (server, connect); connect() opens a client
    connection in the namespace. Everything is closed at teardown."""
    made = []

    def make(**keys) -> tuple[MetricsServer, object]:
        port = ns.free_port()
        with netlab.in_netns(ns.name):
            server = MetricsServer(MetricsConfig(listen=f"127.0.0.1:{port}", **keys),
                                   NoCaptures())
        made.append(server)

        def connect() -> socket.socket:
            with netlab.in_netns(ns.name):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            made.append(sock)
            return sock
        return server, connect
    yield make
    for thing in made:
        thing.close()


def turn(server: MetricsServer, timeout: float = 0.01) -> None:
    """One turn of the supervisor's loop, as far as the server is concerned."""
    poller = select.poll()
    for fd, events in server.wanted().items():
        poller.register(fd, events)
    server.serve(dict(poller.poll(timeout * 1000)))


def exchange(server: MetricsServer, sock: socket.socket, data: bytes = b"",
             timeout: float = 5.0) -> bytes:
    """Send data, then turn the loop until the server closes the connection; what it
    sent back."""
    if data:
        sock.sendall(data)
    sock.setblocking(False)
    received = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        turn(server)
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
    else:
        raise netlab.WaitTimeout(f"the server did not close the connection in {timeout} s")
    return bytes(received)


def split(response: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    return status, {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}, body


def test_answers(serve):
    server, connect = serve()
    status, headers, body = split(exchange(server, connect(), SCRAPE))
    assert status == "HTTP/1.1 200 OK" and headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert b"fanoutd_build_info" in body and b"process_cpu_seconds_total" in body
    assert b'fanoutd_metrics_connections_dropped_total{reason="limit"} 0.0' in body

    status, headers, body = split(exchange(server, connect(), SCRAPE.replace(b"GET", b"HEAD")))
    assert status == "HTTP/1.1 200 OK" and int(headers["content-length"]) > 0 and body == b""

    gzipped = SCRAPE.replace(b"\r\n\r\n", b"\r\nAccept-Encoding: gzip\r\n\r\n")
    status, headers, body = split(exchange(server, connect(), gzipped))
    assert headers["content-encoding"] == "gzip" and b"fanoutd_build_info" in gzip.decompress(body)

    for request, want in ((b"GET / HTTP/1.1\r\n\r\n", "404"),
                          (b"GET /metricsx HTTP/1.0\r\n\r\n", "404"),
                          (b"POST /metrics HTTP/1.1\r\n\r\n", "405"),
                          (b"nonsense\r\n\r\n", "400"),
                          (b"GET /metrics HTTP/1.1\r\nno colon\r\n\r\n", "400")):
        assert split(exchange(server, connect(), request))[0].split()[1] == want, request
    assert server.dropped == {"limit": 0, "timeout": 0, "oversized": 0, "tls": 0}


def test_basic_auth(serve):
    digest = hashlib.sha256(b"pw").hexdigest()
    server, connect = serve(basic_auth_user="prom", basic_auth_password_sha256=digest)
    with_auth = SCRAPE.replace(b"\r\n\r\n", b"\r\nAuthorization: Basic cHJvbTpwdw==\r\n\r\n")
    wrong = SCRAPE.replace(b"\r\n\r\n", b"\r\nAuthorization: Basic cHJvbTp4\r\n\r\n")
    status, headers, _ = split(exchange(server, connect(), SCRAPE))
    assert status.startswith("HTTP/1.1 401 ") and headers["www-authenticate"].startswith("Basic")
    assert split(exchange(server, connect(), wrong))[0].startswith("HTTP/1.1 401 ")
    assert split(exchange(server, connect(), with_auth))[0] == "HTTP/1.1 200 OK"


def test_a_head_too_large_is_answered_431_and_counted(serve):
    server, connect = serve()
    head = b"GET /metrics HTTP/1.1\r\n" + b"X-Pad: " + b"x" * 9000 + b"\r\n\r\n"
    assert exchange(server, connect(), head).startswith(b"HTTP/1.1 431 ")
    assert server.dropped["oversized"] == 1


def test_a_request_not_done_in_time_is_dropped(serve):
    """The deadline runs from accept: sending a line now and then does not extend it."""
    server, connect = serve(request_timeout_ms=400)
    sock = connect()
    sock.sendall(b"GET /metrics HTTP/1.1\r\n")
    started, lines = time.monotonic(), 0
    sock.setblocking(False)
    while time.monotonic() - started < 2 and not server.dropped["timeout"]:
        turn(server, 0.05)
        if int((time.monotonic() - started) * 10) > lines:  # a line every 0.1 s
            sock.send(b"X-Slow: 1\r\n")
            lines += 1
    took = time.monotonic() - started
    assert server.dropped["timeout"] == 1 and 0.35 < took < 1.0, (server.dropped, took)
    assert exchange(server, sock) == b""


def test_at_the_bound_the_longest_waiting_connection_makes_room(serve):
    """max_connections 2, both taken by clients that have not finished their request: a
    scrape is answered, and the older of the two is closed (counted as limit)."""
    server, connect = serve(max_connections=2)
    first, second = connect(), connect()
    for taken, sock in enumerate((first, second), 1):
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")
        netlab.wait_for(lambda n=taken: turn(server) or len(server.connections) == n, 5,
                        f"the server to take connection {taken}")
    assert split(exchange(server, connect(), SCRAPE))[0] == "HTTP/1.1 200 OK"
    assert server.dropped["limit"] == 1 and len(server.connections) == 1
    assert exchange(server, first, timeout=1) == b""  # closed
    second.setblocking(False)
    with pytest.raises(BlockingIOError):
        second.recv(1)  # still open
