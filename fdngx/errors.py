"""The exception hierarchy. Every expected failure is an FdngxError whose message a sysadmin can act on.

The CLI maps these to exit code 1 and prints the message on one line; nothing else should reach a user
as a traceback.
"""

from __future__ import annotations

import errno


class FdngxError(Exception):
    """Base class: an expected failure with a message for people."""

    exit_code = 1

    def __str__(self) -> str:
        # One line: nginx and child processes sometimes give multi-line messages.
        return " | ".join(line.strip() for line in super().__str__().splitlines() if line.strip())


def os_error_line(exc: OSError) -> str:
    """An OSError as one line for people, naming the file (absolute: cron's cwd is not yours) when it has one."""
    from pathlib import Path

    where = f"{Path(exc.filename).absolute()}: " if isinstance(exc.filename, str) and exc.filename else ""
    return f"{where}{exc.strerror or exc}"


class InventoryError(FdngxError):
    """The inventory file is missing, unreadable or invalid."""


class InventoryTooLarge(InventoryError):
    """A save refused: the file would be over the size load() accepts (nothing was written)."""


class RenderError(FdngxError):
    """A template is missing, broken or produced something unusable."""


class ApplyError(FdngxError):
    """Writing, testing or reloading the nginx config failed (the old config was restored)."""


class LaunchError(FdngxError):
    """Starting, supervising or stopping replicas failed."""


class UnsafeFileError(FdngxError):
    """A file fdngx must trust is a symlink, not a regular file, or writable by another account."""


class ListenError(FdngxError):
    """A listener fdngx was told to open cannot bind (the port is taken, the address is not on this host yet):
    a state of the machine, not of the command line. Exit 1, so a service manager restarts the sidecar
    (the shipped unit stops for good only on 2, a usage error)."""


# Why a bind failed, by errno: what to look at (the errno's own words come first).
_LISTEN_HINTS = {
    errno.EADDRINUSE: "another process listens there (ss -ltnp)",
    errno.EADDRNOTAVAIL: "that address is not on this host (yet)",
    errno.EACCES: "a port below 1024 needs root or CAP_NET_BIND_SERVICE",
}


def listen_error(option: str, value: str, exc: OSError) -> ListenError:
    """A failed bind of `option`'s `value` as one line: the option, the address, the errno's words and a hint."""
    hint = _LISTEN_HINTS.get(exc.errno or 0)
    return ListenError(f"{option} {value}: cannot listen: {exc.strerror or exc}{f'; {hint}' if hint else ''}")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) that says what the step it stopped left behind ("restored the previous file"). Still a
    KeyboardInterrupt, so whatever stops on one still does (no `except Exception` takes it for a failure);
    the CLI says it on one line and exits 130."""


class UsageError(FdngxError):
    """Options that do not fit together, or a malformed option value."""

    exit_code = 2


def shown(value: object) -> str:
    """A value for a one-line message: its repr (a string quoted, escapes escaped), cut short if long."""
    try:
        text = repr(value)
    except ValueError:  # an int of more than 4300 digits (sys.set_int_max_str_digits)
        return f"an integer of {value.bit_length()} bits" if isinstance(value, int) else "?"
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def check_number(option: str, value: object, low: float, high: float, unit: str = "seconds", *,
                 whole: bool = False) -> None:
    """A numeric option must be a finite number from `low` to `high` (`whole`: an int, as nginx writes it):
    else a UsageError naming the option and the value (one line). NaN, inf and 1e308 are refused here, before
    any timer, list or file sees them."""
    kinds = int if whole else int | float
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "a whole number" if whole or (isinstance(low, int) and isinstance(high, int)) else "a number"
        raise UsageError(f"{option} {shown(value)}: want {kind} {_bound(low)}..{_bound(high)}"
                         f"{f' ({unit})' if unit else ''}")


def _bound(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"
