"""``broker worker --metrics-port PORT``: each slot serves its own ``/metrics`` on PORT + slot.

Per slot, not aggregated by the supervisor: the collector reads the live subscription of its
own process at scrape time (nothing is shared between processes, nothing written per
message), a slot restarted after a crash starts its counters at zero like any restarted
Prometheus target, and the supervisor, which handles no messages, needs no HTTP server and no
merging. Sum over slots in PromQL (``sum by (channel, group) (rate(...))``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from broker import ConfigurationError

from ._spec import WorkerSpec

__all__ = ["metrics_endpoint"]


@contextlib.contextmanager
def metrics_endpoint(spec: WorkerSpec, slot: int) -> Iterator[int | None]:
    """Metrics on and ``/metrics`` served on ``spec.metrics_port + slot`` while the block runs
    (nothing when no port is set); yields the port.

    :raises ConfigurationError: if prometheus_client is missing or the port cannot be bound.
    """
    if spec.metrics_port is None:
        yield None
        return
    try:
        import broker.metrics
    except ImportError as exc:
        raise ConfigurationError(
            "--metrics-port needs prometheus_client: pip install 'broker[metrics]'"
        ) from exc
    port = spec.metrics_port + slot
    broker.metrics.enable()
    try:
        server = broker.metrics.serve(port, spec.metrics_addr)
        bound = server.__enter__()
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve metrics on {spec.metrics_addr}:{port} (slot {slot}): {exc.strerror}"
        ) from exc
    try:
        yield bound
    finally:
        server.__exit__(None, None, None)
        broker.metrics.disable()
