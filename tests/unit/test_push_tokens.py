"""Controller mode's admin tokens: never in a message or a repr, and a rotated token file is read again
before the next push (with --push-to alone too, where no push file changes). 127.0.0.1 only."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from fdngx.errors import ApplyError, FdngxError
from fdngx.nginx.admin import Admin, ensure_token, load_token, read_token
from fdngx.nginx.fanout import Fanout, FrontendSpec
from tests.support import token_file
from tests.unit.test_push_deadline import FakeFrontend, Handler, frontends, good

__all__ = ["frontends"]  # the fixture

OLD, NEW = "OLD-SECRET-TOKEN-0123456789", "NEW-SECRET-TOKEN-9876543210"


@pytest.mark.parametrize("text", [f"{OLD}\n{NEW}", f"{OLD} {NEW}", f"{OLD}\x00", f"{OLD}\u00e9"])
def test_a_token_file_with_more_than_one_word_is_refused_without_saying_it(tmp_path: Path, text: str) -> None:
    """A rotation that appended the new token: requests' error for the header held both tokens, and the
    fan-out logged it."""
    path = token_file(tmp_path, text=text)
    for read in (load_token, read_token, ensure_token):
        with pytest.raises(FdngxError) as err:
            read(path)
        message = str(err.value)
        assert message.startswith(f"{path}: ") and "one word of printable ASCII" in message
        assert "SECRET" not in message and "\n" not in message
    with pytest.raises(FdngxError) as err:
        Fanout([FrontendSpec("http://127.0.0.1:1/fdngx/peers", path)])
    assert "SECRET" not in str(err.value)


def test_the_admin_client_never_shows_its_token(frontends: Callable[[Handler], FakeFrontend]) -> None:
    fe = frontends(good)
    admin = Admin.from_url(fe.url, f"{OLD}\n{NEW}")  # made by hand, past load_token
    try:
        assert "SECRET" not in repr(admin)
        with pytest.raises(ApplyError) as err:
            admin.push("generation 1\nempty\n")
        assert "SECRET" not in str(err.value) and "not a valid HTTP header value" in str(err.value)
    finally:
        admin.close()


def replace_token(path: Path, text: str) -> None:
    """As a rotation does: a new 0600 file renamed over the old one."""
    token_file(path.parent, path.name + ".new", text)
    os.replace(path.with_name(path.name + ".new"), path)


def test_a_rotated_token_is_used_from_the_next_push(frontends: Callable[[Handler], FakeFrontend], tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    fe = frontends(good)
    path = token_file(tmp_path, text="A" * 32)
    fe.token = b"A" * 32
    fan = Fanout([FrontendSpec(f"{fe.url}/fdngx/peers", path)])  # --push-to: no push file to notice anything
    caplog.set_level(logging.INFO, "fdngx.fanout")
    try:
        assert fan.push("generation 1\nempty\n")[0].status == "ok"
        fe.token = b"B" * 32
        replace_token(path, "B" * 32)
        assert fan.push("generation 2\nempty\n")[0].status == "ok"
        assert b"X-Fdngx-Token: " + b"B" * 32 in fe.requests[-1]
        # Rewritten in place and caught empty (truncate, then write): the token in use stays, said once.
        with open(path, "w"):
            pass
        for g in (3, 4):
            assert fan.push(f"generation {g}\nempty\n")[0].status == "ok"
        said = [r for r in caplog.records if "admin token not read again" in r.getMessage()]
        assert len(said) == 1 and said[0].levelno == logging.WARNING and "B" * 16 not in said[0].getMessage()
        fe.token = b"C" * 32
        with open(path, "w") as fh:
            fh.write("C" * 32 + "\n")
        os.utime(path, ns=(1, 1))  # a new mtime, whatever the clock's resolution
        assert fan.push("generation 5\nempty\n")[0].status == "ok"
    finally:
        fan.close()


def test_a_frontend_whose_token_changed_is_not_said_removed(frontends: Callable[[Handler], FakeFrontend],
                                                            tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fe = frontends(good)
    spec = FrontendSpec(f"{fe.url}/fdngx/peers", token_file(tmp_path))
    caplog.set_level(logging.INFO, "fdngx.fanout")
    fan = Fanout([spec])
    try:
        caplog.clear()  # "added" at the start (captured or not, as earlier tests left logging): not this test's
        replace_token(spec.token_file, "u" * 32)
        fan.set_frontends([spec])  # the push file changed (its other lines), this frontend's token too
        said = [r.getMessage() for r in caplog.records if "pushing to" in r.getMessage()]
        assert said == [f"pushing to 1 frontend(s); new admin token for {spec.label}"], said
    finally:
        fan.close()
