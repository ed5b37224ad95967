"""The `fdngx` command line. It only wires: each module in fdngx.commands parses its options, calls one
core function and prints its result; this module registers them on one typer app, and gives every
option of every command its FDNGX_* environment variables and its place in a --config file
(fdngx.config: the precedence is there).

Errors: core functions raise FdngxError; `main()` prints its one-line message and exits 1 (2 for usage).
Nothing imports this module back.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

from fdngx.commands.helptext import HelpContext
from fdngx.config import attach_envvars, env_names, load_settings, settings_of
from fdngx.errors import FdngxError, Interrupted, os_error_line
from fdngx.logs import say, setup_logging
from fdngx.system import hups

# The command each module in fdngx.commands registers, in --help's order. A run imports only the module of the
# command it runs (cron's `render` does not import the simulator, the demo or the launch supervisor: about a
# fifth of a start); --help, completion, an unknown command and --config (whose tables are checked against every
# command) load them all.
COMMANDS = {"launch": "launch", "stop": "launch", "render": "render", "sidecar": "sidecar", "status": "status",
            "drain": "drain", "sim": "sim", "demo": "demo"}
_ROOT_VALUED = ("--config", "--log-format")  # root options that take a value (the next word)
INTERRUPTED = 130  # exit status after Ctrl-C: 128 + SIGINT, as shells report it

APP_SETTINGS: dict[str, Any] = dict(
    name="fdngx",
    help=(
        "nginx in front of data-parallel LLM servers (FastDeploy, vLLM, SGLang), weighted by real load.\n\n"
        "Typical use: `fdngx launch` (start replicas, write fdngx.json), then `fdngx render` (write and "
        "safely apply the nginx upstream), then `fdngx sidecar` or a cron line to keep weights current.\n\n"
        "Recommended for production: `--flavor openresty` on render and sidecar (nginx's Lua module: a Lua "
        "balancer, weights and health pushed, no reloads); with several nginx frontends, one sidecar pushing to "
        "all of them (`fdngx sidecar --push-to`). Without the Lua module, the default: nginx's least_conn with "
        "weights, rewritten with a safe reload when they change."
    ),
    epilog=(
        "Settings: every option can also come from the environment, FDNGX_<COMMAND>_<OPTION> or FDNGX_<OPTION> "
        "(FDNGX_RENDER_OUT, FDNGX_INVENTORY=/a.json:/b.json), or from a TOML file (--config): top-level keys for "
        "every command that has the option, a [render], [sidecar], ... table per command. Precedence: command "
        "line > FDNGX_<COMMAND>_<OPTION> > FDNGX_<OPTION> > [command] table > top-level key > default. timeout and "
        "interval mean different things to different commands: only in a table or FDNGX_<COMMAND>_<OPTION>. A "
        "top-level out or state (or FDNGX_OUT) reaches drain only with --wait."
    ),
    no_args_is_help=True,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        from fdngx import __version__

        typer.echo(f"fdngx {__version__}")
        raise typer.Exit(0)


class LogFormat(str, Enum):
    AUTO = "auto"
    TEXT = "text"
    JOURNAL = "journal"
    JSON = "json"


def _root(
    ctx: typer.Context,
    config: Path | None = typer.Option(
        None, "--config", envvar="FDNGX_CONFIG", dir_okay=False,
        help="TOML file with settings for any command: top-level keys, or a [render], [sidecar], ... table. "
        "Unknown keys are an error.",
    ),
    log_format: LogFormat = typer.Option(
        LogFormat.AUTO, "--log-format", envvar="FDNGX_LOG_FORMAT",
        help="text: timestamped lines; journal: sd-daemon priority prefixes (<4>...), no timestamp; json: one "
        "object per line (ts, level, logger, msg, extras). auto: journal when stderr is the journal "
        "($JOURNAL_STREAM), else text.",
    ),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", envvar="FDNGX_VERBOSE", help="Debug logging (fdngx's own loggers only)."
    ),
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", is_eager=True, callback=_print_version
    ),
) -> None:
    setup_logging(verbose, log_format.value)  # now: a bad --config is reported in the chosen shape
    from_env = attach_envvars(ctx.command, ctx.invoked_subcommand)
    if config is not None:
        params = {p.name: p for p in ctx.command.params}
        settings = load_settings(ctx, config, ctx.command, {"log-format": params["log_format"],
                                                            "verbose": params["verbose"]})
        ctx.default_map = {**(ctx.default_map or {}), **settings.default_map}
        # The root's own options were parsed before the file was read: take the file's value where the
        # command line and the environment gave none.
        if _defaulted(ctx, "log_format") and "log_format" in settings.root:
            log_format = LogFormat(str(settings.root["log_format"]).lower())
        if _defaulted(ctx, "verbose") and "verbose" in settings.root:
            verbose = bool(settings.root["verbose"])
        setup_logging(verbose, log_format.value)
    for name, values in from_env.items():  # FDNGX_OUT for drain (fdngx.config.ONLY_WITH): above the file
        ctx.default_map = {**(ctx.default_map or {}), name: {**(ctx.default_map or {}).get(name, {}), **values}}
    _note_sources(ctx, config)


# Where the running command's options set outside the command line came from ({"--listen": ("FILE, key
# 'listen'", its parameter name)}): a refused value is then said with its file or variable (main), not as if
# typed; and the running command, to ask click what the command line gave.
_SOURCES: dict[str, tuple[str, str]] = {}
_RUNNING: list[tuple[str, Any]] = []


def _note_sources(ctx: typer.Context, config: Path | None) -> None:
    running = ctx.invoked_subcommand
    command = getattr(ctx.command, "commands", {}).get(running) if running else None
    if command is None:
        return
    from_file = (ctx.default_map or {}).get(running, {}) if config is not None else {}
    _RUNNING[:] = [(running, command)]
    for key, param in settings_of(command).items():
        variables = [v for v in env_names(running, key) if os.environ.get(v)]
        if variables:
            _SOURCES[f"--{key}"] = variables[0], str(param.name)
        elif param.name in from_file:
            _SOURCES[f"--{key}"] = f"{Path(config).absolute()}, key '{key}'", str(param.name)  # type: ignore[arg-type]


def _sourced(message: str) -> str:
    """`message` with where its option's value came from, when not from the command line."""
    where, name = _SOURCES.get(message.split(" ", 1)[0].rstrip(":"), ("", ""))
    return f"{message} (from {where})" if where and not _typed(name) else message


def _typed(name: str) -> bool:
    """Did the command line give parameter `name` of the running command, in any spelling (`--out X`,
    `--out=X`, `-o X`, `-qoX`)? click's own parser says, run again on the command's words with resilient
    parsing (no prompts, no errors; a parameter callback would still run: fdngx's options have none)."""
    if not _RUNNING:
        return False
    running, command = _RUNNING[0]
    words = iter(sys.argv[1:])
    for word in words:  # past fdngx's own options, to the command's name (as modules_for)
        if word in _ROOT_VALUED:
            next(words, None)
        elif word == running:
            break
    try:
        ctx = command.make_context(running, list(words), resilient_parsing=True)
    except Exception:
        return True
    source = ctx.get_parameter_source(name)  # typer's own click: its enum, compared by name
    return source is not None and source.name == "COMMANDLINE"


def _defaulted(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is None or source.name == "DEFAULT"


class _Group(TyperGroup):
    """fdngx's root command: a Ctrl-C in a command is said on one line. typer turns a KeyboardInterrupt into
    exit 130 and says nothing; a cron mail or a terminal should see that the run was stopped, and what it
    left (an apply after its swap puts the previous file back: fdngx.nginx.apply). Its help and each
    command's wrap at spaces only (fdngx.commands.helptext)."""

    context_class = HelpContext

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            command.context_class = HelpContext
        return command

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            say(interrupted_line(exc), logging.WARNING)
            raise  # typer: exit 130 (128 + SIGINT)

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        """The root's options parsed (typer builds its validators here: tens of ms a Ctrl-C can land in)."""
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt as exc:
            say(interrupted_line(exc), logging.WARNING)
            raise


APP_SETTINGS["cls"] = _Group


def make_app(modules: Sequence[str] | None = None) -> typer.Typer:
    """The typer app with the commands of `modules` (names in fdngx.commands; None: every one)."""
    made = typer.Typer(**APP_SETTINGS)  # type: ignore[arg-type]
    made.callback()(_root)
    for name in modules if modules is not None else dict.fromkeys(COMMANDS.values()):
        importlib.import_module(f"fdngx.commands.{name}").register(made)
    return made


def modules_for(argv: Sequence[str]) -> list[str] | None:
    """The command modules a run with `argv` needs: the one of its command, or None (all of them)."""
    if os.environ.get("FDNGX_CONFIG") or "_FDNGX_COMPLETE" in os.environ:
        return None
    if any(word == "--config" or word.startswith("--config=") for word in argv[:_command_at(argv)]):
        return None
    word = command_of(argv)
    return [COMMANDS[word]] if word in COMMANDS else None


def command_of(argv: Sequence[str]) -> str | None:
    """The command a run with `argv` names (its first word that is not fdngx's own option), or None."""
    at = _command_at(argv)
    return argv[at] if at < len(argv) else None


def _command_at(argv: Sequence[str]) -> int:
    at = 0
    while at < len(argv) and argv[at].startswith("-"):
        at += 2 if argv[at] in _ROOT_VALUED else 1
    return at


@functools.cache
def _full_app() -> typer.Typer:
    return make_app()


def __getattr__(name: str) -> typer.Typer:
    """`fdngx.cli.app`: the app with every command (docs, tests, completion scripts)."""
    if name == "app":
        return _full_app()
    raise AttributeError(name)


def main() -> None:
    if command_of(sys.argv[1:]) == "sidecar":
        hups.hold()  # first thing: `systemctl reload` may come while it starts (fdngx.system.hups)
    # Not click's standalone mode: its usage errors (a bad option, a value typer cannot convert) come here too,
    # and are said on one line like fdngx's own, instead of a box of several.
    try:
        # prog_name: `python -m fdngx` is still `fdngx` in usage lines and in completion's _FDNGX_COMPLETE.
        code = make_app(modules_for(sys.argv[1:]))(prog_name="fdngx", standalone_mode=False)
    except KeyboardInterrupt as exc:  # Ctrl-C before a command ran (while loading it); in one: _Group.invoke
        say(interrupted_line(exc), logging.WARNING)
        sys.exit(INTERRUPTED)
    except typer.Abort:  # Ctrl-C while click was reading or prompting
        say("Aborted!", logging.ERROR)
        sys.exit(1)
    except typer.TyperException as exc:  # click's exceptions (typer carries its own click)
        if type(exc).__name__ == "NoArgsIsHelpError":  # `fdngx` alone: its help, as --help shows it; exit 2
            typer.echo(exc.ctx.get_help())  # type: ignore[attr-defined]
            sys.exit(2)
        if line := click_error_line(exc):
            say(f"fdngx: error: {line}", logging.ERROR, color="red")
        sys.exit(getattr(exc, "exit_code", 2))
    except FdngxError as exc:
        say(f"fdngx: error: {_sourced(str(exc))}", logging.ERROR, color="red")
        sys.exit(exc.exit_code)
    except OSError as exc:
        # A file or socket the user pointed us at: one line naming it.
        say(f"fdngx: error: {os_error_line(exc)}", logging.ERROR, color="red")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)  # typer.Exit(N), --help: their code; a command's end: 0


def interrupted_line(exc: KeyboardInterrupt) -> str:
    """Ctrl-C as one line: what the interrupted step left, when it said (fdngx.errors.Interrupted)."""
    return f"fdngx: interrupted: {exc}" if isinstance(exc, Interrupted) and str(exc) else "fdngx: interrupted"


def click_error_line(exc: typer.TyperException) -> str:
    """click's words on one line: a bad value's option first (its long name; click's own hint would list the
    environment variables as a Python list), then where to look."""
    param = getattr(exc, "param", None)
    message = " ".join(str(getattr(exc, "message", "")).split())
    if isinstance(exc, typer.BadParameter) and param is not None and message:
        opts = [o for o in getattr(param, "opts", []) if o.startswith("--")] or [str(param.name).upper()]
        text = f"{max(opts, key=len)}{_from_environment(param)}: {message}"
    else:  # a missing argument or option, an unknown one: click's own sentence
        text = " ".join(str(getattr(exc, "format_message", exc.__str__)()).split())
    ctx = getattr(exc, "ctx", None)
    return f"{text} (see '{ctx.command_path} --help')" if text and ctx is not None else text



def _from_environment(param: Any) -> str:
    """' (from FDNGX_X)' when the bad value was not on the command line but in a variable that is set."""
    opts = getattr(param, "opts", [])
    if any(a == o or a.startswith(o + "=") for a in sys.argv[1:] for o in opts):
        return ""
    names = param.envvar if isinstance(param.envvar, list | tuple) else [param.envvar] if param.envvar else []
    set_ = [n for n in names if n in os.environ]
    return f" (from {set_[0]})" if set_ else ""


if __name__ == "__main__":
    main()
