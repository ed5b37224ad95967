"""Regenerate examples/nginx/* and tests/golden/* from their inventories: `make examples`.

A test renders the same files and compares, so neither can go stale.
"""

from __future__ import annotations

from pathlib import Path

from fdngx import inventory
from fdngx.render import RenderOptions, ServerState, render

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "nginx"
GOLDEN = REPO / "tests" / "golden"


def rendered_files() -> dict[Path, str]:
    files: dict[Path, str] = {}
    sample = inventory.load(REPO / "examples" / "fdngx.json")
    files[EXAMPLES / "fdngx-upstream.conf"] = render(sample, RenderOptions(mode="upstream"))
    files[EXAMPLES / "fdngx-site.conf"] = render(sample, RenderOptions(mode="site", listen="0.0.0.0:8080"))
    files[EXAMPLES / "standalone.conf"] = render(sample, RenderOptions(mode="standalone", listen="0.0.0.0:8080"))
    files[EXAMPLES / "fdngx-upstream-openresty.conf"] = render(
        sample, RenderOptions(mode="upstream", flavor="openresty", admin_token_file="/etc/fdngx/fdngx-admin.token")
    )
    tricky = inventory.load(REPO / "tests" / "fixtures" / "golden-inventory.json")
    # Policy output on top of inventory weights: one replica held out, one re-weighted.
    states = {"node-b-dp2": ServerState(weight=5, down=True), "node-a-dp0": ServerState(weight=7)}
    for mode in ("upstream", "site", "standalone"):
        files[GOLDEN / f"{mode}.conf"] = render(tricky, RenderOptions(mode=mode, listen="8443"), states)
    files[GOLDEN / "upstream-static.conf"] = render(tricky, RenderOptions(mode="upstream", keepalive=0))
    return files


def main() -> None:
    for path, text in rendered_files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
