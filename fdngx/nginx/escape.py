"""One escaping rule per output syntax. Templates print every value through one of these.

nginx directive arguments: nginx has no escape for `$` (variables) and treats `;`, `{`, `}`, `#`, quotes
and whitespace as syntax, so an argument is printed bare and must match an allow-list; anything else is
refused (EscapeError), never quoted into something nginx might read differently. Values are validated
when they enter (inventory, CLI), so a refusal here means a bug or a hostile template context, and it
fails the render instead of changing the config's shape.

nginx strings (nginx_string): a path fdngx writes into a config it generates for itself (the test
wrapper's `include`), double-quoted with `\\` and `"` escaped; `$` and control characters are refused.

Lua: a value becomes a Lua literal. Strings are emitted with every byte outside a small safe set as a
decimal escape (\\ddd), so no input can close the string; numbers must be finite; tables are built from
sorted keys (deterministic). Inventory data does not go through here at all: it reaches the balancer as
data (see fdngx.nginx.openresty).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

_ARG = re.compile(r"[A-Za-z0-9_./:@+\[\]*=,-]+")
_TIME = re.compile(r"(?:[0-9]+(?:ms|s|m|h|d|w|M|y)?)+")
_SIZE = re.compile(r"[0-9]+[kKmMgG]?")
_LUA_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 _./:@+-")
_LUA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LUA_KEYWORDS = frozenset({
    "and", "break", "do", "else", "elseif", "end", "false", "for", "function", "goto", "if", "in", "local",
    "nil", "not", "or", "repeat", "return", "then", "true", "until", "while",
})


class EscapeError(ValueError):
    """A value cannot be printed safely in the target syntax."""


def nginx_arg(value: Any) -> str:
    """`value` as one bare nginx directive argument; EscapeError unless it is an int or allow-listed text."""
    if isinstance(value, bool):
        raise EscapeError(f"{value!r} is not an nginx argument")
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if not _ARG.fullmatch(text):
        raise EscapeError(f"{text[:60]!r} is not safe as an nginx argument")
    return text


def nginx_string(value: str) -> str:
    """`value` as one double-quoted nginx argument (a path fdngx did not choose: the candidate file, a temp
    dir). Inside quotes nginx reads `\\` and `\\"` as escapes; `$` has no escape and control characters
    have no business in a path, so both are refused (EscapeError)."""
    text = str(value)
    if "$" in text or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise EscapeError(f"{text[:60]!r} cannot be quoted safely for nginx")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def nginx_time(value: str) -> bool:
    return isinstance(value, str) and bool(_TIME.fullmatch(value))


def nginx_size(value: str) -> bool:
    return isinstance(value, str) and bool(_SIZE.fullmatch(value))


def lua_string(text: str) -> str:
    out = []
    for byte in text.encode("utf-8"):
        out.append(chr(byte) if byte in _LUA_SAFE else f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def lua_literal(value: Any) -> str:
    """A Python value (str, int, finite float, bool, None, list, mapping with str keys) as Lua source."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise EscapeError(f"{value!r} is not a finite number")
        return repr(value)
    if isinstance(value, str):
        return lua_string(value)
    if isinstance(value, Mapping):
        items = []
        for key in sorted(value):
            if not isinstance(key, str):
                raise EscapeError(f"table key {key!r} is not a string")
            lhs = key if _LUA_NAME.fullmatch(key) and key not in _LUA_KEYWORDS else f"[{lua_string(key)}]"
            items.append(f"{lhs} = {lua_literal(value[key])}")
        return "{ " + ", ".join(items) + " }" if items else "{}"
    if isinstance(value, Sequence):
        return "{ " + ", ".join(lua_literal(v) for v in value) + " }" if value else "{}"
    raise EscapeError(f"{type(value).__name__} cannot be written as a Lua literal")
