"""Read a few scalar metadata values from a GGUF file's header, fast.

``gguf.GGUFReader`` maps and decodes the whole file, including the tokenizer's vocabulary (seconds
for a 262k-token vocabulary); a split host only needs the layer count, which sits near the start of
the key-value section. This reader walks the key-value pairs in order and stops at the last key
asked for, skipping arrays without decoding them.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

from meshllm.errors import ModelError

__all__ = ["block_count", "context_length", "embedding_length", "read_metadata"]

# GGUF value types: fixed sizes, and the struct formats of the scalars
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def _read(f: BinaryIO, fmt: str) -> object:
    size = struct.calcsize("<" + fmt)
    data = f.read(size)
    if len(data) != size:
        raise ModelError(f"{f.name}: GGUF header ends early")
    return struct.unpack("<" + fmt, data)[0]


def _string(f: BinaryIO) -> str:
    length = int(_read(f, "Q"))  # type: ignore[call-overload]
    return f.read(length).decode("utf-8", errors="replace")


def _skip(f: BinaryIO, kind: int) -> None:
    if kind in _SCALARS:
        f.seek(struct.calcsize("<" + _SCALARS[kind]), 1)
    elif kind == _STRING:
        f.seek(int(_read(f, "Q")), 1)  # type: ignore[call-overload]
    elif kind == _ARRAY:
        item, count = int(_read(f, "I")), int(_read(f, "Q"))  # type: ignore[call-overload]
        if item in _SCALARS:
            f.seek(count * struct.calcsize("<" + _SCALARS[item]), 1)
        else:
            for _ in range(count):
                _skip(f, item)
    else:
        raise ModelError(f"{f.name}: unknown GGUF value type {kind}")


def read_metadata(path: Path, keys: set[str] | None = None) -> dict[str, object]:
    """Scalar and string metadata of ``path`` (only ``keys`` when given; arrays are skipped)."""
    found: dict[str, object] = {}
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{path} is not a GGUF file")
        _read(f, "I")  # version
        _read(f, "Q")  # tensor count
        for _ in range(int(_read(f, "Q"))):  # type: ignore[call-overload]
            key, kind = _string(f), int(_read(f, "I"))  # type: ignore[call-overload]
            wanted = keys is None or key in keys
            if wanted and kind in _SCALARS:
                found[key] = _read(f, _SCALARS[kind])
            elif wanted and kind == _STRING:
                found[key] = _string(f)
            else:
                _skip(f, kind)
            if keys is not None and keys <= found.keys():
                break
    return found


def block_count(path: Path) -> int:
    """The model's layer count (``<architecture>.block_count``)."""
    arch = read_metadata(path, {"general.architecture"}).get("general.architecture")
    key = f"{arch}.block_count"
    value = read_metadata(path, {key}).get(key)
    if not isinstance(value, int) or value <= 0:
        raise ModelError(f"{path}: no {key} in its GGUF header; cannot split it by layers")
    return value


def context_length(path: Path) -> int:
    """The context the model was trained for (``<architecture>.context_length``), 0 when unsaid."""
    arch = read_metadata(path, {"general.architecture"}).get("general.architecture")
    key = f"{arch}.context_length"
    value = read_metadata(path, {key}).get(key)
    return value if isinstance(value, int) and value > 0 else 0


def embedding_length(path: Path) -> int:
    """The model's hidden width (``<architecture>.embedding_length``), 0 when unsaid."""
    arch = read_metadata(path, {"general.architecture"}).get("general.architecture")
    key = f"{arch}.embedding_length"
    value = read_metadata(path, {key}).get(key)
    return value if isinstance(value, int) and value > 0 else 0
