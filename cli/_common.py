"""What every command shares: the global options, opening the broker, user errors, notes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import click

import broker

__all__ = [
    "INTERRUPT_ENDS",
    "Config",
    "UserError",
    "channel_missing",
    "check_channels",
    "loads_json",
    "note",
    "run",
]

R = TypeVar("R")


def loads_json(raw: str | bytes, otherwise: str = "") -> Any:
    """JSON given on the command line or stdin, parsed.

    :raises ValueError: saying where it is not valid JSON and that strings need quotes, then
        ``otherwise`` (the command's alternatives, e.g. "or use --text").
    """
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        where = f" ({exc.msg}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        tail = f" {otherwise}" if otherwise else ""
        raise ValueError(f"not valid JSON{where}; quote strings ('\"text\"'){tail}") from None


#: key of ``ctx.meta``: set by commands whose normal end is Ctrl-C (tail, server), so the
#: error boundary exits 0 instead of 130
INTERRUPT_ENDS = "broker.interrupt_ends"


@dataclasses.dataclass(frozen=True)
class Config:
    """The global options, kept on ``ctx.obj``."""

    url: str | None
    namespace: str
    verbose: bool = False

    def connect(self) -> broker.Broker:
        """An unopened broker (``async with config.connect() as b``).

        :raises UserError: (usage) on a bad URL or namespace, naming the option to fix.
        """
        try:
            return broker.connect(self.url, namespace=self.namespace)
        except broker.ConfigurationError as exc:
            fix = (
                "--namespace or BROKER_NAMESPACE"
                if "namespace" in str(exc)
                else ("--url or BROKER_URL")
            )
            raise UserError(f"{exc} (set {fix})", exit_code=2) from exc


class UserError(Exception):
    """A mistake the user can fix; the message says how. ``exit_code``: 1 runtime, 2 usage."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


#: seconds after which a Ctrl-C whose cancellation was lost is delivered again
RECANCEL = 1.0


def run(coro: Coroutine[Any, Any, R]) -> R:
    """Run a command's coroutine (the one place that calls ``asyncio.run``).

    Ctrl-C cancels the coroutine (so ``async with`` blocks close their connections) and then
    raises ``KeyboardInterrupt``; a second Ctrl-C stops waiting for that cleanup. On Python
    3.11 a cancellation can be lost when it races with a finished ``asyncio.wait_for`` (redis-py
    sends every command through one), so while the coroutine keeps running after a Ctrl-C, it
    is cancelled again every second.
    """
    interrupted: list[bool] = []
    try:
        return asyncio.run(_interruptible(coro, interrupted))
    except asyncio.CancelledError:
        if interrupted:
            raise KeyboardInterrupt from None
        raise


async def _interruptible(coro: Coroutine[Any, Any, R], interrupted: list[bool]) -> R:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def on_sigint() -> None:
        if interrupted:
            raise KeyboardInterrupt  # a second Ctrl-C: out of the loop, skip the cleanup
        interrupted.append(True)
        cancel()

    def cancel() -> None:
        if not task.done():
            task.cancel()
            loop.call_later(RECANCEL, cancel)

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
        handled = True
    except (NotImplementedError, RuntimeError):  # not the main thread (tests), or Windows
        handled = False
    try:
        return await coro
    finally:
        if handled:
            loop.remove_signal_handler(signal.SIGINT)


def note(text: str) -> None:
    """A status line on stderr (data goes to stdout)."""
    click.echo(f"broker: {text}", err=True)


def channel_missing(name: str, namespace: str) -> UserError:
    return UserError(
        f"channel {name!r} does not exist in namespace {namespace!r} "
        "(list them with `broker channels`, or check --namespace)"
    )


async def check_channels(b: broker.Broker, names: Sequence[str]) -> list[str]:
    """The names whose stream does not exist yet.

    :raises WrongTypeError: if the key under a name holds something other than a stream.
    :raises ConfigurationError: on an invalid channel name.
    """
    missing = []
    for name in names:
        # the channel knows its streams (one per partition) and checks their type
        if not await b.channel(name).exists():
            missing.append(name)
    return missing
