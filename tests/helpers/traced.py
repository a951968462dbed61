"""A consumer for the worker tests of metrics and traces: ``tests.helpers.traced:handle``.

On import it sets up the OpenTelemetry SDK, as an application would; every finished span is
written as one JSON line to ``$TRACE_FILE`` (the worker runs in other processes). A payload
``{"fail_first": true}`` fails on its first delivery.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider

import broker


class _ToFile(SpanProcessor):
    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()

    def on_end(self, span: ReadableSpan) -> None:
        ctx = span.get_span_context()
        assert ctx is not None
        row = {
            "name": span.name,
            "kind": span.kind.name,
            "trace_id": f"{ctx.trace_id:032x}",
            "span_id": f"{ctx.span_id:016x}",
            "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
            "links": [f"{link.context.span_id:016x}" for link in span.links],
            "status": span.status.status_code.name,
            "attributes": dict(span.attributes or {}),
            "pid": os.getpid(),
        }
        with self.lock, open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


_provider = TracerProvider()
_provider.add_span_processor(_ToFile(os.environ["TRACE_FILE"]))
trace.set_tracer_provider(_provider)
_tracer = trace.get_tracer("tests.helpers.traced")


async def handle(msg: broker.Message[Any]) -> None:
    with _tracer.start_as_current_span("work"):
        if msg.data.get("fail_first") and msg.deliveries == 1:
            raise RuntimeError("first delivery fails")
