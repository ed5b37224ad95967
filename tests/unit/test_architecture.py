"""The architecture as a test: import contracts (pyproject's [tool.importlinter]) and module size."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAX_LINES = 400


def test_import_contracts_hold() -> None:
    """Layers flow one way, the policy imports no I/O, domain imports nothing of ours, no cycles."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    proc = subprocess.run([exe, "--config", str(REPO / "pyproject.toml")], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
    assert "0 broken" in proc.stdout and "4 kept" in proc.stdout, proc.stdout[-1000:]


def test_every_module_is_short_enough_to_read() -> None:
    long = {str(p.relative_to(REPO)): n for p in (REPO / "fdngx").rglob("*.py")
            if (n := len(p.read_text().splitlines())) >= MAX_LINES}
    assert not long, f"modules of {MAX_LINES}+ lines (split them by job): {long}"
