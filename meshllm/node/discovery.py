"""A node's use of the mesh directory: which mesh ``--auto``/``--mesh-name`` joins, and the publisher of a public mesh.

``resolve_join`` runs before the node exists (``run_node``): with ``--auto`` or ``--mesh-name`` and no
``--join``, it reads the listings (relays and LAN), picks the best (``discovery.listing.choose``) and
turns it into a ``--join`` token; if none fits, the node founds a mesh as it would without discovery.
A directory that cannot be read costs a warning, never the start. ``publisher_for`` builds the
component that keeps a ``--publish``/``--mesh-name`` mesh listed (``discovery.publisher``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from meshllm import __version__
from meshllm.discovery.directory import DEFAULT_RELAYS, Directory
from meshllm.discovery.listing import choose
from meshllm.discovery.mdns import MdnsDirectory
from meshllm.discovery.publisher import Publisher, PublishSettings
from meshllm.engine.models import resolve_model
from meshllm.errors import MeshError
from meshllm.node.config import NodeConfig
from meshllm.node.mesh import MeshRuntime
from meshllm.state.document import MeshState
from meshllm.state.schema import ModelName, NodeId

__all__ = ["directory_for", "publisher_for", "resolve_join"]

log = logging.getLogger(__name__)


def directory_for(config: NodeConfig, *, instance: str = "") -> Directory:
    """The relays (``--relay``, else the default list) and, unless ``--no-mdns``, the LAN."""
    lan = MdnsDirectory(instance=instance or "meshllm", port=config.port) if config.mdns else None
    relays = DEFAULT_RELAYS if config.relays is None else config.relays
    return Directory(relays=relays, lan=lan, timeout=config.relay_timeout)


async def resolve_join(config: NodeConfig, *, announce: Callable[[str], None] = print) -> NodeConfig:
    """``config`` with the token of the mesh ``--auto``/``--mesh-name`` should join, when one fits."""
    if config.joins or not (config.auto or config.mesh_name):
        return config
    directory = directory_for(config)
    listings = await directory.find(wait=config.mdns_wait)
    model = config.want_model or (config.models[0] if config.models else "")
    best = choose(listings, model=_model_name(model), region=config.region, name=config.mesh_name,
                  now=time.time(), ttl=config.listing_ttl)
    if best is None:
        named = f" {config.mesh_name!r}" if config.mesh_name else ""
        announce(f"discovery: no published mesh fits ({len(listings)} listed); starting a new mesh{named}")
        return config
    c = best.content
    announce(f"discovery: joining mesh {c.name or c.mesh!r} ({c.mesh}, {c.nodes} node(s), {c.clients} client(s), "
             f"serving {', '.join(c.served) or 'nothing yet'}) listed on {best.source}")
    return dataclasses.replace(config, joins=(c.token,))


def _model_name(source: str) -> ModelName:
    """The name a listing uses for ``--model`` (a path's file stem, as the mesh names models)."""
    if not source:
        return ModelName("")
    try:
        return ModelName(resolve_model(source).name)
    except MeshError:  # a model this machine lacks: its name, as the listings spell it
        return ModelName(source)


def publisher_for(config: NodeConfig, state: MeshState, mesh: MeshRuntime, *, node_id: NodeId) -> Publisher | None:
    """The component that lists a ``--publish``/``--mesh-name`` mesh; None for a private mesh."""
    if not (config.publish or config.mesh_name):
        return None
    directory = directory_for(config, instance=f"{mesh.creds.mesh_id}-{node_id[:12]}")
    settings = PublishSettings(name=config.mesh_name or f"mesh-{mesh.creds.mesh_id[:6]}", region=config.region,
                               max_clients=config.max_clients, ttl=config.listing_ttl)
    return Publisher(state, directory, settings=settings, creds=lambda: mesh.creds, token=mesh.token,
                     version=__version__)
