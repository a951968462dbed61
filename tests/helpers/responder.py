"""A request responder in its own process, for the request/reply tests.

usage: python -m tests.helpers.responder URL NAMESPACE CHANNEL GROUP CONSUMER OUTFILE [CLAIM_IDLE]

Consumes CHANNEL with ``sub.consume`` (64 handlers) and answers each request ``{"n": N, "op":
OP}``: ``echo`` answers ``{"n": 2N, "by": CONSUMER}``; ``hang`` (with ``"who": CONSUMER``)
never returns in that consumer and echoes in any other. Writes "ready" once subscribed and
"got <n>" per request to OUTFILE (flushed). Runs until killed.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import broker


async def main() -> None:
    url, ns, channel, group, consumer, out = sys.argv[1:7]
    claim_idle = float(sys.argv[7]) if len(sys.argv) > 7 else 60.0
    with open(out, "a", buffering=1) as f:

        async def handle(msg: broker.Message[Any]) -> Any:
            data = msg.data
            f.write(f"got {data['n']}\n")
            if data.get("op") == "hang" and data.get("who") == consumer:
                await asyncio.Event().wait()
            return {"n": 2 * data["n"], "by": consumer}

        async with broker.connect(url, namespace=ns) as b:
            async with b.subscribe(
                channel,
                group=group,
                consumer=consumer,
                start="all",
                prefetch=128,
                claim_idle=claim_idle,
                claim_interval=0.2,
            ) as sub:
                f.write("ready\n")
                await sub.consume(handle, concurrency=64)


if __name__ == "__main__":
    asyncio.run(main())
