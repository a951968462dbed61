"""Request/reply: round trips, many requests over one inbox, timeouts, late answers, remote
errors, a responder killed mid-request, the inbox's lifetime, ``broker worker`` answering."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

import broker
from broker._request import REPLY_CLIENT_NAME, REPLY_ID, REPLY_TO
from broker.workers import WorkerSpec, serve

SERVERS = ("single", "cluster")
ROOT = Path(__file__).resolve().parents[2]


class OutOfStockError(Exception):
    pass


async def until(check: Callable[[], Any], what: str, bound: float = 20) -> None:
    deadline = time.monotonic() + bound
    while True:
        ok = check()
        if asyncio.iscoroutine(ok):
            ok = await ok
        if ok:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {bound}s: {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def responding(
    b: broker.Broker, name: str, handler: Any, **options: Any
) -> AsyncIterator[None]:
    """``b.consume(name, handler)`` in a task for the block (subscribed before it starts)."""
    options.setdefault("start", "all")
    options.setdefault("concurrency", 4)
    task = asyncio.create_task(b.consume(name, handler, group="responders", **options))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def spawn_responder(server: str, namespace: str, name: str, consumer: str, out: Path, claim=60.0):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.helpers.responder",
            server,
            namespace,
            name,
            "responders",
            consumer,
            str(out),
            str(claim),
        ],
        cwd=ROOT,
    )


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def reply_clients(raw: Any) -> int:
    """Connections named like the inbox reader's, over every node."""
    if hasattr(raw, "nodes_manager"):
        lists = await raw.client_list(target_nodes=raw.get_primaries())
        if isinstance(lists, dict):
            lists = [c for v in lists.values() for c in v]
    else:
        lists = await raw.client_list()
    return sum(1 for c in lists if c.get("name") == REPLY_CLIENT_NAME)


def inbox_readers() -> int:
    return sum(1 for t in asyncio.all_tasks() if t.get_name().startswith("broker-inbox"))


# -- round trips ------------------------------------------------------------------------------


async def test_round_trip(client: broker.Broker, name: str, raw: Any) -> None:
    async def double(msg: broker.Message[Any]) -> Any:
        assert msg.is_request and msg.reply_to is not None
        return {"n": msg.data["n"] * 2, "h": msg.headers.get("k")}

    ch = client.channel(name)
    assert client.request_statistics() == broker.RequestStatistics(0, 0, 0, 0, None)
    async with responding(client, name, double):
        assert await ch.request({"n": 21}, headers={"k": "v"}) == {"n": 42, "h": "v"}
        assert await ch.request({"n": 1}, timeout=2) == {"n": 2, "h": None}
    stats = client.request_statistics()
    assert (stats.waiting, stats.answered, stats.timed_out, stats.dropped) == (0, 2, 0, 0)
    assert stats.inbox is not None and stats.inbox.startswith(f"{client.namespace}:{{reply~")
    ttl = await raw.pttl(stats.inbox)
    assert 0 < ttl <= 60_000, "the inbox has a time to live"
    assert await raw.xlen(stats.inbox) == 0, "answers read are deleted"
    assert name in await client.channels() and len(await client.channels()) == 1, (
        "the inbox is not a channel"
    )


async def test_plain_messages_are_handled_as_before(client: broker.Broker, name: str) -> None:
    seen: list[Any] = []

    async def handler(msg: broker.Message[Any]) -> Any:
        assert not msg.is_request and msg.reply_to is None
        seen.append(msg.data)
        return "ignored"

    ch = client.channel(name)
    async with responding(client, name, handler):
        await ch.publish(1)
        await until(lambda: seen == [1], "handled")
    assert client.request_statistics().inbox is None, "no inbox without a request"


async def test_many_requests_two_responder_processes_one_reply_connection(
    client: broker.Broker, server: str, namespace: str, name: str, raw: Any, tmp_path: Path
) -> None:
    outs = [tmp_path / "a.out", tmp_path / "b.out"]
    procs = [
        spawn_responder(server, namespace, name, c, o) for c, o in zip("ab", outs, strict=True)
    ]
    try:
        await until(lambda: all("ready" in lines(o) for o in outs), "responders ready")
        ch = client.channel(name)
        n = 1000
        async with asyncio.timeout(60):
            answers = await asyncio.gather(*(ch.request({"n": i}, timeout=30) for i in range(n)))
        assert [a["n"] for a in answers] == [2 * i for i in range(n)], "each got its own answer"
        by = {a["by"] for a in answers}
        assert by == {"a", "b"}, f"both responders answered: {by}"
        assert inbox_readers() == 1
        assert await reply_clients(raw) == 1, "one reply connection served every request"
        stats = client.request_statistics()
        assert (stats.answered, stats.waiting, stats.dropped) == (n, 0, 0)
    finally:
        for p in procs:
            stop(p)


async def test_no_answer_raises_the_typed_timeout(client: broker.Broker, name: str) -> None:
    started = time.monotonic()
    with pytest.raises(broker.RequestTimeoutError, match="within 0.3s") as info:
        await client.channel(name).request({"n": 1}, timeout=0.3)
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, broker.BrokerError)
    assert info.value.channel == name
    assert time.monotonic() - started < 2
    stats = client.request_statistics()
    assert (stats.timed_out, stats.waiting) == (1, 0)
    with pytest.raises(ValueError, match="timeout must be > 0"):
        await client.channel(name).request(1, timeout=0)
    with pytest.raises(ValueError, match="set by request"):
        await client.channel(name).request(1, headers={REPLY_TO: "x"})


async def test_late_answer_is_dropped_and_counted(client: broker.Broker, name: str) -> None:
    async def slow_first(msg: broker.Message[Any]) -> Any:
        await asyncio.sleep(msg.data["sleep"])
        return msg.data["n"]

    ch = client.channel(name)
    async with responding(client, name, slow_first, concurrency=2):
        with pytest.raises(broker.RequestTimeoutError):
            await ch.request({"n": 1, "sleep": 0.8}, timeout=0.3)
        assert await ch.request({"n": 2, "sleep": 0}, timeout=5) == 2
        await until(lambda: client.request_statistics().dropped == 1, "the late answer dropped")
        assert await ch.request({"n": 3, "sleep": 0}, timeout=5) == 3
    stats = client.request_statistics()
    assert (stats.answered, stats.timed_out, stats.dropped) == (2, 1, 1)


async def test_handler_raising_answers_remote_error(client: broker.Broker, name: str) -> None:
    async def fail(msg: broker.Message[Any]) -> Any:
        if msg.data == "builtin":
            raise ValueError("bad input: 3")
        if msg.data == "unencodable":
            return object()
        raise OutOfStockError(f"no {msg.data}")

    ch = client.channel(name)
    async with responding(client, name, fail, max_deliveries=1):
        with pytest.raises(broker.RemoteError) as info:
            await ch.request("builtin")
        assert (info.value.type, info.value.text) == ("ValueError", "bad input: 3")
        with pytest.raises(broker.RemoteError) as info:
            await ch.request("A1")
        assert info.value.type == f"{__name__}.OutOfStockError" and info.value.text == "no A1"
        with pytest.raises(broker.RemoteError) as info:
            await ch.request("unencodable")
        assert info.value.type == "TypeError" and "msgpack" in info.value.text
    dead = await ch.dead_letters()
    assert len(dead) == 2, "a raise still follows the dead-letter policy"


async def test_subscribe_users_answer_with_msg_reply(client: broker.Broker, name: str) -> None:
    ch = client.channel(name)
    async with ch.subscribe(group="g", start="all") as messages:
        pending = asyncio.create_task(ch.request({"q": 1}, timeout=10))
        await ch.publish("plain")
        handled = 0
        async for msg in messages:
            if msg.is_request:
                assert await msg.reply({"a": msg.data["q"] + 1}) is True
            else:
                with pytest.raises(ValueError, match="not a request"):
                    await msg.reply(1)
            msg.ack()
            handled += 1
            if handled == 2:
                break
        assert await pending == {"a": 2}


async def test_a_handler_that_replies_itself_answers_once(client: broker.Broker, name: str) -> None:
    async def handler(msg: broker.Message[Any]) -> Any:
        assert await msg.reply("mine")
        return "ignored: already answered"

    async with responding(client, name, handler):
        assert await client.channel(name).request(1) == "mine"
        assert await client.channel(name).request(2) == "mine"
    stats = client.request_statistics()
    assert (stats.answered, stats.dropped) == (2, 0), "no second answer was sent"


async def test_an_answer_never_recreates_a_dead_inbox(
    client: broker.Broker, name: str, raw: Any
) -> None:
    gone = f"{client.namespace}:{{reply~{'0' * 32}}}"
    forged = {REPLY_TO: gone, REPLY_ID: "1"}
    ch = client.channel(name)
    answered: list[bool] = []
    async with ch.subscribe(group="g", start="all") as messages:
        await ch.publish(1, headers=forged)
        await ch.publish(2, headers={REPLY_TO: f"{client.namespace}:{{{name}}}", REPLY_ID: "1"})
        async for msg in messages:
            if msg.data == 1:
                assert msg.is_request
                answered.append(await msg.reply("late"))
            else:
                assert not msg.is_request, "only inbox keys are reply addresses"
            msg.ack()
            if msg.data == 2:
                break
    assert answered == [False]
    assert not await raw.exists(gone)
    assert (await ch.info()).length == 2, "nothing written to the channel"


# -- failures and lifetimes -------------------------------------------------------------------


async def test_responder_killed_mid_request(
    client: broker.Broker, server: str, namespace: str, name: str, tmp_path: Path
) -> None:
    a_out, b_out = tmp_path / "a.out", tmp_path / "b.out"
    a = spawn_responder(server, namespace, name, "a", a_out, claim=1.0)
    b = None
    try:
        await until(lambda: "ready" in lines(a_out), "responder a ready")
        ch = client.channel(name)
        async with asyncio.timeout(30):  # never hangs
            pending = asyncio.create_task(
                ch.request({"n": 7, "op": "hang", "who": "a"}, timeout=20)
            )
            await until(lambda: "got 7" in lines(a_out), "a took the request")
            stop(a, signal.SIGKILL)
            b = spawn_responder(server, namespace, name, "b", b_out, claim=1.0)
            answer = await pending
        assert answer == {"n": 14, "by": "b"}, "answered by the other after the claim time"
        with pytest.raises(broker.RequestTimeoutError):  # nobody left who answers in time
            stop(b, signal.SIGKILL)
            await ch.request({"n": 8}, timeout=0.5)
    finally:
        stop(a, signal.SIGKILL)
        if b is not None:
            stop(b, signal.SIGKILL)


async def test_inbox_deleted_on_close(server: str, namespace: str, name: str, raw: Any) -> None:
    async with broker.connect(server, namespace=namespace) as b:
        with pytest.raises(broker.RequestTimeoutError):
            await b.channel(name).request(1, timeout=0.1)
        key = b.request_statistics().inbox
        assert key is not None and await raw.exists(key)
        waiting = asyncio.create_task(b.channel(name).request(2, timeout=30))
        await until(lambda: b.request_statistics().waiting == 1, "waiting")
    assert not await raw.exists(key), "deleted on close"
    with pytest.raises(broker.ClosedError):
        await waiting
    await raw.delete(f"{namespace}:{{{name}}}")


async def test_inbox_expires_when_the_requester_dies(
    server: str, namespace: str, name: str, raw: Any
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.requester", server, namespace, name, "1.0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        key = (await asyncio.to_thread(proc.stdout.readline)).strip()
        assert key.startswith(f"{namespace}:{{reply~"), key
        await asyncio.sleep(1.5)  # longer than the ttl: the live requester refreshes it
        assert await raw.exists(key), "kept alive while the requester lives"
        assert 0 < await raw.pttl(key) <= 1000
        stop(proc, signal.SIGKILL)
        await until(lambda: _gone(raw, key), "the inbox expired", bound=5)
    finally:
        stop(proc, signal.SIGKILL)
        if proc.stdout is not None:
            proc.stdout.close()
        await raw.delete(f"{namespace}:{{{name}}}")


async def _gone(raw: Any, key: str) -> bool:
    return not await raw.exists(key)


# -- workers ----------------------------------------------------------------------------------


async def test_a_worker_answers_requests(redis_url: str, namespace: str, name: str) -> None:
    # not parametrized by SERVERS (no `server` fixture): the worker runtime is the same there
    spec = WorkerSpec(
        name="w" + name[-6:],
        target="tests.helpers.handlers:answer",
        channels=(name,),
        url=redis_url,
        namespace=namespace,
        heartbeat=0.2,
        kind="consume",
        group="workers",
        start="all",
        max_deliveries=1,
    )
    source = broker.StopSource()
    async with broker.connect(redis_url, namespace=namespace) as client:
        task = asyncio.create_task(serve(spec, 0, stop=source.token))
        try:
            ch = client.channel(name)
            assert await ch.request({"n": 5}, timeout=10) == {"n": 10}
            with pytest.raises(broker.RemoteError, match="ZeroDivisionError"):
                await ch.request({"n": 0}, timeout=10)
        finally:
            source.stop("done")
            await asyncio.wait_for(task, 10)
        await client.redis.delete(f"{namespace}:{{{name}}}", f"{namespace}:{{{name}}}:dead")


# -- Sentinel ---------------------------------------------------------------------------------


async def test_round_trip_through_sentinel(name: str, namespace: str) -> None:
    from broker._server_sentinel import EmbeddedSentinel

    with EmbeddedSentinel(down_after=2000, failover_timeout=3000) as s:
        s.wait_ready(45)
        async with broker.connect(s.url, namespace=namespace) as b:

            async def double(msg: broker.Message[Any]) -> Any:
                return 2 * msg.data

            async with responding(b, name, double):
                answers = await asyncio.gather(
                    *(b.channel(name).request(i, timeout=10) for i in range(50))
                )
            assert answers == [2 * i for i in range(50)]
            direct = aioredis.Redis(port=s.master().port)
            try:
                clients = await direct.client_list()
            finally:
                await direct.aclose()
            assert sum(1 for c in clients if c.get("name") == REPLY_CLIENT_NAME) == 1
            await b.channel(name).delete()
