"""Shared fixtures. Helpers live in tests/support.py (importable by every test module)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Backends, free_ports


@pytest.fixture
def two_backends() -> Iterator[Backends]:
    """Two real HTTP replicas (one process) named b0 and b1."""
    with Backends(free_ports(2), ["b0", "b1"]) as b:
        yield b


@pytest.fixture
def prefix(tmp_path: Path) -> Path:
    p = tmp_path / "nginx"
    p.mkdir()
    return p
