"""broker.metrics: a real scrape over HTTP, parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import broker
import broker.metrics
from broker.testing import isolated, run_handler


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    reg = CollectorRegistry()
    broker.metrics.enable(reg, sample_interval=0.2)
    try:
        yield reg
    finally:
        broker.metrics.disable()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_scrape_matches_what_was_published_and_handled(
    registry: CollectorRegistry, redis_url: str, name: str
) -> None:
    with broker.metrics.serve(0, "127.0.0.1", registry) as port:
        async with isolated(redis_url) as b:
            ns = b.namespace
            ch = b.channel(name)
            await ch.publish_many([{"n": -1}])  # before the group: not handled by it

            async def handle(msg: broker.Message[Any]) -> None:
                await asyncio.sleep(0.002)
                if msg.data["n"] % 10 == 3 and msg.deliveries == 1:
                    raise ValueError("first try fails")
                if msg.data["n"] == 7:
                    raise ValueError("always fails")

            run = await run_handler(
                b, ch, handle, [{"n": i} for i in range(40)], group="billing", max_deliveries=2
            )
            for i in range(5):  # through publish(): its pipelines are counted too
                await ch.publish({"n": 100 + i})
            # a live subscription that holds 3 unacked: pending, lag and age are sampled
            async with ch.subscribe(group="audit", start="all", prefetch=3) as sub:
                held = [await anext(sub) for _ in range(3)]
                await asyncio.sleep(0.05)
                live = await asyncio.to_thread(scrape, port)
                assert len(held) == 3
            await asyncio.sleep(0.3)
            after = await asyncio.to_thread(scrape, port)
    failures = len(run.failures)
    assert failures == 4 + 2, run.failures  # n=3,13,23,33 once; n=7 twice (then dead)
    calls = len(run.calls)
    assert calls == 40 + 5  # each failure but the last of n=7 is delivered again
    g = {"namespace": ns, "channel": name, "group": "billing"}
    assert value(after, "broker_published_messages_total", namespace=ns, channel=name) == 46
    assert value(after, "broker_delivered_messages_total", **g) == calls
    assert value(after, "broker_acked_messages_total", **g) == 39
    assert value(after, "broker_nacked_messages_total", **g) == failures
    assert value(after, "broker_dead_lettered_messages_total", **g) == 1
    assert value(after, "broker_handler_failures_total", **g) == failures
    assert value(after, "broker_handler_duration_seconds_count", **g) == calls
    assert value(after, "broker_handler_duration_seconds_bucket", le="0.001", **g) == 0
    assert value(after, "broker_handler_duration_seconds_bucket", le="+Inf", **g) == calls
    assert calls * 0.002 <= value(after, "broker_handler_duration_seconds_sum", **g) < 60
    batches = value(after, "broker_publish_batch_messages_count", namespace=ns)
    assert value(after, "broker_publish_batch_messages_sum", namespace=ns) == 5
    assert 1 <= batches <= 5
    audit = {"namespace": ns, "channel": name, "group": "audit"}
    assert value(live, "broker_subscriptions", **audit) == 1
    assert value(live, "broker_in_flight_messages", **audit) == 3
    assert value(live, "broker_group_pending_messages", **audit) == 3
    assert value(live, "broker_group_lag_messages", **audit) == 46 - 3
    assert value(live, "broker_channel_length_messages", namespace=ns, channel=name) == 46
    assert value(live, "broker_dead_letter_messages", namespace=ns, channel=name) == 1
    assert 0 <= value(live, "broker_group_oldest_pending_age_seconds", **audit) < 60
    # closed: its counters stay in the totals, its gauges are gone
    assert value(after, "broker_delivered_messages_total", **audit) == 3
    assert ("broker_subscriptions", tuple(sorted(audit.items()))) not in after
    # and its group's sampled values are no longer reported once nobody reads it here
    assert ("broker_group_pending_messages", tuple(sorted(audit.items()))) not in after
    assert value(after, "broker_sample_errors_total") == 0


async def test_a_closed_subscription_is_forgotten_but_counted(
    registry: CollectorRegistry, client: broker.Broker, name: str
) -> None:
    collector = broker.metrics.enable(registry)
    ch = client.channel(name)
    await ch.publish_many(range(4))
    async with ch.subscribe(group="g", start="all") as sub:
        for _ in range(4):
            (await anext(sub)).ack()
    del sub
    gc.collect()
    families = {f.name: f for f in registry.collect()}
    acked = families["broker_acked_messages"].samples
    assert [(s.labels["group"], s.value) for s in acked] == [("g", 4.0)]
    assert collector._subs == {}


def test_nothing_optional_is_imported_when_not_used(redis_url: str) -> None:
    """Without the optional libraries (OpenTelemetry blocked as if not installed), a publish
    and a consume work and import none of them, nor broker.metrics / broker.tracing."""
    code = f"""
import asyncio, sys
sys.modules["opentelemetry"] = None  # as if not installed (redis-py imports it when it is)
import broker

async def main():
    async with broker.connect({redis_url!r}, namespace="t-noimport") as b:
        ch = b.channel("x")
        await ch.publish(1)
        seen = []
        async def handle(msg):
            seen.append(msg.data)
        sub_stop = broker.StopSource()
        task = asyncio.create_task(
            b.consume(ch, handle, group="g", start="all", stop=sub_stop.token)
        )
        while not seen:
            await asyncio.sleep(0.01)
        sub_stop.stop()
        await task
        await ch.delete()

asyncio.run(main())
optional = ("prometheus_client", "opentelemetry", "rich")
bad = [m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in optional]
bad += [m for m in ("broker.metrics", "broker.tracing") if m in sys.modules]
print(bad)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out


async def test_request_counters(registry: CollectorRegistry, redis_url: str, name: str) -> None:
    async with isolated(redis_url) as b:
        ch = b.channel(name)

        async def slow(msg: broker.Message[Any]) -> Any:
            await asyncio.sleep(msg.data)
            return msg.data

        task = asyncio.create_task(b.consume(name, slow, group="g", start="all", concurrency=2))
        try:
            with pytest.raises(broker.RequestTimeoutError):
                await ch.request(0.5, timeout=0.1)
            assert await ch.request(0, timeout=5) == 0
            for _ in range(100):
                if b.request_statistics().dropped:
                    break
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        families = {f.name: f for f in registry.collect()}
        ns = b.namespace

        def count(metric: str) -> float:
            (sample,) = [s for s in families[metric].samples if s.labels["namespace"] == ns]
            return sample.value

        assert count("broker_requests_answered") == 1
        assert count("broker_requests_timed_out") == 1
        assert count("broker_replies_dropped") == 1


async def test_watch_counters(registry: CollectorRegistry, redis_url: str, name: str) -> None:
    async with isolated(redis_url) as b:
        ns = b.namespace

        def sample(metric: str) -> float:
            families = {f.name: f for f in registry.collect()}
            (s,) = [s for s in families[metric].samples if s.labels["namespace"] == ns]
            return s.value

        w = b.watch(name)
        await w.set("a")  # version 1
        async with w.subscribe() as values:
            assert (await asyncio.wait_for(anext(values), 5)).version == 1
            assert sample("broker_watch_readers") == 1
            await w.set("b")
            assert (await asyncio.wait_for(anext(values), 5)).version == 2
            with pytest.raises(broker.VersionConflictError):
                await w.set("c", if_version=1)
            with pytest.raises(broker.VersionConflictError):
                await w.delete(if_version=1)
            assert await w.delete(if_version=2)
            assert not await w.delete()  # nothing to delete: not counted
        stats = values.statistics()
        assert b.watch_statistics() == broker.WatchTotals(
            sets=2, deletes=1, conflicts=2, readers=0, yielded=2, rereads=stats.rereads
        )
        assert stats.rereads >= 1  # the first value is read from the server
        assert sample("broker_watch_sets") == 2
        assert sample("broker_watch_deletes") == 1
        assert sample("broker_watch_conflicts") == 2
        assert sample("broker_watch_values_seen") == 2
        assert sample("broker_watch_rereads") == stats.rereads
        assert sample("broker_watch_readers") == 0
    # a closed broker's counts stay in the totals; its readers gauge goes with it
    assert sample("broker_watch_sets") == 2
    families = {f.name: f for f in registry.collect()}
    assert not [s for s in families["broker_watch_readers"].samples if s.labels["namespace"] == ns]
