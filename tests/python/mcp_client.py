"""An MCP client this project did not write (the official Python SDK, from PyPI) against
`projector mcp` (stdio) and `/mcp` of `projector serve` (Streamable HTTP).

usage: mcp_client.py stdio <projector binary> <customer_id>
       mcp_client.py http <url> <token> <customer_id>
Prints one JSON line: the tools with their annotations and output schemas, and the
structured content of get_customer_360 for the customer.
"""

import json
import os
import sys

import anyio
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client


async def exercise(read, write, customer):
    async with ClientSession(read, write) as session:
        init = await session.initialize()
        tools = (await session.list_tools()).tools
        result = await session.call_tool("get_customer_360", {"customer_id": customer})
        missing = await session.call_tool("get_customer_360", {"customer_id": customer + "-nobody"})
        print(json.dumps({
            "server": init.server_info.name,
            "tools": {
                t.name: {
                    "read_only": t.annotations.read_only_hint,
                    "idempotent": t.annotations.idempotent_hint,
                    "open_world": t.annotations.open_world_hint,
                    "output_schema": t.output_schema is not None,
                }
                for t in tools
            },
            "is_error": result.is_error,
            "structured": result.structured_content,
            "missing_is_error": missing.is_error,
            "missing_text": missing.content[0].text if missing.content else None,
        }))


async def main():
    mode = sys.argv[1]
    if mode == "stdio":
        # The SDK passes a minimal environment: hand the server its settings explicitly.
        env = {k: v for k, v in os.environ.items() if k.startswith("PROJECTOR_") or k == "RUST_LOG"}
        params = StdioServerParameters(command=sys.argv[2], args=["mcp"], env=env)
        async with stdio_client(params) as (read, write):
            await exercise(read, write, sys.argv[3])
    else:
        client = create_mcp_http_client(headers={"Authorization": f"Bearer {sys.argv[3]}"})
        async with client, streamable_http_client(sys.argv[2], http_client=client) as (read, write):
            await exercise(read, write, sys.argv[4])


anyio.run(main)
