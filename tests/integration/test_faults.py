"""Faults found under test (issue 11): each test failed before its fix.

- a stalled server (SIGSTOP: TCP still connects) must not outlast ``reconnect_deadline``;
- a pub/sub permission error surfaces at the stop token, and nothing else in the process stops;
- ``GroupMissingError`` names the channel that lost its group in a merged subscription;
- entries trimmed while waiting for a retry are acked, logged and counted;
- a password in a bad URL still gives ``ConfigurationError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

import broker
from broker import EmbeddedServer

# generous bounds: each catches the old behaviour (15-30 s), not a slow machine
SLACK = 4.0


@pytest.fixture
def own_server() -> Iterator[EmbeddedServer]:
    """A server of this test's own, which the test may stop with SIGSTOP."""
    with EmbeddedServer() as server:
        yield server


@contextlib.contextmanager
def stalled(server: EmbeddedServer) -> Iterator[None]:
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


async def test_stalled_server_fails_iteration_and_publish_within_the_deadline(
    own_server: EmbeddedServer, name: str
) -> None:
    async with broker.connect(own_server.url, reconnect_deadline=2, connect_timeout=1) as b:
        ch = b.channel(name)
        await ch.publish({"n": 0})
        async with ch.subscribe(group="g", start="all", block=0.2) as messages:
            first = await anext(messages)
            first.ack()
            await messages.flush()
            with stalled(own_server):
                t0 = time.monotonic()
                with pytest.raises(broker.ConnectionLostError):
                    await ch.publish({"n": 1})
                publish_took = time.monotonic() - t0
                t0 = time.monotonic()
                with pytest.raises(broker.ConnectionLostError):
                    await anext(messages)
                iterate_took = time.monotonic() - t0
                t0 = time.monotonic()
            close_took = time.monotonic() - t0  # leaving the subscription while stalled
    assert publish_took < 2 + SLACK, publish_took
    assert iterate_took < 2 + SLACK, iterate_took
    assert close_took < 2 + SLACK, close_took


async def test_leaving_a_subscription_on_a_stalled_server_is_bounded(
    own_server: EmbeddedServer, name: str
) -> None:
    async with broker.connect(own_server.url, reconnect_deadline=2, connect_timeout=1) as b:
        ch = b.channel(name)
        await ch.publish_many([{"n": i} for i in range(5)])
        async with ch.subscribe(group="g", start="all", prefetch=5) as messages:
            msg = await anext(messages)
            while messages.statistics().buffered < 4:
                await asyncio.sleep(0.01)
            with stalled(own_server):
                msg.ack()  # an ack to flush and four buffered to release: both stall
                t0 = time.monotonic()
                await messages.aclose()
                took = time.monotonic() - t0
    assert took < 2 + SLACK, took


async def test_opening_a_client_on_a_stalled_server_is_bounded(own_server: EmbeddedServer) -> None:
    with stalled(own_server):
        t0 = time.monotonic()
        with pytest.raises(broker.ConnectionLostError, match="cannot connect"):
            async with broker.connect(own_server.url, reconnect_deadline=2, connect_timeout=1):
                pass
        took = time.monotonic() - t0
    assert took < 1 + SLACK, took


@pytest.fixture
async def no_channel_user(
    redis_url: str, raw: aioredis.Redis, namespace: str
) -> AsyncIterator[str]:
    """A URL for an ACL user with every command on the namespace's keys but no pub/sub
    channel at all."""
    user = f"u{namespace}"
    await raw.execute_command(
        "ACL", "SETUSER", user, "on", ">pw", f"~{namespace}:*", "resetchannels", "+@all"
    )
    host_part = redis_url.split("://", 1)[1]
    yield f"redis://{user}:pw@{host_part}"
    await raw.execute_command("ACL", "DELUSER", user)


async def test_pubsub_permission_error_surfaces_at_the_token_only(
    no_channel_user: str, namespace: str, name: str
) -> None:
    async with broker.connect(no_channel_user, namespace=namespace, reconnect_deadline=2) as b:
        ch = b.channel(name)
        published: list[str] = []
        done = asyncio.Event()

        async def publish_meanwhile() -> None:
            for i in range(50):
                published.append(await ch.publish({"i": i}))
                await asyncio.sleep(0.01)
            done.set()

        task = asyncio.create_task(publish_meanwhile())
        with pytest.raises(broker.PermissionDeniedError) as caught:
            async with b.stop_token("deploy"):
                pass
        assert "deploy" in str(caught.value) or "stop" in str(caught.value), caught.value
        with pytest.raises(broker.PermissionDeniedError) as fired:
            await b.stop_source("deploy").stop("why")
        text = str(fired.value)
        assert "\\x" not in text and "b'" not in text, text  # no raw msgpack in the message
        await asyncio.wait_for(done.wait(), 30)
        await task
        assert len(published) == 50
        # the broker still works afterwards, and so does a second try
        assert await ch.publish({"after": True})
        with pytest.raises(broker.PermissionDeniedError):
            async with b.stop_token("deploy"):
                pass
        assert len(await ch.publish_many([{"x": 1}, {"x": 2}])) == 2


@pytest.mark.parametrize("how", ["delete the stream", "destroy the group"])
async def test_group_missing_names_the_channel_that_lost_it(
    client: broker.Broker, raw: aioredis.Redis, name: str, how: str
) -> None:
    a, b = client.channel(f"{name}-a"), client.channel(f"{name}-b")
    async with client.subscribe([a, b], group="g", block=5.0) as messages:
        await asyncio.sleep(0.3)  # the blocking read is on the wire
        if how == "delete the stream":
            await raw.delete(b.key)
        else:
            await raw.xgroup_destroy(b.key, "g")
        with pytest.raises(broker.GroupMissingError) as caught:
            await asyncio.wait_for(anext(messages), 10)
    assert caught.value.channel == b.name, caught.value


async def test_trimmed_while_waiting_for_retry_is_counted(
    client: broker.Broker, raw: aioredis.Redis, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    ch = client.channel(name)
    await ch.publish_many([{"n": i} for i in range(3)])
    async with ch.subscribe(group="g", start="all") as messages:
        got = [await anext(messages) for _ in range(3)]
        for m in got:
            m.nack(delay=0.5)
        await messages.flush()
        await raw.xtrim(ch.key, maxlen=0)
        deadline = time.monotonic() + 10
        while messages.statistics().trimmed < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stats = messages.statistics()
    assert stats.trimmed == 3, stats
    assert (await raw.xpending(ch.key, "g"))["pending"] == 0
    trimmed_lines = [r for r in caplog.records if "trimmed while pending" in r.getMessage()]
    assert len(trimmed_lines) == 3, [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize(
    "url",
    ["redis://alice:pw@127.0.0.1:notaport/0", "redis://:pw@127.0.0.1:99999999/0"],
)
def test_bad_url_with_a_password_is_a_configuration_error(url: str) -> None:
    with pytest.raises(broker.ConfigurationError) as caught:
        broker.connect(url)
    assert "pw" not in str(caught.value), caught.value


def test_bad_url_with_a_password_is_a_usage_error_in_the_cli() -> None:
    from click.testing import CliRunner

    from broker.cli.main import cli

    result = CliRunner().invoke(cli, ["--url", "redis://alice:pw@127.0.0.1:notaport/0", "info"])
    assert result.exit_code == 2, result.output
    assert "invalid URL" in result.output and "pw@" not in result.output, result.output


async def test_a_server_older_than_7_is_refused_at_connect(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = aioredis.Redis.info

    async def old_info(self: aioredis.Redis, section: str | None = None, *args: object) -> dict:
        info = await real(self, section, *args)
        return {**info, "redis_version": "6.2.14"}

    monkeypatch.setattr(aioredis.Redis, "info", old_info)
    with pytest.raises(broker.ConfigurationError, match=r"runs Redis 6\.2\.14; broker needs"):
        async with broker.connect(redis_url):
            pass
