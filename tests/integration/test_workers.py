"""The worker runtime: serve(), graceful and forced shutdown, heartbeats, the supervisor."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

import broker
from tests.conftest import compare_ids
from tests.helpers import handlers
from workers import Supervisor, WorkerSpec, list_workers, serve

ROOT = Path(__file__).resolve().parents[2]


def spec_for(redis_url: str, namespace: str, name: str, target: str, **kw: object) -> WorkerSpec:
    return WorkerSpec(
        name="w" + name[-6:],
        kind="consume",
        target=f"tests.helpers.handlers:{target}",
        channels=(name,),
        group="g",
        url=redis_url,
        namespace=namespace,
        start="all",
        heartbeat=0.2,
        **kw,  # type: ignore[arg-type]
    )


async def test_serve_consumes_reports_health_and_stops_remotely(
    client: broker.Broker, name: str, namespace: str, redis_url: str, raw: aioredis.Redis
) -> None:
    ch = client.channel(name)
    sent = await ch.publish_many(range(20))
    spec = spec_for(redis_url, namespace, name, "record", concurrency=4)
    handlers.recorded.clear()
    ready = asyncio.Event()
    task = asyncio.create_task(serve(spec, 0, ready=ready.set))
    try:
        async with asyncio.timeout(20):
            await ready.wait()
            while len(handlers.recorded) < 20:
                await asyncio.sleep(0.02)
        status = await list_workers(client)
        assert [(s.name, s.state, s.alive) for s in status] == [(spec.name, "running", True)]
        await client.stop_source(f"workers/{spec.name}").stop("deploy")
        await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
    compare_ids(sent, handlers.recorded)
    assert await list_workers(client) == []
    assert (await raw.xpending(ch.key, "g"))["pending"] == 0
    await client.stop_source(f"workers/{spec.name}").reset()


async def test_grace_period_then_cancel_leaves_the_message_pending(
    client: broker.Broker, name: str, namespace: str, redis_url: str, raw: aioredis.Redis
) -> None:
    ch = client.channel(name)
    await ch.publish("stuck")
    spec = spec_for(redis_url, namespace, name, "hang", grace=0.3)
    handlers.recorded.clear()
    source = broker.StopSource()
    task = asyncio.create_task(serve(spec, 0, stop=source.token))
    async with asyncio.timeout(20):
        while not handlers.recorded:
            await asyncio.sleep(0.02)
    t0 = time.monotonic()
    source.stop("shutdown")
    await asyncio.wait_for(task, 10)
    assert 0.3 <= time.monotonic() - t0 < 3
    pending = await raw.xpending_range(ch.key, "g", "-", "+", 10)
    assert [p["consumer"].decode() for p in pending] == [spec.consumer_name(0)]


def test_spec_errors_are_clear() -> None:
    with pytest.raises(broker.ConfigurationError, match="needs a group"):
        WorkerSpec(name="x", kind="consume", target="m:f", channels=("a",))
    with pytest.raises(broker.ConfigurationError, match="package.module:function"):
        from workers import load_target

        load_target("nocolon")
    with pytest.raises(ValueError, match="processes"):
        Supervisor(WorkerSpec(name="x", kind="produce", target="m:f", channels=("a",)), 0)


async def test_supervisor_restarts_a_killed_slot_and_stops_gracefully(
    client: broker.Broker, name: str, namespace: str, redis_url: str, raw: aioredis.Redis
) -> None:
    ch = client.channel(name)
    sent = await ch.publish_many(range(60))
    spec = spec_for(redis_url, namespace, name, "record_redis", concurrency=2)
    done_key = f"{namespace}:done"
    env = {**os.environ, "TEST_REDIS_URL": redis_url, "TEST_DONE_KEY": done_key}
    sup = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.supervise", spec.to_json(), "2"],
        cwd=ROOT,
        env=env,
    )
    try:
        async with asyncio.timeout(30):
            while len(workers := await list_workers(client)) < 2 or await raw.llen(done_key) < 5:
                await asyncio.sleep(0.05)
        victim = workers[0]
        os.kill(victim.pid, signal.SIGKILL)
        async with asyncio.timeout(40):
            while True:
                now = {w.slot: w.pid for w in await list_workers(client) if w.alive}
                if now.get(victim.slot) not in (None, victim.pid):
                    break
                await asyncio.sleep(0.05)
            while set(x.decode() for x in await raw.lrange(done_key, 0, -1)) < set(sent):
                await asyncio.sleep(0.05)
        sup.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(sup.wait, 30)
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
    assert code == 0
    compare_ids(sent, set(x.decode() for x in await raw.lrange(done_key, 0, -1)))
    assert (await raw.xpending(ch.key, "g"))["pending"] == 0
    # the restarted slot reused the killed one's heartbeat field and removed it on exit
    assert await list_workers(client) == []
    consumers = {c["name"].decode() for c in await raw.xinfo_consumers(ch.key, "g")}
    assert consumers == {spec.consumer_name(0), spec.consumer_name(1)}, "stable per slot"


async def test_a_failing_worker_ends_with_its_error_instead_of_hanging(
    client: broker.Broker, name: str, namespace: str, redis_url: str, raw: aioredis.Redis
) -> None:
    spec = spec_for(redis_url, namespace, name, "record")
    await raw.set(client.channel(name).key, "not a stream")
    with pytest.raises(broker.WrongTypeError):
        await asyncio.wait_for(serve(spec, 0), 15)
    assert await list_workers(client) == [], "no heartbeat left claiming it is alive"


async def test_remote_stop_ends_the_supervisor_instead_of_restarting(
    client: broker.Broker, name: str, namespace: str, redis_url: str
) -> None:
    spec = spec_for(redis_url, namespace, name, "record", grace=1.0)
    sup = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.supervise", spec.to_json(), "2"], cwd=ROOT
    )
    try:
        async with asyncio.timeout(30):
            while len(await list_workers(client)) < 2:
                await asyncio.sleep(0.05)
        await client.stop_source(f"workers/{spec.name}").stop("deploy done")
        code = await asyncio.to_thread(sup.wait, 20)
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
    assert code == 0
    await client.stop_source(f"workers/{spec.name}").reset()
