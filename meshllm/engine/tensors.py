"""The tensors of a GGUF file: where each lies, which a split device holds, and a hash of each.

A split worker needs only the GGUF header and the bytes of the tensors the host will offer it (patch
0003: weights are offered by name and read from the worker's own file at the header's offset). This
module gives the pieces for that:

- ``TensorTable``: parsed from the header bytes alone (``parse_table``; a ``NeedMore`` when the bytes
  given end before the header does): every tensor's absolute offset and size, the layer count, and a
  digest of the header (``fingerprint``: the size and a hash of the bytes before the data, which name
  every tensor with its type, shape and offset).
- ``layer_devices``: the device llama.cpp puts each layer on for ``--n-gpu-layers``/``--tensor-split``
  (``llama_model::load_tensors`` of the pinned version, mirrored), and ``device_tensors``: the tensors
  a device is offered (its layers' ``blk.N.*``; the output head's tensors for the device of the output
  layer; small global tensors for anyone).
- ``tensor_hashes``: a sha256 of every tensor's bytes (32 hex digits), computed once by a node holding
  the whole file and carried in the model's spec, so that any copy of any piece is checked against
  it: a file that differs only in the middle of one tensor is caught, naming the tensor.
"""

from __future__ import annotations

import bisect
import hashlib
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from meshllm.errors import ModelError

__all__ = [
    "CPU", "HASH_DIGITS", "NeedMore", "TensorInfo", "TensorTable", "check_hashes", "device_tensors", "file_table",
    "hash_tensors", "layer_devices", "masked_header", "parse_table", "runs", "tensor_digest",
]

CPU = -1  # the device index of a layer llama.cpp keeps on the CPU
HASH_DIGITS = 32  # hex digits kept of each tensor's sha256 (128 bits)
HEAD_READ = 4 << 20  # bytes read first for a header; more when it is longer
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_BLOCK = re.compile(r"^blk\.(\d+)\.")


class NeedMore(Exception):
    """The header is longer than the bytes given: read at least ``size`` bytes."""

    def __init__(self, size: int) -> None:
        super().__init__(f"the GGUF header needs at least {size} bytes")
        self.size = size


@dataclass(frozen=True)
class TensorInfo:
    name: str
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes

    @property
    def block(self) -> int | None:
        """The layer (``blk.N``) it belongs to, or None for a tensor of no layer."""
        match = _BLOCK.match(self.name)
        return int(match[1]) if match else None


@dataclass(frozen=True)
class TensorTable:
    size: int  # of the whole file
    data_offset: int  # where the tensor data starts (the header is everything before)
    header_digest: str
    n_layer: int
    tensors: tuple[TensorInfo, ...]
    name_at: tuple[int, ...] = ()  # where each tensor's name starts in the header, in ``tensors``' order

    @property
    def fingerprint(self) -> str:
        return f"{self.size}:{self.header_digest}"

    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise NeedMore(max(2 * len(self.data), self.pos + n))
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def scalar(self, fmt: str) -> object:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def num(self, fmt: str) -> int:
        value = self.scalar(fmt)
        assert isinstance(value, int)
        return value

    def string(self) -> str:
        return self.take(self.num("Q")).decode("utf-8", errors="replace")

    def value(self, kind: int) -> object:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.num("I"), self.num("Q")
            if item in _SCALARS:  # skipped whole: a vocabulary's scores are long
                self.take(count * struct.calcsize("<" + _SCALARS[item]))
            else:
                for _ in range(count):
                    self.value(item)
            return None
        raise ModelError(f"unknown GGUF value type {kind}")


def _nbytes(kind: int, dims: list[int]) -> int:
    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
        raise ModelError(f"unknown GGML tensor type {kind}") from None
    count = 1
    for d in dims:
        count *= d
    return count // block * size


def parse_table(head: bytes, size: int) -> TensorTable:
    """The tensor table of a GGUF file of ``size`` bytes whose first bytes are ``head``; ``NeedMore``
    when ``head`` ends before the header does, ``ModelError`` when it is no GGUF."""
    cur = _Cursor(head)
    if cur.take(4) != b"GGUF":
        raise ModelError("not a GGUF file (no GGUF header)")
    cur.num("I")  # version
    n_tensors, n_kv = cur.num("Q"), cur.num("Q")
    meta: dict[str, object] = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.num("I"))
    infos, name_at = [], []
    for _ in range(n_tensors):
        name_at.append(cur.pos + 8)
        name = cur.string()
        dims = [cur.num("Q") for _ in range(cur.num("I"))]
        kind, offset = cur.num("I"), cur.num("Q")
        infos.append((name, offset, _nbytes(kind, dims)))
    align = int(meta.get("general.alignment", 32))  # type: ignore[call-overload]
    data_offset = (cur.pos + align - 1) // align * align
    if data_offset > len(head):
        raise NeedMore(data_offset)
    arch = str(meta.get("general.architecture", ""))
    n_layer = int(meta.get(f"{arch}.block_count", 0))  # type: ignore[call-overload]
    digest = hashlib.blake2b(head[:data_offset], digest_size=12, person=b"meshllm-gguf").hexdigest()
    tensors = tuple(TensorInfo(name, data_offset + offset, nbytes) for name, offset, nbytes in infos)
    for t in tensors:
        if t.end > size:
            raise ModelError(f"tensor {t.name} ends at byte {t.end}, beyond the file's {size} bytes")
    return TensorTable(size=size, data_offset=data_offset, header_digest=digest, n_layer=n_layer, tensors=tensors,
                       name_at=tuple(name_at))


def masked_header(header: bytes, table: TensorTable, keep: set[str]) -> bytes:
    """``header`` with every tensor not in ``keep`` renamed (its first letter made ``~``: the same
    length, so every offset stays): a worker's ggml-rpc-server then knows only the tensors its sparse
    copy holds, and an offer of any other ends the connection (patch 0003) instead of loading the
    zeros of a hole. The header unchanged when renaming would make two names equal."""
    names = [t.name for t in table.tensors]
    renamed = [n if n in keep or not n else "~" + n[1:] for n in names]
    if len(set(renamed)) != len(renamed):
        return header
    out = bytearray(header)
    for name, at in zip(names, table.name_at, strict=True):
        if name not in keep and name:
            out[at] = ord("~")
    return bytes(out)


def file_table(path: Path) -> TensorTable:
    """The tensor table of a GGUF file on disk (its header is read, nothing else)."""
    size, want = path.stat().st_size, HEAD_READ
    with path.open("rb") as f:
        while True:
            f.seek(0)
            head = f.read(want)
            try:
                return parse_table(head, size)
            except NeedMore as more:
                if len(head) < want:
                    raise ModelError(f"{path}: the GGUF header ends early") from None
                want = max(more.size, 2 * want)
            except ModelError as exc:
                raise ModelError(f"{path}: {exc}") from None


def tensor_digest(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()[:HASH_DIGITS]


def hash_tensors(path: Path, tensors: Iterable[TensorInfo]) -> dict[str, str]:
    """The sha256 (``HASH_DIGITS`` hex digits) of each tensor's bytes in ``path``."""
    hashes = {}
    with path.open("rb") as f:
        for t in sorted(tensors, key=lambda t: t.offset):
            f.seek(t.offset)
            digest, left = hashlib.sha256(), t.nbytes
            while left:
                chunk = f.read(min(left, 8 << 20))
                if not chunk:
                    raise ModelError(f"{path}: the file ends inside tensor {t.name}")
                digest.update(chunk)
                left -= len(chunk)
            hashes[t.name] = digest.hexdigest()[:HASH_DIGITS]
    return hashes


def layer_devices(n_layer: int, n_gpu_layers: int, splits: list[float]) -> list[int]:
    """The device index of each layer, the output layer last (index ``n_layer``), as llama.cpp
    assigns them: ``CPU`` for a layer kept on the CPU, else the index among ``splits`` (the
    ``--tensor-split`` shares, one per device in order). The input layer always stays on the CPU."""
    i_gpu_start = max(n_layer + 1 - n_gpu_layers, 0)
    active = min(n_gpu_layers, n_layer + 1) if splits else 0
    total = sum(splits)
    bounds, running = [], 0.0
    for share in splits:
        running += share
        bounds.append(running / total)
    devices = []
    for il in range(n_layer + 1):
        if il < i_gpu_start or il - i_gpu_start >= active:
            devices.append(CPU)
        else:
            devices.append(min(bisect.bisect_right(bounds, (il - i_gpu_start) / active), len(splits) - 1))
    return devices


def device_tensors(table: TensorTable, devices: list[int], wanted: set[int], *,
                   input_layer: bool = False, head: int | None = None) -> list[TensorInfo]:
    """The tensors a participant holding the devices ``wanted`` is offered (or, with ``input_layer``,
    reads itself: a host keeps the token embeddings). ``devices`` is ``layer_devices``'s answer;
    ``head``: the device of the output head's own tensors (``output*``, or the token embeddings of a
    tied head) when the host overrides llama.cpp's placement (``--override-tensor``), else the output
    layer's device. Blocks beyond the last layer (a head's blocks) stay with the output layer."""
    n_layer = len(devices) - 1
    names = {t.name for t in table.tensors}
    tied = "output.weight" not in names  # the head reuses the token embeddings
    holds_output = devices[n_layer] in wanted
    holds_head = (devices[n_layer] if head is None else head) in wanted
    chosen = []
    for t in table.tensors:
        block = t.block
        if block is not None:
            take = devices[block] in wanted if block < n_layer else holds_output  # a head's blocks go with it
        elif t.name.startswith("token_embd."):
            take = input_layer or (tied and holds_head)
        elif t.name.startswith("output"):
            take = holds_head
        else:
            take = True  # small globals (rope factors and the like): whoever has a layer may be offered them
        if take:
            chosen.append(t)
    return chosen


def runs(tensors: Iterable[TensorInfo], *, gap: int = 4096) -> list[tuple[int, int, list[TensorInfo]]]:
    """Byte ranges covering ``tensors``, neighbours (at most ``gap`` bytes apart: alignment padding)
    merged: ``(offset, length, tensors)`` in file order."""
    merged: list[tuple[int, int, list[TensorInfo]]] = []
    for t in sorted(tensors, key=lambda t: t.offset):
        if merged and t.offset - (merged[-1][0] + merged[-1][1]) <= gap:
            start, _, inside = merged[-1]
            merged[-1] = (start, max(t.end, start + merged[-1][1]) - start, [*inside, t])
        else:
            merged.append((t.offset, t.nbytes, [t]))
    return merged


def check_hashes(got: Mapping[str, str], want: Mapping[str, str], *, where: str) -> None:
    """``ModelError`` naming the first tensor whose hash differs from the mesh's."""
    for name, digest in got.items():
        expected = want.get(name)
        if expected is None:
            raise ModelError(f"{where}: tensor {name} is not in the mesh's tensor table")
        if digest != expected:
            raise ModelError(f"{where}: tensor {name} differs from the mesh's copy (sha256 {digest[:12]}..., "
                             f"expected {expected[:12]}...)")
