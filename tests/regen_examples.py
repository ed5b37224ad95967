"""Regenerate examples/nginx/*, tests/golden/* and the CLI reference docs/cli.md: `make examples`.

A test renders the same files and compares, so none of them can go stale.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

from fdngx import inventory
from fdngx.domain import ServerState
from fdngx.nginx.render import RenderOptions, render

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "nginx"
GOLDEN = REPO / "tests" / "golden"


COMMANDS = ("launch", "stop", "render", "sidecar", "status", "drain", "sim", "demo")
CLI_HEAD = """# CLI reference

<!-- Generated from the CLI by `make examples` (tests/regen_examples.py); a test keeps it current. -->

Every command has `--help`. Exit status: 0 on success, 1 on an error (one line on stderr naming what is
wrong and where), 2 on a usage error. Every option can also come from the environment or a settings file;
the precedence is in [guide.md](guide.md) and `fdngx --help`.

"""


def _options_table(params: list[Any]) -> str:
    rows = ["| option | default | meaning |\n|---|---|---|\n"]
    for p in params:
        if p.name == "help" or not getattr(p, "opts", None):
            continue
        default = p.default
        # No default to show: none, an empty one, or a flag off. A numeric 0 (0 == False in Python) is shown,
        # as --help shows it.
        if (callable(default) or default is None or default is False or default in ((), "")
                or str(default).startswith("Sentinel")):
            default = ""
        elif isinstance(default, Enum):
            default = default.value
        text = (getattr(p, "help", "") or "").replace("|", "\\|").replace("\n", " ")
        names = ", ".join(f"`{o}`" for o in [*p.opts, *getattr(p, "secondary_opts", [])])
        rows.append(f"| {names} | {default} | {text} |\n")
    return "".join(rows)


def cli_reference() -> str:
    """docs/cli.md: the global options and every command's options as markdown tables, from the typer app."""
    from typer.main import get_command

    from fdngx.cli import app

    root = get_command(app)
    out = [CLI_HEAD, "## `fdngx` (global options, before the command)\n\n", _options_table(root.params), "\n"]
    for name in COMMANDS:
        cmd = root.commands[name]  # type: ignore[attr-defined]
        out.append(f"## `fdngx {name}`\n\n{(cmd.help or '').strip().splitlines()[0]}\n\n")
        out.append(_options_table(cmd.params))
        out.append("\n")
    return "".join(out).rstrip("\n") + "\n"


def rendered_files() -> dict[Path, str]:
    files: dict[Path, str] = {}
    sample = inventory.load(REPO / "examples" / "fdngx.json")
    files[EXAMPLES / "fdngx-upstream.conf"] = render(sample, RenderOptions(mode="upstream"))
    files[EXAMPLES / "fdngx-site.conf"] = render(sample, RenderOptions(mode="site", listen="0.0.0.0:8080"))
    files[EXAMPLES / "standalone.conf"] = render(sample, RenderOptions(mode="standalone", listen="0.0.0.0:8080"))
    # The front door with every guard on: HTTPS + HTTP/2, API keys (kept in the 0600 map beside the config),
    # a rate limit per key, JSON access log lines.
    files[EXAMPLES / "fdngx-site-front-door.conf"] = render(sample, RenderOptions(
        mode="site", listen="0.0.0.0:443", tls_cert="/etc/fdngx/tls/fullchain.pem",
        tls_key="/etc/fdngx/tls/privkey.pem",
        api_keys_file="/etc/fdngx/api-keys", api_keys_map="/etc/nginx/conf.d/.fdngx.conf.fdngx-api-keys",
        api_keys_version="5f0c7a2e9b41d386", rate_limit="10r/s", rate_burst=20, access_log_format="json",
    ))
    files[EXAMPLES / "fdngx-upstream-openresty.conf"] = render(
        sample,
        RenderOptions(
            mode="upstream", flavor="openresty", admin_token_file="/etc/nginx/conf.d/.fdngx.conf.fdngx-admin-token",
            lua_dir="/opt/fdngx/.venv/lib/python3.11/site-packages/fdngx/templates/lua",
        ),
    )
    tricky = inventory.load(REPO / "tests" / "fixtures" / "golden-inventory.json")
    # Policy output on top of inventory weights: one replica held out, one re-weighted.
    states = {"node-b-dp2": ServerState(weight=5, down=True), "node-a-dp0": ServerState(weight=7)}
    for mode in ("upstream", "site", "standalone"):
        files[GOLDEN / f"{mode}.conf"] = render(tricky, RenderOptions(mode=mode, listen="8443"), states)
    files[GOLDEN / "upstream-static.conf"] = render(tricky, RenderOptions(mode="upstream", keepalive=0))
    files[REPO / "docs" / "cli.md"] = cli_reference()
    return files


def main() -> None:
    for path, text in rendered_files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
