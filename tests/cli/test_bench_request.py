"""``python -m broker.cli._bench.request``: the request round trip, lib beside raw (tiny)."""

from __future__ import annotations

from broker.cli._bench.request import measure


async def test_measure_both_sides(redis_url: str, namespace: str) -> None:
    result = await measure(redis_url, 20, namespace)
    for side in ("lib", "raw"):
        f = result[side]
        assert f["requests"] == 20 and 0 < f["p50_ms"] <= f["p99_ms"] < 5000, result


async def test_broker_bench_only_request(sh, raw, namespace) -> None:
    """``broker bench --only request``: the section, the targets and the JSON key; FastStream's
    row only where it is installed."""
    import json

    from broker.cli._bench.faststream import available

    from .conftest import assert_clean

    done = await sh("bench", "--quick", "--only", "request")
    assert done.code == 0, done.err
    assert_clean(done.err)
    *tables, last = done.out.strip().splitlines()
    text = "\n".join(tables)
    assert "### Request round trip through a responder process (100 sequential" in text, text
    assert "| broker: `ch.request()` answered by `consume()` |" in text, text
    assert "Target (issue 15): request p50 ≤ 1.5 x raw" in text, text
    doc = json.loads(last)
    sides = {"lib", "raw"} | ({"faststream"} if available() else set())
    assert set(doc["request"]) == sides, doc["request"]
    for f in doc["request"].values():
        assert f["requests"] == 100 and 0 < f["p50_ms"] <= f["p99_ms"] < 5_000, doc["request"]
    assert doc["throughput"] == {} and doc["latency_ms"] == {}  # only what was asked for
    assert await raw.keys(f"{namespace}-bench-*") == []  # everything written was deleted
