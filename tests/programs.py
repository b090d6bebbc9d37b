"""Where the tests find the programs they run besides fanoutd."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def promtool() -> str | None:
    """promtool on PATH, else the one `scripts/install.sh --test` puts beside the venv's
    python (taken out of Debian's `prometheus` package, which would start a server)."""
    return (shutil.which("promtool")
            or shutil.which("promtool", path=str(Path(sys.executable).parent)))
