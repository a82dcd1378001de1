"""``json.loads`` for text from strangers: clients, peers, relays, invite tokens.

The standard parser recurses once per nesting level, so a document nested about a thousand deep (a
few kilobytes: ``[[[[...]]]]``) raises ``RecursionError``, which callers that catch ``ValueError`` for
malformed input do not expect: a request became a plain-text 500, a peer's tunnel head an unhandled
exception. ``loads`` turns it into the ``ValueError`` every such caller handles (the parser's own
recursion guard stays the limit: a depth check in Python would cost a pass over every request body).
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["loads"]


def loads(text: bytes | bytearray | str) -> Any:
    """``json.loads``, raising ``ValueError`` (never ``RecursionError``) on a document nested too deeply."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
