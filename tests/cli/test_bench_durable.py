"""broker bench's durable scenarios (issue 14): ``replicas=1`` against the default in one run.

The suite's server has no replica, so the run starts a private master and replica for these
scenarios (and says so), measures both sides there, and stops them.
"""

from __future__ import annotations

import json

from .conftest import assert_clean


async def test_durable_publishes_are_measured_against_the_default(sh, raw, namespace) -> None:
    done = await sh(
        "bench", "--quick", "--only", "durable", "--rates", "500", "--latency-seconds", "0.2"
    )
    assert done.code == 0, done.err
    assert_clean(done.err)
    *tables, last = done.out.strip().splitlines()
    text = "\n".join(tables)
    assert "### Durable publishes: `replicas=1`" in text and "private master and replica" in text
    d = json.loads(last)["durable"]
    for sid in ("durable.publish", "durable.publish_many"):
        sides = d["throughput"][sid]
        assert sides["0"]["msg_per_s"] > 0 and sides["1"]["msg_per_s"] > 0, sid
    lat = d["publish_latency_ms"]
    assert lat["0"]["p50"] > 0 and lat["1"]["p50"] > 0 and d["rate"] == 500
    assert await raw.keys(f"{namespace}-bench-*") == []
