"""A consumer in its own process, for kill -9 and multi-process tests.

usage: python -m tests.helpers.consumer URL NAMESPACE CHANNEL GROUP CONSUMER OUTFILE [HOLD]

Appends each delivered id to OUTFILE (flushed) as "got <id>", acks after HOLD seconds and then
writes "ack <id>". Runs until killed.
"""

from __future__ import annotations

import asyncio
import sys

import broker


async def main() -> None:
    url, ns, channel, group, consumer, out = sys.argv[1:7]
    hold = float(sys.argv[7]) if len(sys.argv) > 7 else 0.0
    async with broker.connect(url, namespace=ns) as b:
        async with b.channel(channel).subscribe(
            group=group,
            consumer=consumer,
            start="all",
            prefetch=4,
            claim_idle=1.0,
            claim_interval=0.2,
        ) as messages:
            with open(out, "a", buffering=1) as f:
                f.write("ready\n")
                async for msg in messages:
                    f.write(f"got {msg.id}\n")
                    if hold:
                        await asyncio.sleep(hold)
                    msg.ack()
                    await messages.flush()
                    f.write(f"ack {msg.id}\n")


if __name__ == "__main__":
    asyncio.run(main())
