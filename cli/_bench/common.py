"""What every scenario shares: the payload, the stopwatch, names, medians, the event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import statistics
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import msgpack

__all__ = [
    "BATCH",
    "Run",
    "Summary",
    "Watch",
    "fresh_name",
    "loop_name",
    "optional",
    "payload",
    "payload_size",
    "percentile",
    "redis_client",
    "stopwatch",
    "summarize",
    "unlink_namespace",
    "use_uvloop",
]

#: entries per pipeline, per XREADGROUP and per XACK in the raw baseline
BATCH = 1000


def payload(i: int) -> dict[str, Any]:
    """A message of the benchmark: a dict of 5 fields, about 100 bytes in msgpack.

    ``ts`` is ``time.perf_counter()`` when it was made: the latency scenarios read it back.
    """
    return {
        "id": i,
        "ts": time.perf_counter(),
        "user": "user-004217",
        "item": "sku-88231-blue-m",
        "note": "gift wrap, leave it at the door",
    }


def payload_size() -> int:
    return len(msgpack.packb(payload(123_456)))


@dataclasses.dataclass(frozen=True)
class Run:
    """One timed run: ``messages`` handled in ``seconds`` of wall time and ``cpu`` seconds of
    this process's CPU (``time.process_time``; the server is another process)."""

    messages: int
    seconds: float
    cpu: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.messages * 1e6 if self.messages else 0.0


@dataclasses.dataclass(frozen=True)
class Summary:
    """The median over repetitions of one scenario."""

    rate: float
    cpu_us: float
    runs: tuple[Run, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "msg_per_s": round(self.rate, 1),
            "cpu_us_per_msg": round(self.cpu_us, 2),
            "runs": [
                {"messages": r.messages, "seconds": round(r.seconds, 4), "cpu": round(r.cpu, 4)}
                for r in self.runs
            ],
        }


def summarize(runs: Sequence[Run]) -> Summary:
    return Summary(
        statistics.median(r.rate for r in runs),
        statistics.median(r.cpu_us for r in runs),
        tuple(runs),
    )


class Watch:
    """Filled in by :func:`stopwatch` when its block ends."""

    seconds = 0.0
    cpu = 0.0

    def run(self, messages: int) -> Run:
        return Run(messages, self.seconds, self.cpu)


@contextmanager
def stopwatch() -> Iterator[Watch]:
    """``with stopwatch() as w: ...`` then ``w.run(n)``: wall time and this process's CPU."""
    w = Watch()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        yield w
    finally:
        w.seconds = time.perf_counter() - t0
        w.cpu = time.process_time() - c0


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted values, nearest rank."""
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[k]


def fresh_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def optional(module: str) -> Any | None:
    """The module, or None when it is not installed (the bench extra is optional)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def use_uvloop(wanted: bool | None) -> str:
    """Install uvloop's event loop policy when wanted (None: when installed); the loop's name."""
    if wanted is not False:
        uvloop = optional("uvloop")
        if uvloop is not None:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            return f"uvloop {uvloop.__version__}"
        if wanted:
            raise RuntimeError("--uvloop: uvloop is not installed (pip install 'broker[bench]')")
    asyncio.set_event_loop_policy(None)
    return "asyncio"


def loop_name() -> str:
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def redis_client(url: str) -> Any:
    """A redis-py asyncio client set up for speed: hiredis parses replies when installed, and
    no socket timeout, because redis-py 8 wraps the read of every reply (every entry of a
    pipeline) in ``asyncio.timeout`` when there is one, which costs more than the rest of
    the client's work on a pipelined XADD."""
    import redis.asyncio

    return redis.asyncio.Redis.from_url(url, socket_timeout=None)


async def unlink_namespace(r: Any, namespace: str) -> int:
    """Delete every key of ``namespace`` (SCAN + UNLINK: a large stream is freed in the
    background, without blocking the server)."""
    removed = 0
    batch: list[bytes] = []
    async for key in r.scan_iter(match=f"{namespace}:*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            removed += await r.unlink(*batch)
            batch = []
    if batch:
        removed += await r.unlink(*batch)
    return int(removed)
