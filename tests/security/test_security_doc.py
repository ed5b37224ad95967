"""docs/security.md's table names real tests (a renamed or deleted test must not leave a row unbacked)."""

from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
DOC = TESTS.parent / "docs" / "security.md"


def test_every_test_named_in_docs_security_exists() -> None:
    doc = DOC.read_text()
    named = set(re.findall(r"`(?:[\w/]+\.py::)?(test_[a-z0-9_]+)`", doc))
    defined = {name for path in TESTS.rglob("test_*.py")
               for name in re.findall(r"^def (test_[a-z0-9_]+)", path.read_text(), re.M)}
    assert len(named) > 40
    assert named <= defined, sorted(named - defined)
    for file, name in re.findall(r"`([\w/]+\.py)::(test_[a-z0-9_]+)`", doc):
        path = TESTS.parent / file if "/" in file else HERE / file  # a bare file name is one of tests/security's
        assert f"def {name}(" in path.read_text(), (file, name)
