"""broker bench's watched values (issue 15): set → seen in another process, beside raw
PUBLISH → receive. A smoke test: both rows, sane numbers; no timing target."""

from __future__ import annotations

import json

from .conftest import assert_clean


async def test_watch_latency_is_measured_beside_raw_publish(sh, raw, namespace) -> None:
    done = await sh("bench", "--quick", "--only", "watch", "--latency-seconds", "0.25")
    assert done.code == 0, done.err
    assert_clean(done.err)
    *tables, last = done.out.strip().splitlines()
    text = "\n".join(tables)
    assert "### Watched values: set → seen in another process (200 values/s" in text, text
    assert "writer's await p50 ms |" in text
    assert "| raw redis-py: `PUBLISH` → `PubSub.listen()` | 50 |" in text, text
    assert "| broker: `watch.set()` → `async for` over `subscribe()` | 50 |" in text, text
    assert "Target (issue 15): watch p50 ≤ 1.5 x raw" in text
    doc = json.loads(last)
    w = doc["watch"]
    assert (w["rate"], w["seconds"], w["repeat"]) == (200, 0.25, 1)
    for side in ("raw", "watch"):
        s = w[side]
        assert s["sent"] == 50 and 0 < s["seen"] <= s["sent"], (side, s)
        assert 0 < s["p50"] <= s["p99"] <= s["max"] < 5_000, (side, s)  # ms, across processes
        assert 0 < s["send_p50"] < 5_000, (side, s)
    assert w["raw"]["seen"] == 50  # raw pub/sub on loopback loses nothing
    # every value set (warm-up, measured, the stop) was announced; one read at the start
    assert w["watch"]["messages"] >= w["watch"]["seen"] and w["watch"]["rereads"] >= 1
    assert w["p50_ratio"] > 0 and w["met"] in (True, False)
    assert doc["throughput"] == {} and doc["latency_ms"] == {}  # only what was asked for
    assert await raw.keys(f"{namespace}-bench-*") == []  # everything written was deleted
