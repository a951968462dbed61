"""What every command shares: the global options, opening the broker, user errors, notes."""

from __future__ import annotations

import asyncio
import dataclasses
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
    "note",
    "run",
]

R = TypeVar("R")

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

        :raises ConfigurationError: on a bad URL or namespace.
        """
        return broker.connect(self.url, namespace=self.namespace)


class UserError(Exception):
    """A mistake the user can fix; the message says how. ``exit_code``: 1 runtime, 2 usage."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run(coro: Coroutine[Any, Any, R]) -> R:
    """Run a command's coroutine (the one place that calls ``asyncio.run``)."""
    return asyncio.run(coro)


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
    channels = [b.channel(n) for n in names]

    async def types() -> list[Any]:
        pipe = b.redis.pipeline(transaction=False)
        for ch in channels:
            pipe.type(ch.key)
        return list(await pipe.execute())

    missing = []
    for ch, kind in zip(channels, await b.call(types), strict=True):
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        if kind == "none":
            missing.append(ch.name)
        elif kind != "stream":
            raise broker.WrongTypeError(ch.name, ch.key)
    return missing
