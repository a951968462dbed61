"""Throughput against hand-written redis-py loops, measured in the same run on the same server.

usage: python -m tests.benchmarks.bench_throughput [N]   (starts a private redis-server)

Prints a Markdown table: messages per second and the ratio to the baseline. Not a pass/fail test.
"""

from __future__ import annotations

import asyncio
import sys

from broker import EmbeddedServer
from workers.bench import run, table

if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    with EmbeddedServer() as server:
        rows = asyncio.run(run(server.url, n))
    print(f"\n{n} messages each, redis-server {server.binary}\n")
    print(table(rows))
