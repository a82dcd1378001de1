"""Manifests: the files people write to say which models the mesh should serve (``meshllm apply``).

A manifest is a kubectl-style document, ``apiVersion: meshllm/v1``, ``kind``, ``metadata``, ``spec``
and an optional ``status`` (output only; ignored on apply). Two kinds:

- ``Model``: one model; ``metadata.name`` is the name clients put in ``model``.
- ``Mesh``: the whole set of manifest models (``spec.models``, each with a ``name``); applying it
  prunes the manifest models it no longer lists.

Files are written by hand, so every field is strict (a string is not a number) and unknown fields
fail: a typo must not be silently ignored. ``load_manifests`` parses multi-document YAML (or JSON)
and raises one ``ManifestError`` whose message names the place: file, document, field path
(``mesh.yaml: document 2: spec.models[1].replicas: Input should be a valid integer``).
``manifest_models`` turns valid manifests into the document's ``ModelSpec``s (``origin`` manifest);
the caller resolves each source and fills ``size_bytes``. Pure: no I/O here.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from meshllm.errors import ManifestError
from meshllm.state.schema import ModelName, ModelOrigin, ModelSpec

__all__ = [
    "API_VERSION",
    "MAX_MODELS",
    "LoadedManifest",
    "Manifest",
    "ManifestModel",
    "MeshManifest",
    "MeshModel",
    "MeshSpec",
    "Metadata",
    "ModelManifest",
    "ModelManifestSpec",
    "ModelManifestStatus",
    "Placement",
    "json_schemas",
    "load_manifests",
    "manifest_models",
    "model_manifest",
    "parse_documents",
    "validate_documents",
    "with_paths_under",
]

API_VERSION = "meshllm/v1"
MAX_REPLICAS = 256  # more servers of one model than any mesh has nodes is a typo, not a wish
MAX_CTX = 1 << 24  # 16M tokens: beyond any model's trained context
MAX_MODELS = 1000  # models in one apply: a mesh serving more is not what a manifest of this node is for
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-:")


def _check_name(name: str) -> ModelName:
    if not name or len(name) > 128 or not name[0].isalnum() or not set(name) <= _NAME_CHARS:
        raise ValueError(f"invalid model name {name!r}: use 1-128 letters, digits, '.', '_', '-' or ':', "
                         "starting with a letter or digit")
    return ModelName(name)  # a manifest's model name, checked: where a user's name becomes one


ModelNameField = Annotated[ModelName, AfterValidator(_check_name),
                           Field(json_schema_extra={"pattern": "^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"})]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Metadata(_Strict):
    name: ModelNameField = Field(description="the model's name, as clients put it in `model`")
    labels: dict[str, str] = Field(default_factory=dict)


class Placement(_Strict):
    node: str = Field(default="", description="serve it on this node (a node id or a node name); empty: any node")
    split: bool = Field(default=False, description="split it across nodes even when one node could hold it (a "
                        "model no node holds is split anyway): by experts for an MoE model, else by layers")
    expertCore: float = Field(default=0.5, ge=0, le=1, description="expert splits: the share of each layer's "
                              "experts, most used first, that every shard keeps")


Pooling = Literal["", "none", "mean", "cls", "last", "rank"]  # llama-server's --pooling


class ModelManifestSpec(_Strict):
    """What to serve and how; the fields of a ``Model``'s spec and of each of a ``Mesh``'s models."""

    source: str = Field(min_length=1, description="a catalog name (gemma-3-270m) or a path to a .gguf file")
    replicas: int = Field(default=1, ge=1, le=MAX_REPLICAS, description="servers wanted at least")
    ctxSize: int = Field(default=0, ge=0, le=MAX_CTX, description="context length; 0 takes the model's default")
    draft: str = Field(default="", description="draft model for speculative decoding (a name or a .gguf path)")
    placement: Placement = Field(default_factory=Placement)
    embeddings: bool = Field(default=False, description="serve embeddings (/v1/embeddings): an embedding model")
    pooling: Pooling = Field(default="", description="pooling of embeddings; empty: the model's own")
    rerank: bool = Field(default=False, description="serve reranking (/v1/rerank): a reranker model")
    chatTemplate: str = Field(default="", description="chat template: a llama.cpp built-in name (chatml, gemma, "
                              "llama3, ...) or a jinja template; empty: the model's own")


class ModelManifestStatus(_Strict):
    """Where the model stands (output of ``meshllm get``; ignored on apply)."""

    phase: str = ""
    reason: str = ""
    message: str = ""
    ready: int = 0
    wanted: int = 0
    nodes: list[str] = Field(default_factory=list)


class ModelManifest(_Strict):
    """``kind: Model``: serve one model."""

    apiVersion: Literal["meshllm/v1"]
    kind: Literal["Model"]
    metadata: Metadata
    spec: ModelManifestSpec
    status: ModelManifestStatus | None = None


class MeshModel(ModelManifestSpec):
    """One model of a ``Mesh``: a ``Model`` spec with its name."""

    name: ModelNameField


class MeshSpec(_Strict):
    models: list[MeshModel] = Field(description="every manifest model the mesh should serve")


class MeshStatus(_Strict):
    models: dict[str, ModelManifestStatus] = Field(default_factory=dict)


class MeshManifest(_Strict):
    """``kind: Mesh``: the whole desired set of manifest models."""

    apiVersion: Literal["meshllm/v1"]
    kind: Literal["Mesh"]
    metadata: Metadata = Field(default_factory=lambda: Metadata(name=ModelName("mesh")))
    spec: MeshSpec
    status: MeshStatus | None = None


Manifest = ModelManifest | MeshManifest
_KINDS: dict[str, type[ModelManifest] | type[MeshManifest]] = {"Model": ModelManifest, "Mesh": MeshManifest}


@dataclass(frozen=True)
class LoadedManifest:
    """A valid manifest and where it was written."""

    manifest: Manifest
    source_name: str
    index: int  # 1-based document number in its file (or item in its list)

    @property
    def location(self) -> str:
        return f"{self.source_name}: document {self.index}"


@dataclass(frozen=True)
class ManifestModel:
    """One model a manifest asks for, with where it was written (errors about it name the place)."""

    spec: ModelSpec
    location: str  # "mesh.yaml: document 2"
    path: str  # "spec" (a Model) or "spec.models[1]" (a Mesh)

    def where(self, field: str) -> str:
        """``mesh.yaml: document 2: spec.models[1].source`` for ``field`` "source"."""
        if field == "name":
            return f"{self.location}: {'metadata.name' if self.path == 'spec' else self.path + '.name'}"
        return f"{self.location}: {self.path}.{field}"


# -- parsing ----------------------------------------------------------------------------------------
class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error, not the last one."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_documents(text: str, *, source_name: str) -> list[object]:
    """The documents of a YAML (or JSON) text, in order; empty documents stay as ``None`` so that
    document numbers match the file. A JSON list (or a YAML file that is one list) is a list of
    documents."""
    if source_name.endswith(".json"):
        try:
            docs: list[object] = [json.loads(text)]
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{source_name}: line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}") from None
        except RecursionError:
            raise ManifestError(f"{source_name}: invalid JSON: nested too deeply") from None
    else:
        try:
            docs = list(yaml.load_all(text, Loader=_UniqueKeyLoader))
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            raise ManifestError(f"{source_name}: {where}invalid YAML: {exc.problem or exc.context}") from None
        except yaml.YAMLError as exc:
            raise ManifestError(f"{source_name}: invalid YAML: {exc}") from None
        except RecursionError:
            raise ManifestError(f"{source_name}: invalid YAML: nested too deeply") from None
    if len(docs) == 1 and isinstance(docs[0], list):
        return list(docs[0])
    return docs


def load_manifests(text: str, *, source_name: str) -> list[LoadedManifest]:
    """Parse and validate every manifest in ``text``; one ``ManifestError`` names the first problem."""
    return validate_documents(parse_documents(text, source_name=source_name), source_name=source_name)


def validate_documents(docs: Sequence[object], *, source_name: str) -> list[LoadedManifest]:
    """Validate parsed documents (``None`` entries, empty documents, are skipped but counted)."""
    loaded = [_validate(doc, location=f"{source_name}: document {i}", source_name=source_name, index=i)
              for i, doc in enumerate(docs, 1) if doc is not None]
    if not loaded:
        raise ManifestError(f"{source_name}: no manifests found (expected documents with apiVersion: "
                            f"{API_VERSION}, kind: Model or Mesh)")
    count = sum(len(item.manifest.spec.models) if isinstance(item.manifest, MeshManifest) else 1 for item in loaded)
    if count > MAX_MODELS:
        raise ManifestError(f"{source_name}: {count} models in one apply; at most {MAX_MODELS} (split the manifest)")
    _check_across(loaded)
    return loaded


def _validate(doc: object, *, location: str, source_name: str, index: int) -> LoadedManifest:
    if not isinstance(doc, dict):
        raise ManifestError(f"{location}: expected a mapping with apiVersion, kind, metadata and spec, "
                            f"got {_type_name(doc)}")
    version = doc.get("apiVersion")
    if version != API_VERSION:
        problem = "missing" if version is None else f"unsupported {version!r}"
        raise ManifestError(f"{location}: apiVersion: {problem}; expected {API_VERSION}")
    kind = doc.get("kind")
    if not isinstance(kind, str) or kind not in _KINDS:
        problem = "missing" if kind is None else f"unknown kind {kind!r}"
        raise ManifestError(f"{location}: kind: {problem}; expected one of: {', '.join(sorted(_KINDS))}")
    cls = _KINDS[kind]
    try:
        manifest = cls.model_validate(doc)
    except ValidationError as exc:
        raise ManifestError(f"{location}: {_describe(exc, cls)}") from None
    return LoadedManifest(manifest=manifest, source_name=source_name, index=index)


def _check_across(loaded: list[LoadedManifest]) -> None:
    """Rules between documents: a model is defined once; at most one Mesh."""
    meshes = [item for item in loaded if isinstance(item.manifest, MeshManifest)]
    if len(meshes) > 1:
        raise ManifestError(f"{meshes[1].location}: kind: only one Mesh per apply ({meshes[0].location} is one)")
    seen: dict[str, ManifestModel] = {}
    for model in manifest_models(loaded):
        first = seen.setdefault(model.spec.name, model)
        if first is not model:
            also = first.where("name").removeprefix(f"{loaded[0].source_name}: ")
            raise ManifestError(f"{model.where('name')}: model {model.spec.name!r} is defined twice (also at {also})")


def _type_name(value: object) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), type(value).__name__)


# -- errors -----------------------------------------------------------------------------------------
def _describe(exc: ValidationError, cls: type[BaseModel]) -> str:
    """The first error as ``field.path: message``, with the count of any others. An unknown field
    comes first: a misspelt field is also a missing one, and the misspelling is the news."""
    errors = exc.errors(include_url=False)
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(first["loc"])
    path = _path(loc)
    if first["type"] == "extra_forbidden":
        message = _unknown_field(str(loc[-1]), _fields_at(cls, loc[:-1]))
    else:
        message = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{path}: {message}{more}" if path else f"{message}{more}"


def _path(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _unknown_field(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f"unknown field (did you mean {close[0]}?)"
    return f"unknown field; known fields: {', '.join(known)}" if known else "unknown field"


def _fields_at(cls: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The field names of the model found at ``loc`` inside ``cls`` (empty when it is not a model)."""
    current: type[BaseModel] | None = cls
    for part in loc:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if current is not None else None
        current = _model_in(field.annotation) if field is not None else None
    return list(current.model_fields) if current is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


# -- conversion -------------------------------------------------------------------------------------
def _spec(name: ModelName, spec: ModelManifestSpec, *, now: float) -> ModelSpec:
    return ModelSpec(name=name, source=spec.source, node=spec.placement.node, ctx_size=spec.ctxSize,
                     created_at=now, origin=ModelOrigin.MANIFEST, replicas=spec.replicas, draft=spec.draft,
                     split=spec.placement.split, expert_core=spec.placement.expertCore, embeddings=spec.embeddings,
                     pooling=spec.pooling, rerank=spec.rerank, chat_template=spec.chatTemplate)


def manifest_models(loaded: Sequence[LoadedManifest], *, now: float = 0.0) -> list[ManifestModel]:
    """Every model the manifests ask for, as ``ModelSpec``s (``size_bytes`` 0: the caller resolves the
    source and fills it in)."""
    models = []
    for item in loaded:
        manifest = item.manifest
        if isinstance(manifest, ModelManifest):
            models.append(ManifestModel(spec=_spec(manifest.metadata.name, manifest.spec, now=now),
                                        location=item.location, path="spec"))
        else:
            models.extend(ManifestModel(spec=_spec(model.name, model, now=now), location=item.location,
                                        path=f"spec.models[{i}]")
                          for i, model in enumerate(manifest.spec.models))
    return models


def model_manifest(spec: ModelSpec, *, status: ModelManifestStatus | None = None) -> ModelManifest:
    """The ``Model`` manifest that asks for ``spec`` (the reverse of ``manifest_models``)."""
    return ModelManifest(
        apiVersion="meshllm/v1", kind="Model", metadata=Metadata(name=spec.name),
        spec=ModelManifestSpec(source=spec.source, replicas=spec.replicas, ctxSize=spec.ctx_size,
                               draft=spec.draft, placement=Placement(node=spec.node, split=spec.split,
                                                                     expertCore=spec.expert_core),
                               embeddings=spec.embeddings, pooling=_pooling(spec.pooling), rerank=spec.rerank,
                               chatTemplate=spec.chat_template),
        status=status)


def _pooling(value: str) -> Pooling:
    """A document's pooling as a manifest's (one it does not know: the model's own)."""
    return next((p for p in get_args(Pooling) if p == value), "")


def _is_relative_path(source: str) -> bool:
    looks_like_path = source.endswith(".gguf") or "/" in source or source.startswith(".")
    return looks_like_path and not source.startswith(("/", "~"))


def _under(base: PurePath, source: str) -> str:
    return str(base / source) if source and _is_relative_path(source) else source


def with_paths_under(manifest: Manifest, base: PurePath) -> Manifest:
    """``manifest`` with relative ``.gguf`` paths (source, draft) made relative to ``base`` (the folder
    of the manifest's file), so that they mean the same file to a node whatever its working folder."""
    if isinstance(manifest, ModelManifest):
        spec = manifest.spec.model_copy(update={"source": _under(base, manifest.spec.source),
                                                "draft": _under(base, manifest.spec.draft)})
        return manifest.model_copy(update={"spec": spec})
    models = [m.model_copy(update={"source": _under(base, m.source), "draft": _under(base, m.draft)})
              for m in manifest.spec.models]
    return manifest.model_copy(update={"spec": manifest.spec.model_copy(update={"models": models})})


def json_schemas() -> dict[str, dict[str, object]]:
    """JSON Schemas of the manifest kinds, as checked in under ``schemas/``."""
    return {"manifest.Model": ModelManifest.model_json_schema(), "manifest.Mesh": MeshManifest.model_json_schema()}
