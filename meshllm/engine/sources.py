"""Which model files a manifest may name on this node: its models folder and what its operator allowed.

A manifest applied through any node's console names a ``source`` that this node resolves on its own
disk. Without a limit, whoever may apply could make the node open any file it can read, and learn from
the errors which files exist. ``SourcePolicy`` admits embedded and catalog names (they resolve inside
the models folder; so do Hugging Face references, which download into it, from huggingface.co or
the node's ``HF_ENDPOINT`` only: a manifest cannot make a node fetch from another host), files under the allowed folders (the models folder, ``--allow-models DIR``) and the
files named by the node's own ``--model``. Everything else is refused before the disk is touched, with
one message whether or not the file exists. Symbolic links are followed before the check, so a link in
an allowed folder cannot lead out of it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from meshllm.engine.download import parse_reference
from meshllm.engine.models import looks_like_path, models_dir
from meshllm.errors import ModelError

__all__ = ["SourcePolicy"]


@dataclass(frozen=True)
class SourcePolicy:
    folders: tuple[Path, ...]
    files: tuple[Path, ...] = ()

    @classmethod
    def for_node(cls, *, allowed: Iterable[str | Path] = (), model_files: Iterable[str | Path] = ()) -> SourcePolicy:
        """The models folder and ``allowed`` (folders or files), plus the node's own ``--model`` files."""
        folders, files = [_real(models_dir())], [_real(Path(p).expanduser()) for p in model_files]
        for entry in allowed:
            path = _real(Path(entry).expanduser())
            (files if path.is_file() else folders).append(path)
        return cls(tuple(folders), tuple(files))

    def check(self, source: str) -> None:
        """Raise ``ModelError`` unless this node may open ``source``; says nothing about existence."""
        text = source.strip()
        if not looks_like_path(text):
            return  # a name: it resolves inside the models folder
        reference = parse_reference(text)
        if reference is not None:  # a hub URL or ORG/REPO/FILE.gguf: it downloads into the models folder
            hub = os.environ.get("HF_ENDPOINT", "").rstrip("/")
            if any(f.endpoint and f.endpoint.rstrip("/") != hub for f in reference.files):
                raise ModelError(f"{text}: a manifest may name models on huggingface.co (or this node's "
                                 "HF_ENDPOINT) only, not on another host")
            return
        path = Path(text).expanduser()
        if path.is_absolute():
            real = _real(path)
            if real in self.files or any(real.is_relative_to(folder) for folder in self.folders):
                return
        raise ModelError(f"{text} is not in a folder this node serves models from; its operator can "
                         "allow a folder with --allow-models DIR (the models folder "
                         f"{self.folders[0]} is always allowed)")


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))
