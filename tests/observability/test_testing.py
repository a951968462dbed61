"""broker.testing.run_handler on the real server: acks, retries, dead letters, a timeout."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import broker
from broker.testing import isolated, run_handler


async def test_acks_every_message_and_returns_what_the_handler_returned(
    broker_client: broker.Broker, name: str, raw: Any
) -> None:
    async def double(msg: broker.Message[Any]) -> int:
        return int(msg.data["n"]) * 2

    run = await run_handler(broker_client, name, double, [{"n": i} for i in range(20)])
    assert len(run.ids) == 20 and run.acked == run.ids
    assert not run.failures and not run.dead_letters
    assert sorted(run.results().values()) == [i * 2 for i in range(20)]
    # settled on the server: nothing pending, the group saw everything
    key = f"{broker_client.namespace}:{{{name}}}"
    assert (await raw.xpending(key, "test"))["pending"] == 0
    groups = await raw.xinfo_groups(key)
    assert groups[0]["last-delivered-id"].decode() == run.ids[-1]


async def test_a_failure_is_retried_and_one_that_always_fails_is_dead_lettered(
    broker_client: broker.Broker, name: str
) -> None:
    seen: dict[Any, int] = {}

    async def flaky(msg: broker.Message[Any]) -> None:
        seen[msg.data] = seen.get(msg.data, 0) + 1
        if msg.data == "poison" or (msg.data == "flaky" and msg.deliveries == 1):
            raise ValueError(f"cannot take {msg.data}")

    run = await run_handler(
        broker_client,
        name,
        flaky,
        ["ok", "flaky", ("poison", {"k": "v"})],
        max_deliveries=3,
    )
    ok, flaky_id, poison = run.ids
    assert run.acked == [ok, flaky_id]
    assert [d.original_id for d in run.dead_letters] == [poison]
    assert "cannot take poison" in run.dead_letters[0].error
    assert seen == {"ok": 1, "flaky": 2, "poison": 3}
    tries = [(c.id, c.deliveries, type(c.error).__name__) for c in run.failures]
    expected = [(flaky_id, 1, "ValueError")] + [(poison, n, "ValueError") for n in (1, 2, 3)]
    assert sorted(tries) == sorted(expected)
    assert next(c.headers for c in run.calls if c.id == poison) == {"k": "v"}


async def test_a_hanging_handler_times_out_naming_the_message(
    broker_client: broker.Broker, name: str
) -> None:
    async def hang(msg: broker.Message[Any]) -> None:
        if msg.data == "stuck":
            await asyncio.sleep(3600)

    with pytest.raises(TimeoutError) as info:
        await run_handler(broker_client, name, hang, ["fine", "stuck"], within=0.5)
    text = str(info.value)
    assert "1 of 2 messages not settled after 0.5s" in text, text


async def test_isolated_deletes_every_key_of_its_namespace(broker_url: str, raw: Any) -> None:
    async with isolated(broker_url) as b:
        ns = b.namespace
        await b.channel("a").publish(1)
        await b.channel("b").create_group("g")
        await b.stop_source("s").stop("x")
        assert len([k async for k in raw.scan_iter(match=f"{ns}:*")]) >= 3
    assert [k async for k in raw.scan_iter(match=f"{ns}:*")] == []
