"""Hooks for the optional integrations (``broker.metrics``, ``broker.tracing``), free when off.

- **Metrics**: :func:`broker.metrics.enable` installs a :class:`Sink`. From then on, brokers
  entered and subscriptions created are handed to it (it reads their statistics at scrape
  time), publishes are counted per channel and ``consume`` handlers are timed.
- **Traces**: possible once OpenTelemetry is imported in the process (``opentelemetry.trace`` is
  in ``sys.modules``: the application's SDK set-up does it, and so does redis-py 8 when the
  SDK is installed). Only then is ``broker.tracing`` imported here; a publish then checks for
  a current span, and ``consume`` wraps its handler when a tracer provider is configured as it
  starts. Without OpenTelemetry nothing of it is imported.

With neither, a publish pays one check of two names, and ``consume`` runs the handler as given.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from types import ModuleType

    from ._broker import Broker
    from ._channel import Channel
    from ._message import Message
    from ._subscription import Subscription
    from ._topology import Link

__all__ = [
    "Sink",
    "broker_closed",
    "broker_opened",
    "instrument_handler",
    "observing",
    "publish",
    "publish_many",
    "set_sink",
    "subscription",
    "subscription_closed",
]

T = TypeVar("T")
S = TypeVar("S", bound="Subscription[Any]")
_OTEL = "opentelemetry.trace"


class Sink(Protocol):
    """What ``broker.metrics`` receives (each call on the event loop that owns the object)."""

    def broker_opened(self, b: Broker) -> None: ...

    def broker_closed(self, b: Broker) -> None: ...

    def subscription(self, sub: Subscription[Any]) -> None: ...

    def subscription_closed(self, sub: Subscription[Any]) -> None: ...

    def published(self, namespace: str, channel: str, n: int) -> None: ...

    def handled(
        self, namespace: str, channel: str, group: str, seconds: float, failed: bool
    ) -> None: ...


_sink: Sink | None = None


def set_sink(sink: Sink | None) -> None:
    global _sink
    _sink = sink


_tracing: ModuleType | None = None


def tracing() -> ModuleType | None:
    """``broker.tracing`` once OpenTelemetry is imported in the process, else None (and nothing
    is imported)."""
    global _tracing
    if _tracing is None and _OTEL in sys.modules:
        from . import tracing as module

        _tracing = module
    return _tracing


def observing() -> bool:
    """Whether a publish must go through :func:`publish` (metrics on, or traces possible)."""
    return _sink is not None or _OTEL in sys.modules


# -- lifetimes (called by Broker) --------------------------------------------------------------


def broker_opened(b: Broker) -> None:
    if _sink is not None:
        _sink.broker_opened(b)


def broker_closed(b: Broker) -> None:
    if _sink is not None:
        _sink.broker_closed(b)


def subscription(sub: S) -> S:
    if _sink is not None:
        _sink.subscription(sub)
    return sub


def subscription_closed(sub: Subscription[Any]) -> None:
    """Called by ``Subscription.aclose`` once everything is settled."""
    if _sink is not None:
        _sink.subscription_closed(sub)


# -- publishing --------------------------------------------------------------------------------


async def publish(
    channel: Channel[Any],
    data: Any,
    headers: dict[str, str] | None,
    key: Any = None,
    replicas: int | None = None,
) -> str:
    """``channel.publish`` with a producer span (when a span is current) and a count."""
    tr = tracing()
    if tr is None or not tr.in_span():
        entry_id = await channel._publish(data, headers, key, replicas)
    else:
        with tr.sending(channel) as inject:
            entry_id = await channel._publish(data, inject(headers), key, replicas)
            tr.sent(entry_id)
    if _sink is not None:
        _sink.published(channel.broker.namespace, channel.name, 1)
    return entry_id


async def publish_many(
    channel: Channel[Any],
    items: Iterable[Any],
    batch: int,
    key: Any = None,
    replicas: int | None = None,
) -> list[str]:
    """``channel.publish_many`` with one producer span for the whole call and a count."""
    tr = tracing()
    if tr is None or not tr.in_span():
        ids = await channel._publish_many(items, batch, key, None, replicas)
    else:
        with tr.sending(channel, batch=True) as inject:
            ids = await channel._publish_many(items, batch, key, inject, replicas)
    if _sink is not None:
        _sink.published(channel.broker.namespace, channel.name, len(ids))
    return ids


# -- consuming ---------------------------------------------------------------------------------


class Consuming(Protocol):
    """What :func:`instrument_handler` needs of the subscription it consumes."""

    link: Link
    group: str


def instrument_handler(
    handler: Callable[[Message[T]], Awaitable[Any]], sub: Consuming
) -> Callable[[Message[T]], Awaitable[Any]]:
    """``handler`` run in a consumer span and timed, or ``handler`` itself when, as consumption
    starts, metrics are off and no OpenTelemetry tracer provider is configured.

    A handler cancelled because its consumer is being cancelled (a shutdown) is neither a
    failure nor a handled message; one that raises, or cancels itself, is a failure.
    """
    sink, tr = _sink, tracing()
    if tr is not None and not tr.configured():
        tr = None
    if sink is None and tr is None:
        return handler
    namespace, group = sub.link.settings.namespace, sub.group

    async def observed(msg: Message[T]) -> Any:
        started = time.perf_counter()
        failed = True
        try:
            if tr is None:
                result = await handler(msg)
            else:
                with tr.processing(msg, group, namespace):
                    result = await handler(msg)
            failed = False
            return result
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                failed = False
                started = -1.0  # not handled: the consumer is going away
            raise
        finally:
            if sink is not None and started >= 0:
                sink.handled(namespace, msg.channel, group, time.perf_counter() - started, failed)

    observed.__wrapped__ = handler  # type: ignore[attr-defined]
    return observed
