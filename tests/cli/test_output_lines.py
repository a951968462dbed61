"""One write per line wherever processes share an output.

With ``PYTHONUNBUFFERED=1`` (common in containers) ``print(..., flush=True)`` writes the text and
the newline in two calls, so two worker slots writing to one pipe can merge their lines
(``a-1 ...a-2 ...\\n\\n``): one line is lost to a reader that parses lines.
"""

from __future__ import annotations

import asyncio
import io
import re
import signal
import sys
import types
from typing import Any

import pytest

import broker
from broker.workers import examples
from tests.cli.conftest import TIMEOUT
from tests.cli.test_workers import start, until
from tests.conftest import compare_ids


class Writes(io.RawIOBase):
    """A raw stream that records each write call (what reaches write(2) unbuffered)."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.calls.append(bytes(b))
        return len(b)


def unbuffered_stdout(monkeypatch: pytest.MonkeyPatch) -> Writes:
    """``sys.stdout`` as Python sets it up under ``PYTHONUNBUFFERED=1``: a text layer writing
    through to an unbuffered raw file."""
    raw = Writes()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, write_through=True))  # type: ignore[arg-type]
    return raw


def assert_one_write_per_line(calls: list[bytes]) -> None:
    calls = [c for c in calls if c]
    assert calls, "nothing written"
    for c in calls:
        assert c.endswith(b"\n") and c.count(b"\n") == 1, calls


def _message(data: Any) -> broker.Message[Any]:
    return broker.Message("1-0", "orders", data, {}, 1, False, None, {}, None)


async def test_example_handlers_write_each_line_in_one_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PROCESS_MS", "0")
    raw = unbuffered_stdout(monkeypatch)
    await examples.process_order(_message({"order_id": "r-1", "item": "tea", "quantity": 2}))
    assert_one_write_per_line(raw.calls)
    raw.calls.clear()
    await examples.print_message(_message({"n": 1}))
    assert_one_write_per_line(raw.calls)


LINE = re.compile(r"^(?P<ch>ch-[0-9a-f]{8}) (?P<id>\d+-\d+) \(delivery \d+\): \{'n': \d+\}$")


async def test_slots_sharing_a_pipe_under_pythonunbuffered_never_merge_lines(
    client: broker.Broker, name: str, namespace: str, redis_url: str
) -> None:
    """Three slots print into one pipe as fast as they can; every line stays whole."""
    n = 10_000
    sent = await client.channel(name).publish_many({"n": i} for i in range(n))
    proc = await start(
        redis_url,
        namespace,
        "worker",
        "broker.workers.examples:print_message",
        "--channel",
        name,
        "--group",
        "g",
        "--start",
        "all",
        "-p",
        "3",
        "-c",
        "8",
        "--heartbeat",
        "0.3",
        env={"PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None and proc.stderr is not None
    # read as it comes: a full pipe would block the slots
    out = asyncio.create_task(proc.stdout.read())
    err = asyncio.create_task(proc.stderr.read())
    try:

        async def drained() -> bool:
            [group] = (await client.channel(name).info()).groups or [None]
            return group is not None and group.lag == 0 and group.pending == 0

        await until(drained, "every message handled", bound=60)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(proc.wait(), TIMEOUT)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        text, log = (await out).decode(), (await err).decode()
    assert code == 0, log[-2000:]
    lines = text.splitlines()
    broken = [line for line in lines if not LINE.match(line)]
    assert not broken, f"{len(broken)} merged or broken lines, e.g. {broken[:3]}"
    compare_ids(sent, [LINE.match(line)["id"] for line in lines])  # type: ignore[index]


async def test_demo_echo_writes_each_line_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.workers import demo

    raw = unbuffered_stdout(monkeypatch)
    child = asyncio.StreamReader()
    child.feed_data(b"processed order r-1 (tea x2) orders 1-0 delivery 1\nready\n")
    child.feed_eof()
    shown = demo._Demo("redis://127.0.0.1:1/0")
    await shown.echo(types.SimpleNamespace(stdout=child), keep=True)  # type: ignore[arg-type]
    assert shown.processed == ["r-1"]
    assert_one_write_per_line(raw.calls)
    assert len(raw.calls) == 2


@pytest.mark.parametrize("kind", ["json", "pretty", "template", "raw"])
def test_cli_message_outputs_write_each_message_in_one_call(
    monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """`broker tail` (and a group tail) stream to pipes that others may share."""
    from broker.cli import _format

    raw = unbuffered_stdout(monkeypatch)
    output: _format.MessageOutput = {
        "json": lambda: _format.JsonLines(),
        "pretty": lambda: _format.Pretty(color=False),
        "template": lambda: _format.Template("{channel} {id} {data}"),
        "raw": lambda: _format.RawPayloads(),
    }[kind]()
    msg = broker.Message("1-0", "orders", {"n": 1}, {"k": "v"}, 1, False, None, {b"d": b"x"}, None)
    for _ in range(3):
        output.write(msg)
    assert_one_write_per_line(raw.calls)
    assert len([c for c in raw.calls if c]) == 3
