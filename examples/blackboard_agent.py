"""An agent's side of the blackboard through MCP, with the official SDK: list the tools, search before
starting work, post a status, read the feed. Run it where `meshllm` is installed:

    python examples/blackboard_agent.py            # a node with --blackboard on :3131, or none (it starts one)
"""

from __future__ import annotations

import anyio
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client


async def main() -> None:
    server = StdioServerParameters(command="meshllm", args=["blackboard", "--mcp"])
    async with stdio_client(server) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        print("tools:", [tool.name for tool in (await session.list_tools()).tools])
        found = await session.call_tool("blackboard_search", {"query": "billing refactor"})
        print("already on it:", found.structured_content)
        posted = await session.call_tool("blackboard_post", {"text": "STATUS: [org/repo branch:main] refactoring billing"})
        print("posted:", posted.structured_content or posted.content)
        feed = await session.call_tool("blackboard_feed", {"limit": 5})
        for item in (feed.structured_content or {}).get("items", []):
            print(f"{item['id']} {item['author']}: {item['text']}")


if __name__ == "__main__":
    anyio.run(main)
