"""Agent launchers: ``meshllm claude|goose|opencode|pi`` point a coding agent at the mesh and run it.

``run.launch`` reuses the node on the port or starts a client node (``node``), picks the model
(``choice``: the strongest tool-capable one unless the user names one), writes what the tool reads
(``tools``), runs the tool with the user's arguments and stops the node it started when the tool
exits. The CLI commands are in ``meshllm.cli.launch``.
"""

from meshllm.launchers.choice import choose_model, rank
from meshllm.launchers.run import LaunchRequest, launch
from meshllm.launchers.tools import TOOLS, Tool

__all__ = ["TOOLS", "LaunchRequest", "Tool", "choose_model", "launch", "rank"]
