"""Talk to a running meshllm node with the official OpenAI client: list, chat, stream.

    meshllm --model gemma-3-270m          # in one terminal
    python examples/openai_client.py      # in another (pip install openai)
"""

from __future__ import annotations

import sys

from openai import OpenAI

base_url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:9337/v1"
client = OpenAI(base_url=base_url, api_key="unused")

models = [m.id for m in client.models.list()]
print("models:", ", ".join(models))

reply = client.chat.completions.create(
    model=models[0], messages=[{"role": "user", "content": "Write one sentence about the sea."}], max_tokens=48)
print("chat:", reply.choices[0].message.content)

print("stream: ", end="")
for chunk in client.chat.completions.create(
        model=models[0], messages=[{"role": "user", "content": "Count to five."}], max_tokens=32, stream=True):
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
