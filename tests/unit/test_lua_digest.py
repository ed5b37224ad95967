"""The OpenResty flavor's config carries a digest of the Lua balancer's modules (fdngx.nginx.luacode): nginx
loads them only at a (re)load, and a config whose text stayed the same (fdngx upgraded in place under the same
version string) was never reloaded, so nginx kept the old modules while the new sidecar pushed what only the
new ones read: every push refused, weights and down flags frozen (an outside review of this change)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from fdngx.domain import Flavor, Instance, Inventory, Mode
from fdngx.nginx.render import RenderOptions, builtin_template_dir, render


def _digest(tmp: Path, lua_dir: str) -> str:
    opts = RenderOptions(mode=Mode.UPSTREAM, flavor=Flavor.OPENRESTY, admin_token_file=str(tmp / "tok"),
                         peers_file=str(tmp / "peers"), lua_dir=lua_dir).validated()
    text = render(Inventory([Instance("dp0", "127.0.0.1", 8000, 8000)]), opts)
    m = re.search(r"^# fdngx-lua: ([0-9a-f]{12}) ", text, re.M)
    assert m, text[:600]
    return m.group(1)


def test_a_change_to_any_lua_module_changes_the_config(tmp_path: Path) -> None:
    shipped = builtin_template_dir() / "lua"
    same, changed = tmp_path / "same", tmp_path / "changed"
    shutil.copytree(shipped, same)
    shutil.copytree(shipped, changed)
    pick = changed / "fdngx" / "pick.lua"
    pick.write_text(pick.read_text() + "\n-- an upgrade\n")
    assert _digest(tmp_path, str(same)) == _digest(tmp_path, "")  # the same bytes: the same digest
    assert _digest(tmp_path, str(changed)) != _digest(tmp_path, str(same))
