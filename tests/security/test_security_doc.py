"""docs/security.md's table names real tests (a renamed or deleted test must not leave a row unbacked)."""

from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC = HERE.parent.parent / "docs" / "security.md"


def test_every_test_named_in_docs_security_exists() -> None:
    doc = DOC.read_text()
    named = set(re.findall(r"`(?:[a-z_]+\.py::)?(test_[a-z0-9_]+)`", doc))
    defined = {name for path in HERE.glob("test_*.py")
               for name in re.findall(r"^def (test_[a-z0-9_]+)", path.read_text(), re.M)}
    assert len(named) > 40
    assert named <= defined, sorted(named - defined)
    for file, name in re.findall(r"`([a-z_]+\.py)::(test_[a-z0-9_]+)`", doc):
        assert f"def {name}(" in (HERE / file).read_text(), (file, name)
