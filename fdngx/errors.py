"""The exception hierarchy. Every expected failure is an FdngxError whose message a sysadmin can act on.

The CLI maps these to exit code 1 and prints the message on one line; nothing else should reach a user
as a traceback.
"""

from __future__ import annotations


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


class UsageError(FdngxError):
    """Options that do not fit together, or a malformed option value."""

    exit_code = 2
