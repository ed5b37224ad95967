from __future__ import annotations

import random
from pathlib import Path

import pytest

from fdngx import inventory
from fdngx.domain import Listen, ServerState
from fdngx.errors import RenderError, UsageError
from fdngx.nginx.control import generation_in
from fdngx.nginx.render import RenderOptions, environment, render
from tests.regen_examples import rendered_files

REPO = Path(__file__).resolve().parents[2]


def sample() -> inventory.Inventory:
    return inventory.load(REPO / "examples" / "fdngx.json")


def test_golden_and_examples_are_current() -> None:
    """examples/nginx, tests/golden and the CLI reference docs/cli.md are what the code renders today
    (`make examples` regenerates them)."""
    stale = [str(p.relative_to(REPO)) for p, text in rendered_files().items() if p.read_text() != text]
    assert not stale, f"stale rendered files (run `make examples`): {stale}"


@pytest.mark.parametrize("mode", ["upstream", "site", "standalone"])
def test_render_is_deterministic_whatever_the_inventory_order(mode: str) -> None:
    inv = sample()
    first = render(inv, RenderOptions(mode=mode))
    assert render(inv, RenderOptions(mode=mode)) == first
    shuffled = list(inv.instances)
    random.Random(7).shuffle(shuffled)
    inv.instances = shuffled
    assert render(inv, RenderOptions(mode=mode)) == first


def test_upstream_block_has_zone_least_conn_weights_and_health_params() -> None:
    text = render(
        sample(),
        RenderOptions(max_fails=5, fail_timeout=20, keepalive=32),
        {"dp1": ServerState(weight=4), "dp3": ServerState(weight=2, down=True)},
    )
    assert "zone fastdeploy " in text and "least_conn;" in text and "keepalive 32;" in text
    assert "server 127.0.0.1:8001 weight=1 max_fails=5 fail_timeout=20s;  # dp0" in text
    assert "server 127.0.0.1:8002 weight=4 max_fails=5 fail_timeout=20s;  # dp1" in text
    assert "server 127.0.0.1:8004 weight=2 max_fails=5 fail_timeout=20s down;  # dp3" in text


def test_generation_changes_with_content_and_is_embedded() -> None:
    a = render(sample(), RenderOptions(mode="site"))
    b = render(sample(), RenderOptions(mode="site"), {"dp0": ServerState(weight=2)})
    ga, gb = generation_in(a), generation_in(b)
    assert ga and gb and ga != gb
    assert f'return 200 "{ga}\\n";' in a and f"X-Fdngx-Generation {ga} always" in a


def test_site_has_sse_settings_and_safe_retries() -> None:
    text = render(sample(), RenderOptions(mode="site"))
    for needle in (
        "proxy_buffering off;",
        "proxy_cache off;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_next_upstream error http_429 http_503 non_idempotent;",
        "proxy_read_timeout 1h;",
        "client_max_body_size 64m;",
        "allow 127.0.0.1;",
        "deny all;",
        "location = /health",
        "location /v1/",
        "X-Request-ID",
    ):
        assert needle in text, needle
    # timeouts are not retried: a read timeout may come after the generation started
    assert "proxy_next_upstream error timeout" not in text


def test_template_dir_overrides_one_template(tmp_path: Path) -> None:
    (tmp_path / "_proxy.j2").write_text("        proxy_pass http://{{ upstream }};  # custom\n")
    text = render(sample(), RenderOptions(mode="site", template_dir=tmp_path))
    assert "proxy_pass http://fastdeploy;  # custom" in text and "least_conn;" in text


def test_template_errors_name_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "upstream.conf.j2").write_text("ok\n{% for x in %}\n")
    with pytest.raises(RenderError, match=r"upstream.conf.j2:2: "):
        render(sample(), RenderOptions(template_dir=tmp_path))
    (tmp_path / "upstream.conf.j2").write_text("{{ no_such_variable }}\n")
    with pytest.raises(RenderError, match=r"no_such_variable"):
        render(sample(), RenderOptions(template_dir=tmp_path))


def test_bad_options_and_empty_inventory() -> None:
    with pytest.raises(UsageError, match="--mode 'x'"):
        render(sample(), RenderOptions(mode="x"))
    with pytest.raises(UsageError, match="--listen"):
        render(sample(), RenderOptions(mode="site", listen="1.2.3.4:99999"))
    empty = inventory.parse_inventory({"instances": []}, "e.json")
    with pytest.raises(RenderError, match=r"e\.json: no instances"):
        render(empty, RenderOptions())


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("8080", ("127.0.0.1", 8080)),
        ("0.0.0.0:80", ("127.0.0.1", 80)),
        ("[::]:8080", ("::1", 8080)),
        ("10.0.0.5:81", ("10.0.0.5", 81)),
    ],
)
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    parsed = Listen.parse(listen)
    assert (parsed.reach_host, parsed.port) == expected


def test_a_replica_filled_by_traffic_from_elsewhere_is_rendered_as_backup() -> None:
    text = render(sample(), RenderOptions(), {"dp0": ServerState(2, backup=True), "dp1": ServerState(3, down=True,
                                                                                                   backup=True)})
    assert "server 127.0.0.1:8001 weight=2 max_fails=3 fail_timeout=1s backup;  # dp0" in text
    assert "weight=3 max_fails=3 fail_timeout=1s down;  # dp1" in text, "down wins over backup"


def test_a_sidecar_of_the_previous_version_survives_the_new_templates_being_installed() -> None:
    """jinja re-read changed template files on every render: a sidecar still running while a newer fdngx was
    installed under it read the new header, which needs `front` its own code never passed (StrictUndefined:
    every render failed until a restart). The header does without it, and ours are read once."""
    header = environment(None).get_template("_header.j2").render(version="0.0.0", generation="0123456789ab")
    assert "fdngx-front" not in header and "# fdngx-generation: 0123456789ab" in header
    assert environment(None).auto_reload is False
