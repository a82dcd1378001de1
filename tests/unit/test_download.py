"""Models from a hub: every reference form, and downloads against a local server speaking the hub's
protocol (``meshllm.testing.hubserver``): resume, checksum, 404, gated, full disk, one fetch per machine."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshllm.engine.catalog import catalog, find_entry
from meshllm.engine.download import fetch, parse_reference, progress_line
from meshllm.engine.models import resolve_model
from meshllm.engine.tinygguf import write_dense
from meshllm.errors import ModelError, ModelNotFetched
from meshllm.testing.hubserver import HubServer


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """34 MB: more than huggingface_hub's 10 MB write chunk, so a cut transfer has something to resume."""
    return write_dense(tmp_path_factory.mktemp("hub") / "big.gguf", n_vocab=32000, n_embd=128)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dense(tmp_path_factory.mktemp("hub") / "small.gguf")


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("MESHLLM_MODELS_DIR", str(tmp_path / "models"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield server


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_catalog_holds_the_seed_models_and_their_drafts() -> None:
    names = {e.name for e in catalog()}
    for query in ("Qwen2.5-3B", "Qwen2.5-7B", "Qwen2.5-14B", "Qwen2.5-32B-Instruct", "Qwen2.5-72B", "Qwen3-8B",
                  "Qwen3-32B", "Llama-3.3-70B", "Gemma-3-27B", "GLM-4.7-Flash"):
        entry = find_entry(query)
        assert entry is not None, query
        assert entry.size_bytes > 0 and entry.files and "/" in entry.repo and entry.quantization
        assert entry.draft == "" or entry.draft in names
    pairs = {q: find_entry(q).draft for q in ("Qwen2.5-32B-Instruct", "Qwen3-32B", "Llama-3.3-70B", "Gemma-3-27B")}
    assert pairs == {"Qwen2.5-32B-Instruct": "Qwen2.5-0.5B-Instruct-Q4_K_M", "Qwen3-32B": "Qwen3-0.6B-Q4_K_M",
                     "Llama-3.3-70B": "Llama-3.2-1B-Instruct-Q4_K_M", "Gemma-3-27B": "Gemma-3-1B-it-Q4_K_M"}
    assert find_entry("GLM-4.7-Flash").moe and not find_entry("Qwen3-8B").moe
    assert len(find_entry("72b").files) == 2  # a split GGUF is one model


def test_fuzzy_names_find_one_model_or_list_the_candidates() -> None:
    assert find_entry("Qwen3-8B").name == "Qwen3-8B-Q4_K_M"
    assert find_entry("qwen3-8b-q4_k_m").name == "Qwen3-8B-Q4_K_M"
    assert find_entry("Qwen3-3") is None  # parts match whole: not Qwen3-30B nor Qwen3-32B
    with pytest.raises(ModelError, match="several catalog models: .*Qwen2.5-32B.*Qwen3-32B"):
        find_entry("32B")


@pytest.mark.parametrize(("text", "repo", "files", "endpoint"), [
    ("https://huggingface.co/bartowski/L-GGUF/resolve/main/L-Q4_K_M.gguf", "bartowski/L-GGUF", ["L-Q4_K_M.gguf"], ""),
    ("http://127.0.0.1:8000/org/r/resolve/v2/sub/m.gguf", "org/r", ["sub/m.gguf"], "http://127.0.0.1:8000"),
    ("bartowski/L-GGUF/L-Q4_K_M.gguf", "bartowski/L-GGUF", ["L-Q4_K_M.gguf"], ""),
    ("org/r/big-00001-of-00003.gguf", "org/r",
     ["big-00001-of-00003.gguf", "big-00002-of-00003.gguf", "big-00003-of-00003.gguf"], ""),
])
def test_reference_forms(text: str, repo: str, files: list[str], endpoint: str) -> None:
    ref = parse_reference(text)
    assert ref is not None
    assert {f.repo for f in ref.files} == {repo} and [f.path for f in ref.files] == files
    assert {f.endpoint for f in ref.files} == {endpoint}
    assert ref.name == files[0].rsplit("/", 1)[-1].replace("-00001-of-00003", "").removesuffix(".gguf")


def test_paths_and_unknown_words_are_not_references(tmp_path: Path) -> None:
    local = tmp_path / "org" / "r" / "m.gguf"
    local.parent.mkdir(parents=True)
    local.write_bytes(b"GGUF")
    assert parse_reference(str(local)) is None and parse_reference("./m.gguf") is None
    assert parse_reference("no-such-model") is None
    with pytest.raises(ModelError, match="not a model file URL"):
        parse_reference("https://huggingface.co/org/repo")


@pytest.mark.parametrize("form", ["catalog", "url", "hub-url", "shorthand"])
def test_each_reference_form_downloads_and_resolves(hub: HubServer, small_model: Path, tmp_path: Path,
                                                    form: str) -> None:
    hub.add("unsloth/Qwen3-8B-GGUF", "Qwen3-8B-Q4_K_M.gguf", small_model)
    text = {"catalog": "Qwen3-8B", "shorthand": "unsloth/Qwen3-8B-GGUF/Qwen3-8B-Q4_K_M.gguf",
            "url": "https://huggingface.co/unsloth/Qwen3-8B-GGUF/resolve/main/Qwen3-8B-Q4_K_M.gguf",
            "hub-url": f"{hub.url}/unsloth/Qwen3-8B-GGUF/resolve/main/Qwen3-8B-Q4_K_M.gguf"}[form]
    with pytest.raises(ModelNotFetched, match="meshllm download"):
        resolve_model(text)
    ref = parse_reference(text)
    assert ref is not None
    path = fetch(ref, tmp_path / "models")
    resolved = resolve_model(text)
    assert resolved.path == path == tmp_path / "models" / "Qwen3-8B-Q4_K_M.gguf"
    assert sha256(path) == sha256(small_model)
    assert resolved.name == ("Qwen3-8B-Q4_K_M")


def test_split_gguf_downloads_every_part(hub: HubServer, small_model: Path, big_model: Path, tmp_path: Path) -> None:
    hub.add("org/r", "m-00001-of-00002.gguf", small_model)
    hub.add("org/r", "m-00002-of-00002.gguf", big_model)
    ref = parse_reference("org/r/m-00001-of-00002.gguf")
    assert ref is not None
    fetch(ref, tmp_path / "models")
    resolved = resolve_model("org/r/m-00001-of-00002.gguf")
    assert resolved.name == "m" and resolved.path.name == "m-00001-of-00002.gguf"
    assert resolved.size_bytes == small_model.stat().st_size + big_model.stat().st_size


def test_an_interrupted_download_resumes(hub: HubServer, big_model: Path, tmp_path: Path) -> None:
    size = big_model.stat().st_size
    entry = hub.add("org/r", "big.gguf", big_model, drop_after=size // 2)
    path = fetch(parse_reference("org/r/big.gguf"), tmp_path / "models", backoff=0.01)  # type: ignore[arg-type]
    assert sha256(path) == sha256(big_model)
    assert entry.gets == 2 and len(entry.ranges) == 1  # one cut transfer, then a ranged one
    resumed_from = int(entry.ranges[0].removeprefix("bytes=").split("-")[0])
    assert resumed_from >= 10 << 20  # from what was written, not from zero
    assert hub.bytes_sent < size + size // 2


def test_a_corrupted_byte_fails_the_checksum_and_the_file_is_not_used(hub: HubServer, small_model: Path,
                                                                      tmp_path: Path) -> None:
    hub.add("org/r", "m.gguf", small_model, corrupt=True)
    with pytest.raises(ModelError, match="checksum mismatch.*not used") as caught:
        fetch(parse_reference("org/r/m.gguf"), tmp_path / "models")  # type: ignore[arg-type]
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "models" / "m.gguf").exists()
    with pytest.raises(ModelNotFetched):
        resolve_model("org/r/m.gguf")


@pytest.mark.parametrize(("setup", "expected"), [
    ("missing", "not found on"), ("gated", "gated; accept its terms on the hub and set HF_TOKEN"),
    ("huge", "not enough disk space"),
])
def test_hub_and_disk_failures_are_one_line(hub: HubServer, small_model: Path, tmp_path: Path, setup: str,
                                            expected: str) -> None:
    if setup == "gated":
        hub.add("org/r", "m.gguf", small_model, gated=True, token="hf_secret")
    elif setup == "huge":
        hub.add("org/r", "m.gguf", small_model, advertise_size=1 << 60)
    with pytest.raises(ModelError, match=expected) as caught:
        fetch(parse_reference("org/r/m.gguf"), tmp_path / "models")  # type: ignore[arg-type]
    assert "\n" not in str(caught.value)
    assert hub.files.get(("org/r", "m.gguf")) is None or hub.files[("org/r", "m.gguf")].gets == 0


def test_hf_token_opens_a_gated_repository(hub: HubServer, small_model: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add("org/r", "m.gguf", small_model, gated=True, token="hf_secret")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    path = fetch(parse_reference("org/r/m.gguf"), tmp_path / "models")  # type: ignore[arg-type]
    assert sha256(path) == sha256(small_model)


def test_two_fetches_on_one_machine_download_once(hub: HubServer, big_model: Path, tmp_path: Path) -> None:
    hub.rate = 40 << 20  # about a second for the file: the two overlap
    entry = hub.add("org/r", "big.gguf", big_model)
    folder = tmp_path / "models"
    other = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; "
                              "from meshllm.engine.download import fetch, parse_reference; "
                              "fetch(parse_reference('org/r/big.gguf'), Path(sys.argv[1]))", str(folder)])
    results: list[Path] = []
    mine = threading.Thread(target=lambda: results.append(fetch(parse_reference("org/r/big.gguf"), folder)))  # type: ignore[arg-type]
    mine.start()
    mine.join(timeout=60)
    assert other.wait(timeout=60) == 0
    assert entry.gets == 1 and sha256(results[0]) == sha256(big_model)


def test_progress_line_has_rate_and_time_left() -> None:
    assert progress_line(1_200_000_000, 4_800_000_000, 48_000_000) == \
        "downloading 1.2 GB of 4.8 GB (25%), 48.0 MB/s, 1m15s left"
    assert progress_line(0, 0, 0) == "downloading 0 B"
