"""Fixtures of the integration tests: a mesh of real node processes, torn down whatever happens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.nodes import Mesh


@pytest.fixture
def mesh(tmp_path: Path, engine_dir: Path) -> Iterator[Mesh]:
    mesh = Mesh(tmp_path, engine_dir)
    try:
        yield mesh
    finally:
        mesh.close()
