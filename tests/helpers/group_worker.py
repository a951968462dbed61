"""A consumer with a group-wide concurrency limit, in its own process.

usage: python -m tests.helpers.group_worker URL NAMESPACE CHANNEL GROUP CONSUMER
                                            LOCAL GROUP_LIMIT HOLD LEASE

Each handler increments ``<ns>:{t}:gauge`` in Redis, records the highest value in ``<ns>:{t}:peak``
(atomically), sleeps HOLD seconds and decrements. Runs until killed or stopped by token "end".
"""

from __future__ import annotations

import asyncio
import sys

import broker

PEAK = """
local v = redis.call('INCR', KEYS[1])
local p = tonumber(redis.call('GET', KEYS[2]) or '0')
if v > p then redis.call('SET', KEYS[2], v) end
return v
"""


async def main() -> None:
    url, ns, channel, group, consumer, local, limit, hold, lease = sys.argv[1:10]
    async with broker.connect(url, namespace=ns) as b:
        r = b.redis
        # one hash tag: the PEAK script touches both keys (one slot on a cluster)
        gauge, peak = f"{ns}:{{t}}:gauge", f"{ns}:{{t}}:peak"

        async def handler(msg: broker.Message) -> None:
            await r.eval(PEAK, 2, gauge, peak)
            try:
                await r.rpush(f"{ns}:{{t}}:started", msg.id)
                await asyncio.sleep(float(hold))
            finally:
                await r.decr(gauge)
            await r.rpush(f"{ns}:{{t}}:done", msg.id)

        async with b.stop_token("end") as stop:
            print("ready", flush=True)
            await b.consume(
                channel,
                handler,
                group=group,
                consumer=consumer,
                start="all",
                concurrency=int(local),
                group_concurrency=int(limit),
                lease=float(lease),
                stop=stop,
                claim_idle=2.0,
                claim_interval=0.2,
            )


if __name__ == "__main__":
    asyncio.run(main())
