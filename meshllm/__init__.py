"""meshllm: pool spare GPU capacity across machines into one mesh serving LLMs.

Layers, lowest first: ``state`` (the replicated document) ← ``engine`` / ``store``
(llama.cpp binaries and processes, local persistence) ← ``reconcile`` (controllers) ←
``api`` (starlette apps) ← ``node`` (wiring of one node) ← ``cli`` (typer commands).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
