"""One escaping rule per output syntax. Templates print every value through one of these.

nginx directive arguments: nginx has no escape for `$` (variables) and treats `;`, `{`, `}`, `#`, quotes
and whitespace as syntax, so an argument is printed bare and must match an allow-list; anything else is
refused (EscapeError), never quoted into something nginx might read differently. Values are validated
when they enter (inventory, CLI), so a refusal here means a bug or a hostile template context, and it
fails the render instead of changing the config's shape.

nginx strings (nginx_string): a path fdngx writes into a config it generates for itself (the test
wrapper's `include`), double-quoted with `\\` and `"` escaped; `$` and control characters are refused.

nginx times, sizes and paths (nginx_msec, nginx_bytes, check_path_length): what nginx's own parsers take
(src/core/ngx_parse.c, ngx_conf_file.c), within bounds that hold on every nginx fdngx runs on, so a value
fdngx accepts is one `nginx -t` accepts; EscapeError says what to write instead.

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
# ngx_parse_time(value, 0), which every millisecond directive uses (proxy_read_timeout, worker_shutdown_timeout):
# units w d h m s ms, each at most once and largest first (no y or M: those are for second directives); a bare
# number is seconds. nginx also takes a bare number after units (`1h30` = 1h 30s) and spaces: fdngx does not.
_TIME_PART = re.compile(r"([0-9]+)(ms|[wdhms])")
_MSEC = {"w": 604_800_000, "d": 86_400_000, "h": 3_600_000, "m": 60_000, "s": 1_000, "ms": 1}
# nginx 1.22 takes up to 2^63-1 ms; older nginx and 32-bit builds 2^31-1 ms (24d 20h 31m): 24d fits them all.
MAX_MSEC = 24 * 86_400_000
TIME_HELP = "an nginx time such as 90s, 10m or 1h30m (units w d h m s ms, each once, largest first), 1ms..24d"
# ngx_parse_size (size directives: client_body_buffer_size) takes k and m; ngx_parse_offset (client_max_body_size)
# also g. Both: a whole number, at most 2^63-1 bytes (NGX_MAX_SIZE_T_VALUE, NGX_MAX_OFF_T_VALUE).
_SIZE = re.compile(r"([0-9]{1,19})([kKmMgG]?)")
_SCALE = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
MAX_NGINX_INT = (1 << 63) - 1
# nginx reads a directive argument into a 4096-byte buffer (NGX_CONF_BUFFER: longer is "too long parameter"),
# and open() refuses a path over PATH_MAX (4096, with the prefix nginx puts before a relative one) or with a
# name over NAME_MAX (255): 1024 bytes leaves room for the prefix and for two paths in one argument.
MAX_PATH = 1024
MAX_NAME = 255
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
    have no business in a path, so both are refused (EscapeError); so are bytes that are not UTF-8 (a path
    Python read from argv keeps them as lone surrogates, which no config file can hold)."""
    text = str(value)
    if "$" in text or any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF for c in text):
        raise EscapeError(f"{text[:60]!r} cannot be quoted safely for nginx")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def nginx_msec(value: object) -> int:
    """The milliseconds of `value`, an nginx time for a millisecond directive, read as ngx_parse_time(value, 0)
    reads it; EscapeError (TIME_HELP) unless nginx takes it and it is 1ms..24d (0 is not "no limit" to nginx:
    it is no time at all)."""
    text = value if isinstance(value, str) else ""
    if text.isascii() and text.isdigit() and len(text) <= 19:
        total, pos = int(text) * 1000, len(text)  # a bare number: seconds
    else:
        total, pos, allowed = 0, 0, list(_MSEC)
        for m in _TIME_PART.finditer(text):
            digits, unit = m.groups()
            if m.start() != pos or len(digits) > 19 or unit not in allowed:
                break
            allowed = allowed[allowed.index(unit) + 1:]  # each unit once, largest first
            total, pos = total + int(digits) * _MSEC[unit], m.end()
    if not text or pos != len(text) or not 1 <= total <= MAX_MSEC:
        raise EscapeError(f"want {TIME_HELP}")
    return total


def nginx_bytes(value: object, *, units: str = "km", least: int = 0, most: int = MAX_NGINX_INT) -> int:
    """The bytes of `value`, an nginx size with one of `units` (k, m and, for ngx_parse_offset, g; either case)
    or none, least..most bytes; EscapeError naming what nginx takes."""
    m = _SIZE.fullmatch(value) if isinstance(value, str) else None
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in ("", *units) or not least <= int(m.group(1)) * _SCALE[unit] <= most:
        suffix = " or ".join(", ".join(units).rsplit(", ", 1))
        limit = f"{most >> 20}m" if most < MAX_NGINX_INT else "2^63-1 bytes"
        low = f"{least >> 20}m" if least >= 1 << 20 and not least % (1 << 20) else f"{least} byte"
        bound = f"{low}..{limit}" if least else f"at most {limit}"
        raise EscapeError(f"want a size such as 512k or 1m (a whole number: bytes, or with {suffix}), {bound}")
    return int(m.group(1)) * _SCALE[unit]


def check_path_length(value: str) -> None:
    """EscapeError if nginx could not read `value` as one argument or open it: over MAX_PATH bytes, or a name in
    it over MAX_NAME."""
    data = str(value).encode("utf-8", "surrogateescape")
    if len(data) > MAX_PATH:
        raise EscapeError(f"a path of at most {MAX_PATH} bytes, please (this one has {len(data)})")
    if any(len(name) > MAX_NAME for name in data.split(b"/")):
        raise EscapeError(f"a path whose names are at most {MAX_NAME} bytes each, please")


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
