"""Settings from a TOML file and FDNGX_* environment variables, for every option of every command.

Precedence, highest first (click's own order, so a value's source is never ambiguous):

    1. the command line                 fdngx render --listen 8080
    2. FDNGX_<COMMAND>_<OPTION>          FDNGX_RENDER_LISTEN=8080
    3. FDNGX_<OPTION>                    FDNGX_LISTEN=8080        (every command that has --listen)
    4. [<command>] table of --config     [render]  listen = "8080"
    5. top-level key of --config         listen = "8080"          (every command that has --listen)
    6. the built-in default

<OPTION> is the long option name in capitals with `-` as `_` (--max-reloads-per-minute:
FDNGX_SIDECAR_MAX_RELOADS_PER_MINUTE); a flag takes 1/0, true/false, yes/no; a repeatable option takes a
list in the file and `:`-separated paths in the environment (FDNGX_INVENTORY=/a.json:/b.json); a
top-level key goes to each command whose option takes its value (a list of two inventories: render,
status and sidecar, not launch; a one-element list also suits an option taken once). File keys
are the long option names (`max-fails` or `max_fails`); `--no-x` flags are `x = false`, except options
whose own name starts with no- (sidecar's `no-reload = true`). An unknown table, key or a value of the
wrong type is an error naming the file and the key. The file is read by `fdngx --config FILE` or
$FDNGX_CONFIG; relative paths in it are relative to the current directory, as on the command line.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from fdngx.errors import FdngxError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (pyproject: tomli>=2; python_version < "3.11")
    import tomli as tomllib

ENV_PREFIX = "FDNGX"
# Not settings: they act at once (help, version) or choose the settings themselves.
_NOT_SETTINGS = frozenset({"help", "version", "config", "install-completion", "show-completion"})
# typer >= 0.25 carries its own copy of click's classes, older typer uses click's: the code below relies
# only on what both have (a command's .params and .commands, an option's .opts, .envvar, .multiple).
Command = Any
Option = Any


class ConfigError(FdngxError):
    """The --config file is missing, not TOML, or names something no command takes."""


@dataclass(frozen=True)
class Settings:
    path: Path
    root: dict[str, Any] = field(default_factory=dict)  # values for the `fdngx` options (log-format, verbose)
    default_map: dict[str, dict[str, Any]] = field(default_factory=dict)  # click: command -> param -> value


def option_key(param: Any) -> str | None:
    """The name an option goes by in the file and the environment: its first long flag, without `--`."""
    if getattr(param, "param_type_name", None) != "option" or getattr(param, "hidden", False):
        return None
    longs = [o for o in param.opts if o.startswith("--")]
    if not longs:
        return None
    key = longs[0][2:]
    return None if key in _NOT_SETTINGS else key


def settings_of(command: Command) -> dict[str, Option]:
    """key -> option, for every option of `command` that can be set from a file or the environment."""
    return {key: param for param in command.params if (key := option_key(param)) is not None}


def env_names(command: str | None, key: str) -> list[str]:
    """FDNGX_<COMMAND>_<OPTION> first, then FDNGX_<OPTION>."""
    opt = key.upper().replace("-", "_")
    names = [f"{ENV_PREFIX}_{command.upper().replace('-', '_')}_{opt}"] if command else []
    return [*names, f"{ENV_PREFIX}_{opt}"]


def attach_envvars(group: Command) -> None:
    """Give every option of every sub-command its two environment variables (before its context is made:
    click reads them while parsing). Options that already name a variable keep it."""
    for name, command in group.commands.items():
        for key, param in settings_of(command).items():
            if not param.envvar:
                param.envvar = env_names(name, key)


def _norm(key: str) -> str:
    return key.replace("_", "-")


def coerce(ctx: Any, param: Option, value: Any) -> Any:
    """`value` as the command would get it (the option's own conversion); typer.BadParameter if it cannot."""
    runtime = getattr(param, "get_runtime_param", None)
    if runtime is not None:  # typer >= 0.25
        return runtime().coerce(value, param=param, ctx=ctx)
    return param.type_cast_value(ctx, value)  # click


def _check(ctx: Any, path: Path, where: str, param: Option, value: Any) -> Any:
    """The value for click's default_map, or a ConfigError saying what is wrong with it and where."""
    multiple = param.multiple or (param.nargs != 1)
    if multiple and isinstance(value, str):
        value = [value]
    if not multiple and isinstance(value, list) and len(value) == 1:
        value = value[0]  # inventory = ["/etc/fdngx/fdngx.json"] also suits launch, which writes one
    items = value if multiple else [value]
    if multiple and not isinstance(value, list):
        raise ConfigError(f"{path}: {where}: expected a list, got {type(value).__name__}")
    if not multiple and isinstance(value, (list, dict)):
        kind = "list" if isinstance(value, list) else "table"
        raise ConfigError(f"{path}: {where}: expected one value, got a {kind}")
    for item in items:
        if isinstance(item, (list, dict)):
            raise ConfigError(f"{path}: {where}: expected a plain value, got a nested {type(item).__name__}")
    if getattr(param, "is_flag", False) and not isinstance(value, bool):
        raise ConfigError(f"{path}: {where}: expected true or false, got {value!r}")
    try:
        coerce(ctx, param, value)
    except (typer.BadParameter, ValueError, TypeError) as exc:
        message = exc.format_message() if isinstance(exc, typer.BadParameter) else str(exc)
        raise ConfigError(f"{path}: {where}: {message}") from None
    return value


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_settings(ctx: Any, path: Path, group: Command, root: dict[str, Option]) -> Settings:
    """Read and check `path` against the commands of `group` (and `root`, the group's own options); `ctx`
    is the group's context (the options' conversions take one)."""
    path = path.absolute()
    doc = read_toml(path)
    commands = {name: settings_of(cmd) for name, cmd in group.commands.items()}
    shared: dict[str, dict[str, Any]] = {}  # top-level key -> {command: value}
    root_values: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {}
    for raw_key, value in doc.items():
        if raw_key in commands:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: '{raw_key}' must be a table ([{raw_key}]), not a plain value")
            tables[raw_key] = value
            continue
        key = _norm(raw_key)
        if isinstance(value, dict):
            raise ConfigError(f"{path}: unknown table [{raw_key}] (commands: {', '.join(sorted(commands))})")
        if key in root:
            root_values[root[key].name or key] = _check(ctx, path, raw_key, root[key], value)
            continue
        takers = [name for name, opts in commands.items() if key in opts]
        if not takers:
            raise ConfigError(
                f"{path}: unknown key '{raw_key}': not an option of fdngx ({', '.join(sorted(root))}) nor of any "
                f"command (a command's own options go in its table, e.g. [render])"
            )
        # Given to every command it suits: a list of inventories is for render, status and sidecar, not for
        # launch and stop (which take one); a value that suits none is an error.
        fits: dict[str, Any] = {}
        first: ConfigError | None = None
        for name in takers:
            try:
                fits[name] = _check(ctx, path, raw_key, commands[name][key], value)
            except ConfigError as exc:
                first = first or exc
        if not fits:
            assert first is not None
            raise first
        shared[key] = fits
    default_map: dict[str, dict[str, Any]] = {}
    for name, opts in commands.items():
        values: dict[str, Any] = {}
        for key, fits in shared.items():
            if name in fits:
                values[opts[key].name or key] = fits[name]
        for raw_key, value in tables.get(name, {}).items():
            key = _norm(raw_key)
            if key not in opts:
                raise ConfigError(
                    f"{path}: [{name}] unknown key '{raw_key}' ({name} takes: {', '.join(sorted(opts)) or 'nothing'})"
                )
            values[opts[key].name or key] = _check(ctx, path, f"[{name}] {raw_key}", opts[key], value)
        if values:
            default_map[name] = values
    return Settings(path, root_values, default_map)
