"""broker bench, as a real process against the real server."""

from __future__ import annotations


async def test_bench_prints_a_table(sh) -> None:
    done = await sh("bench", "-n", "300", "--tasks", "10")
    assert done.code == 0, done.err
    assert "| publish, 10 concurrent tasks |" in done.out and "x |" in done.out
