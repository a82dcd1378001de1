"""Exceptions raised by meshllm, in one place so callers can catch by kind.

    MeshError                  every error meshllm raises on purpose
    ├── EngineError            the llama.cpp engine is missing, cannot be built or will not start
    ├── ModelError             a model name or path cannot be resolved to a GGUF file
    │   └── ModelNotFetched    it names a hub model not in the models folder yet (``.reference``)
    ├── ManifestError          a manifest is malformed; the message names file, document and field
    ├── NodeUnreachable        the CLI cannot reach a running node's API
    └── TerminalError          a reconcile that must not be retried (logged, key left alone)

API errors are not exceptions here: the api layer turns conditions into OpenAI-shaped responses.
"""

from __future__ import annotations

__all__ = [
    "EngineError", "ManifestError", "MeshError", "ModelError", "ModelNotFetched", "NodeUnreachable", "TerminalError",
]


class MeshError(Exception):
    """Base of every error meshllm raises on purpose; its message says what to do next."""


class EngineError(MeshError):
    """The llama.cpp engine is missing, cannot be built, or a binary will not start."""


class ModelError(MeshError):
    """A model name or path does not resolve to a readable GGUF file."""


class ModelNotFetched(ModelError):
    """A catalog name or hub reference whose files are not in the models folder yet: fetch them first
    (``reference`` is the ``engine.download.ModelReference``)."""

    def __init__(self, message: str, reference: object) -> None:
        super().__init__(message)
        self.reference = reference


class ManifestError(MeshError):
    """A manifest is malformed or names a model that cannot be found; the message starts with where:
    ``file: document N: field.path: problem``."""


class NodeUnreachable(MeshError):
    """No meshllm node answers on the address the CLI was told to use."""


class TerminalError(MeshError):
    """A reconcile failed in a way retrying cannot fix; the key is left alone until its spec changes."""
