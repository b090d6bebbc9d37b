"""Commands against the namespace's real interfaces (cap0, inj0) and a real daemon:
print-config's output is a valid configuration that prints the same again; `stats
--watch` into a pipe prints plain tables."""

import subprocess
import sys

import netlab
import pytest

pytestmark = pytest.mark.integration

SMALL_RING = "ring: {block_size: 65536, block_count: 4}\n"

ROUND_TRIP_CONFIGS = {
    "single-interface": "interface: cap0\nworkers: 2\n" + SMALL_RING,
    "entries-with-overrides": (
        "workers: 2\n" + SMALL_RING +
        "interfaces:\n"
        "  - interface: cap0\n"
        "    workers: 3\n"
        "    fanout: {mode: lb, group_id: 7}\n"
        "  - interface: inj0\n"
        "    filter: udp port 53\n"
        "    payload_bytes: 32\n"
        "    ring: {block_count: 8}\n"),
    "auto-values": (
        "interface: auto\nworkers: auto\nruntime_dir: auto\nfanout: {group_id: auto}\n"
        + SMALL_RING +
        "interfaces:\n"
        "  - interface: cap0\n"
        "    workers: auto\n"
        "    fanout: {group_id: auto}\n"
        "  - interface: inj0\n"
        "    workers: 1\n"),
    "none-values": (
        "interface: cap0\nuser: none\n" + SMALL_RING +
        "publish: {curve: {secret_key_file: none, clients_dir: none}}\n"
        "metrics: {tls_cert_file: none, tls_key_file: none, basic_auth_user: none}\n"),
}


@pytest.mark.parametrize("text", ROUND_TRIP_CONFIGS.values(), ids=ROUND_TRIP_CONFIGS.keys())
def test_print_config_output_round_trips(ns, text):
    with netlab.workdir() as wd:
        first = wd / "first.yaml"
        first.write_text(text)
        printed = netlab.run_cli(ns, "print-config", "-c", str(first))
        assert printed.returncode == 0, printed.stderr
        again = wd / "again.yaml"
        again.write_text(printed.stdout)
        checked = netlab.run_cli(ns, "check-config", "-c", str(again))
        assert checked.returncode == 0, f"{checked.stderr}\n--- printed:\n{printed.stdout}"
        reprinted = netlab.run_cli(ns, "print-config", "-c", str(again))
        assert reprinted.returncode == 0, reprinted.stderr
        assert reprinted.stdout == printed.stdout


def test_stats_watch_into_a_pipe_prints_no_escape_codes(ns, start_daemon):
    """Not a terminal: no clear-screen codes, each table after a blank line."""
    daemon = start_daemon(workers=2)
    argv = ["ip", "netns", "exec", ns.name, sys.executable, "-m", "fanoutd", "stats",
            "--watch", "--interval", "0.1", "--metrics", f"127.0.0.1:{daemon.metrics_port}"]
    proc = subprocess.Popen(argv, cwd=netlab.REPO, env={**netlab.base_env(),
                                                        "PYTHONUNBUFFERED": "1"},
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out = netlab.LineReader(proc)

        def tables() -> int:
            return sum(line.startswith("interface ") for line in out.drain())
        netlab.wait_for(lambda: tables() >= 3, 20, "three tables from stats --watch",
                        detail=lambda: f"stdout {out.seen[-8:]}\n{daemon.logs()}")
    finally:
        proc.kill()
        proc.wait(timeout=10)
    text = "".join(out.drain())
    assert "\033" not in text, repr(text[:200])
    table = ["interface", "cap0", "cap0", "total"]  # a header, two workers, the total
    blocks = [[line.split()[0] for line in block.splitlines()]
              for block in text.split("\n\n")]
    assert blocks[0] == table and blocks[1] == table, repr(text)
