"""The parts of a GGUF file the expert splitter needs, read from its header without mapping the data.

``gguf.GGUFReader`` decodes every array of the header (a 150k-token vocabulary takes seconds) and maps the
whole file; detecting an MoE model needs only the scalar metadata and the tensor table. ``read_header``
walks both, skips arrays, and checks that every tensor lies inside the file, so a truncated download is
caught here with a clear message instead of inside llama-server.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import gguf

from meshllm.errors import ModelError

__all__ = ["GgufHeader", "TensorEntry", "read_header"]

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_COUNT = 1 << 24  # more tensors or keys than this: not a GGUF header, whatever its magic says


@dataclass(frozen=True)
class TensorEntry:
    """One tensor: ``dims`` in GGUF order (``dims[0]`` the fastest-moving), its type, and where its data is."""

    name: str
    dims: tuple[int, ...]
    kind: int  # gguf.GGMLQuantizationType value
    offset: int  # from the start of the data section
    nbytes: int


@dataclass(frozen=True)
class GgufHeader:
    path: Path
    metadata: dict[str, object]  # scalars and strings (arrays are skipped)
    tensors: tuple[TensorEntry, ...]
    data_start: int  # file offset of the data section
    file_size: int

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def key(self, name: str) -> object:
        """``<arch>.<name>`` from the metadata, or None."""
        return self.metadata.get(f"{self.arch}.{name}")


class _Reader:
    def __init__(self, f: BinaryIO, path: Path) -> None:
        self.f, self.path = f, path

    def read(self, fmt: str) -> int | float | bool:
        size = struct.calcsize("<" + fmt)
        data = self.f.read(size)
        if len(data) != size:
            raise ModelError(f"{self.path}: the GGUF header ends early (a truncated or damaged file)")
        value: int | float | bool = struct.unpack("<" + fmt, data)[0]
        return value

    def count(self) -> int:
        value = int(self.read("Q"))
        if value > _MAX_COUNT:
            raise ModelError(f"{self.path}: the GGUF header is damaged (a count of {value})")
        return value

    def string(self) -> str:
        length = int(self.read("Q"))
        data = self.f.read(length)
        if len(data) != length:
            raise ModelError(f"{self.path}: the GGUF header ends early (a truncated or damaged file)")
        return data.decode("utf-8", errors="replace")

    def skip(self, kind: int) -> None:
        if kind in _SCALARS:
            self.f.seek(struct.calcsize("<" + _SCALARS[kind]), 1)
        elif kind == _STRING:
            self.f.seek(int(self.read("Q")), 1)
        elif kind == _ARRAY:
            item, count = int(self.read("I")), int(self.read("Q"))
            if item in _SCALARS:
                self.f.seek(count * struct.calcsize("<" + _SCALARS[item]), 1)
            else:
                for _ in range(count):
                    self.skip(item)
        else:
            raise ModelError(f"{self.path}: unknown GGUF value type {kind} (a damaged file?)")


def read_header(path: Path) -> GgufHeader:
    """The metadata scalars and tensor table of ``path``; ``ModelError`` when it is not a whole GGUF file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        r = _Reader(f, path)
        if f.read(4) != b"GGUF":
            raise ModelError(f"{path} is not a GGUF file (no GGUF magic at its start)")
        r.read("I")  # version
        n_tensors, n_kv = r.count(), r.count()
        metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key, kind = r.string(), int(r.read("I"))
            if kind in _SCALARS:
                metadata[key] = r.read(_SCALARS[kind])
            elif kind == _STRING:
                metadata[key] = r.string()
            else:
                r.skip(kind)
        tensors = [_tensor(r) for _ in range(n_tensors)]
        alignment = int(metadata.get("general.alignment", 32))  # type: ignore[call-overload]
        start = f.tell()
        data_start = start + (-start) % alignment
    header = GgufHeader(path, metadata, tuple(tensors), data_start, size)
    _check_bounds(header)
    return header


def _tensor(r: _Reader) -> TensorEntry:
    name = r.string()
    n_dims = int(r.read("I"))
    if not 1 <= n_dims <= 4:
        raise ModelError(f"{r.path}: tensor {name!r} has {n_dims} dimensions (a damaged file?)")
    dims = tuple(int(r.read("Q")) for _ in range(n_dims))
    kind, offset = int(r.read("I")), int(r.read("Q"))
    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
        raise ModelError(f"{r.path}: tensor {name!r} has an unknown type {kind}") from None
    elements = 1
    for d in dims:
        elements *= d
    if dims[0] % block:
        raise ModelError(f"{r.path}: tensor {name!r} rows ({dims[0]}) are not whole blocks of {block}")
    return TensorEntry(name, dims, kind, offset, elements // block * type_size)


def _check_bounds(header: GgufHeader) -> None:
    if not header.tensors:
        return
    end = max(t.offset + t.nbytes for t in header.tensors)
    if header.data_start + end > header.file_size:
        raise ModelError(f"{header.path} is truncated: its tensors need {header.data_start + end} bytes, the file "
                         f"has {header.file_size} (an interrupted download or copy?)")
