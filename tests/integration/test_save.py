"""`fanoutd save`: a real daemon's stream into rotated Parquet files that analysts query
(the README's polars SQL, and pyarrow), complete files only, also when the saver is
stopped or killed."""

from __future__ import annotations

import signal
import subprocess
import sys

import frames as F
import netlab
import pytest

pytestmark = pytest.mark.integration
pq = pytest.importorskip("pyarrow.parquet")
pl = pytest.importorskip("polars")


def start_save(ns: netlab.NetNS, daemon: netlab.Daemon, directory, *args: str):
    argv = ["ip", "netns", "exec", ns.name, *netlab.cli_argv(), "save", str(directory),
            "--endpoint", daemon.endpoint, *args]
    proc = subprocess.Popen(argv, cwd=netlab.REPO, env=netlab.base_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    err = netlab.StreamReader(proc.stderr)
    netlab.wait_line(err, lambda line: "listening on" in line, 15, "save's listening line",
                     detail=daemon.logs)
    return proc, err


def published(daemon: netlab.Daemon) -> float:
    return netlab.metric_sum(daemon.metrics(), "fanoutd_batches_published_total")


def decoded(daemon: netlab.Daemon) -> float:
    return netlab.metric_sum(daemon.metrics(), "fanoutd_packets_decoded_total")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_save_rotates_and_the_files_answer_queries(ns, injector, start_daemon, tmp_path):
    daemon = start_daemon(workers=2, fanout="lb")
    out = tmp_path / "capture"
    proc, err = start_save(ns, daemon, out, "--rotate-rows", "1", "--count", "300")
    try:
        for round_ in range(3):  # bursts in batches of their own; a file per batch
            before = published(daemon)
            injector.send_all(F.udp4_frame(src=f"10.0.{round_}.{i % 5 + 1}",
                                           sport=5000 + round_ * 100 + i, payload=b"x" * i)
                              for i in range(100))
            netlab.wait_for(lambda b=before: published(daemon) > b, 10, "a batch")
        status = proc.wait(timeout=15)  # --count: it stops by itself after 300 packets
    finally:
        if proc.poll() is None:
            stop(proc)
    assert status == 0, err.drain()
    files = sorted(out.glob("*.parquet"))
    assert not list(out.glob("*.part")), "a file was left unfinished"
    assert len(files) >= 2, files  # rotated
    table = pq.read_table(files)  # every file is complete and they share one schema
    assert table.num_rows == 300
    assert sorted(table.column("sport").to_pylist()) == list(range(5000, 5300))
    assert set(table.column("worker").to_pylist()) <= {0, 1}
    assert set(table.column("iface").to_pylist()) == {"cap0"}
    assert set(table.column("sensor").to_pylist()) == {daemon.endpoint}
    assert table.schema.field("ts_ns").type.unit == "ns"
    summary = "".join(err.drain())
    assert "300 packets in" in summary and "0 batches lost" in summary, summary

    # The README's query: top talkers in one SQL statement.
    top = pl.sql(f"""
        SELECT src, count(*) AS packets, sum(len) AS bytes
        FROM read_parquet('{out}/*.parquet')
        GROUP BY src ORDER BY bytes DESC, src LIMIT 3
    """).collect()
    want: dict[bytes, int] = {}
    for src, length in zip(table.column("src").to_pylist(), table.column("len").to_pylist(),
                           strict=True):
        want[src] = want.get(src, 0) + length
    best = sorted(want.items(), key=lambda kv: (-kv[1], kv[0]))[:3]  # ties by address, as the SQL
    assert list(zip(top["src"].to_list(), top["bytes"].to_list(), strict=True)) == best


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"])
def test_a_stopped_or_killed_saver_leaves_complete_files(ns, injector, start_daemon,
                                                         tmp_path, sig):
    """SIGTERM mid-stream completes the file being written (no .part left); after SIGKILL
    every *.parquet is still complete, only a .part can be partial."""
    daemon = start_daemon(workers=1)
    out = tmp_path / "capture"
    proc, _ = start_save(ns, daemon, out, "--rotate-rows", "1")
    try:
        start = published(daemon)
        for round_ in range(4):  # batches of their own; --rotate-rows 1: a file each
            before = published(daemon)
            injector.send_all(F.udp4_frame(sport=6000 + round_ * 60 + i) for i in range(60))
            netlab.wait_for(lambda b=before: published(daemon) > b, 10, "a batch")
        netlab.wait_for(lambda: decoded(daemon) >= 240, 10, "240 frames published")
        batches = int(published(daemon) - start)  # a round's frames may span two blocks
        # A file is closed when the next batch arrives: once every batch but the last is
        # in a finished file, the saver has them all and is writing the last one.
        netlab.wait_for(lambda: len(list(out.glob("*.parquet"))) >= max(3, batches - 1), 15,
                        f"{batches - 1} finished files",
                        detail=lambda: str(sorted(out.iterdir())))
    finally:
        status = stop(proc, sig)
    files = sorted(out.glob("*.parquet"))
    if sig == signal.SIGTERM:
        assert status == 0
        assert not list(out.glob("*.part"))
        assert pq.read_table(files).num_rows == 240
    assert len(files) >= 3
    for path in files:
        assert pq.read_table(path).num_rows > 0


def test_save_without_a_sensor_says_so(tmp_path):
    proc = subprocess.run([*netlab.cli_argv(), "save", str(tmp_path / "x"), "--endpoint",
                           "ipc:///nonexistent/fanoutd-test", "--timeout", "1"],
                          cwd=netlab.REPO, env=netlab.base_env(), capture_output=True,
                          text=True, timeout=30, check=False)
    assert proc.returncode == 69, proc.stderr
    assert "no answer from ipc:///nonexistent/fanoutd-test" in proc.stderr
    assert sys.executable  # the same interpreter ran it
