"""The daemon under the privileges its own systemd unit gives it.

Each test runs the real daemon through setpriv with the capability bounding set, the
ambient capabilities and NoNewPrivileges read from deploy/systemd/fanoutd.service (what
systemd gives the unit's main process), and does what an operator or a fault does to a
service: stop, a reload that changes the worker count, a hung worker, the interface
deleted and re-created. None may crash the supervisor, leave a process behind, or need a
signal the unit does not allow. The whole unit, sandbox included, is exercised under a
real systemd by deploy/test-under-systemd.sh.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
from pathlib import Path

import frames as F
import netlab
import pytest
from unitfile import setpriv_argv

pytestmark = pytest.mark.integration

UNIT = "fanoutd.service"
RING = "ring: {block_size: 65536, block_count: 8, block_timeout_ms: 5}\n"
# What a crash or a refused signal would have printed.
BAD_WORDS = ("Traceback", "PermissionError", "permission denied", "did not stop",
             "still there")


def proc_status(pid: int | str) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def workers(daemon: netlab.Daemon) -> dict[str, int]:
    return {k: v for k, v in daemon.children_by_comm().items() if k.startswith("fanoutd-w")}


def assert_clean(daemon: netlab.Daemon) -> None:
    text = daemon.stderr_text()
    for word in BAD_WORDS:
        assert word not in text, f"{word!r} in the daemon's output:\n{daemon.logs()}"


def assert_stops_cleanly(daemon: netlab.Daemon) -> None:
    """SIGTERM: exit 0, every child reaped (none re-parented and left running)."""
    session = daemon.pid  # the daemon leads its own session (netlab.Daemon)
    assert daemon.stop(signal.SIGTERM, timeout=15) == 0, daemon.logs()
    netlab.wait_for(lambda: not netlab.session_processes(session), 10,
                    "no process of the daemon left",
                    detail=lambda: f"{netlab.session_processes(session)}\n{daemon.logs()}")
    assert_clean(daemon)
    assert "SIGTERM received: stopping" in daemon.stderr_text()


def deliver(injector: netlab.Injector, sub: netlab.Subscriber, daemon: netlab.Daemon,
            base: int, n: int = 200) -> None:
    injector.send_all(F.udp4_frame(sport=base + i) for i in range(n))
    sub.collect(netlab.all_keys(set(range(base, base + n)), lambda r: r["sport"]),
                timeout=10, detail=daemon.logs)


@pytest.fixture
def unit_daemon(ns, start_daemon, subscribe):
    """A 2-worker daemon driven by a config file, run with the unit's privileges."""
    with netlab.workdir() as wd:
        config = wd / "fanoutd.yaml"
        config.write_text(f"workers: 2\nfanout: {{mode: lb}}\n{RING}"
                          "supervisor: {heartbeat_timeout_ms: 500}\n")
        daemon = start_daemon(workers=2, config=config, wrap=setpriv_argv(UNIT))
        yield daemon, config, subscribe(daemon)


def test_children_hold_no_privilege(unit_daemon):
    """The proxy and the workers, in every thread: no capability in any set, an empty
    bounding set (the unit grants CAP_SETPCAP for that), no_new_privs, not root."""
    daemon, _, _ = unit_daemon
    supervisor = proc_status(daemon.pid)
    assert supervisor["NoNewPrivs"] == "1"
    assert int(supervisor["CapBnd"], 16) != 0  # the unit's set, not everything
    children = daemon.children_by_comm()
    assert {"fanoutd-proxy", "fanoutd-w0", "fanoutd-w1"} <= set(children)
    for name, pid in children.items():
        threads = os.listdir(f"/proc/{pid}/task")
        if name == "fanoutd-proxy":  # workers run no thread besides their own (outbox.py)
            assert len(threads) > 1, f"{name}: ZeroMQ's threads should be running"
        for tid in threads:  # ZeroMQ's threads too: capabilities are per thread
            status = proc_status(f"{pid}/task/{tid}")
            for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                assert int(status[caps], 16) == 0, f"{name} thread {tid}: {caps} " \
                                                   f"{status[caps]}"
            assert status["NoNewPrivs"] == "1", name
            assert status["Uid"].split()[0] != "0", name


def test_stop(unit_daemon, injector):
    """systemctl stop: the supervisor stops its (unprivileged) children itself; what
    they had captured is published first."""
    daemon, _, sub = unit_daemon
    deliver(injector, sub, daemon, 1000)
    assert_stops_cleanly(daemon)


def test_reload_changing_the_worker_count(unit_daemon, injector):
    """2 -> 3 workers: the old workers (fanoutd) are told to drain, new ones start, the
    old ones exit; the supervisor keeps running and capture goes on."""
    daemon, config, sub = unit_daemon
    config.write_text(f"workers: 3\nfanout: {{mode: lb}}\n{RING}"
                      "supervisor: {heartbeat_timeout_ms: 500}\n")
    os.kill(daemon.pid, signal.SIGHUP)
    netlab.wait_for(lambda: sorted(workers(daemon)) == ["fanoutd-w0", "fanoutd-w1",
                                                        "fanoutd-w2"], 15,
                    "3 workers and no draining old one", detail=daemon.logs)
    daemon.workers = 3
    daemon.wait_ready()
    assert "reloaded the configuration (changed: workers)" in daemon.stderr_text()
    deliver(injector, sub, daemon, 2000)
    daemon.check_running()
    assert_stops_cleanly(daemon)


def test_hung_worker_is_replaced(unit_daemon, injector):
    """A worker stops heartbeating (SIGSTOP): the supervisor terminates it (SIGTERM stays
    pending on a stopped process, so SIGKILL follows) and starts another."""
    daemon, _, sub = unit_daemon
    hung = workers(daemon)["fanoutd-w0"]
    os.kill(hung, signal.SIGSTOP)
    netlab.wait_for(lambda: workers(daemon).get("fanoutd-w0") not in (None, hung), 15,
                    "a new fanoutd-w0", detail=daemon.logs)
    daemon.wait_ready()
    m = daemon.metrics()
    assert netlab.metric_sum(m, "fanoutd_worker_restarts_total", worker="0") == 1
    text = daemon.stderr_text()
    assert "fanoutd-w0 has not heartbeaten" in text
    assert "fanoutd-w0 ignored SIGTERM; killing it" in text
    deliver(injector, sub, daemon, 3000)
    assert_stops_cleanly(daemon)


def test_interface_recreated(ns, unit_daemon):
    """cap0 deleted and re-created: the old workers (fanoutd) are stopped, new sockets
    opened (CAP_NET_RAW), capture resumes, the link counters carry on."""
    daemon, _, sub = unit_daemon
    ns.exec("ip", "link", "del", "cap0")
    netlab.wait_for(lambda: "cap0 was deleted" in daemon.stderr_text(), 10, "the deletion",
                    detail=daemon.logs)
    ns.add_veth("inj0", "cap0")
    netlab.wait_for(lambda: "cap0 exists again" in daemon.stderr_text(), 10,
                    "the re-creation", detail=daemon.logs)
    daemon.wait_ready()
    with netlab.Injector(ns) as fresh:
        deliver(fresh, sub, daemon, 4000)
    m = daemon.metrics()
    assert netlab.metric_sum(m, "fanoutd_link_events_total", event="gone") == 1
    assert netlab.metric_sum(m, "fanoutd_link_events_total", event="returned") == 1
    assert_stops_cleanly(daemon)


def test_refuses_to_start_without_cap_kill(ns, start_daemon):
    """Without CAP_KILL the supervisor could not stop or replace workers that run as
    fanoutd: it says so and exits 77 before opening anything, leaving nothing behind."""
    daemon = start_daemon(ready=False, wrap=setpriv_argv(UNIT, drop={"kill"}))
    assert daemon.proc is not None
    status = daemon.proc.wait(timeout=15)
    assert status == 77, daemon.logs()
    text = daemon.stderr_text()
    assert "lacks CAP_KILL" in text and "user: none" in text, text
    assert "Traceback" not in text
    assert not netlab.session_processes(daemon.pid)


def test_user_none_needs_no_cap_kill(ns, start_daemon):
    """With `user: none` the children keep the supervisor's uid, so CAP_KILL is not
    needed: it starts and stops cleanly."""
    daemon = start_daemon(workers=1, extra=["--user", "none"],
                          wrap=setpriv_argv(UNIT, drop={"kill"}))
    assert_stops_cleanly(daemon)


# Run without CAP_KILL (but as root): the supervisor's own helper signals a process that
# runs as nobody. It must log, return False and carry on.
REFUSED_SIGNAL = """
import logging, os, signal, sys
from fanoutd.children import Child

logging.basicConfig(level=logging.ERROR, stream=sys.stdout, format="%(message)s")
child = Child("fanoutd-w0", lambda: 0, pid=int(sys.argv[1]))
print("sent" if child.send_signal(os.kill, signal.SIGTERM) else "refused")
"""


def test_a_refused_signal_is_logged_not_raised():
    """The supervisor's kill helper, where the kernel refuses the signal (EPERM)."""
    nobody = subprocess.Popen(["setpriv", "--reuid=nobody", "--regid=nogroup",
                               "--clear-groups", "sleep", "60"])
    try:
        argv = [*setpriv_argv(UNIT, drop={"kill"}), sys.executable, "-c", REFUSED_SIGNAL,
                str(nobody.pid)]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                             env=netlab.base_env(), check=False)
        assert nobody.poll() is None  # the signal really was not delivered
    finally:
        nobody.kill()
        nobody.wait(timeout=10)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "refused", res.stdout
    assert "cannot send SIGTERM to fanoutd-w0" in res.stdout
    assert "needs CAP_KILL" in res.stdout


# A drop-in that switches the unit's User= to an unprivileged account keeps capture
# working through AmbientCapabilities=; setpriv gives the daemon the same: uid nobody with
# CAP_NET_RAW, CAP_SETUID and CAP_SETGID in its ambient (so permitted, effective and
# inheritable) set.
AS_NOBODY_WITH_CAPS = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                       "--inh-caps=-all,+net_raw,+setuid,+setgid",
                       "--ambient-caps=-all,+net_raw,+setuid,+setgid", "--")


def nobody_workdir(wd: Path) -> None:
    """Let nobody make the runtime directory and bind the publish endpoint in wd."""
    os.chown(wd, pwd.getpwnam("nobody").pw_uid, -1)


def can_run_as_nobody() -> str | None:
    probe = subprocess.run([*AS_NOBODY_WITH_CAPS, sys.executable, "-c",
                            "import fanoutd.supervisor, zmq"], cwd=netlab.REPO,
                           env=netlab.base_env(), capture_output=True, text=True,
                           timeout=30, check=False)
    if probe.returncode != 0:
        return f"cannot run fanoutd as nobody here: {probe.stderr.strip()[-300:]}"
    return None


@pytest.mark.parametrize("user", ["nobody", "none"])
def test_not_root_with_ambient_capabilities(ns, injector, subscribe, user):
    """Started as nobody with capabilities: `user` names that same user (or none), so it
    is honoured; and no thread of any child keeps a capability: ZeroMQ's threads start
    after the fork, and a capset() in the main thread would not reach them (setuid() is
    not done, the process is not root)."""
    reason = can_run_as_nobody()
    if reason:
        pytest.skip(reason)
    with netlab.workdir() as wd:
        nobody_workdir(wd)
        extra = ("--runtime-dir", str(wd / "run"), "--user", user)
        with netlab.Daemon(ns, wd, workers=2, extra=extra, wrap=AS_NOBODY_WITH_CAPS) as daemon:
            daemon.wait_ready()
            uid = str(pwd.getpwnam("nobody").pw_uid)
            assert proc_status(daemon.pid)["CapEff"] != "0" * 16  # the supervisor's caps
            children = daemon.children_by_comm()
            assert {"fanoutd-proxy", "fanoutd-w0", "fanoutd-w1"} <= set(children)
            for name, pid in children.items():
                threads = os.listdir(f"/proc/{pid}/task")
                if name == "fanoutd-proxy":  # workers run no thread of ZeroMQ's
                    assert len(threads) > 1, f"{name}: ZeroMQ's threads should be running"
                for tid in threads:
                    status = proc_status(f"{pid}/task/{tid}")
                    for caps in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
                        assert int(status[caps], 16) == 0, \
                            f"{name} thread {tid}: {caps} {status[caps]}"
                    assert status["Uid"].split() == [uid] * 4, (name, status["Uid"])
            sub = subscribe(daemon)
            deliver(injector, sub, daemon, 5000)
            assert_stops_cleanly(daemon)


def test_not_root_refuses_another_user(ns):
    """Started as nobody with capabilities and `user: fanoutd` (the default): it cannot
    switch its children to fanoutd (from a non-root uid, setuid() would keep their
    capabilities), so it says so and exits 77, leaving nothing behind."""
    reason = can_run_as_nobody()
    if reason:
        pytest.skip(reason)
    with netlab.workdir() as wd:
        nobody_workdir(wd)
        extra = ("--runtime-dir", str(wd / "run"))
        with netlab.Daemon(ns, wd, workers=1, extra=extra, wrap=AS_NOBODY_WITH_CAPS) as daemon:
            assert daemon.proc is not None
            assert daemon.proc.wait(timeout=15) == 77, daemon.logs()
            lines = daemon.stderr_text().splitlines()
            assert len(lines) == 1, lines
            assert "user: fanoutd runs as nobody, not root" in lines[0], lines
            assert "cannot become 'fanoutd'" in lines[0] and "user: none" in lines[0]
            assert not netlab.session_processes(daemon.pid)
