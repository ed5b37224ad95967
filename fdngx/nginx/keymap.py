"""The API-key map nginx includes for `--api-keys-file`: a 0600 file beside the config, one file per set of keys.

A map's name carries its version (`.NAME.fdngx-api-keys.<16 hex>`), and new keys get a new file, never a
rewrite: the config that names the file is the only thing that changes which keys nginx checks. So a run
that fails after reading a changed keys file (its candidate fails `nginx -t`, the config is refused, an
option is bad) leaves nginx checking the keys it had, also across a later plain reload. Before, the one map
file was rewritten in place before anything was checked, and nginx's next reload took the new keys from a
run that said it failed.

A map no config names any more (neither the live file nor its backup, fdngx.nginx.journal) is removed by a
later run, once it is older than STALE_AFTER: a run in progress may be testing a candidate that names one.
A run that takes an existing map again (the keys went back to an older set) touches it, so the age counts from
the last run that chose it: another run's prune, which is not under the apply lock, does not remove the map a
candidate being tested names (one it removed just before the touch is written anew).
An older fdngx's unversioned `.NAME.fdngx-api-keys` is used while it holds the same keys, and removed the
same way once nothing names it.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from fdngx.domain import Mode
from fdngx.errors import UsageError
from fdngx.nginx.frontdoor import API_KEY, MAX_KEYS_FILE, load_api_keys
from fdngx.nginx.journal import aside
from fdngx.system.files import atomic_write, read_bytes_or_none, real_target

if TYPE_CHECKING:
    from fdngx.nginx.render import RenderOptions

STALE_AFTER = 600.0  # seconds an unnamed map is kept (a concurrent run's candidate may name it)
_PLAIN = re.compile(r"[A-Za-z0-9._-]+")  # a file name nginx_string writes as it is
_MAP_VERSION = re.compile(r"^# version ([0-9a-f]{16})$", re.M)
_MAP_ENTRY = re.compile(r'^"~\^\(\?i:bearer\) \+[^"\n]+\$" L[0-9]+;$', re.M)


def map_path(out: Path | None) -> Path:
    """The key map lives beside the config it guards as a dot-file (hidden from include globs), or in the
    working directory when the config goes to stdout."""
    if out is None:
        return Path(".fdngx-api-keys").absolute()
    target = real_target(out)
    return target.with_name(f".{target.name}.fdngx-api-keys")


def map_entries(keys: list[tuple[int, str]]) -> list[str]:
    """One nginx map entry a key: a case-sensitive regex on the whole Authorization header -> `L<line>`.
    A key has no `"`, `\\`, `$` or space (API_KEY); `.` and `+`, the regex metacharacters it may hold, are
    escaped. nginx keeps `\\.` and `\\+` as they are inside a double-quoted string."""
    out = []
    for number, key in keys:
        if not API_KEY.fullmatch(key):
            raise UsageError(f"API key on line {number} is not valid")
        pattern = key.replace(".", "\\.").replace("+", "\\+")
        out.append(f'"~^(?i:bearer) +{pattern}$" L{number};')
    return out


def _ours_and_private(path: Path) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


def current_map_version(path: Path, entries: list[str]) -> str | None:
    """The version of the key map at `path` if it is ours, private and holds exactly these entries."""
    if not _ours_and_private(path):
        return None
    old = read_bytes_or_none(path, 4 * MAX_KEYS_FILE)
    text = old.decode("ascii", "replace") if old is not None else ""
    m = _MAP_VERSION.search(text)
    if m is None or _MAP_ENTRY.findall(text) != entries:
        return None
    return m.group(1)


def _maps(base: Path) -> list[Path]:
    """The maps beside `base` (its versioned siblings, then the unversioned legacy name)."""
    try:
        versioned = re.compile(re.escape(base.name) + r"\.[0-9a-f]{16}")
        names = sorted(n for n in os.listdir(base.parent) if versioned.fullmatch(n))
    except OSError:
        names = []
    return [base.parent / n for n in names] + [base]


def ensure(base: Path, keys: list[tuple[int, str]], *, write: bool) -> tuple[Path, str]:
    """The map holding `keys` beside the config (`base`: map_path): (its path, its version). One
    that holds them already is used as it is; else, with `write`, a new file of a new version; without it
    (--check, --diff, stdout) nothing is written: (base, "unwritten")."""
    entries = map_entries(keys)
    for path in _maps(base):
        version = current_map_version(path, entries)
        if version is not None:
            if write:  # chosen again (keys put back to an older set): as young as a new map to prune
                try:
                    os.utime(path, follow_symlinks=False)
                except OSError:  # another run's prune took it just now: a new one is written below
                    continue
            return path, version
    if not write:
        return base, "unwritten"
    version = secrets.token_hex(8)
    path = base.with_name(f"{base.name}.{version}")
    text = ("# Generated by fdngx from --api-keys-file: do not edit. Mode 0600: the API keys are secrets.\n"
            f"# version {version}\n" + "".join(f"{e}\n" for e in entries))
    atomic_write(path, text, mode=0o600, private=True)
    return path, version


def prune(base: Path, keep: Path, named_by: list[bytes | None], now: float | None = None) -> list[Path]:
    """Remove the maps beside `base` other than `keep` that none of `named_by` (the live config, its backup)
    names and that are older than STALE_AFTER; only regular files of this account. Returns what went."""
    if not _PLAIN.fullmatch(base.name):  # a name the config escapes: what names it cannot be told; keep all
        return []
    now = time.time() if now is None else now
    texts = [t for t in named_by if t]
    gone = []
    for path in _maps(base):
        # The config names a map as `include "<dir>/<name>";`: the name and its closing quote.
        if path == keep or any(os.fsencode(path.name) + b'"' in t for t in texts):
            continue
        try:
            st = os.stat(path, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or now - st.st_mtime < STALE_AFTER:
                continue
            os.unlink(path)
        except OSError:
            continue
        gone.append(path)
    return gone


def applied(opts: RenderOptions, out: Path | None, *, write: bool) -> RenderOptions:
    """--api-keys-file: the options with the map holding the file's keys now, beside `out` (a new file when the
    keys changed, unless `write` is off: --check, --diff, stdout); maps no config names any more go. Read at
    every `fdngx render` and at every sidecar cycle whose keys file changed (fdngx.nginx.target): a revoked key
    is gone from the next config either writes, and the sidecar never puts an older map back."""
    if not opts.api_keys_file:
        return opts
    base = map_path(out)
    keys = load_api_keys(Path(opts.api_keys_file))
    try:
        if write and opts.mode is Mode.STANDALONE:
            base.parent.mkdir(parents=True, exist_ok=True)  # the prefix, which the target prepares next
        path, version = ensure(base, keys, write=write)
    except OSError as exc:
        raise UsageError(f"{base}: cannot write the API key map: {exc.strerror or exc}") from None
    if write and out is not None:
        live = real_target(out)
        prune(base, path, [read_bytes_or_none(live), read_bytes_or_none(aside(live, "bak"))])
    return replace(opts, api_keys_map=str(path), api_keys_version=version).validated()
