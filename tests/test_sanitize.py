"""The C encoder and unpacker pass their differential and hostile-input tests built with
AddressSanitizer and UBSan (scripts/sanitize.sh)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_fastpath_under_asan_and_ubsan():
    res = subprocess.run([str(ROOT / "scripts" / "sanitize.sh"), "-x"], capture_output=True,
                         text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert " passed" in res.stdout
