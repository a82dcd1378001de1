"""Manifests: each mistake is one error naming file, document and field; valid ones become ModelSpecs."""

from __future__ import annotations

from pathlib import Path, PurePath

import pytest

from meshllm.errors import ManifestError
from meshllm.state.changes import ChangeAction, plan_apply, plan_delete
from meshllm.state.manifest import (
    MeshManifest, ModelManifest, load_manifests, manifest_models, model_manifest, with_paths_under,
)
from meshllm.state.schema import ModelOrigin, ModelSpec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

HEAD = "apiVersion: meshllm/v1\nkind: Model\nmetadata:\n  name: m\n"
GOOD = HEAD + "spec:\n  source: gemma-3-270m\n"
MESH = """apiVersion: meshllm/v1
kind: Mesh
metadata:
  name: prod
spec:
  models:
    - name: a
      source: a.gguf
    - name: b
      source: b.gguf
      replicas: {replicas}
"""

BAD = [
    (HEAD + "spec:\n  source: x\n  replica: 2\n", "m.yaml: document 1: spec.replica: unknown field (did you mean replicas?)"),
    (HEAD + "spec:\n  source: x\n  colour: red\n", "m.yaml: document 1: spec.colour: unknown field; known fields: "
                                                     "source, replicas, ctxSize, draft, placement"),
    (HEAD + "spec:\n  source: x\n  placement:\n    nodes: a\n", "document 1: spec.placement.nodes: unknown field (did you mean node?)"),
    (HEAD + "spec:\n  replicas: 1\n", "m.yaml: document 1: spec.source: Field required"),
    (HEAD + "spec:\n  source: x\n  replicas: 0\n", "document 1: spec.replicas: Input should be greater than or equal to 1"),
    (HEAD + "spec:\n  source: x\n  ctxSize: '4096'\n", "document 1: spec.ctxSize: Input should be a valid integer"),
    (HEAD + "spec:\n  source: 42\n", "document 1: spec.source: Input should be a valid string"),
    (HEAD, "m.yaml: document 1: spec: Field required"),
    (GOOD + "---\n" + MESH.format(replicas="two"), "m.yaml: document 2: spec.models[1].replicas: Input should be a valid integer"),
    (GOOD.replace("meshllm/v1", "meshllm/v2"), "m.yaml: document 1: apiVersion: unsupported 'meshllm/v2'; expected meshllm/v1"),
    (GOOD.replace("apiVersion: meshllm/v1\n", ""), "m.yaml: document 1: apiVersion: missing; expected meshllm/v1"),
    (GOOD.replace("kind: Model", "kind: Pod"), "m.yaml: document 1: kind: unknown kind 'Pod'; expected one of: Mesh, Model"),
    (GOOD.replace("name: m", "name: a/b"), "m.yaml: document 1: metadata.name: invalid model name 'a/b'"),
    (GOOD.replace("name: m", "nam: m"), "m.yaml: document 1: metadata.nam: unknown field (did you mean name?)"),
    (GOOD + "status:\n  phase: Ready\n  colour: 1\n", "document 1: status.colour: unknown field"),
    (GOOD + "---\n" + GOOD, "m.yaml: document 2: metadata.name: model 'm' is defined twice (also at document 1: metadata.name)"),
    (MESH.format(replicas=1).replace("name: b", "name: a"),
     "m.yaml: document 1: spec.models[1].name: model 'a' is defined twice (also at document 1: spec.models[0].name)"),
    (MESH.format(replicas=1) + "---\n" + MESH.format(replicas=1).replace("- name: a", "- name: c").replace("name: b", "name: d"),
     "m.yaml: document 2: kind: only one Mesh per apply"),
    (GOOD + "spec:\n  source: y\n", "m.yaml: line 7, column 1: invalid YAML: duplicate key 'spec'"),
    ("apiVersion: meshllm/v1\nkind: [Model\n", "m.yaml: line 3, column 1: invalid YAML:"),
    ("- 1\n- 2\n", "m.yaml: document 1: expected a mapping with apiVersion, kind, metadata and spec, got a number"),
    ("# nothing\n", "m.yaml: no manifests found"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_each_mistake_is_one_error_naming_its_place(text: str, message: str) -> None:
    with pytest.raises(ManifestError) as caught:
        load_manifests(text, source_name="m.yaml")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_json_is_accepted_and_its_syntax_errors_have_a_line() -> None:
    text = '[{"apiVersion": "meshllm/v1", "kind": "Model", "metadata": {"name": "m"}, "spec": {"source": "x"}}]'
    assert [item.manifest.metadata.name for item in load_manifests(text, source_name="m.json")] == ["m"]
    with pytest.raises(ManifestError, match=r"m.json: line 2, column \d+: invalid JSON"):
        load_manifests('[\n{"apiVersion": }]', source_name="m.json")


def test_empty_documents_are_skipped_but_counted() -> None:
    loaded = load_manifests("---\n" + GOOD + "---\n---\n" + MESH.format(replicas=2), source_name="m.yaml")
    assert [(item.index, type(item.manifest)) for item in loaded] == [(1, ModelManifest), (3, MeshManifest)]


def test_models_become_manifest_model_specs_and_back() -> None:
    text = HEAD + "spec:\n  source: big.gguf\n  replicas: 2\n  ctxSize: 8192\n  draft: gemma-3-270m\n" \
                  "  placement:\n    node: gpu-box\n---\n" + MESH.format(replicas=3)
    models = manifest_models(load_manifests(text, source_name="m.yaml"), now=5.0)
    assert [m.spec for m in models] == [
        ModelSpec(name="m", source="big.gguf", node="gpu-box", ctx_size=8192, created_at=5.0,
                  origin=ModelOrigin.MANIFEST, replicas=2, draft="gemma-3-270m"),
        ModelSpec(name="a", source="a.gguf", created_at=5.0),
        ModelSpec(name="b", source="b.gguf", replicas=3, created_at=5.0),
    ]
    assert [m.where("source") for m in models] == [
        "m.yaml: document 1: spec.source", "m.yaml: document 2: spec.models[0].source",
        "m.yaml: document 2: spec.models[1].source"]
    again = manifest_models(load_manifests(model_manifest(models[0].spec).model_dump_json(), source_name="x.json"),
                            now=5.0)
    assert again[0].spec == models[0].spec


def test_relative_paths_are_made_relative_to_the_manifest_folder() -> None:
    text = HEAD + "spec:\n  source: ./models/a.gguf\n  draft: d.gguf\n---\n" + MESH.format(replicas=1).replace(
        "source: b.gguf", "source: gemma-3-270m")
    loaded = load_manifests(text + "    - name: c\n      source: /abs/c.gguf\n", source_name="m.yaml")
    moved = [with_paths_under(item.manifest, PurePath("/srv/mesh")) for item in loaded]
    assert isinstance(moved[0], ModelManifest) and isinstance(moved[1], MeshManifest)
    assert (moved[0].spec.source, moved[0].spec.draft) == ("/srv/mesh/models/a.gguf", "/srv/mesh/d.gguf")
    assert [m.source for m in moved[1].spec.models] == ["/srv/mesh/a.gguf", "gemma-3-270m", "/abs/c.gguf"]


def test_every_example_manifest_is_valid() -> None:
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert {f.name for f in files} >= {"one-model.yaml"}
    for path in files:
        loaded = load_manifests(path.read_text(), source_name=path.name)
        assert manifest_models(loaded), path.name


def spec(name: str, **fields: object) -> ModelSpec:
    return ModelSpec(name=name, source=f"{name}.gguf", **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("current", "desired", "prune", "expected"), [
    ({}, [spec("a")], False, {"a": ChangeAction.CREATED}),
    ({"a": spec("a", created_at=1.0)}, [spec("a", created_at=9.0)], False, {"a": ChangeAction.UNCHANGED}),
    ({"a": spec("a")}, [spec("a", replicas=2)], False, {"a": ChangeAction.CONFIGURED}),
    ({"a": spec("a", origin=ModelOrigin.NODE, owner="n1")}, [spec("a")], False, {"a": ChangeAction.CONFIGURED}),
    ({"a": spec("a"), "b": spec("b")}, [spec("b")], False, {"b": ChangeAction.UNCHANGED}),
    ({"a": spec("a"), "b": spec("b"), "n": spec("n", origin=ModelOrigin.NODE)}, [spec("b")], True,
     {"b": ChangeAction.UNCHANGED, "a": ChangeAction.PRUNED}),
])
def test_plan_apply(current: dict[str, ModelSpec], desired: list[ModelSpec], prune: bool,
                    expected: dict[str, ChangeAction]) -> None:
    changes = plan_apply(current, desired, prune=prune)
    assert {c.name: c.action for c in changes} == expected


def test_plan_apply_keeps_created_at_and_lists_changed_fields_by_manifest_name() -> None:
    (change,) = plan_apply({"a": spec("a", created_at=1.0)}, [spec("a", ctx_size=4096, node="n2", created_at=9.0)],
                           prune=False)
    assert change.spec is not None and change.spec.created_at == 1.0
    assert {k: (v.old, v.new) for k, v in change.fields.items()} == {"ctxSize": (0, 4096), "placement.node": ("", "n2")}


def test_plan_delete_leaves_node_models_to_drop() -> None:
    current = {"a": spec("a"), "n": spec("n", origin=ModelOrigin.NODE, owner="n1")}
    assert {c.name: c.action for c in plan_delete(current, ["a", "n", "z"])} == {
        "a": ChangeAction.DELETED, "n": ChangeAction.NOT_FOUND, "z": ChangeAction.NOT_FOUND}
