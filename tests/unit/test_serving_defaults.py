"""What llama-server is told for a request that sets no limit and a GGUF that brings no chat template."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from meshllm.engine.models import canonical_name, resolve_model
from meshllm.engine.process import DEFAULT_MAX_TOKENS, LlamaServerConfig
from meshllm.engine.templates import BASE_MODEL_STOP, BASE_MODEL_TEMPLATE, chat_arguments


def header_only(path: Path, arch: str, **meta: str) -> Path:
    """A GGUF holding only metadata: enough for the header reader."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        writer.add_string(key.replace("__", "."), value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(("arch", "meta", "expected"), [
    ("gemma3", {"general__finetune": "it"}, ("--chat-template", "gemma", "--no-jinja")),
    ("gemma2", {"general__finetune": "instruct"}, ("--chat-template", "gemma", "--no-jinja")),
    ("phi3", {"general__finetune": "instruct"}, ("--chat-template", "phi3", "--no-jinja")),
    ("qwen2", {"general__finetune": "instruct"}, ()),  # no built-in of its own: llama-server's ChatML
    ("gemma3", {"general__finetune": "it", "tokenizer__chat_template": "{{ messages }}"}, ()),
    ("gemma3", {}, ("--chat-template", BASE_MODEL_TEMPLATE, "--reverse-prompt", BASE_MODEL_STOP)),
])
def test_a_gguf_without_a_template_gets_its_family_s_or_a_question_answer_frame(
        tmp_path: Path, arch: str, meta: dict[str, str], expected: tuple[str, ...]) -> None:
    assert chat_arguments(header_only(tmp_path / "m.gguf", arch, **meta)) == expected


def test_an_unreadable_file_gets_no_chat_arguments(tmp_path: Path) -> None:
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf")
    assert chat_arguments(tmp_path / "broken.gguf") == ()


def test_llama_server_gets_the_default_generation_limit_and_the_chat_format(tmp_path: Path) -> None:
    base = LlamaServerConfig(binary=Path("llama-server"), model_path=tmp_path / "m.gguf", alias="m", port=1)
    argv = base.argv()
    assert argv[argv.index("--n-predict") + 1] == str(DEFAULT_MAX_TOKENS)
    chat = LlamaServerConfig(binary=Path("llama-server"), model_path=tmp_path / "m.gguf", alias="m", port=1,
                             max_tokens=64, chat=("--chat-template", "gemma", "--no-jinja"))
    assert chat.argv()[-3:] == ["--chat-template", "gemma", "--no-jinja"]
    assert "64" in chat.argv() and chat.digest() != base.digest()


def test_a_model_started_from_its_file_keeps_the_name_the_readme_uses(tmp_path: Path) -> None:
    path = header_only(tmp_path / "gemma-3-270m-q4_k_m.gguf", "gemma3")
    assert resolve_model(str(path)).name == "gemma-3-270m"
    other = header_only(tmp_path / "Other-Model.gguf", "llama")
    assert resolve_model(str(other)).name == "Other-Model"
    assert canonical_name("Other-Model.gguf") == "Other-Model"
