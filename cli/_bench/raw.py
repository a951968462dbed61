"""The baseline: redis-py written as well as it allows (pipelines of 1000, one XACK per batch).

Entries use the library's wire format (field ``d`` = msgpack payload), so a backlog filled here
is read by the library's consumers too.
"""

from __future__ import annotations

from typing import Any

import msgpack

from .common import BATCH, Run, payload, stopwatch

__all__ = ["consume", "fill", "publish"]


async def fill(r: Any, key: str, n: int, batch: int = BATCH) -> None:
    """Append ``n`` entries in pipelines of ``batch`` XADDs (``transaction=False``)."""
    packb = msgpack.packb
    for start in range(0, n, batch):
        pipe = r.pipeline(transaction=False)
        for i in range(start, min(n, start + batch)):
            pipe.xadd(key, {b"d": packb(payload(i))})
        await pipe.execute()


async def publish(r: Any, key: str, n: int) -> Run:
    """Pipelined XADD, batches of 1000, each payload encoded with msgpack."""
    with stopwatch() as w:
        await fill(r, key, n)
    return w.run(n)


async def consume(r: Any, key: str, group: str, n: int) -> Run:
    """``XREADGROUP COUNT 1000`` from a backlog of ``n`` entries, decode each payload, then one
    multi-id ``XACK`` per batch. The group is created inside the timing, as a subscription
    creates its own."""
    unpackb = msgpack.unpackb
    got = 0
    with stopwatch() as w:
        await r.xgroup_create(key, group, id="0")
        while got < n:
            reply = await r.xreadgroup(group, "raw", {key: ">"}, count=BATCH, block=1000)
            for _, entries in reply or ():
                ids = []
                for entry_id, fields in entries:
                    unpackb(fields[b"d"])
                    ids.append(entry_id)
                if ids:
                    await r.xack(key, group, *ids)
                    got += len(ids)
    return w.run(got)
