"""The Lua balancer's modules with plain luajit, outside nginx (tests/lua/run.lua drives tests/lua/test_*.lua).

The pure modules (peers, health, pick, ledger, pool, slots) are tested for behaviour; every module, the ngx-bound
ones included, must compile and must not write a global (the old inlined balancer leaked `fdngx`).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import LUA_DIR, NEEDS_LUAJIT, REPO

TESTS = REPO / "tests" / "lua"
LUAJIT = shutil.which("luajit")

pytestmark = NEEDS_LUAJIT


def modules() -> list[Path]:
    return sorted(LUA_DIR.glob("fdngx/*.lua"))


def test_the_lua_unit_tests_pass() -> None:
    tests = sorted(TESTS.glob("test_*.lua"))
    assert tests
    assert LUAJIT is not None
    proc = subprocess.run([LUAJIT, str(TESTS / "run.lua"), str(LUA_DIR), *map(str, tests)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " 0 failed" in proc.stdout


@pytest.mark.parametrize("module", modules(), ids=lambda p: p.name)
def test_every_module_compiles_and_sets_no_global(module: Path) -> None:
    assert LUAJIT is not None
    proc = subprocess.run([LUAJIT, "-bl", str(module)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    globals_set = [line for line in proc.stdout.splitlines() if " GSET " in line]
    assert not globals_set, f"{module.name} writes globals: {globals_set}"


def test_modules_stay_small() -> None:
    for module in modules():
        assert len(module.read_text().splitlines()) < 400, module.name
