"""broker bench, as a real process against the real server: tiny sizes, every scenario.

FastStream and uvloop are optional (the bench extra): without them the run says so and the rest
is measured all the same.
"""

from __future__ import annotations

import json

import pytest

from .conftest import assert_clean

QUICK = (
    "bench", "--quick", "--no-faststream", "--processes", "1,2", "--rates", "1000",
    "--latency-seconds", "0.2", "--memory-seconds", "0.3", "--backlog", "3000",
    "--channel-counts", "1,20",
)  # fmt: skip


async def test_quick_run_prints_tables_then_one_json_line(sh, raw, namespace) -> None:
    done = await sh(*QUICK)
    assert done.code == 0, done.err
    assert_clean(done.err)
    *tables, last = done.out.strip().splitlines()
    doc = json.loads(last)
    text = "\n".join(tables)
    for heading in ("### Targets", "### Throughput", "### Latency", "### Memory", "### Consumer",
                    "### A cluster", "### Many channels"):  # fmt: skip
        assert heading in text, text
    assert set(doc["cluster"]["paths"]) == {
        "publish_many (keys)", "publish() from tasks (keys)", "chunks(1000) + ack(batch)"
    }  # fmt: skip
    assert len(doc["cluster"]["spread"]) == 3  # one count per primary
    assert [c["channels"] for c in doc["channels"]] == [1, 20]
    assert "| concurrent `publish()` from 1000 tasks | ≥ 0.8 x raw pipelined XADD |" in text
    assert "disabled (--no-faststream)" in text
    through = doc["throughput"]
    for sid in ("raw.publish", "lib.publish", "lib.publish_many", "raw.consume", "lib.iterate"):
        assert through[sid]["msg_per_s"] > 0 and through[sid]["cpu_us_per_msg"] > 0, sid
    assert through["raw.publish"]["vs_raw"] == 1.0
    assert "fs.consume" not in through and doc["skipped"]["fs.consume"].startswith("disabled")
    assert set(doc["latency_ms"]) == {"raw", "lib"} and doc["latency_ms"]["lib"]["1000"]["p50"] > 0
    assert [m["prefetch"] for m in doc["memory"]] == [16, 1000]  # the default, and --prefetch
    assert all(m["peak_mb"] >= m["idle_mb"] > 0 for m in doc["memory"])
    assert set(doc["processes"]) == {"1", "2"}
    assert {t["met"] for t in doc["targets"]} <= {True, False, None}
    assert doc["machine"]["redis_server"] and doc["options"]["repeat"] == 1
    assert await raw.keys(f"{namespace}-bench-*") == []  # everything written was deleted


async def test_json_only_and_a_selection(sh) -> None:
    done = await sh("bench", "--quick", "--only", "raw.publish,lib.publish_many", "--json")
    assert done.code == 0, done.err
    (line,) = done.out.strip().splitlines()
    assert set(json.loads(line)["throughput"]) == {"raw.publish", "lib.publish_many"}
    assert done.err == ""


async def test_unknown_scenario_is_a_usage_error(sh) -> None:
    done = await sh("bench", "--only", "publish,nope")
    assert done.code == 2
    assert "unknown scenario 'nope'" in done.err and "Traceback" not in done.err


async def test_both_loops_side_by_side_with_latency_runs(sh) -> None:
    pytest.importorskip("uvloop")
    done = await sh(
        "bench", "--quick", "--loop", "both", "--runs", "2", "--rates", "1000",
        "--latency-seconds", "0.1", "--only", "latency,raw.consume,lib.iterate",
    )  # fmt: skip
    assert done.code == 0, done.err
    assert_clean(done.err)
    *tables, last = done.out.strip().splitlines()
    text = "\n".join(tables)
    assert "| path | target | asyncio | uvloop |" in text, text
    assert "## Event loop: asyncio" in text and "## Event loop: uvloop" in text
    assert "### Latency, run by run (2 runs" in text
    assert "in ≥ 2 of 2 runs" in text
    loops = json.loads(last)["loops"]
    assert set(loops) == {"asyncio", "uvloop"}
    for name, doc in loops.items():
        assert doc["machine"]["loop"] == name
        assert len(doc["latency_runs"]) == 2
        assert doc["latency_runs"][0]["lib"]["1000"]["p50"] > 0
        assert doc["throughput"]["lib.iterate"]["vs_raw"] > 0


async def test_loop_and_uvloop_flags_conflict(sh) -> None:
    done = await sh("bench", "--loop", "asyncio", "--uvloop")
    assert done.code == 2
    assert "not both" in done.err and "Traceback" not in done.err
