"""Fixtures shared by the integration tests of one area."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_launch import Launcher


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    """`fdngx launch` runs in tmp_path; every process a test learns of is killed by PID at teardown."""
    lx = Launcher(tmp_path)
    try:
        yield lx
    finally:
        lx.cleanup()
