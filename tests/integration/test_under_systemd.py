"""deploy/test-under-systemd.sh from pytest: the shipped units under a real systemd.

The script boots Debian 12 in a container (systemd-nspawn), installs this checkout's
committed HEAD there as README.md says and checks the units end to end. It takes minutes
and, on its first run, the network for debootstrap, apt and pip, so it runs only when
FANOUTD_TEST_SYSTEMD=1 is set; otherwise it is skipped, saying so.
"""

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "test-under-systemd.sh"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.environ.get("FANOUTD_TEST_SYSTEMD") != "1",
                       reason="boots a container for minutes: set FANOUTD_TEST_SYSTEMD=1 to run "
                              "deploy/test-under-systemd.sh"),
]


def test_units_under_systemd():
    result = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=1200)
    print(result.stdout, result.stderr, sep="\n")  # shown by pytest when the test fails
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert result.returncode == 0, "\n".join(failed) or f"exit status {result.returncode}"
