"""./scripts/demo, as a new user runs it (its setup part aside: .venv is there)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.e2e.capture import require_capture_peers

DEMO = Path(__file__).resolve().parents[2] / "scripts" / "demo.py"


def test_the_demo_proves_both_recovered_disks_and_stops_everything() -> None:
    require_capture_peers()
    result = subprocess.run(
        [sys.executable, str(DEMO)], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    out = result.stdout
    assert out.count("Images are identical.") == 2
    assert "2 of 2 checks passed" in out
    assert "RPO" in out
    assert "kept in" not in out  # its folder is gone: nothing of it is left running in it
