"""The supervisor's metrics endpoint: HTTP, or HTTPS, served from its own loop without ever
waiting on a client.

The supervisor has one thread and forks, so nothing here blocks or starts a thread: the
listening socket and every connection are non-blocking, the loop polls what wanted()
names and hands back what is ready to serve(). Each connection is a small state machine
(TLS handshake, read the request head, answer, close) under one absolute deadline counted
from accept, so a client that trickles its headers (slowloris), stalls in the handshake or
reads the answer slowly holds one connection slot for request_timeout_ms at most, and the
loop not at all.

At most max_connections are open. When all are taken, the one that has waited longest for
its request is dropped to make room: a scraper sends its request as soon as it connects,
and the kernel hands a connection over only once data has arrived (TCP_DEFER_ACCEPT), so
it is answered in the turn of the loop that accepts it (over TLS, a few round trips
later), and clients that hold connections open without finishing a request cannot keep
it out. When every open connection is being answered, the newcomer is closed instead.
Each drop is counted by reason (metrics.DROP_REASONS).

Only GET and HEAD of /metrics are served, one request per connection (Connection: close);
with basic auth configured, anything else unauthenticated gets 401.
"""

import base64
import contextlib
import gzip
import hashlib
import hmac
import logging
import select
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from prometheus_client.exposition import choose_encoder, gzip_accepted

from fanoutd.config import MetricsConfig, parse_host_port, tls_context
from fanoutd.metrics import DROP_REASONS, StatsSource, make_registry

log = logging.getLogger("fanoutd")

METRICS_PATH = "/metrics"
MAX_HEAD_BYTES = 8192  # request line and headers; a scrape's are a few hundred bytes
RECV_BYTES = 4096
BACKLOG = 64
DEFER_ACCEPT_S = 1
ACCEPTS_PER_TURN = 16  # a flood of connections waits in the backlog, not in the loop
ACCEPT_PAUSE_S = 1.0  # after accept failed for want of descriptors or memory

HANDSHAKE, READ, WRITE = "handshake", "read", "write"


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    fd: int
    deadline: float  # monotonic: closed (reason timeout) if not done by then
    stage: str
    head: bytearray = field(default_factory=bytearray)
    out: bytes = b""
    sent: int = 0
    want: int = select.POLLIN


class MetricsServer:
    """The listening socket and its connections, advanced by the supervisor's loop."""

    def __init__(self, cfg: MetricsConfig, source: StatsSource) -> None:
        host, port = parse_host_port(cfg.listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # The kernel hands over a connection once its first data is there (or after
            # this many seconds): a scraper's request can then be answered as it is
            # accepted, and clients that connect and say nothing wait outside the bound.
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_S)
            self.socket.bind((host if host != "*" else "", port))
            self.socket.listen(BACKLOG)
        except OSError:
            self.socket.close()
            raise
        self.socket.setblocking(False)
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.registry = make_registry(source, self.dropped)
        self.connections: dict[int, _Connection] = {}
        self.accept_paused_until = 0.0
        self.configure(cfg)

    def configure(self, cfg: MetricsConfig) -> None:
        """TLS, basic auth and limits as cfg says (on a reload, for the same listening
        socket; connections already open keep what they started with)."""
        self.credentials: tuple[str, bytes] | None = None  # (user, sha256 of the password)
        if cfg.basic_auth_user is not None and cfg.basic_auth_password_sha256 is not None:
            self.credentials = (cfg.basic_auth_user,
                                bytes.fromhex(cfg.basic_auth_password_sha256))
        self.tls = tls_context(cfg) if cfg.tls_cert_file is not None else None
        self.max_connections = cfg.max_connections
        self.timeout_s = cfg.request_timeout_ms / 1000

    # -- the loop's side ----------------------------------------------------------------

    def wanted(self) -> dict[int, int]:
        """{fd: poll events} to wait for: new connections, and what each one waits for."""
        fds = {}
        if time.monotonic() >= self.accept_paused_until:
            fds[self.socket.fileno()] = select.POLLIN
        for fd, conn in self.connections.items():
            fds[fd] = conn.want
        return fds

    def serve(self, ready: Mapping[int, int]) -> None:
        """Advance the connections that are ready, accept new ones, drop overdue ones."""
        for fd, conn in list(self.connections.items()):
            if fd in ready:
                self._advance(conn)
        if self.socket.fileno() in ready:
            self._accept()
        now = time.monotonic()
        for conn in [c for c in self.connections.values() if now >= c.deadline]:
            self._drop(conn, "timeout")

    def close(self) -> None:
        for conn in list(self.connections.values()):
            self._close(conn)
        self.socket.close()

    def close_inherited(self) -> None:
        """In a forked child: close its copies of the sockets (a client must see its
        connection end when the supervisor ends it)."""
        for conn in self.connections.values():
            conn.sock.close()
        self.socket.close()

    # -- connections --------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, _ = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                # Out of descriptors or memory: the listener stays readable, so stop
                # polling it a while rather than spin; say so once per spell.
                if not self.accept_paused_until:
                    log.warning("metrics: cannot accept connections: %s", e.strerror or e)
                self.accept_paused_until = time.monotonic() + ACCEPT_PAUSE_S
                return
            self.accept_paused_until = 0.0
            if len(self.connections) >= self.max_connections and not self._make_room():
                sock.close()
                self.dropped["limit"] += 1
                continue
            sock.setblocking(False)
            stage = READ
            if self.tls is not None:
                try:
                    sock = self.tls.wrap_socket(sock, server_side=True,
                                                do_handshake_on_connect=False)
                except OSError:  # reset already
                    sock.close()
                    continue
                stage = HANDSHAKE
            conn = _Connection(sock, sock.fileno(), time.monotonic() + self.timeout_s, stage)
            self.connections[conn.fd] = conn
            self._advance(conn)  # a scraper's request is usually there already

    def _make_room(self) -> bool:
        """Drop the connection that has waited longest for its request; False when every
        connection is being answered."""
        waiting = [c for c in self.connections.values() if c.stage != WRITE]
        if not waiting:
            return False
        self._drop(min(waiting, key=lambda c: c.deadline), "limit")
        return True

    def _advance(self, conn: _Connection) -> None:
        """As far as the connection's socket lets it go without waiting."""
        conn.want = select.POLLOUT if conn.stage == WRITE else select.POLLIN
        try:
            if conn.stage == HANDSHAKE:
                conn.sock.do_handshake()  # type: ignore[attr-defined]
                conn.stage = READ
            if conn.stage == READ:
                self._read(conn)
            if conn.stage == WRITE:
                conn.want = select.POLLOUT
                self._write(conn)
        except ssl.SSLWantReadError:
            conn.want = select.POLLIN
        except ssl.SSLWantWriteError:
            conn.want = select.POLLOUT
        except (BlockingIOError, InterruptedError):
            pass
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            self._close(conn)  # the client hung up
        except ssl.SSLError:
            self._drop(conn, "tls")  # no or a bad client certificate, not TLS at all, ...
        except OSError:
            self._close(conn)  # reset by the client

    def _read(self, conn: _Connection) -> None:
        """Read until the head is complete (then answer) or the socket has no more."""
        while True:
            data = conn.sock.recv(RECV_BYTES)
            if not data:
                self._close(conn)  # gone before asking anything
                return
            conn.head += data
            end = _head_end(conn.head)
            if (len(conn.head) if end is None else end) > MAX_HEAD_BYTES:
                self.dropped["oversized"] += 1
                self._respond(conn, _Answer(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE))
                return
            if end is not None:
                self._respond(conn, self._answer(bytes(conn.head[:end])))
                return

    def _respond(self, conn: _Connection, answer: "_Answer") -> None:
        status = answer.status
        lines = [f"HTTP/1.1 {status.value} {status.phrase}",
                 *(f"{k}: {v}" for k, v in answer.headers),
                 f"Content-Length: {len(answer.body)}", "Connection: close", "", ""]
        conn.out = "\r\n".join(lines).encode("latin-1") + (b"" if answer.head_only
                                                            else answer.body)
        conn.stage = WRITE

    def _write(self, conn: _Connection) -> None:
        view = memoryview(conn.out)
        while conn.sent < len(view):
            conn.sent += conn.sock.send(view[conn.sent:])
        self._close(conn)

    def _drop(self, conn: _Connection, reason: str) -> None:
        self.dropped[reason] += 1
        self._close(conn)

    def _close(self, conn: _Connection) -> None:
        self.connections.pop(conn.fd, None)
        with contextlib.suppress(OSError):
            conn.sock.close()

    # -- HTTP ---------------------------------------------------------------------------

    def _answer(self, head: bytes) -> "_Answer":
        """The answer to one request head (request line and headers)."""
        request_line, *header_lines = head.decode("latin-1").splitlines() or [""]
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _Answer(HTTPStatus.BAD_REQUEST)
        method, target, _ = parts
        headers = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if not sep:
                return _Answer(HTTPStatus.BAD_REQUEST)
            headers[name.strip().lower()] = value.strip()
        head_only = method == "HEAD"
        if method not in ("GET", "HEAD"):
            return _Answer(HTTPStatus.METHOD_NOT_ALLOWED, [("Allow", "GET, HEAD")])
        if self.credentials is not None and not _authorized(self.credentials,
                                                            headers.get("authorization", "")):
            return _Answer(HTTPStatus.UNAUTHORIZED,
                           [("WWW-Authenticate", 'Basic realm="fanoutd"')], head_only=head_only)
        url = urlsplit(target)
        if url.path != METRICS_PATH:  # the one thing served, on its path
            return _Answer(HTTPStatus.NOT_FOUND, [("Content-Type", "text/plain; charset=utf-8")],
                           f"fanoutd serves its metrics at {METRICS_PATH}\n".encode(),
                           head_only)
        registry = self.registry
        params = parse_qs(url.query)
        if "name[]" in params:
            registry = registry.restricted_registry(params["name[]"])
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        try:
            body = encoder(registry)
        except Exception:  # a collector bug: say so, and keep serving
            log.exception("metrics: cannot build the exposition")
            return _Answer(HTTPStatus.INTERNAL_SERVER_ERROR)
        answer = _Answer(HTTPStatus.OK, [("Content-Type", content_type)], body, head_only)
        if gzip_accepted(headers.get("accept-encoding", "")):
            answer.body = gzip.compress(body)
            answer.headers.append(("Content-Encoding", "gzip"))
        return answer


@dataclass
class _Answer:
    status: HTTPStatus
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    head_only: bool = False  # HEAD: the headers of the answer, without its body


def _head_end(data: bytearray) -> int | None:
    """Where the request head ends (before its blank line), or None if it does not yet."""
    ends = [i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0]
    return min(ends) if ends else None


def _authorized(credentials: tuple[str, bytes], authorization: str) -> bool:
    user, digest = credentials
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given_user, _, password = base64.b64decode(encoded.strip(), validate=True).decode(
            ).partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    user_ok = hmac.compare_digest(given_user.encode(), user.encode())
    password_ok = hmac.compare_digest(hashlib.sha256(password.encode()).digest(), digest)
    return user_ok and password_ok
