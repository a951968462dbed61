"""Traces with the OpenTelemetry SDK's in-memory exporter: producer and consumer spans, their
parents and links, one span per delivery."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import broker
from broker.testing import run_handler


def by_name(finished: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in finished if s.name == name]


async def test_a_trace_runs_from_publish_to_each_delivery(
    spans: InMemorySpanExporter, client: broker.Broker, name: str
) -> None:
    tracer = trace.get_tracer("test")

    async def handle(msg: broker.Message[Any]) -> None:
        with tracer.start_as_current_span("charge card"):
            if msg.deliveries == 1:
                raise ValueError("card declined")

    ch = client.channel(name)
    with tracer.start_as_current_span("checkout") as root:
        run = await run_handler(client, ch, handle, [{"order": 1}], group="billing")
    (entry_id,) = run.ids
    (stored,) = [m async for m in ch.tail(start="beginning", follow=False)]
    assert stored.headers["traceparent"].split("-")[1] == f"{root.get_span_context().trace_id:032x}"
    finished = spans.get_finished_spans()
    (checkout,) = by_name(finished, "checkout")
    (send,) = by_name(finished, f"send {name}")
    process = sorted(by_name(finished, f"process {name}"), key=lambda s: s.start_time or 0)
    charges = by_name(finished, "charge card")
    trace_id = checkout.context.trace_id
    assert send.kind == SpanKind.PRODUCER and send.parent == checkout.context
    assert send.attributes["messaging.destination.name"] == name
    assert [s.attributes["messaging.redis.message.delivery_count"] for s in process] == [1, 2]
    for span in process:
        assert span.kind == SpanKind.CONSUMER
        assert span.context.trace_id == trace_id
        assert span.parent is not None and span.parent.span_id == send.context.span_id
        assert [link.context.span_id for link in span.links] == [send.context.span_id]
        assert span.attributes["messaging.consumer.group.name"] == "billing"
        assert span.attributes["messaging.message.id"] == entry_id
        assert span.attributes["messaging.system"] == "redis"
    assert process[0].status.status_code == StatusCode.ERROR
    assert process[0].attributes["error.type"] == "ValueError"
    assert process[1].status.status_code == StatusCode.UNSET
    assert sorted(c.parent.span_id for c in charges if c.parent) == sorted(
        p.context.span_id for p in process
    )


async def test_publish_many_has_one_send_span_and_no_span_means_no_header(
    spans: InMemorySpanExporter, client: broker.Broker, name: str
) -> None:
    ch = client.channel(name)
    await ch.publish("untraced")
    with trace.get_tracer("test").start_as_current_span("one"):
        one = await ch.publish("one")
    own = "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01"
    with trace.get_tracer("test").start_as_current_span("batch"):
        await ch.publish_many(["a", ("b", {"k": "v"}), ("c", {"traceparent": own})])
    rows = [m async for m in ch.tail(start="beginning", follow=False)]
    assert "traceparent" not in rows[0].headers
    single, send = by_name(spans.get_finished_spans(), f"send {name}")
    assert single.attributes["messaging.message.id"] == one
    assert rows[1].headers["traceparent"].split("-")[2] == f"{single.context.span_id:016x}"
    del rows[1]
    assert send.attributes["messaging.batch.message_count"] == 3
    mine = f"{send.context.span_id:016x}"
    assert rows[1].headers["traceparent"].split("-")[2] == mine
    assert rows[2].headers["k"] == "v" and rows[2].headers["traceparent"].split("-")[2] == mine
    assert rows[3].headers["traceparent"] == own  # a message's own context is kept
