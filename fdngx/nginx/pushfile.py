"""Controller mode's frontend list: `--push-to URL [TOKEN_FILE]` and the push file (`--push-file`), read into
FrontendSpecs (fdngx.nginx.fanout pushes to them). Tokens: one shared token file (`--push-token-file`), or per
frontend a token file named after its URL (`URL TOKEN_FILE`, relative to the push file's directory)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fdngx.errors import UnsafeFileError, UsageError
from fdngx.nginx.admin import parse_admin_url
from fdngx.system.files import read_regular_file

MAX_FRONTENDS = 1024
MAX_PUSH_FILE = 1 << 20


@dataclass(frozen=True)
class FrontendSpec:
    """One frontend to push to: its admin URL and the file holding its token."""

    url: str
    token_file: Path

    @property
    def label(self) -> str:
        """HOST:PORT, for logs and the `frontend` label."""
        listen, _path = parse_admin_url(self.url)
        return str(listen)


def frontend_specs(urls: Iterable[str], token_file: Path | None, what: str = "--push-to",
                   base: Path | None = None) -> list[FrontendSpec]:
    """URLs (each may be `URL` or `URL TOKEN_FILE`) -> specs; every frontend needs a token file. A relative
    TOKEN_FILE is relative to `base` (the push file's directory), else to the working directory."""
    specs: list[FrontendSpec] = []
    seen: set[str] = set()
    for entry in urls:
        parts = entry.split()
        if not parts:
            continue
        if len(parts) > 2:
            raise UsageError(f"{what} {entry!r}: want URL or URL TOKEN_FILE")
        try:
            listen, _path = parse_admin_url(parts[0])
        except ValueError as exc:
            raise UsageError(f"{what}: {exc}") from None
        own = (base or Path.cwd()) / parts[1] if len(parts) == 2 else None
        token = own or token_file
        if token is None:
            raise UsageError(f"{what} {parts[0]}: no token file (give --push-token-file, or URL TOKEN_FILE)")
        url = listen.url("/fdngx/peers")
        if url in seen:
            raise UsageError(f"{what}: {parts[0]} is listed twice")
        seen.add(url)
        specs.append(FrontendSpec(url, token.absolute()))
    if len(specs) > MAX_FRONTENDS:
        raise UsageError(f"{what}: more than {MAX_FRONTENDS} frontends")
    return specs


def _check_push_file(path: Path) -> None:
    """The push file says where the admin tokens go (a line `URL TOKEN_FILE` sends that file's contents to
    URL): like the token and state files (check_private), nobody but its owner, this user or root, may
    write it."""
    try:
        st = os.stat(path)
    except OSError:
        return  # said by the read
    if st.st_uid not in (os.geteuid(), 0):
        raise UnsafeFileError(f"{path}: the push file belongs to uid {st.st_uid}, neither this user (uid "
                              f"{os.geteuid()}) nor root, and it says where the admin tokens go; chown it to this user")
    if st.st_mode & 0o022:
        raise UnsafeFileError(f"{path}: the push file is writable by group or others (mode {st.st_mode & 0o7777:04o}), "
                              f"and it says where the admin tokens go; chmod go-w {path}")


def read_push_file(path: Path, token_file: Path | None) -> list[FrontendSpec]:
    """The push file: one admin URL per line, optionally followed by that frontend's token file (relative to
    the push file's directory); `#` comments and blank lines ignored. A file others can write, or that
    lists no frontend, is refused. Raises FdngxError naming the file and line."""
    _check_push_file(path)
    try:
        text = read_regular_file(path, MAX_PUSH_FILE).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the push file ({getattr(exc, 'strerror', None) or exc})") from None
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            entries.append((n, line))
    specs: list[FrontendSpec] = []
    for n, line in entries:
        specs.extend(frontend_specs([line], token_file, what=f"{path}:{n}", base=path.absolute().parent))
    urls = [s.url for s in specs]
    if len(urls) != len(set(urls)):
        raise UsageError(f"{path}: a frontend is listed twice")
    if len(specs) > MAX_FRONTENDS:
        raise UsageError(f"{path}: more than {MAX_FRONTENDS} frontends")
    if not specs:
        raise UsageError(f"{path}: the push file lists no frontend (one admin URL per line)")
    return specs
