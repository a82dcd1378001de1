"""Is this file a whole GGUF model? Checked before llama-server is asked to load it.

A truncated download or a corrupt copy starts with the right four magic bytes, so llama-server takes
it, fails to load it, exits, and is restarted in a loop while the log fills with the same error.
``check_gguf`` walks the file's structure the way llama.cpp's loader does, without decoding any
value: the header (magic, version 2 or 3, counts), every key-value pair (types and lengths inside
the file), the tensor table (names, dimensions, known ggml types, aligned offsets) and finally that
every tensor's data lies inside the file. A failure is one ``ModelError`` that says what is wrong.
The walk reads the header region into memory once; a 262k-token vocabulary costs a fraction of a
second, once per file.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf

from meshllm.errors import ModelError

__all__ = ["check_gguf"]

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4
_HEADER_CHUNK = 1 << 20


class _Corrupt(Exception):
    pass


class _Reader:
    """A cursor over the file's bytes, reading further chunks from disk as the walk needs them."""

    def __init__(self, path: Path, size: int) -> None:
        self.f = path.open("rb")
        self.size = size
        self.data = b""
        self.base = 0  # file offset of data[0]
        self.pos = 0  # file offset of the cursor

    def close(self) -> None:
        self.f.close()

    def need(self, n: int) -> int:
        """Make ``n`` bytes at the cursor available; the index of the cursor in ``data``."""
        if self.pos + n > self.size:
            raise _Corrupt(f"the file ends at byte {self.size}, inside its header (truncated?)")
        end = self.pos + n - self.base
        if end > len(self.data):
            keep = self.data[self.pos - self.base:]
            self.f.seek(self.pos + len(keep))
            self.data = keep + self.f.read(max(n - len(keep), _HEADER_CHUNK))
            self.base = self.pos
        return self.pos - self.base

    def unpack(self, fmt: str) -> int:
        size = struct.calcsize("<" + fmt)
        at = self.need(size)
        self.pos += size
        return int(struct.unpack_from("<" + fmt, self.data, at)[0])

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Corrupt(f"a length of {n} bytes at byte {self.pos} runs past the end of the file")
        self.pos += n

    def string(self) -> str:
        length = self.unpack("Q")
        at = self.need(length)
        self.pos += length
        return self.data[at:at + length].decode("utf-8", errors="replace")


def check_gguf(path: Path) -> None:
    """Raise ``ModelError`` unless ``path`` is a structurally whole GGUF file."""
    try:
        size = path.stat().st_size
        reader = _Reader(path, size)
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror}") from None
    try:
        _walk(reader)
    except _Corrupt as exc:
        raise ModelError(f"{path} is not a valid GGUF model: {exc}") from None
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror}") from None
    finally:
        reader.close()


def _walk(r: _Reader) -> None:
    at = r.need(4)
    if r.data[at:at + 4] != b"GGUF":
        raise _Corrupt("no GGUF magic at the start")
    r.pos += 4
    version = r.unpack("I")
    if version not in (2, 3):
        raise _Corrupt(f"GGUF version {version} (llama.cpp reads versions 2 and 3)")
    n_tensors, n_kv = r.unpack("Q"), r.unpack("Q")
    if n_tensors > r.size or n_kv > r.size:  # each takes bytes: a count beyond the file's size is garbage
        raise _Corrupt(f"implausible counts ({n_tensors} tensors, {n_kv} metadata keys)")
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key, kind = r.string(), r.unpack("I")
        if key == "general.alignment" and kind == 4:
            alignment = r.unpack("I")
            if alignment == 0 or alignment & (alignment - 1):
                raise _Corrupt(f"general.alignment {alignment} is not a power of two")
        else:
            _skip_value(r, kind, key)
    tensors = [_tensor_info(r, alignment) for _ in range(n_tensors)]
    data_start = -(-r.pos // alignment) * alignment
    for name, offset, nbytes in tensors:
        if data_start + offset + nbytes > r.size:
            raise _Corrupt(f"tensor {name!r} ends at byte {data_start + offset + nbytes}, past the end of the "
                           f"file ({r.size} bytes): truncated")


def _skip_value(r: _Reader, kind: int, key: str) -> None:
    if kind in _SCALAR_SIZES:
        r.skip(_SCALAR_SIZES[kind])
    elif kind == _STRING:
        r.skip(r.unpack("Q"))
    elif kind == _ARRAY:
        item, count = r.unpack("I"), r.unpack("Q")
        if item in _SCALAR_SIZES:
            r.skip(count * _SCALAR_SIZES[item])
        elif item == _STRING:
            if count > r.size:
                raise _Corrupt(f"{key}: an array of {count} strings in a file of {r.size} bytes")
            for _ in range(count):
                r.skip(r.unpack("Q"))
        else:
            raise _Corrupt(f"{key}: an array of value type {item}")
    else:
        raise _Corrupt(f"{key}: unknown value type {kind}")


def _tensor_info(r: _Reader, alignment: int) -> tuple[str, int, int]:
    name = r.string()
    n_dims = r.unpack("I")
    if not 1 <= n_dims <= _MAX_DIMS:
        raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions")
    dims = [r.unpack("Q") for _ in range(n_dims)]
    kind, offset = r.unpack("I"), r.unpack("Q")
    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
        raise _Corrupt(f"tensor {name!r} has unknown ggml type {kind}") from None
    elements = 1
    for dim in dims:
        elements *= dim
    if dims[0] % block or offset % alignment:
        raise _Corrupt(f"tensor {name!r}: row of {dims[0]} is not whole {block}-blocks, or offset {offset} "
                       f"is not aligned to {alignment}")
    return name, offset, elements // block * type_size
