"""Logging for the command line: the `fdngx` logger only, in one of three shapes.

- text: `2024-05-01T12:00:00 fdngx WARNING message` (a terminal, a file, cron mail);
- journal: `<4>fdngx.controller: message` under systemd: journald reads the sd-daemon priority prefix and
  stamps the time itself, so there is no timestamp (it would be duplicated) and `journalctl -p warning`
  works; chosen by `auto` when stderr is the stream named by $JOURNAL_STREAM;
- json: one object per line, {"ts", "level", "logger", "msg", plus the record's structured extras}, for
  log shippers (under journald it also carries the priority prefix, which journald strips).

Third-party loggers (watchdog's inotify events, urllib3's connection pool) go through the root logger at
WARNING, in the same shape; `-v` never turns them up. Lines a command prints for people on stderr (render's
summary, an error) go through `say`, so they get the same priority prefix or JSON shape.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

LOGGER = "fdngx"
FORMATS = ("auto", "text", "journal", "json")

# sd-daemon(3) priorities: what journald takes from a "<N>" line prefix.
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}
# Attributes every LogRecord has: anything else on a record came from `extra=` and is structured data.
_COLORS = {"red": 31, "yellow": 33}
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_state: dict[str, str] = {}  # "format": the shape chosen by the first set-up (or a later explicit one)


def priority(levelno: int) -> int:
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return _PRIORITY[level]
    return _PRIORITY[logging.DEBUG]


def under_journald(stream: TextIO | None = None, environ: dict[str, str] | None = None) -> bool:
    """True when `stream` (stderr) is connected to the journal: $JOURNAL_STREAM is "DEVICE:INODE" of it
    (systemd.exec(5)); a child whose stderr was redirected elsewhere inherits the variable, hence the check."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat((stream or sys.stderr).fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (ValueError, OSError, AttributeError):  # unset/garbled variable, or a stream with no descriptor
        return False


def resolve_format(fmt: str | None, stream: TextIO | None = None) -> str:
    fmt = (fmt or "auto").lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r} (one of: {', '.join(FORMATS)})")
    if fmt == "auto":
        return "journal" if under_journald(stream) else "text"
    return fmt


def extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s fdngx %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")


class JournalFormatter(logging.Formatter):
    """`<P>logger: message`, every line of a multi-line message (a traceback) prefixed, so journald keeps
    each line at the record's priority instead of its default (info)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{priority(record.levelno)}>"
        lines = text.splitlines() or [""]
        return "\n".join(f"{prefix}{record.name}: {line}" if i == 0 else f"{prefix}  {line}"
                         for i, line in enumerate(lines))


class JsonFormatter(logging.Formatter):
    def __init__(self, prefix: bool = False) -> None:
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in extras(record).items():
            doc.setdefault(key, value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        line = json.dumps(doc, default=str, ensure_ascii=False)
        return f"<{priority(record.levelno)}>{line}" if self.prefix else line


def formatter_for(fmt: str) -> logging.Formatter:
    if fmt == "journal":
        return JournalFormatter()
    if fmt == "json":
        return JsonFormatter(prefix=under_journald())
    return TextFormatter()


def _replace_handler(logger: logging.Logger, fmt: str) -> None:
    for handler in list(logger.handlers):
        if getattr(handler, "_fdngx", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter_for(fmt))
    handler._fdngx = True  # type: ignore[attr-defined]  # ours to replace on the next set-up
    logger.addHandler(handler)


def setup_logging(verbose: bool = False, fmt: str | None = None) -> None:
    """One stderr handler for the `fdngx` logger (DEBUG with verbose, else INFO) and one on the root logger
    at WARNING for everything else. `fmt` None keeps the shape an earlier call chose (a command that sets
    up logging again, e.g. `fdngx sim -v`, must not undo `--log-format json`)."""
    if fmt is not None or "format" not in _state:
        _state["format"] = resolve_format(fmt)
    chosen = _state["format"]
    logger = logging.getLogger(LOGGER)
    _replace_handler(logger, chosen)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    root = logging.getLogger()
    _replace_handler(root, chosen)
    root.setLevel(logging.WARNING)


def current_format() -> str:
    return _state.get("format") or resolve_format("auto")


def say(message: str, level: int = logging.INFO, *, color: str | None = None) -> None:
    """A line for people on stderr (a command's result or error), in the configured shape: plain text (the
    way render and the error path always printed), with a priority prefix under journald, or JSON."""
    fmt = current_format()
    if fmt == "json":
        record = logging.makeLogRecord({"name": LOGGER, "levelno": level, "levelname": logging.getLevelName(level),
                                        "msg": message, "args": None})
        print(JsonFormatter(prefix=under_journald()).format(record), file=sys.stderr, flush=True)
        return
    if fmt == "journal":
        prio = priority(level)
        text = "\n".join(f"<{prio}>{line}" for line in message.splitlines() or [""])
        print(text, file=sys.stderr, flush=True)
        return
    if color in _COLORS and sys.stderr.isatty() and "NO_COLOR" not in os.environ:
        message = f"\x1b[{_COLORS[color]}m{message}\x1b[0m"
    print(message, file=sys.stderr, flush=True)
