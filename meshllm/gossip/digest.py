"""A short digest of a replica's whole state, so anti-entropy between equal replicas costs bytes, not KB.

The Yjs pull (sync step 1, answered by step 2) carries the puller's state vector and, even when
nothing is missing, the other side's whole delete set: about 2 KB per exchange at 100 nodes, growing
with every node that ever wrote, and most of the mesh's steady traffic (bench/README.md). Two
replicas hold the same document exactly when their state vectors (which items exist: each client's
items are numbered without gaps) and their delete sets (which of those are deleted) are equal, so a
hash of both is a complete test: anti-entropy sends 16 bytes and runs the real exchange only when
the digests differ.

The hash is taken over a canonical form, not over yrs's bytes: the state vector's (client, clock)
pairs sorted, and each client's deleted ranges sorted and merged, because the encodings need not
list clients, or split ranges, the same way on two replicas. Bytes it cannot parse hash as they are:
a digest that fails to match only costs a full exchange.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pycrdt import Doc

__all__ = ["DIGEST_SIZE", "state_digest"]

DIGEST_SIZE = 16


def _varuints(data: bytes) -> list[int]:
    """All the unsigned LEB128 integers in ``data``, in order (raises ValueError on a cut-off one)."""
    values: list[int] = []
    value = shift = 0
    for byte in data:
        value |= (byte & 0x7F) << shift
        if byte & 0x80:
            shift += 7
        else:
            values.append(value)
            value = shift = 0
    if shift:
        raise ValueError("truncated varint")
    return values


def _state_vector(sv: bytes) -> list[tuple[int, int]]:
    numbers = _varuints(sv)
    count = numbers[0]
    if len(numbers) != 1 + 2 * count:
        raise ValueError("not a state vector")
    return sorted(zip(numbers[1::2], numbers[2::2], strict=True))


def _delete_set(update: bytes) -> list[tuple[int, list[tuple[int, int]]]]:
    """The delete set of an update that carries no items (a replica's diff against its own state)."""
    numbers = _varuints(update)
    if not numbers or numbers[0] != 0:
        raise ValueError("the update carries items")
    at, clients = (2, numbers[1]) if len(numbers) > 1 else (1, 0)
    deleted: dict[int, list[tuple[int, int]]] = {}
    for _ in range(clients):
        client, ranges = numbers[at], numbers[at + 1]
        at += 2
        spans = deleted.setdefault(client, [])
        for _ in range(ranges):
            spans.append((numbers[at], numbers[at] + numbers[at + 1]))
            at += 2
    if at != len(numbers):
        raise ValueError("not a delete set")
    return [(client, _merged(spans)) for client, spans in sorted(deleted.items())]


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        elif end > start:
            out.append((start, end))
    return out


def state_digest(doc: Doc[Any]) -> bytes:
    """``DIGEST_SIZE`` bytes equal on two replicas exactly when they hold the same document."""
    sv = doc.get_state()
    update = doc.get_update(sv)
    h = hashlib.blake2b(digest_size=DIGEST_SIZE, person=b"meshllm-state")
    try:
        h.update(repr((_state_vector(sv), _delete_set(update))).encode())
    except (ValueError, IndexError):
        h.update(b"raw\0" + sv + b"\0" + update)
    return h.digest()
