"""Write one expert shard: the whole model's GGUF with only some experts of each MoE layer.

The shard is written with the ``gguf`` library: every metadata key is copied (``<arch>.expert_count`` set
to the experts kept), every tensor too, except those cut by expert (``detect.expert_tensor``), of which only
the kept experts' slices are written, in ascending expert id order, router rows included, so expert ``j``
of the shard is the ``j``-th kept expert of the model. The data is streamed from the source file in chunks
(memory stays at one chunk plus the header), into ``<name>.part`` renamed into place once complete.

A shard is written once per (source file, experts kept): its name carries a digest of the kept experts,
and a sidecar ``<name>.json`` records the source's fingerprint, that digest and the shard's own
fingerprint (``engine.models.file_fingerprint``). ``shard_ready`` trusts a shard only when all three agree
with the file on disk, so a damaged or stale shard is written again rather than served.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, cast

import gguf
import numpy as np

from meshllm.engine.models import file_fingerprint
from meshllm.errors import ModelError
from meshllm.moe.detect import MoeProblem, detect_moe, expert_tensor
from meshllm.moe.header import TensorEntry, read_header
from meshllm.moe.plan import composition_digest

__all__ = ["CHUNK", "ShardCancelled", "shard_ready", "write_shard"]

CHUNK = 16 << 20  # bytes read and written at a time


class ShardCancelled(Exception):
    """The node stopped while the shard was being written (the partial file is removed)."""


def _sidecar(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def shard_ready(out: Path, *, source_fingerprint: str, experts: Sequence[Sequence[int]]) -> bool:
    """Whether ``out`` is a whole shard of the source with these experts (see the module docstring)."""
    try:
        record = json.loads(_sidecar(out).read_text())
        return bool(record.get("source") == source_fingerprint and record.get("experts") ==
                    composition_digest(experts) and record.get("fingerprint") == file_fingerprint(out))
    except (OSError, ValueError, ModelError):  # missing, unreadable, or no longer a whole GGUF
        return False


def write_shard(source: Path, out: Path, experts: Mapping[int, Sequence[int]], *,
                source_fingerprint: str = "", cancelled: Callable[[], bool] = lambda: False) -> int:
    """Write the shard of ``source`` keeping ``experts[layer]`` (ids) in each MoE layer; returns its size.

    Every MoE layer must keep the same number of experts (one ``expert_count`` for the file), at least
    ``expert_used_count``. ``ModelError`` (``MoeProblem``) when the source is not a whole MoE GGUF."""
    info = detect_moe(source)
    if info is None:
        raise MoeProblem("NotMoe", f"{source.name} has no experts to split")
    counts = {len(set(experts.get(layer, ()))) for layer in info.moe_layers}
    if len(counts) != 1 or min(counts) < info.n_used:
        raise ValueError(f"every MoE layer must keep one number of experts >= {info.n_used}, got {sorted(counts)}")
    kept = {layer: sorted(set(experts[layer])) for layer in info.moe_layers}
    if any(e < 0 or e >= info.n_expert for ids in kept.values() for e in ids):
        raise ValueError(f"expert ids must be within 0..{info.n_expert - 1}")
    n_kept = counts.pop()
    header = read_header(source)
    partial = out.with_name(out.name + ".part")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        reader = gguf.GGUFReader(source)
    except (ValueError, OSError) as exc:
        raise MoeProblem("UnreadableModel", f"{source}: {exc}") from None
    writer = gguf.GGUFWriter(partial, header.arch)
    try:
        _copy_metadata(reader, writer, expert_count_key=f"{header.arch}.expert_count", n_kept=n_kept)
        del reader
        for tensor in header.tensors:
            layer = expert_tensor(tensor.name)
            numpy_shape = list(reversed(tensor.dims))
            nbytes = tensor.nbytes
            if layer is not None:
                numpy_shape[0] = n_kept
                nbytes = tensor.nbytes // info.n_expert * n_kept
            writer.add_tensor_info(tensor.name, numpy_shape, np.dtype(np.float32), nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType(tensor.kind))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _stream(writer, header.tensors, source, header.data_start, kept, info.n_expert, cancelled)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(partial, out)
    record = {"source": source_fingerprint or file_fingerprint(source), "experts": composition_digest(
        [kept[layer] for layer in info.moe_layers]), "fingerprint": file_fingerprint(out)}
    _sidecar(out).write_text(json.dumps(record) + "\n")
    return out.stat().st_size


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, *, expert_count_key: str, n_kept: int) -> None:
    for field in reader.fields.values():
        name = field.name
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # the header's own counts, and the key the writer adds itself
        if name == "general.alignment":
            writer.add_custom_alignment(int(field.contents()))
            continue
        kind = field.types[0]
        if name == expert_count_key:
            writer.add_key_value(name, n_kept, kind)
            continue
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        if sub == gguf.GGUFValueType.ARRAY:
            raise ModelError(f"metadata {name!r} is an array of arrays, which shards cannot copy")
        writer.add_key_value(name, field.contents(), kind, sub_type=sub)


def _stream(writer: gguf.GGUFWriter, tensors: Sequence[TensorEntry], source: Path, data_start: int,
            kept: Mapping[int, Sequence[int]], n_expert: int, cancelled: Callable[[], bool]) -> None:
    assert writer.fout is not None and len(writer.fout) == 1
    fout = cast(IO[bytes], writer.fout[0])
    with source.open("rb") as fin:
        for tensor in tensors:
            writer.write_padding(fout, fout.tell())
            layer = expert_tensor(tensor.name)
            start = data_start + tensor.offset
            if layer is None:
                ranges = [(start, tensor.nbytes)]
            else:
                per = tensor.nbytes // n_expert
                ranges = [(start + e * per, per) for e in kept[layer]]
            written = 0
            for offset, length in ranges:
                written += _copy(fin, fout, offset, length, cancelled)
            writer.write_padding(fout, written)
        fout.flush()
        os.fsync(fout.fileno())


def _copy(fin: IO[bytes], fout: IO[bytes], offset: int, length: int, cancelled: Callable[[], bool]) -> int:
    fin.seek(offset)
    left = length
    while left:
        if cancelled():
            raise ShardCancelled("the node is stopping")
        chunk = fin.read(min(CHUNK, left))
        if not chunk:
            raise ModelError(f"{fin.name} ends early: a truncated model file")
        fout.write(chunk)
        left -= len(chunk)
    return length
