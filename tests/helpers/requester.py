"""A requester in its own process that dies without closing its broker (kill -9 tests).

usage: python -m tests.helpers.requester URL NAMESPACE CHANNEL REPLY_TTL

Sends one request nobody answers (so the inbox exists), prints the inbox key, then waits until
killed.
"""

from __future__ import annotations

import asyncio
import sys

import broker


async def main() -> None:
    url, ns, channel, ttl = sys.argv[1:5]
    async with broker.connect(url, namespace=ns, reply_ttl=float(ttl)) as b:
        try:
            await b.channel(channel).request({"n": 0}, timeout=0.2)
        except broker.RequestTimeoutError:
            pass
        print(b.request_statistics().inbox, flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
