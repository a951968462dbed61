"""``broker request``: the answer as JSON; a timeout or a remote error is one line, status 1."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import broker

from .conftest import assert_clean


@contextlib.asynccontextmanager
async def responder(client: broker.Broker, name: str) -> AsyncIterator[None]:
    async def handle(msg: broker.Message[Any]) -> Any:
        if msg.data == "fail":
            raise LookupError("no such\nthing")
        return {"got": msg.data, "bytes": b"\x00", "h": msg.headers.get("k")}

    task = asyncio.create_task(
        client.consume(name, handle, group="r", start="all", max_deliveries=1)
    )
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_request_prints_the_answer(client, name, invoke):
    async with responder(client, name):
        result = await invoke("request", name, '{"n": 1}', "-H", "k=v", "--timeout", "10")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout) == {
            "got": {"n": 1},
            "bytes": {"$base64": "AA=="},
            "h": "v",
        }
        failed = await invoke("request", name, '"fail"', "--timeout", "10")
    assert failed.exit_code == 1 and failed.stdout == ""
    (line,) = failed.stderr.splitlines()
    assert line == "error: the responder raised LookupError: no such thing"
    assert_clean(failed.stderr)


async def test_request_timeout_and_bad_input(name, invoke):
    result = await invoke("request", name, "1", "--timeout", "0.2")
    assert result.exit_code == 1 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: no answer to the request") and "within 0.2s" in line
    bad = await invoke("request", name, "{nope")
    assert bad.exit_code == 2 and "not valid JSON" in bad.stderr
    zero = await invoke("request", name, "1", "--timeout", "0")
    assert zero.exit_code == 2
