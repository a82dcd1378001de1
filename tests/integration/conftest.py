"""Fixtures of the integration tests: a mesh of real node processes, torn down whatever happens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.nodes import Mesh


@pytest.fixture
def mesh(tmp_path: Path, engine_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    # the session's test models live under the base temp folder: manifests may name them
    mesh = Mesh(tmp_path, engine_dir, allow_models=(tmp_path_factory.getbasetemp(),))
    try:
        yield mesh
    finally:
        mesh.close()
