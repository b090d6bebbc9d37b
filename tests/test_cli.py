"""The command line without a daemon: usage errors, help texts, check-config's report,
keygen, and what tail and stats print."""

import re
import time
from pathlib import Path

import pytest
import zmq.auth

from fanoutd import cli, exits
from fanoutd.config import RingConfig


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """cli.main(argv) -> (exit status, stdout, stderr); argparse's exits included."""
    try:
        status = cli.main(list(argv))
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


# --------------------------------------------------------------------------- check-config


def test_check_config_reports_every_problem_on_its_own_line(capsys, tmp_path):
    path = tmp_path / "fanoutd.yaml"
    path.write_text("interface: lo\nsurprise: 1\nworkers: many\n"
                    "ring: {block_size: 1000, frame_size: 100}\n")
    status, out, err = run(capsys, "check-config", "-c", str(path), "--block-count", "1")
    assert status == 78 and out == ""
    assert sorted(line.split(": ")[1] for line in err.splitlines()) == [
        "ring.block_count (--block-count)", "ring.block_size", "ring.frame_size", "surprise",
        "workers"], err


# --------------------------------------------------------------------------- keygen


def test_keygen_refuses_to_overwrite_a_key_pair(capsys, tmp_path):
    assert run(capsys, "keygen", str(tmp_path), "--name", "server")[0] == 0
    public, secret = tmp_path / "server.key", tmp_path / "server.key_secret"
    before = public.read_bytes(), secret.read_bytes()
    status, out, err = run(capsys, "keygen", str(tmp_path), "--name", "server")
    assert status == 73 and out == ""
    assert str(public) in err and "--force" in err and len(err.splitlines()) == 1, err
    assert (public.read_bytes(), secret.read_bytes()) == before
    public.unlink()  # either file of the pair is enough to refuse
    assert run(capsys, "keygen", str(tmp_path), "--name", "server")[0] == 73
    assert secret.read_bytes() == before[1]


def test_keygen_force_replaces_the_pair(capsys, tmp_path):
    assert run(capsys, "keygen", str(tmp_path), "--name", "server")[0] == 0
    secret = tmp_path / "server.key_secret"
    old = secret.read_bytes()
    secret.chmod(0o644)  # a replaced secret key must not keep a wider mode
    assert run(capsys, "keygen", str(tmp_path), "--name", "server", "--force")[0] == 0
    assert secret.read_bytes() != old
    assert secret.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "server.key").stat().st_mode & 0o777 == 0o644


def test_keygen_into_something_that_is_not_a_directory(capsys, tmp_path):
    target = tmp_path / "file"
    target.write_text("")
    status, out, err = run(capsys, "keygen", str(target))
    assert (status, out) == (73, "") and err == f"fanoutd keygen: {target}: not a directory\n"


# --------------------------------------------------------------------------- help and usage

EXIT_STATUSES = {
    "run": {0, 2, 69, 70, 77, 78},
    "check-config": {0, 2, 69, 78},
    "print-config": {0, 2, 69, 78},
    "tail": {0, 2, 69, 77, 130},
    "doctor": {0, 1, 2, 69, 77, 78},
    "stats": {0, 2, 69, 130},
    "keygen": {0, 2, 73},
    "save": {0, 2, 69},
    "relay": {0, 2, 69, 78},
}


@pytest.mark.parametrize("command", EXIT_STATUSES)
def test_help_ends_with_the_exit_statuses(capsys, command):
    status, out, _ = run(capsys, command, "--help")
    assert status == 0
    _, sep, epilog = out.partition("\nexit status:\n")
    assert sep, out
    listed = {int(m) for m in re.findall(r"^  (\d+) ", epilog, re.MULTILINE)}
    assert listed == EXIT_STATUSES[command], epilog


def test_help_shows_defaults(capsys):
    out = " ".join(run(capsys, "run", "--help")[1].split())  # unwrapped
    assert f"ring block size (default: from the file, else {RingConfig().block_size})" in out
    assert "worker processes (or auto) (default: from the file, else auto: one per CPU)" in out
    out = " ".join(run(capsys, "stats", "--help")[1].split())
    assert "(default: 127.0.0.1:9740)" in out and "(default: 1.0)" in out
    out = " ".join(run(capsys, "tail", "--help")[1].split())
    assert "(default: tcp://127.0.0.1:7440)" in out and "(default: no limit)" in out


def test_the_readme_lists_every_status_a_command_returns():
    """The README's table and fanoutd/exits.py agree: every status a command can return
    has a row, and a row's status is one the table in exits.py names."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.partition("### Exit statuses")[2].partition("\n\n###")[0]
    rows = {int(m) for m in re.findall(r"^\| (\d+) \|", table, re.MULTILINE)}
    assert rows == set().union(*EXIT_STATUSES.values())
    internal = {exits.BOOT_FAILED, exits.RECONNECT}  # a child's, seen by the supervisor only
    named = {v for k, v in vars(exits).items() if k.isupper()} - internal
    assert rows == named


@pytest.mark.parametrize("command", EXIT_STATUSES)
def test_an_unknown_option_gets_the_commands_usage(capsys, command):
    argv = [command, "DIR"] if command in ("keygen", "save") else [command]
    status, out, err = run(capsys, *argv, "--bogus")
    assert (status, out) == (2, "")
    assert err.startswith(f"usage: fanoutd {command} "), err
    assert err.rstrip().endswith(f"fanoutd {command}: error: unrecognized arguments: --bogus")


@pytest.mark.parametrize("argv", [
    ["tail", "--count", "0"], ["tail", "--count", "-1"], ["tail", "--count", "x"],
    ["tail", "--timeout", "0"], ["tail", "--timeout", "-2"], ["tail", "--timeout", "nan"],
    ["stats", "--interval", "0"], ["stats", "--metrics", "9740"],
    ["tail", "--endpoint", "foo"], ["tail", "--endpoint", "inproc://x"],
    ["tail", "--endpoint", "udp://h:1"], ["tail", "--endpoint", "tcp://host"],
    ["tail", "--endpoint", "tcp://*:7440"], ["tail", "--curve-server-key", "/nonexistent"],
], ids=" ".join)
def test_bad_values_are_usage_errors(capsys, tmp_path, argv):
    if argv[0] == "tail":  # bounded even if a bad value were taken: valid ones go first
        argv = ["tail", "--endpoint", f"ipc://{tmp_path}/x", "--timeout", "0.2", *argv[1:]]
    status, out, err = run(capsys, *argv)
    assert (status, out) == (2, "")
    assert err.startswith(f"usage: fanoutd {argv[0]} "), err
    assert argv[-1] in err.splitlines()[-1] and "Traceback" not in err, err


def test_a_public_key_is_not_a_client_cert(capsys, tmp_path):
    public, _ = zmq.auth.create_certificates(str(tmp_path), "alice")
    status, _, err = run(capsys, "tail", "--endpoint", f"ipc://{tmp_path}/x", "--timeout",
                         "0.2", "--curve-server-key", public, "--curve-client-cert", public)
    assert status == 2 and "holds no secret key" in err


def test_good_endpoints_parse():
    parse = cli._parser().parse_args
    for endpoint in ("tcp://sensor-a:7440", "tcp://[::1]:7440", "ipc:///run/fanoutd/pub"):
        assert parse(["tail", "--endpoint", endpoint]).endpoint == [endpoint]


# --------------------------------------------------------------------------- tail


def test_tail_that_never_connects_exits_69(capsys, tmp_path):
    endpoint = f"ipc://{tmp_path}/nobody-publishes-here"
    started = time.monotonic()
    status, out, err = run(capsys, "tail", "--endpoint", endpoint, "--timeout", "0.3")
    assert (status, out) == (69, ""), err
    assert f"no answer from {endpoint}" in err.splitlines()[-1], err
    assert time.monotonic() - started < 10
