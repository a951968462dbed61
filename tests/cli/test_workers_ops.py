"""`broker worker` as operators expect it: handlers from the current folder, slots retired by
memory or message count and replaced at once, RSS in the heartbeat, blocked slots shown stale."""

from __future__ import annotations

import asyncio
import json
import pathlib
import signal
import sys
import textwrap
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

import broker
from broker.workers import list_workers
from tests.cli.conftest import ENV
from tests.cli.test_workers import events, start, stop, until
from tests.conftest import compare_ids

H = "tests.helpers.handlers"


def console_script() -> str:
    """The installed ``broker`` command (not ``python -m``, which puts the folder on the path
    by itself)."""
    path = pathlib.Path(sys.executable).parent / "broker"
    assert path.exists(), f"the console script is not installed next to {sys.executable}"
    return str(path)


async def test_handlers_are_imported_from_the_current_folder(
    client: broker.Broker, name: str, namespace: str, redis_url: str, tmp_path: pathlib.Path
) -> None:
    """Like uvicorn, gunicorn, celery and arq. The application's own ``workers`` package is
    the one imported: the runtime is ``broker.workers``, so nothing shadows anything."""
    app = tmp_path / "workers"
    app.mkdir()
    (app / "__init__.py").write_text("")
    (app / "handlers.py").write_text(
        textwrap.dedent(
            """
            import os

            async def handle(msg):
                with open(os.environ["HANDLED"], "a") as f:
                    f.write(msg.id + "\\n")
            """
        )
    )
    handled = tmp_path / "handled.txt"
    handled.touch()
    sent = await client.channel(name).publish_many(range(5))
    env = {**ENV, "HANDLED": str(handled), "PYTHONSAFEPATH": "1"}  # no implicit '' on the path
    proc = await asyncio.create_subprocess_exec(
        console_script(),
        "--url",
        redis_url,
        "--namespace",
        namespace,
        "worker",
        "workers.handlers:handle",
        "--channel",
        name,
        "--group",
        "g",
        "--start",
        "all",
        "-p",
        "2",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,
        env=env,
    )
    try:

        async def all_handled() -> bool:
            return len(handled.read_text().split()) >= len(sent) or proc.returncode is not None

        await until(all_handled, "every message handled")
    finally:
        done = await stop(proc)
    assert done.code == 0, done.err[-2000:]
    compare_ids(sent, handled.read_text().split())


def _worker_args(name: str, target: str, *extra: str) -> list[str]:
    return [
        "worker",
        f"{H}:{target}",
        "--channel",
        name,
        "--group",
        "g",
        "--start",
        "all",
        "--heartbeat",
        "0.3",
        "--log-format",
        "json",
        *extra,
    ]


async def _done_rows(raw: aioredis.Redis, key: str) -> list[tuple[int, str, int]]:
    rows = [x.decode().split() for x in await raw.lrange(key, 0, -1)]
    return [(int(p), i, int(d)) for p, i, d in rows]


async def test_max_messages_retires_a_slot_and_a_fresh_one_starts_at_once(
    client: broker.Broker, name: str, namespace: str, redis_url: str, raw: aioredis.Redis
) -> None:
    ch = client.channel(name)
    sent = await ch.publish_many({"n": i} for i in range(23))
    key = f"{namespace}:done"
    proc = await start(
        redis_url,
        namespace,
        *_worker_args(name, "record_redis", "-c", "2", "--max-messages", "5"),
        env={"TEST_REDIS_URL": redis_url, "TEST_DONE_KEY": key},
    )
    try:

        async def every_one() -> bool:
            return {i for _, i, _ in await _done_rows(raw, key)} >= set(sent)

        await until(every_one, "every message handled", bound=60)
    finally:
        done = await stop(proc)
    assert done.code == 0, done.err[-3000:]
    rows = await _done_rows(raw, key)
    compare_ids(sent, [i for _, i, _ in rows])
    per_pid: dict[int, int] = {}
    for pid, _, _ in rows:
        per_pid[pid] = per_pid.get(pid, 0) + 1
    # 5, plus at most the one other handler already running when the fifth ended
    assert all(n <= 6 for n in per_pid.values()), per_pid
    assert len(per_pid) >= 4, per_pid
    log = events(done.err)
    retired = [e for e in log if e["event"] == "child_exited" and e["code"] == 4]
    assert len(retired) == len(per_pid) - 1 or len(retired) == len(per_pid), (retired, per_pid)
    assert all(e["restart"] and e["restart_in"] == 0 for e in retired), retired
    assert all(e["meaning"] == "retired" for e in retired)
    assert [e for e in log if e["event"] == "retiring"], "the slot says why it retires"
    assert not [e for e in log if e["event"] in ("handler_failed", "grace_expired")]
    # one consumer name throughout, nothing left pending
    consumers = await raw.xinfo_consumers(ch.key, "g")
    assert [(c["name"].decode(), c["pending"]) for c in consumers] == [
        (f"record-redis-{_host(log)}-0", 0)
    ]
    _report_gaps(log)


def _host(log: list[dict[str, Any]]) -> str:
    worker = next(e["worker"] for e in log if e.get("role") == "supervisor")
    return str(worker.split("/", 1)[1])


def _report_gaps(log: list[dict[str, Any]]) -> None:
    """Print how long a retired slot's replacement took (exit -> ready), for the record."""
    exits = [_t(e["ts"]) for e in log if e["event"] == "child_exited" and e["code"] == 4]
    readies = sorted(_t(e["ts"]) for e in log if e["event"] == "ready")
    gaps = [min((r - x for r in readies if r >= x), default=float("nan")) for x in exits]
    print(f"retirements: {len(exits)}; exit -> next ready: {[round(g, 2) for g in gaps]} s")


def _t(ts: str) -> float:
    whole, ms = ts.rstrip("Z").split(".")
    return time.mktime(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(ms) / 1000


async def test_max_memory_retires_a_leaking_slot_before_it_runs_out(
    client: broker.Broker, name: str, namespace: str, redis_url: str, raw: aioredis.Redis
) -> None:
    ch = client.channel(name)
    sent = await ch.publish_many({"n": i} for i in range(30))
    key = f"{namespace}:done"
    limit_mb = 120
    proc = await start(
        redis_url,
        namespace,
        *_worker_args(name, "leak", "--max-memory", str(limit_mb)),
        env={"TEST_REDIS_URL": redis_url, "TEST_DONE_KEY": key, "LEAK_MB": "8"},
    )
    try:

        async def every_one() -> bool:
            return {i for _, i, _ in await _done_rows(raw, key)} >= set(sent)

        await until(every_one, "every message handled", bound=90)
    finally:
        done = await stop(proc)
    assert done.code == 0, done.err[-3000:]
    rows = await _done_rows(raw, key)
    compare_ids(sent, [i for _, i, _ in rows])
    log = events(done.err)
    retiring = [e for e in log if e["event"] == "retiring"]
    assert retiring and all("--max-memory" in e["reason"] for e in retiring), retiring
    retired = [e for e in log if e["event"] == "child_exited" and e["code"] == 4]
    assert len(retired) >= 2 and all(e["restart_in"] == 0 for e in retired), retired
    assert not [e for e in log if e["event"] in ("handler_failed", "failed", "fatal")]
    # checked after every message: a slot retires after the message that crossed the limit,
    # so at most one leak (8 MiB) above it
    at_retirement = [e["rss_mib"] for e in retiring]
    assert all(limit_mb <= mib < limit_mb + 16 for mib in at_retirement), at_retirement
    per_pid: dict[int, int] = {}
    for pid, _, _ in rows:
        per_pid[pid] = per_pid.get(pid, 0) + 1
    print(
        f"max-memory {limit_mb} MiB, 8 MiB kept per message: {len(retired)} retirements, "
        f"messages per slot {sorted(per_pid.values())}, MiB at retirement {at_retirement}"
    )
    _report_gaps(log)
    assert (await raw.xpending(ch.key, "g"))["pending"] == 0


async def test_a_slot_with_a_blocked_event_loop_is_listed_stale_not_gone(
    client: broker.Broker, name: str, namespace: str, redis_url: str, sh: Any
) -> None:
    proc = await start(
        redis_url,
        namespace,
        *_worker_args(name, "block_loop"),
        env={"BLOCK_SECONDS": "4"},
    )
    try:

        async def running() -> bool:
            return [(w.state, w.alive) for w in await list_workers(client)] == [("running", True)]

        await until(running, "the slot running")
        [before] = await list_workers(client)
        assert before.rss is not None and 10 * 2**20 < before.rss < 2**31, before.rss
        await client.channel(name).publish("block")

        async def stale() -> bool:
            rows = await list_workers(client)
            return len(rows) == 1 and not rows[0].alive and rows[0].age > 1.5

        await until(stale, "the slot listed stale", bound=10)
        table = await sh("workers")
        listed = await sh("workers", "--json")
        await until(running, "the slot alive again once its loop is free", bound=15)
    finally:
        done = await stop(proc)
    assert done.code == 0, done.err[-2000:]
    [row] = json.loads(listed.out)
    assert (row["alive"], row["state"]) == (False, "running"), row
    assert row["age"] > 3 * row["interval"] and row["rss"] > 0
    head, line = table.out.splitlines()
    assert "RSS" in head and "LAST SEEN" in head
    assert " stale " in line and "ago" in line, line


def test_a_signal_while_retiring_is_a_stop_not_a_forced_exit() -> None:
    from broker.workers._serve import _Slot
    from broker.workers._spec import WorkerSpec

    async def check() -> None:
        spec = WorkerSpec(name="w", kind="consume", target="m:f", channels=("a",), group="g")
        slot = _Slot(spec, 0)
        slot.retire("handled 5 messages (--max-messages)")
        assert slot.stop.stopped and slot.retiring
        slot.on_signal(signal.SIGTERM)
        assert slot.forced is None and slot.retiring is None, "a plain stop now, not retired"
        assert slot.reason == "signal SIGTERM"
        # (a second signal forces, as always: not called here, it arms an os._exit timer)

    asyncio.run(_bounded(check()))


async def _bounded(coro: Any) -> None:
    async with asyncio.timeout(5):
        await coro


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-memory", "0"], "0 is not in the range x>=1"),
        (["--max-messages", "-1"], "-1 is not in the range x>=1"),
    ],
)
async def test_retirement_options_are_checked(invoke, name, extra, message) -> None:
    result = await invoke("worker", f"{H}:record", "--channel", name, "-g", "g", *extra)
    assert result.exit_code == 2 and message in result.stderr, result.output


async def test_retirement_options_are_for_consumers(invoke, name) -> None:
    result = await invoke("worker", f"{H}:numbers", "--channel", name, "--max-messages", "5")
    assert result.exit_code == 2, result.output
    assert "--max-messages is for consumers" in result.stderr
