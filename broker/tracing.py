"""OpenTelemetry traces for broker (the ``tracing`` extra: ``opentelemetry-api``).

Nothing to call: once the application uses OpenTelemetry (imports it, as any SDK set-up or
instrumentation does), the library traces by itself, following the OpenTelemetry messaging
semantic conventions:

- ``publish`` / ``publish_many`` inside a current span open a ``send {channel}`` span (kind
  PRODUCER) and put its W3C trace context into the message headers (``traceparent``, and
  ``tracestate``/``baggage`` when set). A message that already carries a ``traceparent`` keeps
  it. Without a current span nothing is added.
- ``consume`` and ``broker worker`` run each handler call in a ``process {channel}`` span (kind
  CONSUMER) whose parent is the producer's context from the headers, also linked to it: a trace
  started in one process continues in the process that handled the message, one span per
  delivery (a retried message shows each attempt, with its delivery count).

Attributes: ``messaging.system`` (``redis``), ``messaging.operation.type`` (``send`` /
``process``), ``messaging.operation.name`` (``publish`` / ``consume``),
``messaging.destination.name`` (the channel), ``messaging.consumer.group.name``,
``messaging.message.id``, ``messaging.batch.message_count`` (``publish_many``),
``messaging.redis.message.delivery_count``, ``broker.namespace``, and ``error.type`` on failure.

For a loop of your own (``async for msg in messages``), :func:`processing` opens the same span.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from . import __version__

if TYPE_CHECKING:
    from ._channel import Channel
    from ._message import Message

__all__ = ["SYSTEM", "configured", "in_span", "processing", "sending", "sent"]

#: ``messaging.system``: what is on the wire
SYSTEM = "redis"
TRACEPARENT = "traceparent"
DELIVERY_COUNT = "messaging.redis.message.delivery_count"

_tracer = trace.get_tracer("broker", __version__)
Inject = Callable[[dict[str, str] | None], dict[str, str] | None]


def configured() -> bool:
    """Whether the application set a tracer provider (an SDK): spans are recorded."""
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def in_span() -> bool:
    """Whether a span (local, or a remote context) is current: a publish carries it on."""
    return trace.get_current_span().get_span_context().is_valid


def _keep(headers: dict[str, str] | None) -> dict[str, str] | None:
    return headers


def _inject(headers: dict[str, str] | None) -> dict[str, str] | None:
    """``headers`` plus the current trace context (a message's own ``traceparent`` is kept)."""
    if headers and TRACEPARENT in headers:
        return headers
    carrier: dict[str, str] = dict(headers or {})
    propagate.inject(carrier)
    return carrier or headers


@contextlib.contextmanager
def sending(channel: Channel[Any], *, batch: bool = False) -> Iterator[Inject]:
    """A ``send {channel}`` PRODUCER span when a span is current; yields what adds its trace
    context to a message's headers (a no-op without a current span)."""
    if not in_span():
        yield _keep
        return
    attributes: dict[str, Any] = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": channel.name,
        "broker.namespace": channel.broker.namespace,
    }
    with _tracer.start_as_current_span(
        f"send {channel.name}", kind=SpanKind.PRODUCER, attributes=attributes
    ) as span:
        if not batch:
            yield _inject
            return
        count = 0

        def inject(headers: dict[str, str] | None) -> dict[str, str] | None:
            nonlocal count
            count += 1
            return _inject(headers)

        try:
            yield inject
        finally:
            span.set_attribute("messaging.batch.message_count", count)


def sent(entry_id: str) -> None:
    """Record the id of the message just sent on the current (send) span."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("messaging.message.id", entry_id)


@contextlib.contextmanager
def processing(msg: Message[Any], group: str, namespace: str | None = None) -> Iterator[trace.Span]:
    """A ``process {channel}`` CONSUMER span around handling ``msg``: its parent is the
    producer's context from the headers (when present), which it also links to. An exception
    marks it failed (and is re-raised); a cancellation of the consumer itself does not."""
    parent = None
    links: list[Link] = []
    if msg._header(TRACEPARENT) is not None:
        parent = propagate.extract(msg.headers)
        producer = trace.get_current_span(parent).get_span_context()
        if producer.is_valid:
            links.append(Link(producer))
        else:
            parent = None
    attributes: dict[str, Any] = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "process",
        "messaging.operation.name": "consume",
        "messaging.destination.name": msg.channel,
        "messaging.consumer.group.name": group,
        "messaging.message.id": msg.id,
        DELIVERY_COUNT: msg.deliveries,
    }
    if namespace is not None:
        attributes["broker.namespace"] = namespace
    with _tracer.start_as_current_span(
        f"process {msg.channel}",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes=attributes,
        links=links,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is None or not task.cancelling():  # the handler cancelled itself
                _failed(span, exc)
            raise
        except BaseException as exc:
            _failed(span, exc)
            raise


def _failed(span: trace.Span, exc: BaseException) -> None:
    span.record_exception(exc)
    span.set_attribute("error.type", type(exc).__qualname__)
    span.set_status(Status(StatusCode.ERROR, str(exc)[:200] or type(exc).__qualname__))
