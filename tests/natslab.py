"""A NATS JetStream cluster on loopback for the relay's tests and benchmark.

NatsCluster starts N nats-server processes (Debian's binary: scripts/install.sh --test
puts it in .venv/bin) listening on 127.0.0.1 only, on free ports, with their JetStream
stores in a temporary directory; it returns once the cluster has formed and the stream
(3 replicas by default) has a leader and every replica current. Leaving it kills every
server and removes the directory, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fanoutd import jetstream

ROOT = Path(__file__).resolve().parent.parent


def nats_server_binary() -> str | None:
    local = Path(sys.prefix) / "bin" / "nats-server"
    if local.exists():
        return str(local)
    return shutil.which("nats-server")


def free_ports(count: int) -> list[int]:
    """count distinct free TCP ports on 127.0.0.1 (held together while picked)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
        return ports


def poll(condition: Callable[[], Any], timeout: float, what: str,
         interval: float = 0.1) -> Any:
    """condition()'s first true value, checked every interval for up to timeout s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(interval)


class NatsServer:
    """One member: its ports, config file and process."""

    def __init__(self, name: str, directory: Path, client: int, route: int, http: int,
                 routes: list[int], max_payload: int) -> None:
        self.name, self.client_port, self.http_port = name, client, http
        self.url = f"nats://127.0.0.1:{client}"
        self.config = directory / f"{name}.conf"
        self.log = directory / f"{name}.log"
        store = directory / name
        self.config.write_text(f"""
server_name: {name}
listen: 127.0.0.1:{client}
http: 127.0.0.1:{http}
max_payload: {max_payload}
jetstream {{
  store_dir: "{store}"
  max_memory_store: 64MB
  max_file_store: 4GB
}}
cluster {{
  name: fanoutd-test
  listen: 127.0.0.1:{route}
  routes: [{", ".join(f"nats-route://127.0.0.1:{p}" for p in routes)}]
}}
""")
        self.proc: subprocess.Popen | None = None

    def start(self, binary: str) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([binary, "-c", str(self.config)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def healthy(self) -> bool:
        """Its JetStream is up and current with the cluster (/healthz)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz",
                                        timeout=1) as answer:
                return json.load(answer).get("status") == "ok"
        except (OSError, ValueError):
            return False

    def logs(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


class NatsCluster:
    """`with NatsCluster() as cluster:` N servers, one stream ready (see the docstring)."""

    def __init__(self, size: int = 3, stream: str = jetstream.DEFAULT_STREAM,
                 replicas: int = 3, max_payload: int = 8 << 20,
                 ready_timeout: float = 60.0) -> None:
        self.size, self.stream, self.replicas = size, stream, replicas
        self.max_payload, self.ready_timeout = max_payload, ready_timeout
        self.servers: list[NatsServer] = []
        self.directory: Path | None = None
        self.binary = nats_server_binary()

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def url_list(self) -> str:
        return ",".join(self.urls)

    def __enter__(self) -> NatsCluster:
        if self.binary is None:
            raise RuntimeError("no nats-server: run ./scripts/install.sh --test")
        self.directory = Path(tempfile.mkdtemp(prefix="fanoutd-nats-"))
        try:
            ports = free_ports(3 * self.size)
            routes = ports[self.size:2 * self.size]
            for i in range(self.size):
                self.servers.append(NatsServer(
                    f"n{i}", self.directory, ports[i], routes[i], ports[2 * self.size + i],
                    routes, self.max_payload))
            for server in self.servers:
                server.start(self.binary)
            self.wait_healthy()
            if self.stream:
                self.run(self._make_stream())
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self.servers:
            server.kill()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def wait_healthy(self, servers: list[NatsServer] | None = None) -> None:
        for server in servers or self.servers:
            try:
                poll(server.healthy, self.ready_timeout, f"nats server {server.name}")
            except TimeoutError as e:
                raise TimeoutError(f"{e}\n{server.logs()}") from None

    @staticmethod
    def run(coro: Any) -> Any:
        return asyncio.run(coro)

    async def _make_stream(self) -> None:
        nc = await jetstream.connect(self.urls, "natslab", connect_seconds=10)
        try:
            js = nc.jetstream()
            await jetstream.ensure_stream(js, self.stream, self.replicas,
                                          wait_seconds=self.ready_timeout)
            deadline = time.monotonic() + self.ready_timeout
            while not await self._stream_current(js):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"stream {self.stream}: no leader with every "
                                       f"replica current")
                await asyncio.sleep(0.2)
        finally:
            await nc.close()

    async def _stream_current(self, js: Any) -> bool:
        info = await js.stream_info(self.stream)
        cluster = info.cluster
        if self.replicas == 1:
            return True
        return bool(cluster and cluster.leader and cluster.replicas
                    and len(cluster.replicas) == self.replicas - 1
                    and all(r.current for r in cluster.replicas))

    def stream_leader(self) -> NatsServer:
        """The member that leads the stream now."""
        async def leader() -> str:
            nc = await jetstream.connect(self.live_urls(), "natslab")
            try:
                return (await nc.jetstream().stream_info(self.stream)).cluster.leader
            finally:
                await nc.close()
        name = self.run(leader())
        return next(s for s in self.servers if s.name == name)

    def live_urls(self) -> list[str]:
        return [s.url for s in self.servers if s.proc and s.proc.poll() is None]

    def stream_messages(self) -> int:
        async def count() -> int:
            nc = await jetstream.connect(self.live_urls(), "natslab")
            try:
                return (await nc.jetstream().stream_info(self.stream)).state.messages
            finally:
                await nc.close()
        return self.run(count())

    def logs(self) -> str:
        return "\n".join(f"--- {s.name}\n{s.logs()}" for s in self.servers)


class Relay:
    """`python -m fanoutd relay` from this checkout, in the root namespace (the sensors'
    ipc endpoints and the cluster's loopback ports are reachable there); its output in
    workdir. Leaving it SIGKILLs it if it still runs."""

    def __init__(self, workdir: Path, sources: list[str], cluster: NatsCluster,
                 extra: list[str] | tuple[str, ...] = (), name: str = "relay",
                 env: dict[str, str] | None = None) -> None:
        self.metrics_port = free_ports(1)[0]
        self.argv = [sys.executable, "-m", "fanoutd", "relay",
                     *(a for src in sources for a in ("--from", src)),
                     "--nats", cluster.url_list, "--stream", cluster.stream,
                     "--replicas", str(cluster.replicas),
                     "--metrics", f"127.0.0.1:{self.metrics_port}", *extra]
        self.log = Path(workdir) / f"{name}.log"
        self.env = env or {}  # NOTIFY_SOCKET, WATCHDOG_USEC: as systemd would set them
        self.proc: subprocess.Popen | None = None

    def start(self) -> Relay:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        env.pop("NOTIFY_SOCKET", None)
        env.pop("JOURNAL_STREAM", None)
        env.update(self.env)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        return self

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, and its exit status (bounded)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def metrics(self) -> dict[str, float]:
        """Each sample summed over its labels: {name: value}; {} while not serving."""
        from prometheus_client.parser import text_string_to_metric_families

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                        timeout=2) as answer:
                text = answer.read().decode()
        except OSError:
            return {}
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
        return out

    def check_running(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, \
            f"relay exited {self.proc and self.proc.returncode}\n{self.logs()}"

    def wait_ready(self, sensors: int = 1, timeout: float = 30.0) -> None:
        """Until every sensor's welcome arrived (its subscriptions are in effect)."""
        def ready() -> bool:
            self.check_running()
            return self.metrics().get("fanoutd_relay_sensors_ready", 0) >= sensors
        try:
            poll(ready, timeout, "the relay's subscriptions")
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n{self.logs()}") from None

    def logs(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


def have_nats() -> str | None:
    """Why the relay's tests cannot run here, or None."""
    if nats_server_binary() is None:
        return "no nats-server (./scripts/install.sh --test installs it)"
    try:
        jetstream.require_nats()
    except ImportError as e:
        return str(e)
    return None


if __name__ == "__main__":  # a quick look: start a cluster, print its URLs, stop
    with NatsCluster() as c:
        print(c.url_list, c.stream_leader().name, os.getpid())
