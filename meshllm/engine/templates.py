"""The chat format llama-server gets for a GGUF that carries no chat template of its own.

Without ``tokenizer.chat_template`` llama-server frames chats in ChatML, which a model not trained on
it does not follow: the embedded gemma-3-270m answered a plain "Hello" with 32,767 tokens of
``<|im_end|>`` loops. So a node picks the frame from the GGUF header (``engine.ggufinfo``):

- a fine-tuned model (``general.finetune`` says so: ``it``, ``instruct``, ``chat``, ...) whose converter
  dropped the template gets its architecture's turn format, by the name llama.cpp's
  ``--chat-template`` knows it under (gemma, gemma2, gemma3 -> ``gemma``; phi3 -> ``phi3``; ...). A
  name is a built-in template only without the jinja engine, hence ``--no-jinja``;
- a base model (no fine-tune recorded, like gemma-3-270m) knows no turn format at all: in gemma's it
  echoes the question back in loops. It gets a plain question/answer frame instead, which it
  continues with an answer, and stops at the next ``Question:`` it would write. That stop string is
  llama-server's default for requests that set none (``--reverse-prompt``), completions included.

A GGUF with its own template is left to it, and an unknown architecture to llama-server's default.
"""

from __future__ import annotations

from pathlib import Path

from meshllm.engine.ggufinfo import read_metadata
from meshllm.errors import ModelError

__all__ = ["BASE_MODEL_STOP", "BASE_MODEL_TEMPLATE", "BUILTIN_TEMPLATES", "LLAMA_TEMPLATE_NAMES", "chat_arguments",
           "template_arguments"]

# general.architecture -> llama.cpp's built-in template of that family (src/llama-chat.cpp), only where
# the architecture has one turn format
BUILTIN_TEMPLATES = {
    "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma",
    "phi3": "phi3", "command-r": "command-r", "cohere2": "command-r", "llama4": "llama4",
    "exaone": "exaone3", "exaone4": "exaone4", "granite": "granite", "chatglm": "chatglm4",
    "minicpm": "minicpm", "rwkv6": "rwkv-world", "rwkv7": "rwkv-world", "gpt-oss": "gpt-oss",
    "hunyuan-moe": "hunyuan-moe", "hunyuan-dense": "hunyuan-dense", "orion": "orion",
    "bailingmoe": "bailing", "bailingmoe2": "bailing2", "seed_oss": "seed_oss", "grok": "grok-2",
}

# every name llama.cpp's --chat-template knows as a built-in template (src/llama-chat.cpp of the engine)
LLAMA_TEMPLATE_NAMES = frozenset((
    "chatml", "llama2", "llama2-sys", "llama2-sys-bos", "llama2-sys-strip", "mistral-v1", "mistral-v3",
    "mistral-v3-tekken", "mistral-v7", "mistral-v7-tekken", "phi3", "phi4", "falcon3", "zephyr", "monarch", "gemma",
    "orion", "openchat", "vicuna", "vicuna-orca", "deepseek", "deepseek2", "deepseek3", "deepseek-ocr", "command-r",
    "llama3", "chatglm3", "chatglm4", "glmedge", "minicpm", "exaone3", "exaone4", "exaone-moe", "rwkv-world",
    "granite", "granite-4.0", "granite-4.1", "gigachat", "megrez", "yandex", "bailing", "bailing-think", "bailing2",
    "llama4", "smolvlm", "hunyuan-moe", "gpt-oss", "hunyuan-dense", "hunyuan-vl", "kimi-k2", "seed_oss", "grok-2",
    "pangu-embedded", "solar-open",
))

# jinja for llama-server: "Question: ...\n" per user turn, "Answer: ...\n" per assistant turn, a system
# message as a plain paragraph, and "Answer:" to be continued
BASE_MODEL_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' %}Question: {{ message['content'] | trim }}\n"
    "{% elif message['role'] == 'assistant' %}Answer: {{ message['content'] | trim }}\n"
    "{% else %}{{ message['content'] | trim }}\n\n"
    "{% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}Answer:{% endif -%}"
)
BASE_MODEL_STOP = "\nQuestion:"

_KEYS = {"general.architecture", "general.finetune", "tokenizer.chat_template"}


def chat_arguments(path: Path) -> tuple[str, ...]:
    """llama-server arguments that give the GGUF at ``path`` a chat format, or ``()`` when it has one
    (or cannot be read: llama-server then reports the file itself)."""
    try:
        meta = read_metadata(path, _KEYS)
    except (ModelError, OSError):
        return ()
    if meta.get("tokenizer.chat_template"):
        return ()
    if not str(meta.get("general.finetune") or "").strip():
        return ("--chat-template", BASE_MODEL_TEMPLATE, "--reverse-prompt", BASE_MODEL_STOP)
    builtin = BUILTIN_TEMPLATES.get(str(meta.get("general.architecture", "")))
    return ("--chat-template", builtin, "--no-jinja") if builtin else ()


def template_arguments(template: str) -> tuple[str, ...]:
    """llama-server arguments for a chat template a model's spec names: a built-in template's name
    (``chatml``, ``gemma``; a name is one only without the jinja engine), or a jinja template."""
    if template in LLAMA_TEMPLATE_NAMES:
        return ("--chat-template", template, "--no-jinja")
    return ("--chat-template", template)
