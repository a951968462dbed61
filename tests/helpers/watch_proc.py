"""A reader or a writer of a watched value, in its own process.

usage: python -m tests.helpers.watch_proc URL NAMESPACE NAME read SLEEP LAST OUTFILE
       python -m tests.helpers.watch_proc URL NAMESPACE NAME write N

A reader writes "ready" once subscribed, then "v <version>" per value (sleeping SLEEP seconds
after each) until it sees version LAST, then "end <values seen>". A writer sets 1..N as fast as
it can (each set awaited) and exits.
"""

from __future__ import annotations

import asyncio
import sys

import broker


async def read(url: str, ns: str, name: str, sleep: float, last: int, out: str) -> None:
    async with broker.connect(url, namespace=ns) as b:
        async with b.watch(name).subscribe() as values:
            with open(out, "a", buffering=1) as f:
                f.write("ready\n")
                seen = 0
                async for v in values:
                    seen += 1
                    f.write(f"v {v.version} {v.value}\n")
                    if v.version >= last:
                        break
                    if sleep:
                        await asyncio.sleep(sleep)
                f.write(f"end {seen}\n")


async def write(url: str, ns: str, name: str, n: int) -> None:
    async with broker.connect(url, namespace=ns) as b:
        w = b.watch(name)
        for i in range(1, n + 1):
            await w.set(i)


if __name__ == "__main__":
    url, ns, name, mode = sys.argv[1:5]
    if mode == "read":
        asyncio.run(read(url, ns, name, float(sys.argv[5]), int(sys.argv[6]), sys.argv[7]))
    else:
        asyncio.run(write(url, ns, name, int(sys.argv[5])))
