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
wrong type is an error naming the file and the key, and so is a key given twice (`max-fails` and `max_fails`)
or true/false for an option that is not a flag. The file is read by `fdngx --config FILE` or $FDNGX_CONFIG:
a regular file of at most 1 MiB (not a FIFO or a device); relative paths in it are relative to the current
directory, as on the command line.

Where a top-level key does not go. PER_COMMAND: an option that means different things to different
commands (`timeout`: launch's wait for /health, status's scrape timeout per request; `interval`: the
sidecar's and demo's cycle, status's --watch frames) is refused at the top level by the commands that have
the option (the others, render and drain, run: an upgrade's cron line keeps working), with the tables to put
it in: given to every command that has it, a value meant for one quietly changed another (`timeout = 900` for
launch made status wait 900 s on a replica that does not answer). Refused rather than given only where it
means the same: `timeout` means the same to no two commands, and a key that silently skipped some commands
would surprise as much. Likewise in the environment: only FDNGX_<COMMAND>_TIMEOUT and _INTERVAL are read,
and a command that has the option refuses to run with FDNGX_TIMEOUT or FDNGX_INTERVAL set.
ONLY_WITH: a top-level key reaches an option that only serves another option of its command only when that
one is set: `out` and `state` (the config render, the sidecar and status share, and its policy state) reach
drain only with --wait, as drain's --out and --state only tell --wait where the policy state is (drain
refuses them without it); so does FDNGX_OUT. A [command] table is always taken as written.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from fdngx.errors import FdngxError
from fdngx.system.files import read_regular_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (pyproject: tomli>=2; python_version < "3.11")
    import tomli as tomllib

ENV_PREFIX = "FDNGX"
MAX_CONFIG_BYTES = 1 << 20  # a settings file is a few hundred bytes: a bigger one is not one
# Options that mean different things to different commands: a [command] table only, never the top level.
PER_COMMAND = {
    "timeout": "launch: seconds to wait for /health; status: the scrape's timeout per request",
    "interval": "sidecar and demo: seconds between cycles; status: seconds between --watch frames",
}
# (command, key) -> the option of that command a top-level key waits for: it reaches the command only when
# that option is set (by any source). drain's --out and --state only say where --wait reads the policy state,
# and drain refuses them without --wait; a top-level `out` is there for render, the sidecar and status.
ONLY_WITH = {("drain", "out"): "wait", ("drain", "state"): "wait"}
# Not settings: they act at once (help, version) or choose the settings themselves.
_NOT_SETTINGS = frozenset({"help", "version", "config", "install-completion", "show-completion"})
# typer >= 0.25 carries its own copy of click's classes, older typer uses click's: the code below relies
# only on what both have (a command's .params and .commands, an option's .opts, .envvar, .multiple; the
# current context, looked up in both).
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


def attach_envvars(group: Command, running: str | None = None) -> dict[str, dict[str, Any]]:
    """Give every option of every sub-command its two environment variables (before its context is made:
    click reads them while parsing); a PER_COMMAND or ONLY_WITH option only FDNGX_<COMMAND>_<OPTION>. Options
    that already name a variable keep it. For the command `running`: FDNGX_<OPTION> of a PER_COMMAND option
    set is a ConfigError (it would be ignored); of an ONLY_WITH option, it reaches it as a top-level key does,
    through the default_map entries returned ({command: {param: OnlyWith}}; above the file's)."""
    for name, command in group.commands.items():
        for key, param in settings_of(command).items():
            if not param.envvar:
                own = key in PER_COMMAND or (name, key) in ONLY_WITH
                param.envvar = env_names(name, key)[:1] if own else env_names(name, key)
    if running is None or running not in group.commands:
        return {}
    found: dict[str, Any] = {}
    for key, param in settings_of(group.commands[running]).items():
        if not (value := os.environ.get(var := env_names(None, key)[0])):  # click, too: empty is not set
            continue
        if key in PER_COMMAND:
            raise ConfigError(f"{var}: means different things to different commands ({PER_COMMAND[key]}): set "
                              f"{env_names(running, key)[0]} instead")
        if (other := ONLY_WITH.get((running, key))) is not None:
            found[param.name or key] = OnlyWith(other, value)
    return {running: found} if found else {}


def _long(param: Option) -> str:
    return next((o for o in param.opts if o.startswith("--")), param.opts[0])


def _norm(key: str) -> str:
    return key.replace("_", "-")


def _keys(path: Path, where: str, table: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """key (with `-`) -> (the key as written, its value); one key written both ways is an error."""
    keys: dict[str, tuple[str, Any]] = {}
    for raw_key, value in table.items():
        key = _norm(raw_key)
        if key in keys:
            raise ConfigError(f"{path}: {where}'{keys[key][0]}' and '{raw_key}' are the same key, given twice: "
                              "keep one")
        keys[key] = (raw_key, value)
    return keys


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
    if getattr(param, "is_flag", False):
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: {where}: expected true or false, got {value!r}")
    else:  # click would take true as 1 (max_fails=1) or "True": no option but a flag takes true/false
        for item in items:
            if isinstance(item, bool):
                raise ConfigError(f"{path}: {where}: expected a value for {_long(param)}, not {str(item).lower()} "
                                  "(true and false are for on/off flags only)")
    try:
        coerce(ctx, param, value)
    except (typer.BadParameter, ValueError, TypeError) as exc:
        message = getattr(exc, "message", None) or str(exc)  # not click's "Invalid value for ... (env var: ...)"
        raise ConfigError(f"{path}: {where}: {message}") from None
    return value


def read_toml(path: Path) -> dict[str, Any]:
    """The document in `path`: a regular file (a FIFO would hang the read, a device never end it) of at most
    MAX_CONFIG_BYTES, in UTF-8 TOML; a ConfigError naming the file otherwise."""
    try:
        data = read_regular_file(path, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            raise ConfigError(f"{path}: config file larger than {MAX_CONFIG_BYTES >> 20} MiB: not a settings "
                              "file") from None
        if exc.errno == errno.EINVAL or path.is_dir():
            kind = "a directory" if path.is_dir() else "not a regular file (a FIFO or a device?)"
            raise ConfigError(f"{path}: {kind}: a config file must be a regular file") from None
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


class OnlyWith:
    """A default_map value that click calls when it looks the option up: `value` when the command's option
    `other` holds a true value by then (click processes the options of a command in their order, those on
    the command line first: drain's --wait comes before --out and --state), else None (not given)."""

    def __init__(self, other: str, value: Any) -> None:
        self.other, self.value = other, value

    def __call__(self) -> Any:
        ctx = _current_context()
        return self.value if ctx is not None and ctx.params.get(self.other) else None


def _current_context() -> Any:
    """The context click is parsing in (the command's), from typer's own copy of click or from click."""
    for module in ("typer._click.globals", "click.globals"):
        try:
            get = importlib.import_module(module).get_current_context
        except (ImportError, AttributeError):
            continue
        if (ctx := get(silent=True)) is not None:
            return ctx
    return None


def load_settings(ctx: Any, path: Path, group: Command, root: dict[str, Option]) -> Settings:
    """Read and check `path` against the commands of `group` (and `root`, the group's own options); `ctx`
    is the group's context (the options' conversions take one)."""
    path = path.absolute()
    doc = read_toml(path)
    commands = {name: settings_of(cmd) for name, cmd in group.commands.items()}
    shared: dict[str, dict[str, Any]] = {}  # top-level key -> {command: value}
    root_values: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {}
    for key, (raw_key, value) in _keys(path, "", doc).items():
        if raw_key in commands:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: '{raw_key}' must be a table ([{raw_key}]), not a plain value")
            tables[raw_key] = value
            continue
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
        if key in PER_COMMAND:  # refused only by a command that has the option: `render` and `drain` have none
            if getattr(ctx, "invoked_subcommand", None) in takers:
                tables = " or ".join(f"[{name}]" for name in takers)
                raise ConfigError(f"{path}: '{raw_key}' means different things to different commands "
                                  f"({PER_COMMAND[key]}): it is not taken at the top level; put it in {tables}")
            continue
        # Given to every command it suits: a list of inventories is for render, status and sidecar, not for
        # launch and stop (which take one); a value that suits none is an error, said by a command that takes
        # its shape (a list: one that takes several) if one does.
        fits: dict[str, Any] = {}
        first: ConfigError | None = None
        for name in sorted(takers, key=lambda name: isinstance(value, list) != bool(commands[name][key].multiple)):
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
                other = ONLY_WITH.get((name, key))
                values[opts[key].name or key] = fits[name] if other is None else OnlyWith(other, fits[name])
        for key, (raw_key, value) in _keys(path, f"[{name}] ", tables.get(name, {})).items():
            if key not in opts:
                raise ConfigError(
                    f"{path}: [{name}] unknown key '{raw_key}' ({name} takes: {', '.join(sorted(opts)) or 'nothing'})"
                )
            values[opts[key].name or key] = _check(ctx, path, f"[{name}] {raw_key}", opts[key], value)
        if values:
            default_map[name] = values
    return Settings(path, root_values, default_map)
