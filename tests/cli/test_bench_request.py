"""``python -m broker.cli._bench.request``: the request round trip, lib beside raw (tiny)."""

from __future__ import annotations

from broker.cli._bench.request import measure


async def test_measure_both_sides(redis_url: str, namespace: str) -> None:
    result = await measure(redis_url, 20, namespace)
    for side in ("lib", "raw"):
        f = result[side]
        assert f["requests"] == 20 and 0 < f["p50_ms"] <= f["p99_ms"] < 5000, result
