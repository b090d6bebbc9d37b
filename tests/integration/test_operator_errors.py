"""Operator errors: each mistake ends `fanoutd` with ONE clear line on stderr that names
the key, flag or object and the reason, the exit status the README documents (2 usage,
69 unavailable, 77 permission, 78 config), no traceback, no process left running and
nothing left in the runtime directory.

Every command runs inside the test's own namespace, in its own session, so that anything
it leaves running is found (and killed) by session id.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import netlab
import pytest

pytestmark = pytest.mark.integration

EX_USAGE, EX_UNAVAILABLE, EX_NOPERM, EX_CONFIG = 2, 69, 77, 78
DROP_TO_NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                  "--inh-caps=-all", "--bounding-set=-all")


@dataclass
class Outcome:
    status: int
    stdout: str
    stderr: str
    left_running: list[tuple[int, int]]  # (pid, start time) still alive after the exit
    runtime_left: list[str]  # what is left in the --runtime-dir

    def shown(self) -> str:
        return (f"exit {self.status}\nstdout: {self.stdout!r}\nstderr: {self.stderr!r}\n"
                f"left running: {self.left_running}\nleft in runtime dir: {self.runtime_left}")


def run_fanoutd(ns: netlab.NetNS, wd: Path, *args: str, prefix: tuple[str, ...] = (),
                timeout: float = 20.0) -> Outcome:
    """Run `[prefix] python -m fanoutd ARGS --runtime-dir WD/run` in the namespace, in a
    new session, to completion (bounded); then collect what it left behind, and kill it.

    The session id is the pid of the process started here; everything fanoutd forks
    stays in that session (nothing in it calls setsid), also once re-parented to init.
    """
    runtime = wd / "run"
    argv = ["ip", "netns", "exec", ns.name, *prefix, sys.executable, "-m", "fanoutd",
            *args, "--runtime-dir", str(runtime)]
    proc = subprocess.Popen(argv, cwd=netlab.REPO, env=netlab.base_env(), text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stdout, stderr = "", f"<still running after {timeout}s: it did not fail>"
    finally:
        left = netlab.session_processes(proc.pid)
        for pid, start in left:
            if netlab.proc_alive((pid, start)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        netlab.wait_for(lambda: not any(map(netlab.proc_alive, left)), 10,
                        "leftover fanoutd processes to die")
    leftovers = sorted(str(p.relative_to(runtime)) for p in runtime.rglob("*")) \
        if runtime.exists() else []
    return Outcome(proc.returncode, stdout, stderr, left, leftovers)


def error_lines(stderr: str) -> list[str]:
    """stderr's non-empty lines, minus an argparse usage block (usage: + indented lines)."""
    out, in_usage = [], False
    for line in stderr.splitlines():
        if line.startswith("usage:"):
            in_usage = True
            continue
        if in_usage and line[:1].isspace():
            continue
        in_usage = False
        if line.strip():
            out.append(line)
    return out


def assert_one_clear_error(out: Outcome, status: int, *words: str) -> str:
    """The documented status, one error line containing every word, no traceback,
    nothing left running or in the runtime directory. Returns the line."""
    shown = out.shown()
    assert "Traceback" not in out.stderr, shown
    assert out.status == status, f"want exit {status}; {shown}"
    lines = error_lines(out.stderr)
    assert len(lines) == 1, f"want exactly one error line; {shown}"
    missing = [w for w in words if w not in lines[0]]
    assert not missing, f"the error line does not mention {missing}: {lines[0]!r}"
    assert not out.left_running, f"processes left running; {shown}"
    assert not out.runtime_left, f"left in the runtime directory; {shown}"
    return lines[0]


@pytest.fixture
def wd():
    with netlab.workdir() as d:
        yield d


@pytest.fixture
def busy_port(ns):
    """A TCP port on 127.0.0.1 inside the namespace, bound and listening by the test."""
    with netlab.in_netns(ns.name):
        sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]
    finally:
        sock.close()


def good_flags(ns: netlab.NetNS, wd: Path) -> list[str]:
    """Flags for a run that would start fine: the case's own flags come after them and
    win (argparse keeps the last value)."""
    return ["--interface", "cap0", "--publish", f"ipc://{wd}/pub.ipc",
            "--metrics", f"127.0.0.1:{ns.free_port()}", "--block-size", "65536"]


# --------------------------------------------------------------------------- config files


@dataclass(frozen=True)
class FileCase:
    """A configuration file (None: it does not exist) and what its error line names."""

    yaml: str | bytes | None
    words: tuple[str, ...]  # "{cfg}" stands for the file's path
    status: int = EX_CONFIG
    marks: tuple = field(default=())


FILE_CASES = {
    "unknown-key": FileCase("interface: cap0\nring:\n  block_cuont: 8\n",
                            ("ring.block_cuont", "unknown key")),
    "wrong-type": FileCase("interface: cap0\nworkers: two\n",
                           ("workers", "must be an integer", "'two'")),
    "section-not-a-mapping": FileCase("log: debug\n", ("log", "must be a mapping", "got a string")),
    "yaml-syntax-error": FileCase("interface: cap0\nring:\n  block_size: [65536\n"
                                  "  frame_size: 2048\n",
                                  ("{cfg}", "YAML syntax error", "line 4")),
    "missing-file": FileCase(None, ("{cfg}", "cannot read", "No such file or directory")),
    "bad-fanout-mode": FileCase("fanout:\n  mode: bogus\n",
                                ("fanout.mode", "must be one of", "'bogus'")),
    "not-utf8": FileCase(b"interface: cap0\n# caf\xe9\n",
                         ("{cfg}", "not UTF-8 text: byte 0xe9")),
}


@pytest.mark.parametrize("command", ["run", "check-config"])
@pytest.mark.parametrize("case", [pytest.param(c, id=name, marks=c.marks)
                                  for name, c in FILE_CASES.items()])
def test_bad_config_file(ns, wd, case, command):
    """A bad configuration file: `run -c FILE` and `check-config -c FILE` both print the
    same single line naming the key (or the file) and the rule, and exit 78."""
    cfg = wd / "fanoutd.yaml"
    if isinstance(case.yaml, bytes):
        cfg.write_bytes(case.yaml)
    elif case.yaml is not None:
        cfg.write_text(case.yaml)
    flags = good_flags(ns, wd) if command == "run" else []
    out = run_fanoutd(ns, wd, command, "-c", str(cfg), *flags)
    words = [w.replace("{cfg}", str(cfg)) for w in case.words]
    assert_one_clear_error(out, case.status, *words)


def test_same_line_from_run_and_check_config(ns, wd):
    """check-config validates exactly as run does: the same line for the same file."""
    cfg = wd / "fanoutd.yaml"
    cfg.write_text("interface: cap0\nring:\n  block_size: 1000\n")
    lines = [assert_one_clear_error(run_fanoutd(ns, wd, command, "-c", str(cfg)), EX_CONFIG,
                                    "ring.block_size", "page size")
             for command in ("run", "check-config")]
    assert lines[0] == lines[1], lines


# --------------------------------------------------------------------------- flags


FLAG_CASES = {
    "bad-fanout-mode": (("--fanout", "bogus"), EX_CONFIG,
                        ("fanout.mode", "--fanout", "'bogus'")),
    "block-size-1000": (("--block-size", "1000"), EX_CONFIG,
                        ("ring.block_size", "--block-size", "page size", "1000")),
    "frame-size-70": (("--frame-size", "70"), EX_CONFIG,
                      ("ring.frame_size", "--frame-size", "TPACKET_ALIGNMENT", "70")),
    "block-count-1": (("--block-count", "1"), EX_CONFIG,
                      ("ring.block_count", "--block-count", "at least 2", "got 1")),
    "missing-interface": (("--interface", "nosuch0"), EX_UNAVAILABLE,
                          ("interface", "'nosuch0'", "does not exist")),
    "unknown-flag": (("--bogus-flag", "1"), EX_USAGE,
                     ("unrecognized arguments", "--bogus-flag")),
}


@pytest.mark.parametrize(("flags", "status", "words"), FLAG_CASES.values(),
                         ids=FLAG_CASES.keys())
def test_bad_flag(ns, wd, flags, status, words):
    """A bad command-line value: one line naming the key and its flag, and the rule."""
    out = run_fanoutd(ns, wd, "run", *good_flags(ns, wd), "--workers", "1", *flags)
    assert_one_clear_error(out, status, *words)
    if status == EX_USAGE:
        assert out.stderr.startswith("usage: fanoutd"), out.shown()


# --------------------------------------------------------------------------- resources


def test_publish_port_in_use(ns, wd, busy_port):
    """The publish endpoint's port is taken: 69, naming publish.endpoint, the address
    and the reason; the ring, the metrics port and the runtime directory are released."""
    endpoint = f"tcp://127.0.0.1:{busy_port}"
    out = run_fanoutd(ns, wd, "run", *good_flags(ns, wd), "--workers", "1",
                      "--publish", endpoint)
    assert_one_clear_error(out, EX_UNAVAILABLE, "publish.endpoint", endpoint,
                           "Address already in use")


def test_metrics_port_in_use(ns, wd, busy_port):
    """The metrics port is taken: 69, naming metrics.listen, the address and the reason."""
    listen = f"127.0.0.1:{busy_port}"
    out = run_fanoutd(ns, wd, "run", *good_flags(ns, wd), "--workers", "1",
                      "--metrics", listen)
    assert_one_clear_error(out, EX_UNAVAILABLE, "metrics.listen", listen,
                           "Address already in use")


def test_publish_ipc_path_in_missing_directory(ns, wd):
    """An ipc:// endpoint whose directory does not exist cannot be bound: 69."""
    endpoint = "ipc:///nonexistent-dir/x.ipc"
    out = run_fanoutd(ns, wd, "run", *good_flags(ns, wd), "--workers", "1",
                      "--publish", endpoint)
    assert_one_clear_error(out, EX_UNAVAILABLE, "publish.endpoint", endpoint,
                           "No such file or directory")


# --------------------------------------------------------------------------- permission


def can_run_as_nobody() -> str | None:
    """None when `setpriv ... python -c 'import fanoutd...'` works as nobody, else why not."""
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    probe = subprocess.run([*DROP_TO_NOBODY, sys.executable, "-c",
                            "import fanoutd.cli, fanoutd.supervisor, zmq, yaml, msgpack"],
                           cwd=netlab.REPO, env=netlab.base_env(), capture_output=True,
                           text=True, timeout=30, check=False)
    if probe.returncode != 0:
        return (f"the checkout or its virtual environment is not usable by user nobody "
                f"({sys.executable}): {probe.stderr.strip()[-300:]}")
    return None


def test_no_cap_net_raw(ns, wd):
    """Run as nobody without any capability: 77 and a line that names CAP_NET_RAW."""
    reason = can_run_as_nobody()
    if reason:
        pytest.skip(reason)
    os.chmod(wd, 0o755)  # so nobody could create the runtime directory, were it to get there
    out = run_fanoutd(ns, wd, "run", *good_flags(ns, wd), "--workers", "1",
                      prefix=DROP_TO_NOBODY)
    assert_one_clear_error(out, EX_NOPERM, "CAP_NET_RAW")
