"""Say so when a ``--model`` of this node cannot have its name in the mesh.

Model names are the keys of the mesh's desired models, so two nodes that both start with ``--model``
of the same name write the same entry: one of the two specs wins (the one already there when this
node synced, or whichever the document's merge keeps when both wrote at once) and the other node's
request was, until this module, dropped without a word. ``NameWatch`` re-reads the models table after
each change and, for each of this node's ``--model`` specs whose entry now belongs to someone else
(another node's ``--model``, or a manifest), says once what happened and what to do: a warning in the
log, a line on the console the node was started from, and a ``NameTaken`` event on the model
(``meshllm describe`` shows it). Level-triggered: the message comes whichever way the entry was lost.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import anyio
from anyio.abc import TaskStatus

from meshllm.state.document import Changed, MeshState
from meshllm.state.schema import ModelName, ModelOrigin, ModelSpec, NodeId

__all__ = ["NameWatch", "taken_by"]

log = logging.getLogger(__name__)

Recorder = Callable[[ModelName, str, str], Awaitable[object]]  # (model, reason, message): an event on the model


def taken_by(entry: ModelSpec | None, *, node_id: NodeId) -> str | None:
    """Who holds the mesh's entry ``entry`` when it is not this node's ``--model``; None when it is
    this node's own (or there is none)."""
    if entry is None or (entry.origin is ModelOrigin.NODE and entry.owner == node_id):
        return None
    if entry.origin is ModelOrigin.NODE:
        return f"node {entry.owner}'s --model ({entry.source})"
    return f"a {entry.origin.value} model ({entry.source})"


class NameWatch:
    """Watches this node's ``--model`` names in the document and reports each one taken, once."""

    def __init__(self, state: MeshState, *, node_id: NodeId, specs: Sequence[ModelSpec],
                 announce: Callable[[str], None], record: Recorder) -> None:
        self.state = state
        self.node_id = node_id
        self.specs = tuple(specs)
        self.announce = announce
        self.record = record
        self.reported: set[ModelName] = set()

    def conflicts(self) -> dict[ModelName, str]:
        """Each of this node's ``--model`` names that the mesh holds for someone else, with the message."""
        models = self.state.models()
        found: dict[ModelName, str] = {}
        for spec in self.specs:
            holder = taken_by(models.get(spec.name), node_id=self.node_id)
            if holder is not None:
                found[spec.name] = (f"--model {spec.source}: the mesh already has a model named {spec.name!r}, "
                                    f"{holder}; this node does not serve its own file under that name. Rename the "
                                    "file (the name is the file's stem) or stop the other one")
        return found

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        changed = anyio.Event()

        def on_change(changes: list[Changed]) -> None:
            if any(change.table == "models" for change in changes):
                changed.set()

        handle = self.state.observe_changes(on_change)
        try:
            task_status.started()
            while True:
                for name, message in self.conflicts().items():
                    if name not in self.reported:
                        self.reported.add(name)
                        log.warning("%s", message)
                        self.announce(f"warning: {message}")
                        await self.record(name, "NameTaken", message)
                await changed.wait()
                changed = anyio.Event()
        finally:
            self.state.unobserve(handle)
