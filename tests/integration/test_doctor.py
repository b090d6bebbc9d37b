"""`fanoutd doctor` on the namespace's veth: each section with the interface's real values,
the advice when something should change, and the exit statuses. Each section's logic on
crafted readings, and the statuses that need no interface (an invalid ring, a missing
interface), are in tests/test_doctor_sections.py."""

import ast
import mmap
import re
import subprocess
from pathlib import Path

import netlab
import pytest

from fanoutd import doctor as doctor_module
from fanoutd import ring

pytestmark = pytest.mark.integration

TITLES = ("Ring and page size", "MTU and packet size", "VLAN offload", "GRO and LRO",
          "Flow symmetry", "Kernel fanout support")
MODES = ("hash", "lb", "cpu", "rnd", "qm", "rollover")


def sections(report: str) -> dict[str, tuple[str, str]]:
    """{title: (status, body)} from the report's "[status] title" blocks."""
    found = {}
    for m in re.finditer(r"^\[(\w+)\] (.+)\n((?:    .*\n)*)", report, re.M):
        found[m.group(2)] = (m.group(1), m.group(3))
    return found


def summary(report: str) -> list[str]:
    """The report's last lines, after its last section."""
    return report.rstrip("\n").rsplit("\n\n", 1)[1].splitlines()


def internal_names() -> set[str]:
    """fanoutd's class names, and its function and method names with an underscore: none
    of them means anything to a user, so none belongs in doctor's report."""
    names = set()
    for path in (Path(netlab.REPO) / "fanoutd").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) or (
                    isinstance(node, ast.FunctionDef) and "_" in node.name.strip("_")):
                names.add(node.name)
    # A function named after the `ip -d link` attribute it reads, which the report quotes.
    return names - {"gro_max_size"}


def assert_no_internal_names(report: str) -> None:
    words = set(re.findall(r"[A-Za-z_]\w*", report))
    assert not words & internal_names(), (words & internal_names(), report)
    assert not re.search(r"\b[A-Z][a-z]+[A-Z]\w*\.\w", report), report  # Class.member


def ethtool_features(ns: netlab.NetNS, ifname: str = "cap0") -> dict[str, str]:
    """{feature: "on" | "off" | "off [fixed]" ...} as ethtool -k reports them."""
    out = ns.exec("ethtool", "-k", ifname)
    return dict(re.findall(r"^\s*([\w-]+): ((?:on|off)(?: \[fixed\])?)", out, re.M))


def doctor(ns: netlab.NetNS, *args: str, env: dict | None = None):
    return netlab.run_cli(ns, "doctor", "--interface", "cap0", "--workers", "2", *args,
                          env=env)


def test_doctor_reports_the_veth_as_it_is(ns):
    proc = doctor(ns)
    report = proc.stdout
    assert proc.returncode == 0, report + proc.stderr
    found = sections(report)
    assert tuple(found) == TITLES, report
    assert report.rstrip().endswith("nothing to change")
    assert "cap0 (index" in report.splitlines()[0] and "MTU 1500" in report.splitlines()[0]
    assert_no_internal_names(report)

    status, body = found["Ring and page size"]
    assert f"page size {mmap.PAGESIZE} bytes, MAX_ORDER {ring.max_page_order()}" in body
    assert "128 blocks of 512 KiB" in body  # the defaults of config.py
    assert "64 MiB per worker, 128 MiB for 2 workers" in body
    assert "the kernel allocated one such ring on cap0" in body
    assert "the ring covers 1.28 s" in body  # 128 blocks x 10 ms
    # A veth reports 10000 Mb/s: 14.88 million 64-byte frames/s fill 128 blocks of 3640
    # such frames (144 bytes each in a block) in 31 ms: a note, and how to reach 50 ms.
    assert "line rate: 10000 Mb/s (the speed cap0 reports)" in body
    assert "holds 465920 64-byte frames (3640 a block)" in body
    assert "full after 31 ms" in body
    assert status == "note", report
    assert "-> raise ring.block_count to 205 (--block-count 205) for 50 ms at line rate" in body

    status, body = found["MTU and packet size"]
    assert status == "ok" and "MTU 1500: frames up to 1522 bytes" in body, report
    assert "up to 524158 bytes" in body  # 524288 - 48 - 82

    feats = ethtool_features(ns)
    status, body = found["VLAN offload"]
    assert feats["rx-vlan-offload"] == "on"  # a veth strips tags: a fact this test relies on
    assert f"rx-vlan-offload (VLAN tag stripping): {feats['rx-vlan-offload']}" in body
    assert "reports it in `vlan`" in body and status == "ok"

    status, body = found["GRO and LRO"]
    for name in ("generic-receive-offload", "large-receive-offload"):
        assert f"{name} " in body and f": {feats[name]}\n" in body.split(f"{name} ", 1)[1], body
    assert status == ("change" if feats["generic-receive-offload"] == "on" else "ok")

    status, body = found["Flow symmetry"]
    assert status == "ok" and "configured: fanout hash" in body
    assert "both directions of a flow reach the same one" in body

    status, body = found["Kernel fanout support"]
    assert status == "ok", report
    for mode in MODES:
        assert f"mode {mode}: supported" in body, body
    for flag in ("uniqueid", "defrag", "rollover", "ignore-outgoing"):
        assert f"flag {flag}: supported" in body, body
    assert "the configured hash: accepted" in body


def test_doctor_says_what_to_change(ns):
    """GRO on, a jumbo MTU and small blocks: doctor says what to change and exits 1."""
    ns.exec("ethtool", "-K", "cap0", "gro", "on")
    ns.exec("ip", "link", "set", "cap0", "mtu", "9000")
    proc = doctor(ns, "--block-size", "8192", "--block-count", "64", "--block-timeout", "5",
                  "--fanout", "lb", "--fanout-flags", "defrag")
    report = proc.stdout
    assert proc.returncode == 1, report + proc.stderr
    found = sections(report)

    status, body = found["GRO and LRO"]
    assert status == "change" and "generic-receive-offload (GRO): on" in body, report
    assert "-> for a sensor, turn merging off: ethtool -K cap0 gro off" in body

    status, body = found["MTU and packet size"]
    assert status == "change" and "MTU 9000: frames up to 9022 bytes" in body, report
    assert "up to 8062 bytes" in body  # 8192 - 130
    assert "raise ring.block_size to 131072" in body  # a 64 KiB GRO packet needs it

    status, body = found["Ring and page size"]
    assert status == "change" and "the ring covers 0.32 s" in body, report  # 64 x 5 ms
    assert "full after 0.24 ms" in body  # 64 blocks x 56 64-byte frames at 14.88 M/s

    status, body = found["Flow symmetry"]
    assert status == "note" and "lb: round robin" in body and "--fanout hash" in body

    assert found["Kernel fanout support"][0] == "ok"
    assert "the configured lb+defrag: accepted" in found["Kernel fanout support"][1]
    assert report.rstrip().endswith(
        "to change: Ring and page size, MTU and packet size, GRO and LRO")
    assert_no_internal_names(report)


def test_doctor_without_ethtool_reads_the_ioctls(ns):
    """Without ethtool on PATH, doctor says so and still reports VLAN offload and GRO."""
    env = {"PATH": "/usr/bin:/bin"}  # `ip` is in /usr/bin on Debian, ethtool in /usr/sbin
    proc = netlab.run_cli(ns, "doctor", "--interface", "cap0", "--workers", "2", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = sections(proc.stdout)
    feats = ethtool_features(ns)
    _, body = found["VLAN offload"]
    assert "ethtool is not installed" in body
    assert f"rx-vlan-offload (VLAN tag stripping): {feats['rx-vlan-offload']}" in body
    gro = feats["generic-receive-offload"].split()[0]
    assert f"generic-receive-offload (GRO): {gro}\n" in found["GRO and LRO"][1]


# Run as nobody with no capability in any set: what a user without CAP_NET_RAW gets.
UNPRIVILEGED = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all")


def doctor_unprivileged(ns: netlab.NetNS, *args: str) -> subprocess.CompletedProcess:
    argv = ["ip", "netns", "exec", ns.name, *UNPRIVILEGED, *netlab.cli_argv(), "doctor",
            "--interface", "cap0", "--workers", "2", *args]
    return subprocess.run(argv, cwd=netlab.REPO, env=netlab.base_env(), capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL, check=False)


def test_doctor_without_cap_net_raw_says_what_it_could_not_check(ns):
    """The probes need CAP_NET_RAW. Without it doctor must not say "nothing to change": it
    names what it could not check and why, and exits 77 (EX_NOPERM), or 1 when something
    it could check should change."""
    ns.exec("ethtool", "-K", "cap0", "gro", "off")  # nothing to change but the unchecked
    proc = doctor_unprivileged(ns)
    report = proc.stdout
    assert proc.returncode == 77, report + proc.stderr
    assert summary(report) == [
        "not checked: the ring's test allocation, the fanout modes and flags this kernel "
        "accepts (AF_PACKET sockets need CAP_NET_RAW: run doctor as root or with "
        "CAP_NET_RAW)"]
    found = sections(report)
    assert tuple(found) == TITLES, report
    status, body = found["Kernel fanout support"]
    assert status == "unknown" and "need CAP_NET_RAW" in body, report
    assert "could not test-allocate the ring" in found["Ring and page size"][1]
    assert_no_internal_names(report)

    proc = doctor_unprivileged(ns, "--block-size", "4096", "--block-count", "4")
    report = proc.stdout
    assert proc.returncode == 1, report + proc.stderr
    lines = summary(report)
    assert len(lines) == 2 and lines[0] == "to change: Ring and page size", lines
    assert lines[1].startswith("not checked: the ring's test allocation"), lines


def test_doctor_probes_leave_no_socket_open(ns):
    """Run in this process (in the namespace): every probe socket is closed again."""
    from fanoutd import doctor as doctor_module
    from fanoutd.config import load_config

    def packet_sockets() -> int:
        with open("/proc/thread-self/net/packet") as f:
            return len(f.read().strip().splitlines()) - 1  # minus the header line

    with netlab.in_netns(ns.name):
        cfg = load_config(None, {"interface": "cap0", "workers": "2"})
        before = packet_sockets()
        _, found = doctor_module.examine(cfg)
        after = packet_sockets()
    assert [s.title for s in found] == list(TITLES)
    assert found[-1].status == "ok", found[-1]
    assert before == after == 0


def test_doctor_reports_the_interfaces_entry_of_the_file(ns, tmp_path):
    """-c FILE: the ring, workers and fanout of the `interfaces` entry examined (the one
    --interface names, else the first), not the top-level defaults."""
    path = tmp_path / "fanoutd.yaml"
    path.write_text(
        "workers: 2\n"
        "ring: {block_size: 1048576, block_count: 16}\n"
        "interfaces:\n"
        "  - interface: inj0\n"
        "    ring: {block_size: 2097152, block_count: 8}\n"
        "  - interface: cap0\n"
        "    workers: 3\n"
        "    fanout: {mode: lb}\n"
        "    ring: {block_size: 65536, block_count: 4}\n")
    proc = netlab.run_cli(ns, "doctor", "-c", str(path), "--interface", "cap0")
    report = proc.stdout
    assert proc.returncode in (0, 1), report + proc.stderr
    assert report.startswith("fanoutd doctor: cap0 (index"), report
    assert "3 workers, fanout lb" in report.splitlines()[0]
    found = sections(report)
    body = found["Ring and page size"][1]
    assert "ring: 4 blocks of 64 KiB" in body, report
    assert "memory: 256 KiB per worker, 768 KiB for 3 workers" in body
    assert "configured: fanout lb" in found["Flow symmetry"][1]
    assert "the configured lb: accepted" in found["Kernel fanout support"][1]
    assert_no_internal_names(report)

    proc = netlab.run_cli(ns, "doctor", "-c", str(path))  # no --interface: the first entry
    report = proc.stdout
    assert report.startswith("fanoutd doctor: inj0 (index"), report + proc.stderr
    assert "2 workers, fanout hash" in report.splitlines()[0]
    assert "the first of 2 interfaces in the configuration" in report.splitlines()[0]
    assert "ring: 8 blocks of 2 MiB" in sections(report)["Ring and page size"][1], report


@pytest.mark.parametrize(("block_size", "frame"), [(4096, 64), (12288, 64), (4096, 1518)])
def test_frames_per_block_is_what_the_kernel_packs(ns, block_size, frame):
    """The rating's arithmetic against a real TPACKET_V3 ring: the first block closes
    holding exactly frames_per_block frames of that size (12288 - 48 bytes is exactly 85
    slots of 144, yet the kernel starts a new block for the 85th)."""
    per_block = doctor_module.frames_per_block(block_size, frame)
    geo = ring.RingGeometry(block_size, 4, 2048, 60_000)  # a block closes when full
    fcs = 4
    data = netlab.filler_frame(frame - fcs)
    with netlab.capture_ring(ns, geo) as rx:
        with netlab.Injector(ns) as inj:
            inj.send_all(data for _ in range(per_block + 1))
        netlab.wait_for(rx.ready, timeout=5, what="the first block to be full")
        _, num_pkts, first, _, _ = rx.head(0)
    assert first == doctor_module.BLOCK_HEADER
    assert num_pkts == per_block
