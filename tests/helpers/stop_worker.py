"""A group consumer wrapped by a remote stop token, in its own process.

usage: python -m tests.helpers.stop_worker URL NAMESPACE CHANNEL GROUP CONSUMER TOKEN OUTFILE HOLD

Writes "ready" once subscribed, "got <id>" / "ack <id>" per message (acked after HOLD seconds),
and "end <reason> <monotonic_ns>" when the stream ends.
"""

from __future__ import annotations

import asyncio
import sys
import time

import broker


async def main() -> None:
    url, ns, channel, group, consumer, token_name, out, hold = sys.argv[1:9]
    async with broker.connect(url, namespace=ns) as b:
        async with b.stop_token(token_name) as token:
            async with b.channel(channel).subscribe(
                group=group, consumer=consumer, start="all", prefetch=4
            ) as messages:
                with open(out, "a", buffering=1) as f:
                    f.write("ready\n")
                    async for msg in token.stop_stream(messages):
                        f.write(f"got {msg.id}\n")
                        await asyncio.sleep(float(hold))
                        msg.ack()
                        f.write(f"ack {msg.id}\n")
                    await messages.flush()
                    f.write(f"end {token.reason} {time.time_ns()}\n")


if __name__ == "__main__":
    asyncio.run(main())
