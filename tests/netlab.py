"""Integration-test harness: private network namespaces, raw frame injection, the daemon.

Safety rules this module enforces for every test that uses it:

* All traffic stays inside a network namespace the test creates (`NetNS`): frames are
  written raw onto one end of a veth pair that exists only in that namespace, so nothing
  is ever sent on an interface of the root namespace or to an outside address.
* Every namespace has a unique name and is deleted on exit, also when the test fails;
  deleting a namespace deletes its veths.
* Every daemon process (and its children) is killed on exit (`Daemon.__exit__`).
* Waiting is always a bounded poll on a condition (`wait_for`), never a hopeful sleep.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing.process
import os
import queue
import secrets
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import frames
import msgpack
import zmq
from prometheus_client.parser import text_string_to_metric_families

from fanoutd import filter, ring
from fanoutd.wire import decode_column

REPO = Path(__file__).resolve().parent.parent
CLONE_NEWNET = 0x40000000
INJ_MAC = "02:00:00:00:00:f1"  # fixed MACs: frames to MAC_B are never "to us" on cap0
CAP_MAC = "02:00:00:00:00:f2"


# --------------------------------------------------------------------------- waiting


class WaitTimeout(AssertionError):
    """A bounded wait ran out; an AssertionError so pytest shows it as a test failure."""


def wait_for(cond: Callable[[], object], timeout: float, what: str,
             interval: float = 0.05, detail: Callable[[], str] | None = None) -> object:
    """Poll cond() until it returns something truthy, and return that value.

    Raises WaitTimeout naming `what` (and appending detail(), e.g. daemon logs) when
    `timeout` seconds pass first, so a hang becomes a readable failure, not a stuck run.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = f"\n{detail()}" if detail else ""
            raise WaitTimeout(f"timed out after {timeout:.1f}s waiting for {what}{extra}")
        time.sleep(interval)


# --------------------------------------------------------------------------- namespaces


def _run(*argv: str) -> str:
    """Run a set-up command; raise with its stderr, because a half-built lab is useless."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Move the calling thread into network namespace `name`, and back afterwards.

    setns() is per thread, and a socket keeps the namespace it was created in, so create
    sockets inside this block and use them anywhere. Python 3.11 has no os.setns, hence
    ctypes.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


class NetNS:
    """A throw-away network namespace holding the veth pair inj0 <-> cap0.

    Frames written on inj0 are received on cap0, where the daemon captures. IPv6 is
    disabled before any link exists so the kernel sends no router solicitations or DAD
    probes: the only frames cap0 ever sees are the ones a test injects, which is what
    lets tests assert exact counts.
    """

    def __init__(self, prefix: str = "fo") -> None:
        self.name = f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"
        self._created = False

    def __enter__(self) -> NetNS:
        _run("ip", "netns", "add", self.name)
        self._created = True
        try:
            for scope in ("all", "default"):
                self.exec("sysctl", "-qw", f"net.ipv6.conf.{scope}.disable_ipv6=1")
            _run("ip", "-n", self.name, "link", "set", "lo", "up")
            self.add_veth("inj0", "cap0", INJ_MAC, CAP_MAC)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Delete the namespace (and with it every veth in it)."""
        if self._created:
            self._created = False
            _run("ip", "netns", "del", self.name)

    def exec(self, *argv: str) -> str:
        return _run("ip", "netns", "exec", self.name, *argv)

    def add_veth(self, a: str, b: str, mac_a: str | None = None,
                 mac_b: str | None = None) -> None:
        """Create veth pair a <-> b, both ends inside this namespace, and bring both up."""
        cmd = ["ip", "-n", self.name, "link", "add", a]
        if mac_a:
            cmd += ["address", mac_a]
        cmd += ["type", "veth", "peer", "name", b]
        if mac_b:
            cmd += ["address", mac_b]
        _run(*cmd)
        for ifname in (a, b):
            _run("ip", "-n", self.name, "link", "set", ifname, "up")

    def ifindex(self, ifname: str) -> int:
        with in_netns(self.name):
            return socket.if_nametoindex(ifname)

    def free_port(self) -> int:
        """A TCP port free on 127.0.0.1 inside the namespace (for --metrics)."""
        with in_netns(self.name), socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


# --------------------------------------------------------------------------- injection


def filler_frame(length: int = 60) -> bytes:
    """An Ethernet frame inj0 -> cap0 of an experimental ethertype (0x88B5), zeros to
    `length` bytes: what a ring test needs to fill blocks, and nothing that decodes."""
    macs = bytes.fromhex((CAP_MAC + INJ_MAC).replace(":", ""))
    return (macs + b"\x88\xb5").ljust(length, b"\0")


@contextlib.contextmanager
def capture_ring(ns: NetNS, geo: ring.RingGeometry, ifname: str = "cap0") -> Iterator[ring.RxRing]:
    """A real TPACKET_V3 ring on ifname inside ns, open to all traffic (the capture
    socket's drop-all filter taken off), closed afterwards."""
    with in_netns(ns.name):
        sock = ring.open_capture_socket(ifname, geo, rxhash=False)
    try:
        filter.detach(sock)
        rx = ring.RxRing(sock, geo)
        try:
            yield rx
        finally:
            rx.close()
    finally:
        sock.close()


class Injector:
    """Writes raw Ethernet frames on `ifname` (default inj0) inside the namespace.

    The AF_PACKET socket is created inside the namespace, so it can only ever reach that
    namespace's interfaces. Protocol 0: it never receives anything.
    """

    def __init__(self, ns: NetNS, ifname: str = "inj0") -> None:
        with in_netns(ns.name):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            self.sock.bind((ifname, 0))

    def send(self, frame: bytes) -> None:
        sent = self.sock.send(frame)
        assert sent == len(frame), f"short send: {sent} of {len(frame)} bytes"

    def send_all(self, frames: Iterable[bytes]) -> int:
        n = 0
        for frame in frames:
            self.send(frame)
            n += 1
        return n

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Injector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fanout_holder(ns: NetNS, group: int, ifname: str = "cap0") -> socket.socket:
    """A socket of the test's own in fanout group `group` on ifname (mode hash), receiving
    nothing (a drop-all filter before bind): the group is taken for as long as it is open."""
    from fanoutd import _linux
    from fanoutd.filter import DROP_ALL, attach

    with in_netns(ns.name):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        attach(sock, DROP_ALL)
        sock.bind((ifname, _linux.ETH_P_ALL))
        sock.setsockopt(_linux.SOL_PACKET, _linux.PACKET_FANOUT,
                        struct.pack("=I", group | _linux.PACKET_FANOUT_HASH << 16))
    except BaseException:
        sock.close()
        raise
    return sock


# --------------------------------------------------------------------------- metrics

MetricKey = tuple[str, frozenset]


def scrape(ns: NetNS | str, port: int, timeout: float = 2.0) -> str:
    """GET http://127.0.0.1:PORT/metrics from inside the namespace (no proxy, ever)."""
    name = ns.name if isinstance(ns, NetNS) else ns
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with in_netns(name), opener.open(f"http://127.0.0.1:{port}/metrics",
                                     timeout=timeout) as resp:
        return resp.read().decode()


def parse_metrics(text: str) -> dict[MetricKey, float]:
    """{(sample name, frozenset(labels.items())): value} for every sample in `text`."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def samples(metrics: dict[MetricKey, float], name: str,
            **labels: str) -> dict[frozenset, float]:
    """The samples called `name` whose labels include `labels`: {frozen labels: value}."""
    want = set(labels.items())
    return {lbl: v for (n, lbl), v in metrics.items() if n == name and want <= lbl}


def metric_sum(metrics: dict[MetricKey, float], name: str, **labels: str) -> float:
    return sum(samples(metrics, name, **labels).values())


# --------------------------------------------------------------------------- processes


def stop_child_process(proc: multiprocessing.process.BaseProcess) -> None:
    """End a multiprocessing child (bounded): join, then SIGTERM, then SIGKILL."""
    proc.join(timeout=1)
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout=5)
    if proc.is_alive():
        proc.kill()
        proc.join(timeout=5)


def proc_comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def proc_children(pid: int) -> list[int]:
    """Direct children of pid, from /proc/PID/task/*/children (any thread may fork)."""
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                kids += [int(p) for p in
                         Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return kids


def proc_descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = proc_children(todo.pop())
        out += kids
        todo += kids
    return out


def proc_identity(pid: int) -> tuple[int, int] | None:
    """(pid, start time) so a recycled pid is never mistaken for the original process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return pid, int(stat.rsplit(")", 1)[1].split()[19])


def proc_alive(ident: tuple[int, int]) -> bool:
    """True while the process identified by proc_identity() exists and is not a zombie."""
    pid, start = ident
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    rest = stat.rsplit(")", 1)[1].split()
    return int(rest[19]) == start and rest[0] not in ("Z", "X")


def session_processes(sid: int) -> list[tuple[int, int]]:
    """proc_identity() of every live (non-zombie) process in session `sid`: what a
    process started with start_new_session=True (sid = its pid) and its descendants
    leave running, even those re-parented to init after it exited."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        rest = stat.rsplit(")", 1)[1].split()
        if int(rest[3]) == sid and rest[0] not in ("Z", "X"):
            found.append((int(entry), int(rest[19])))
    return found


class Daemon:
    """Runs `python -m fanoutd run` on cap0 inside the namespace; always killed on exit.

    stdout/stderr go to files in `workdir`; `logs()` returns them for failure messages,
    because a daemon that dies in a test is only debuggable through what it printed.
    """

    def __init__(self, ns: NetNS, workdir: str | Path, workers: int = 1, fanout: str = "hash",
                 fanout_flags: str | None = None, extra: Iterable[str] = (),
                 interface: str = "cap0", env: Mapping[str, str] | None = None,
                 journal_stream: bool = False, config: Path | None = None,
                 wrap: Iterable[str] = ()) -> None:
        """`env`: extra environment variables (NOTIFY_SOCKET, WATCHDOG_USEC...).
        `journal_stream`: set JOURNAL_STREAM to the device:inode of the daemon's stderr
        file, as systemd does for a service whose stderr is the journal.
        `config`: run with -c config and leave workers, fanout and ring to the file (flags
        would override it, also on a reload); `workers` must then match the file.
        `wrap`: a command that runs the daemon inside the namespace, such as setpriv
        with a unit's capabilities (it must exec the daemon, keeping its pid)."""
        self.ns = ns
        self.env = dict(env or {})
        self.journal_stream = journal_stream
        self.workdir = Path(workdir)
        self.workers = workers
        self.interface = interface
        self.endpoint = f"ipc://{self.workdir / 'pub.ipc'}"
        self.metrics_port = ns.free_port()
        shape = ["-c", str(config)] if config is not None else [
            "--workers", str(workers), "--fanout", fanout,
            *(["--fanout-flags", fanout_flags] if fanout_flags else []),
            "--block-size", "65536", "--block-count", "8", "--block-timeout", "5"]
        self.argv = [
            "ip", "netns", "exec", ns.name, *wrap, sys.executable, "-m", "fanoutd", "run",
            "--interface", interface, *shape,
            "--publish", self.endpoint, "--metrics", f"127.0.0.1:{self.metrics_port}",
            *extra,
        ]
        self.proc: subprocess.Popen | None = None
        self._out = self.workdir / "daemon.stdout"
        self._err = self.workdir / "daemon.stderr"

    # -- lifecycle

    def start(self) -> Daemon:
        env = {**base_env(), "PYTHONUNBUFFERED": "1", **self.env}
        with open(self._out, "wb") as out, open(self._err, "wb") as err:
            if self.journal_stream:
                st = os.fstat(err.fileno())
                env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
            # A session of its own: the final kill can take the whole process group.
            self.proc = subprocess.Popen(self.argv, cwd=REPO, env=env, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "daemon not started"
        return self.proc.pid

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def kill(self, grace: float = 5.0) -> None:
        """Stop the daemon for good: SIGTERM, then after `grace` s SIGKILL everything.

        SIGTERM first lets the supervisor reap its own children; SIGKILL of the supervisor,
        its descendants and its process group is the backstop for a daemon that hangs.
        Children are tracked by (pid, start time), so a recycled pid is never signalled.
        """
        if self.proc is None:
            return
        idents = self._descendant_idents()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
        idents |= self._descendant_idents()
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        for ident in idents:
            if proc_alive(ident):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(ident[0], signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        # SIGKILL is asynchronous: wait (bounded) until every child is really gone, so a
        # test never ends with daemon processes still holding its namespace's sockets.
        wait_for(lambda: not any(map(proc_alive, idents)), 10,
                 "the daemon's children to die after SIGKILL")

    def _descendant_idents(self) -> set[tuple[int, int]]:
        assert self.proc is not None
        if self.proc.poll() is not None:
            return set()
        return {i for i in map(proc_identity, proc_descendants(self.proc.pid)) if i}

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send `sig` to the supervisor and return its exit status (bounded wait)."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise WaitTimeout(f"daemon did not exit within {timeout}s of signal {sig}\n"
                              f"{self.logs()}") from None

    # -- observation

    def logs(self) -> str:
        def read(p: Path) -> str:
            try:
                return p.read_text(errors="replace")[-4000:]
            except OSError:
                return "<none>"
        status = "running" if self.proc and self.proc.poll() is None else (
            f"exited {self.proc.returncode}" if self.proc else "not started")
        return (f"--- daemon ({status}): {' '.join(self.argv)}\n"
                f"--- stdout:\n{read(self._out)}\n--- stderr:\n{read(self._err)}")

    def stderr_text(self) -> str:
        """Everything the daemon wrote on stderr so far (logs() keeps only the tail)."""
        try:
            return self._err.read_text(errors="replace")
        except OSError:
            return ""

    def check_running(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, \
            f"daemon is not running\n{self.logs()}"

    def metrics(self) -> dict[MetricKey, float]:
        return parse_metrics(scrape(self.ns, self.metrics_port))

    def try_metrics(self) -> dict[MetricKey, float] | None:
        """metrics(), or None while the endpoint is not up yet."""
        try:
            return self.metrics()
        except (OSError, ValueError):
            return None

    def workers_up(self) -> float | None:
        m = self.try_metrics()
        if m is None:
            return None
        return m.get(("fanoutd_workers_up", frozenset({("interface", self.interface)})))

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Poll until fanoutd_workers_up{interface} == workers (fail fast if it died)."""
        def ready() -> bool:
            self.check_running()
            return self.workers_up() == self.workers
        wait_for(ready, timeout, f"fanoutd_workers_up{{interface={self.interface!r}}} == "
                 f"{self.workers}", interval=0.1, detail=self.logs)

    def children_by_comm(self) -> dict[str, int]:
        """{comm: pid} of the supervisor's direct children (fanoutd-w0, fanoutd-proxy...)."""
        out = {}
        for pid in proc_children(self.pid):
            comm = proc_comm(pid)
            if comm is not None:
                out[comm] = pid
        return out


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    """A short temporary directory: ipc:// paths must fit in sun_path (108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="fo-it-") as d:
        yield Path(d)


def base_env() -> dict[str, str]:
    """The test runner's environment for a fanoutd process, without the systemd variables
    a runner started by systemd would pass on, plus PYTHONPATH to this checkout."""
    systemd_vars = {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"}
    env = {k: v for k, v in os.environ.items() if k not in systemd_vars}
    env["PYTHONPATH"] = str(REPO)
    return env


def cli_argv() -> list[str]:
    """The command that runs this checkout's fanoutd (with base_env())."""
    return [sys.executable, "-m", "fanoutd"]


def run_cli(ns: NetNS | None, *args: str, timeout: float = 30.0,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m fanoutd ARGS` (inside `ns` when given) to completion, bounded."""
    argv = [sys.executable, "-m", "fanoutd", *args]
    if ns is not None:
        argv = ["ip", "netns", "exec", ns.name, *argv]
    env = {**base_env(), **(env or {})}
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False)


@dataclass
class CurveKeys:
    """A CURVE publisher's configuration file and the keys its clients need."""

    config: Path  # publish.curve: the server's secret key, clients_dir
    server_public: Path  # what clients give as their curve_server_key
    secrets: dict[str, Path]  # each client's secret key (NAME.key_secret)


def curve_keys(workdir: Path, admitted: Iterable[str], others: Iterable[str] = ()) -> CurveKeys:
    """Key pairs from `fanoutd keygen` for a publisher that admits only the `admitted`
    clients (their public keys in its clients_dir), and for `others` it does not know."""
    def keygen(name: str) -> tuple[Path, Path]:
        proc = run_cli(None, "keygen", str(workdir / name), "--name", name)
        assert proc.returncode == 0, proc.stderr
        return workdir / name / f"{name}.key", workdir / name / f"{name}.key_secret"

    server_public, server_secret = keygen("server")
    clients = workdir / "clients"
    clients.mkdir()
    secrets: dict[str, Path] = {}
    for name in admitted:
        public, secrets[name] = keygen(name)
        (clients / public.name).write_bytes(public.read_bytes())
    for name in others:
        _, secrets[name] = keygen(name)
    config = workdir / "fanoutd.yaml"
    config.write_text(f"publish:\n  curve:\n    secret_key_file: {server_secret}\n"
                      f"    clients_dir: {clients}\n")
    return CurveKeys(config, server_public, secrets)


# --------------------------------------------------------------------------- subscriber


@dataclass
class Capture:
    """What a Subscriber received: whole batches (with their topics) and flattened rows.

    Each row is dict(zip(batch["fields"], row)) plus "worker" and "seq" of its batch. A
    version 2 batch (columns) gets "fields" and "packets" too, read from its columns by
    wire.decode_column, the plain reader of the format.
    """

    batches: list[dict] = field(default_factory=list)
    topics: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    other: list[list[bytes]] = field(default_factory=list)  # unexpected messages
    arrived: list[float] = field(default_factory=list)  # time.monotonic() of each batch

    def add(self, topic: str, batch: dict) -> None:
        if batch.get("v") == 2:  # columns: give it the rows of version 1 as well
            n, columns = batch["n"], batch["columns"]
            batch["fields"] = list(columns)
            batch["packets"] = [list(r) for r in zip(*(decode_column(c, n)
                                                       for c in columns.values()), strict=True)]
        self.topics.append(topic)
        self.batches.append(batch)
        self.arrived.append(time.monotonic())
        for values in batch["packets"]:
            row = dict(zip(batch["fields"], values, strict=True))
            row["worker"] = batch["worker"]
            row["seq"] = batch["seq"]
            self.rows.append(row)

    def summary(self) -> str:
        per_worker: dict[int, int] = {}
        for r in self.rows:
            per_worker[r["worker"]] = per_worker.get(r["worker"], 0) + 1
        return (f"received {len(self.batches)} batches, {len(self.rows)} rows, "
                f"rows per worker {dict(sorted(per_worker.items()))}, "
                f"{len(self.other)} unexpected messages")


class Subscriber:
    """A real zmq SUB socket on the daemon's endpoint, subscribed to pkt. and the hello."""

    def __init__(self, endpoint: str, reconnect_ivl_ms: int | None = None) -> None:
        """reconnect_ivl_ms: ZMQ_RECONNECT_IVL, how long to wait before reconnecting
        after the publisher went away (libzmq adds up to as much again at random)."""
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        if reconnect_ivl_ms is not None:
            self.sock.setsockopt(zmq.RECONNECT_IVL, reconnect_ivl_ms)
        self.sock.subscribe(b"pkt.")
        self.sock.subscribe(b"fanoutd.hello")
        self.sock.connect(endpoint)
        self.capture = Capture()

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv(self, timeout: float) -> list[bytes] | None:
        if not self.sock.poll(max(0, int(timeout * 1000))):
            return None
        return self.sock.recv_multipart()

    def wait_hello(self, timeout: float = 10.0, detail: Callable[[], str] | None = None) -> None:
        """Wait for the single-frame `fanoutd.hello`: after it, subscriptions are live.

        Nothing is injected before this, so no frame can be published before we listen.
        """
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self._recv(left)
            if msg == [b"fanoutd.hello"]:
                return
            if msg is not None:
                self._take(msg)
        extra = f"\n{detail()}" if detail else ""
        raise WaitTimeout(f"no fanoutd.hello within {timeout}s{extra}")

    def take_arrivals(self, timeout: float) -> list[float]:
        """Wait up to timeout s for a message, then receive every message already queued,
        and keep them (in capture): their arrival times (time.monotonic()), each taken as
        it is received, before any of them is decoded (which takes milliseconds)."""
        msg = self._recv(timeout)
        if msg is None:
            return []
        got = [(time.monotonic(), msg)]
        while True:
            try:
                got.append((time.monotonic(), self.sock.recv_multipart(zmq.NOBLOCK)))
            except zmq.Again:
                break
        for _, msg in got:
            self._take(msg)
        return [at for at, _ in got]

    def _take(self, msg: list[bytes]) -> None:
        if len(msg) == 2 and msg[0].startswith(b"pkt."):
            self.capture.add(msg[0].decode(), msgpack.unpackb(msg[1]))
        elif msg != [b"fanoutd.hello"]:
            self.capture.other.append(msg)

    def collect(self, until: Callable[[list[dict]], bool], timeout: float = 10.0,
                settle: float = 0.3, detail: Callable[[], str] | None = None) -> Capture:
        """Receive batches until until(rows) holds, then drain until `settle` s are quiet.

        The quiet drain is what lets a test see duplicates: anything that arrives late
        and twice is still collected. Raises WaitTimeout (with a summary of what did
        arrive) when `timeout` passes first. Returns the cumulative Capture.
        """
        deadline = time.monotonic() + timeout
        while not until(self.capture.rows):
            left = deadline - time.monotonic()
            if left <= 0:
                extra = f"\n{detail()}" if detail else ""
                raise WaitTimeout(f"collect: condition not met within {timeout}s; "
                                  f"{self.capture.summary()}{extra}")
            msg = self._recv(min(left, 0.2))
            if msg is not None:
                self._take(msg)
        quiet_until = time.monotonic() + settle
        hard_stop = time.monotonic() + max(5.0, 10 * settle)  # a stream that never stops
        while time.monotonic() < min(quiet_until, hard_stop):
            msg = self._recv(quiet_until - time.monotonic())
            if msg is not None:
                self._take(msg)
                quiet_until = time.monotonic() + settle
        return self.capture


def at_least(n: int) -> Callable[[list[dict]], bool]:
    return lambda rows: len(rows) >= n


def all_keys(keys: set, key: Callable[[dict], object]) -> Callable[[list[dict]], bool]:
    """until-condition: every key in `keys` has been seen among the rows. Rows only grow,
    so each call looks at the new ones alone (collect calls it for every batch)."""
    seen: set = set()
    done = 0

    def until(rows: list[dict]) -> bool:
        nonlocal done
        if len(rows) < done:  # another list: start again
            seen.clear()
            done = 0
        seen.update(key(r) for r in rows[done:])
        done = len(rows)
        return keys <= seen
    return until


# --------------------------------------------------------------------------- sd_notify


class DatagramSink:
    """An AF_UNIX SOCK_DGRAM socket bound at `path`, drained by a thread.

    Every datagram is kept with its arrival time (time.monotonic()). close() stops the
    thread, closes the socket and removes the socket file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.bind(str(path))
        except OSError:
            self.sock.close()
            raise
        self.sock.settimeout(0.05)
        self.received: list[tuple[float, bytes]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.received.append((time.monotonic(), data))

    def snapshot(self) -> list[tuple[float, bytes]]:
        with self._lock:
            return list(self.received)

    def notify_lines(self) -> list[tuple[float, str]]:
        """Every sd_notify assignment received, as (arrival time, "KEY=VALUE")."""
        return [(t, line) for t, data in self.snapshot()
                for line in data.decode(errors="replace").split("\n") if line]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> DatagramSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- tail


class LineReader:
    """Collects a subprocess's stdout lines on a thread, so reads can be bounded."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._thread = threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for line in iter(stream.readline, ""):
            self.lines.put(line)

    def drain(self) -> list[str]:
        with contextlib.suppress(queue.Empty):
            while True:
                self.seen.append(self.lines.get_nowait())
        return self.seen

    def json_objects(self) -> list[dict]:
        out = []
        for line in self.drain():
            if line.strip():
                out.append(json.loads(line))
        return out


class StreamReader(LineReader):
    """A LineReader for any text stream, such as a process's stderr."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines = queue.Queue()
        self.seen = []
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()


def wait_line(reader: LineReader, predicate: Callable[[str], bool], timeout: float, what: str,
              detail: Callable[[], str] | None = None) -> str:
    """Wait (bounded) until one of reader's lines satisfies predicate, and return it."""
    def found() -> str | None:
        return next((line for line in reader.drain() if predicate(line)), None)
    return wait_for(found, timeout, what, detail=detail)


# --------------------------------------------------------------------------- traffic


def frame_id(i: int) -> tuple[bytes, int]:
    """Frame i's identity as a row shows it: (source address, source port)."""
    return frames.ip_bytes(f"10.{i >> 16 & 0xFF}.{i >> 8 & 0xFF}.{i & 0xFF}"), 1000 + i % 60000


def numbered_frame(i: int) -> bytes:
    src, sport = frame_id(i)
    return frames.udp4_frame(src=".".join(str(b) for b in src), sport=sport)


class Pump:
    """Injects `total` numbered frames from a thread at a bounded pace (~20k frames/s),
    setting `reached` once `mark` frames are out, so a fault can be timed mid-traffic."""

    def __init__(self, injector: Injector, total: int, mark: int) -> None:
        self.injector, self.total, self.mark = injector, total, mark
        self.reached = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for i in range(self.total):
            self.injector.send(numbered_frame(i))
            if i == self.mark:
                self.reached.set()
            if i % 50 == 49:
                time.sleep(0.002)
        self.reached.set()

    def __enter__(self) -> Pump:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(timeout=60)
