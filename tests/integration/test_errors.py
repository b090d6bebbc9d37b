"""Operator errors: one clear line on stderr naming what is wrong, non-zero exit, no traceback.

Each case runs `fanoutd run` to completion (bounded) inside the test's namespace.
"""

import netlab
import pytest

pytestmark = pytest.mark.integration


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


def run_and_fail(ns: netlab.NetNS, *overrides: str) -> str:
    """Run the daemon with good defaults plus `overrides`; return its single error line."""
    with netlab.workdir() as wd:
        args = {"--interface": "cap0", "--workers": "1", "--publish": f"ipc://{wd}/pub.ipc",
                "--metrics": f"127.0.0.1:{ns.free_port()}", "--block-size": "65536"}
        args |= dict(zip(overrides[::2], overrides[1::2], strict=True))
        proc = netlab.run_cli(ns, "run", *[x for kv in args.items() for x in kv], timeout=30)
    return one_error_line(proc)


def one_error_line(proc) -> str:
    """Assert a failed run with no traceback and a single error line; return that line."""
    shown = f"exit {proc.returncode}\nstdout: {proc.stdout!r}\nstderr: {proc.stderr!r}"
    assert proc.returncode != 0, f"expected failure; {shown}"
    assert "Traceback" not in proc.stderr, shown
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, f"want exactly one error line; {shown}"
    return lines[0]


def test_missing_interface(ns):
    line = run_and_fail(ns, "--interface", "doesnotexist0")
    assert "doesnotexist0" in line, line


def test_block_size_not_a_page_multiple(ns):
    line = run_and_fail(ns, "--block-size", "1000")
    assert "block_size" in line or "block-size" in line, line
    assert "page" in line.lower(), f"the message should state the page-size rule: {line}"


def test_unknown_fanout_mode(ns):
    line = run_and_fail(ns, "--fanout", "bogus")
    assert "fanout" in line and "bogus" in line, line


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_bad_config_file(ns, command):
    """A bad value in the YAML file is reported by its dotted key, on one line."""
    with netlab.workdir() as wd:
        cfg = wd / "bad.yaml"
        cfg.write_text("interface: cap0\nworkers: 1\nring:\n  block_size: 1000\n"
                       f"publish:\n  endpoint: ipc://{wd}/pub.ipc\n"
                       f"metrics:\n  listen: 127.0.0.1:{ns.free_port()}\n")
        line = one_error_line(netlab.run_cli(ns, command, "-c", str(cfg), timeout=30))
    assert "ring.block_size" in line and "page" in line, line
