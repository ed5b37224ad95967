"""The Lua balancer ships inside the wheel and an installed fdngx points nginx at its own copy."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def test_the_wheel_ships_the_lua_modules_and_renders_their_path(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                            "bench", "tests", "demo-run"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    wheel = next(tmp_path.glob("fdngx-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(site)
    shipped = {f"fdngx/templates/lua/fdngx/{p.name}" for p in (REPO / "templates" / "lua" / "fdngx").glob("*.lua")}
    assert "fdngx/templates/lua/fdngx/balancer.lua" in shipped and shipped <= names, shipped - names
    assert not any(n.endswith("fdngx_balancer.lua") for n in names)
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "fdngx.json").write_text((REPO / "examples" / "fdngx.json").read_text())
    proc = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); import fdngx.cli; "
         "sys.argv=['fdngx','render','--mode','upstream','--flavor','openresty']; fdngx.cli.main()"],
        capture_output=True, text=True, cwd=work, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert f'lua_package_path "{site / "fdngx" / "templates" / "lua"}/?.lua;;";' in proc.stdout, proc.stdout[:800]
