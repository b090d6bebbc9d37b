"""`fanoutd relay` and JetStreamSubscriber against the real thing: a 3-node nats-server
cluster with JetStream on loopback (tests/natslab.py), a 3-replica stream, a daemon
capturing in a namespace, relays, consumers.

Every proof counts batches exactly: the daemon's fanoutd_batches_published_total per
worker says which (worker, seq) it published (seq from 0, one epoch per ring), and the
consumers' (worker, epoch, seq) must be that set, each once.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import frames as F
import natslab
import netlab
import pytest

from fanoutd.client import JetStreamSubscriber

pytestmark = pytest.mark.integration

WORKERS = 2
SENSOR = "sensor.one"  # a dot, which the subject must escape


@pytest.fixture
def cluster():
    reason = natslab.have_nats()
    if reason:
        pytest.skip(reason)
    with natslab.NatsCluster(size=3, replicas=3) as c:
        yield c


@pytest.fixture
def daemon(ns, start_daemon):
    return start_daemon(workers=WORKERS, fanout="lb", extra=["--sensor", SENSOR])


@pytest.fixture
def start_relay(cluster):
    """Factory: start_relay(daemon, name, extra) -> a running natslab.Relay whose
    subscription is in effect (unless wait=False); every relay is SIGKILLed at teardown."""
    with contextlib.ExitStack() as stack:
        wd = stack.enter_context(netlab.workdir())

        def start(daemon: netlab.Daemon, name: str = "relay", extra: tuple[str, ...] = (),
                  wait: bool = True) -> natslab.Relay:
            relay = stack.enter_context(natslab.Relay(wd, [daemon.endpoint], cluster,
                                                      extra=extra, name=name))
            if wait:
                relay.wait_ready()
            return relay
        yield start


class Traffic:
    """Frames into inj0 from a thread, in rounds (each round makes a few batches), until
    stopped or `rounds` are sent; the total is `sent`. Leaving the block waits for the
    rounds to be sent (bounded), or stops the traffic that has no end."""

    def __init__(self, injector: netlab.Injector, rounds: int | None = None,
                 per_round: int = 40, pause: float = 0.01) -> None:
        self.injector, self.rounds, self.per_round = injector, rounds, per_round
        self.pause = pause
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set() and (self.rounds is None or i < self.rounds):
            self.sent += self.injector.send_all(
                F.udp4_frame(sport=1000 + (i * self.per_round + k) % 60000, dport=9)
                for k in range(self.per_round))
            i += 1
            self._stop.wait(self.pause)  # pacing: spreads the frames over many ring blocks

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.rounds is not None and exc[0] is None:
            self._thread.join(timeout=60)
        self.stop()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=30)
        return self.sent


def published(daemon: netlab.Daemon) -> dict[int, int]:
    """{worker: batches published}, once it holds still (the last blocks retire within the
    block timeout)."""
    def count() -> dict[int, int]:
        m = daemon.metrics()
        return {int(dict(lbl)["worker"]): int(v) for lbl, v in
                netlab.samples(m, "fanoutd_batches_published_total").items()}

    previous: list[dict[int, int]] = [{}]

    def settled() -> dict[int, int] | None:
        now = count()
        same = now == previous[0] and sum(now.values()) > 0
        previous[0] = now
        return now if same else None
    return netlab.wait_for(settled, 20, "the daemon's published batches to hold still",
                           interval=0.3, detail=daemon.logs)


def expected_keys(counts: dict[int, int]) -> set[tuple[int, int]]:
    return {(worker, seq) for worker, n in counts.items() for seq in range(n)}


def wait_stored(relays: list[natslab.Relay], cluster: natslab.NatsCluster,
                total: int, timeout: float = 60) -> None:
    """Until the stream holds `total` messages and no relay has anything in flight."""
    def done() -> bool:
        for relay in relays:
            if relay.proc and relay.proc.poll() is None \
                    and relay.metrics().get("fanoutd_relay_in_flight", 1) != 0:
                return False
        return cluster.stream_messages() >= total
    netlab.wait_for(done, timeout, f"{total} batches in the stream", interval=0.3,
                    detail=lambda: "\n".join(r.logs() for r in relays))


def consume(cluster: natslab.NatsCluster, durable: str | None = None,
            idle: float = 3.0) -> list[tuple[str, str, int, int, int]]:
    """Every batch a consumer gets until the stream has nothing for `idle` seconds:
    (sensor, iface, worker, epoch, seq) each."""
    got = []
    with JetStreamSubscriber(cluster.live_urls(), durable=durable) as sub:
        for batch in sub.batches(timeout=idle):
            assert len(list(batch.records())) == batch.n  # readable, as a Batch is
            got.append((batch.sensor, batch.iface, batch.worker, batch.epoch, batch.seq))
    return got


def check_exactly(got: list[tuple], counts: dict[int, int]) -> None:
    """got names every published batch exactly once, all of one sensor, iface and epoch
    per worker."""
    dupes = [k for k, n in Counter(got).items() if n > 1]
    assert not dupes, f"delivered twice: {dupes[:5]}"
    assert {g[0] for g in got} == {SENSOR} and {g[1] for g in got} == {"cap0"}
    assert all(len({g[3] for g in got if g[2] == w}) == 1 for w in counts), "epochs"
    have = {(g[2], g[4]) for g in got}
    want = expected_keys(counts)
    assert have == want, (f"missing {sorted(want - have)[:10]}, "
                          f"unexpected {sorted(have - want)[:10]}")


def test_every_batch_arrives(cluster, daemon, injector, start_relay):
    relay = start_relay(daemon)
    with Traffic(injector, rounds=30) as traffic:
        pass
    counts = published(daemon)
    total = sum(counts.values())
    wait_stored([relay], cluster, total)
    got = consume(cluster)
    check_exactly(got, counts)
    m = relay.metrics()
    assert m["fanoutd_relay_batches_stored_total"] == total
    assert m["fanoutd_relay_batches_failed_total"] == 0
    assert m.get("fanoutd_relay_seq_gaps_total", 0) == 0
    assert traffic.sent == 30 * 40
    assert cluster.stream_messages() == total
    # `fanoutd tail --nats`: the same packets, from the stream
    tail = netlab.run_cli(None, "tail", "--nats", cluster.url_list, "--durable", "tail",
                          "--json", "--count", "5", "--timeout", "20", timeout=60)
    assert tail.returncode == 0, tail.stderr
    lines = [json.loads(line) for line in tail.stdout.splitlines()]
    assert len(lines) == 5 and {line["sensor"] for line in lines} == {SENSOR}, lines
    assert {line["dport"] for line in lines} == {9}


def test_a_sensor_that_encrypts_is_relayed_with_the_relays_key(cluster, ns, start_daemon,
                                                              injector, start_relay):
    """A sensor whose publisher uses CURVE and admits only known clients: the relay with
    an admitted key stores every batch; one with another key gets nothing and says why."""
    with netlab.workdir() as wd:
        keys = netlab.curve_keys(wd, admitted=["relay"], others=["intruder"])
        daemon = start_daemon(workers=WORKERS, fanout="lb",
                              extra=("-c", str(keys.config), "--sensor", SENSOR))

        def relay_with_key(name: str, wait: bool) -> natslab.Relay:
            return start_relay(daemon, name, ("--curve-server-key", str(keys.server_public),
                                              "--curve-client-cert", str(keys.secrets[name])),
                               wait=wait)
        intruder = relay_with_key("intruder", wait=False)
        relay = relay_with_key("relay", wait=True)
        with Traffic(injector, rounds=10):
            pass
        counts = published(daemon)
        wait_stored([relay], cluster, sum(counts.values()))
        check_exactly(consume(cluster), counts)
        netlab.wait_for(lambda: "does not admit this client's key" in intruder.log.read_text(),
                        15, "the refused relay to say why", detail=intruder.log.read_text)
        assert intruder.metrics().get("fanoutd_relay_batches_received_total", 0) == 0


def test_the_relay_notifies_systemd(cluster, daemon, injector):
    """Under systemd (Type=notify): READY=1 once it relays, with a status line naming its
    sensors; the status kept up to date; WATCHDOG=1 at half WATCHDOG_USEC, also while
    its window is full and NATS does not answer (waiting is no hang: the watchdog must
    not kill it then); STOPPING=1 on SIGTERM, and exit 0."""
    with netlab.workdir() as wd, netlab.DatagramSink(wd / "notify.sock") as sink:
        lines = sink.notify_lines

        def after(t: float, prefix: str) -> list[str]:
            return [line for at, line in lines() if at >= t and line.startswith(prefix)]

        relay = natslab.Relay(wd, [daemon.endpoint], cluster, extra=("--max-in-flight", "1"),
                              env={"NOTIFY_SOCKET": str(sink.path),
                                   "WATCHDOG_USEC": "1000000"})
        with relay:
            ready_at = netlab.wait_for(
                lambda: next((t for t, line in lines() if line == "READY=1"), None), 30,
                "READY=1", detail=lambda: f"{lines()}\n{relay.log.read_text()}")
            assert any(line.startswith("STATUS=") and "sensors subscribed" in line
                       for line in after(ready_at, "STATUS=")), lines()
            netlab.wait_for(lambda: len(after(ready_at, "WATCHDOG=1")) >= 3, 5,
                            "3 WATCHDOG=1", detail=lines)
            with Traffic(injector, rounds=5):
                pass
            netlab.wait_for(lambda: any("1/1 sensors subscribed" in line and
                                        " 0 batches stored" not in line
                                        for line in after(ready_at, "STATUS=")),
                            15, "a status line with batches stored", detail=lines)

            # NATS stops answering (every server stopped): the window fills, the relay
            # waits for its acknowledgement, and keeps telling the watchdog it lives.
            servers = [s.proc for s in cluster.servers if s.proc and s.proc.poll() is None]
            for proc in servers:
                proc.send_signal(signal.SIGSTOP)
            try:
                with Traffic(injector, rounds=5):
                    pass
                netlab.wait_for(lambda: relay.metrics().get("fanoutd_relay_in_flight") == 1,
                                15, "the relay's window to fill", detail=relay.log.read_text)
                waiting_since = time.monotonic()
                netlab.wait_for(lambda: len(after(waiting_since, "WATCHDOG=1")) >= 3, 5,
                                "3 WATCHDOG=1 while waiting for NATS", detail=lines)
                assert relay.metrics().get("fanoutd_relay_in_flight") == 1  # still waiting
            finally:
                for proc in servers:
                    proc.send_signal(signal.SIGCONT)
            assert relay.stop() == 0, relay.log.read_text()
        assert "STOPPING=1" in [line for _, line in lines()], lines()


def test_a_cluster_node_killed_under_traffic_loses_nothing(cluster, daemon, injector,
                                                           start_relay):
    relay = start_relay(daemon)
    with Traffic(injector) as traffic:
        netlab.wait_for(lambda: relay.metrics().get("fanoutd_relay_batches_stored_total", 0)
                        >= 20, 20, "batches stored before the kill")
        leader = cluster.stream_leader()
        leader.kill()  # SIGKILL: the stream must elect a new leader among the two left
        before = relay.metrics()["fanoutd_relay_batches_received_total"]
        netlab.wait_for(lambda: relay.metrics()["fanoutd_relay_batches_received_total"]
                        >= before + 100, 60, "traffic after the kill", detail=relay.logs)
        traffic.stop()
    counts = published(daemon)
    total = sum(counts.values())
    wait_stored([relay], cluster, total, timeout=90)
    check_exactly(consume(cluster), counts)
    m = relay.metrics()
    assert m["fanoutd_relay_batches_failed_total"] == 0, relay.logs()
    assert m.get("fanoutd_relay_seq_gaps_total", 0) == 0, relay.logs()
    assert m["fanoutd_relay_batches_stored_total"] + \
        m["fanoutd_relay_batches_duplicate_total"] == total
    assert cluster.stream_messages() == total  # a retry stored twice would show here


def test_a_relay_killed_and_restarted_loses_nothing_and_duplicates_nothing(
        cluster, daemon, injector, start_relay):
    """Two relays of one sensor (the documented way to lose nothing while one is down):
    one is SIGKILLed under traffic and started again; the stream holds every batch once,
    because JetStream drops the second copy by its Nats-Msg-Id."""
    first = start_relay(daemon, "first")
    second = start_relay(daemon, "second")
    with Traffic(injector) as traffic:
        netlab.wait_for(lambda: first.metrics().get("fanoutd_relay_batches_received_total",
                                                    0) >= 20, 20, "batches relayed")
        first.kill()
        mid = second.metrics()["fanoutd_relay_batches_received_total"]
        netlab.wait_for(lambda: second.metrics()["fanoutd_relay_batches_received_total"]
                        >= mid + 30, 30, "traffic while the first relay is down")
        first.start()
        first.wait_ready()
        netlab.wait_for(lambda: first.metrics().get("fanoutd_relay_batches_received_total",
                                                    0) >= 30, 30, "the restarted relay")
        traffic.stop()
    counts = published(daemon)
    total = sum(counts.values())
    wait_stored([first, second], cluster, total)
    check_exactly(consume(cluster), counts)
    assert cluster.stream_messages() == total  # no batch stored twice
    dupes = first.metrics()["fanoutd_relay_batches_duplicate_total"] + \
        second.metrics()["fanoutd_relay_batches_duplicate_total"]
    assert dupes > 0  # both sent the batches after the restart: JetStream kept one
    assert first.metrics()["fanoutd_relay_batches_failed_total"] == 0


# A consumer process: prints "ready" once its consumer is bound, then one JSON line per
# batch, and exits after `idle` seconds without one.
CONSUMER = r'''
import json, sys
from fanoutd.client import JetStreamSubscriber
servers, durable, idle = sys.argv[1], sys.argv[2], float(sys.argv[3])
with JetStreamSubscriber(servers, durable=durable, fetch=4) as sub:
    print("ready", flush=True)
    for b in sub.batches(timeout=idle):
        print(json.dumps([b.sensor, b.iface, b.worker, b.epoch, b.seq]), flush=True)
'''


@contextlib.contextmanager
def consumer_process(cluster: natslab.NatsCluster, durable: str, idle: float):
    argv = [sys.executable, "-c", CONSUMER, cluster.url_list, durable, str(idle)]
    proc = subprocess.Popen(argv, cwd=natslab.ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                            env={**netlab.base_env()})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def batches_of(proc: subprocess.Popen, timeout: float = 120) -> list[tuple]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return [tuple(json.loads(line)) for line in out.splitlines() if line.startswith("[")]


def wait_ready_line(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()  # bounded: the consumer connects or fails within 10 s
    assert line.strip() == "ready", proc.stderr.read() if proc.poll() is not None else line


def test_two_consumers_of_one_durable_share_the_batches(cluster, daemon, injector,
                                                        start_relay):
    start_relay(daemon)
    with consumer_process(cluster, "shared", idle=5) as a, \
            consumer_process(cluster, "shared", idle=5) as b:
        wait_ready_line(a)
        wait_ready_line(b)
        with Traffic(injector, rounds=40, pause=0.05):  # 2 s: many fetches of each
            pass
        got_a, got_b = batches_of(a), batches_of(b)
    counts = published(daemon)
    assert got_a and got_b, f"one consumer got everything: {len(got_a)}, {len(got_b)}"
    assert not set(got_a) & set(got_b), "a batch went to both"
    check_exactly(got_a + got_b, counts)


def test_idle_consumers_of_one_durable_stop_on_time(cluster):
    """Consumers told to stop after `idle` seconds without a batch stop then, however
    many share the durable and for as long as they idle. The server ends each pull
    request with a status (408 when its expires passes): a status that comes for a
    request the client no longer waits for must not be taken for the end of the next
    one, nor count as a batch (that kept one of test_two_consumers' consumers going for
    a minute and more)."""
    idle, consumers, rounds = 2.0, 4, 5
    took: list[float] = []
    errors: list[BaseException] = []

    def idle_consumer() -> None:
        try:
            with JetStreamSubscriber(cluster.url_list, durable="idle") as sub:
                for _ in range(rounds):
                    start = time.monotonic()
                    assert list(sub.batches(timeout=idle)) == []
                    took.append(time.monotonic() - start)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=idle_consumer, daemon=True)
               for _ in range(consumers)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + rounds * (idle + 1.5) + 60
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not errors, errors
    assert len(took) == consumers * rounds, "a consumer never stopped"
    assert max(took) < idle + 1.5, sorted(took)


def test_a_consumer_that_was_down_catches_up(cluster, daemon, injector, start_relay):
    relay = start_relay(daemon)
    with Traffic(injector, rounds=10):
        pass
    first_counts = published(daemon)
    wait_stored([relay], cluster, sum(first_counts.values()))
    before = consume(cluster, durable="late")  # reads what there is, then goes away
    check_exactly(before, first_counts)
    with Traffic(injector, rounds=10):  # while no consumer of "late" runs
        pass
    counts = published(daemon)
    assert sum(counts.values()) > sum(first_counts.values())
    wait_stored([relay], cluster, sum(counts.values()))
    after = consume(cluster, durable="late")
    assert not set(before) & set(after), "batches acknowledged came again"
    check_exactly(before + after, counts)
    time.sleep(0)  # nothing to wait for: the stream had it all
