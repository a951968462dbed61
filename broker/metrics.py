"""Prometheus metrics for broker (the ``metrics`` extra: ``prometheus_client``).

Example::

    import broker.metrics

    broker.metrics.enable()           # before connecting; into prometheus_client's REGISTRY
    with broker.metrics.serve(9100):  # or your own /metrics endpoint
        asyncio.run(main())

Collected at scrape time from what the library counts anyway (``Subscription.statistics()``,
``Publisher.statistics()``), so enabling metrics adds nothing to the read, ack and publish
paths beyond a count per publish call and a timing per ``consume`` handler call. Lag, pending
entries and the age of the oldest pending entry are read from the server at most once per
``sample_interval`` seconds, for at most ``max_sampled`` channel/group pairs.

The samples are taken on the event loop that owns the subscriptions, when the scrape comes
from another thread (:func:`serve`, ``prometheus_client.start_http_server``); a collection
made on that loop itself reads the statistics but keeps the last sample.

Labels: ``namespace``, ``channel``, ``group`` (and ``consumer`` with ``consumer_label=True``);
never message ids. A subscription over several channels reports its counters under
one series per channel (from ``Subscription.channel_statistics()``); the handler metrics and the
sampled ones are per channel.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from . import _observe
from ._message import id_to_ms

if TYPE_CHECKING:
    from ._broker import Broker
    from ._subscription import Subscription

__all__ = ["BUCKETS", "BrokerCollector", "disable", "enable", "serve"]

#: handler duration buckets, seconds (the messaging semantic conventions' boundaries, with
#: finer ones below 5 ms and longer ones up to a minute)
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: seconds a scrape waits for an event loop to read its objects' statistics
LOOP_WAIT = 2.0
#: seconds a sample of the server may take
SAMPLE_TIMEOUT = 1.0

#: (subscription statistics field, metric name, help) of the counters
_COUNTERS = (
    (
        "delivered",
        "broker_delivered_messages",
        "Messages handed to the application (OpenTelemetry: messaging.client.consumed.messages).",
    ),
    ("acked", "broker_acked_messages", "Messages acknowledged."),
    ("nacked", "broker_nacked_messages", "Messages rejected (retried, or dead-lettered)."),
    ("dead_lettered", "broker_dead_lettered_messages", "Messages moved to the dead letters."),
    ("claimed", "broker_claimed_messages", "Entries claimed from other (dead, stuck) consumers."),
    ("released", "broker_released_messages", "Fetched entries released unhandled on a stop."),
    ("trimmed", "broker_trimmed_messages", "Pending entries found trimmed (acked, reported)."),
    ("reconnects", "broker_reconnects", "Reconnects of the subscription's read loop."),
)
#: (broker request statistics field, metric name, help) of the request/reply counters
_REQUESTS = (
    ("answered", "broker_requests_answered", "Requests answered (a value or a remote error)."),
    ("timed_out", "broker_requests_timed_out", "Requests that got no answer in time."),
    (
        "dropped",
        "broker_replies_dropped",
        "Answers nobody waited for (late, or a retried request's second answer): dropped.",
    ),
)
#: (broker watch statistics field, metric name, help) of the watched values' counters
_WATCHES = (
    ("sets", "broker_watch_sets", "Watched values set (a new version)."),
    ("deletes", "broker_watch_deletes", "Watched values deleted."),
    ("conflicts", "broker_watch_conflicts", "Compare-and-set sets and deletes refused."),
    ("yielded", "broker_watch_values_seen", "Values handed to watch readers."),
    ("rereads", "broker_watch_rereads", "Watch readers' reads of the server (gaps, big values)."),
)
_GAUGES = (
    ("buffered", "broker_buffered_messages", "Messages fetched, not yet handed out."),
    ("in_flight", "broker_in_flight_messages", "Messages handed out, not yet settled."),
    ("retrying", "broker_retrying_messages", "Messages waiting for their retry."),
    ("pending_acks", "broker_pending_acks", "Acks and dead letters not yet sent."),
)
_Labels = tuple[str, ...]


class _Histogram:
    """Cumulative-free bucket counts per label set (Prometheus' ``le`` buckets are summed on
    export); observed on event loops, read by scrapes, under the collector's lock."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.series: dict[_Labels, tuple[list[int], list[float]]] = {}

    def observe(self, labels: _Labels, value: float) -> None:
        counts, total = self.series.get(labels) or self.series.setdefault(
            labels, ([0] * (len(self.buckets) + 1), [0.0])
        )
        counts[bisect.bisect_left(self.buckets, value)] += 1
        total[0] += value

    def export(self) -> list[tuple[_Labels, list[tuple[str, float]], float]]:
        out = []
        for labels, (counts, total) in self.series.items():
            running = 0
            rows: list[tuple[str, float]] = []
            for bound, n in zip((*self.buckets, float("inf")), counts, strict=True):
                running += n
                rows.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
            out.append((labels, rows, total[0]))
        return out


class _Tracked:
    """A subscription or a broker, with its labels and its event loop."""

    def __init__(
        self,
        obj: Any,
        labels: _Labels,
        loop: asyncio.AbstractEventLoop | None,
        *,
        sub: bool,
        channel: str | None = None,
    ) -> None:
        self.obj, self.labels, self.loop, self.sub = obj, labels, loop, sub
        #: one channel of a merged subscription (its counts come from channel_statistics())
        self.channel = channel
        self.key: tuple[int, str | None] = (id(obj), channel)
        self.last: dict[str, int] = {}


class BrokerCollector(Collector):
    """The collector behind :func:`enable`: see the module's docstring for what it reports."""

    def __init__(
        self,
        *,
        sample_interval: float = 5.0,
        max_sampled: int = 200,
        consumer_label: bool = False,
    ) -> None:
        if sample_interval <= 0 or max_sampled < 0:
            raise ValueError("sample_interval must be > 0 and max_sampled >= 0")
        self.sample_interval = sample_interval
        self.max_sampled = max_sampled
        self.consumer_label = consumer_label
        self._lock = threading.Lock()
        self._subs: dict[tuple[int, str | None], _Tracked] = {}
        self._brokers: dict[int, _Tracked] = {}
        #: final counts of closed subscriptions / brokers, per label set
        self._retired: dict[_Labels, dict[str, int]] = {}
        self._retired_pub: dict[str, dict[str, int]] = {}
        self._published: dict[tuple[str, str], int] = {}
        self._handled = _Histogram(BUCKETS)
        self._failures: dict[_Labels, int] = {}
        #: (namespace, channel) -> (length, dead letters); (ns, channel, group) -> (lag,
        #: pending, oldest pending age); filled by samples
        self._channels: dict[tuple[str, str], tuple[int, int]] = {}
        self._groups: dict[tuple[str, str, str], tuple[int | None, int, float | None]] = {}
        self._sampled_at: dict[int, float] = {}
        self._sample_errors = 0
        self.registries: list[CollectorRegistry] = []

    # -- the Sink (called on the objects' event loops) -----------------------------------------

    def broker_opened(self, b: Broker) -> None:
        with self._lock:
            self._brokers[id(b)] = _Tracked(b, (b.namespace,), _loop(), sub=False)

    def broker_closed(self, b: Broker) -> None:
        with self._lock:
            tracked = self._brokers.pop(id(b), None)
            if tracked is not None:
                self._retire_broker(tracked, _publisher_counts(b))
            for key, sub in list(self._subs.items()):  # a backstop: its subscriptions are over
                if sub.obj.broker is b:
                    self._retire(key, _sub_counts(sub))

    def subscription(self, sub: Subscription[Any]) -> None:
        names = [c.name for c in sub.channels]
        merged = len(names) > 1
        with self._lock:
            self._sweep()
            for name in names:
                labels: _Labels = (sub.broker.settings.namespace, name, sub.group)
                if self.consumer_label:
                    labels += (sub.consumer,)
                tracked = _Tracked(sub, labels, _loop(), sub=True, channel=name if merged else None)
                self._subs[tracked.key] = tracked

    def subscription_closed(self, sub: Subscription[Any]) -> None:
        """Fold a closed subscription's final counts into the totals."""
        with self._lock:
            for key, tracked in list(self._subs.items()):
                if tracked.obj is sub:
                    self._retire(key, _sub_counts(tracked))

    def published(self, namespace: str, channel: str, n: int) -> None:
        with self._lock:
            key = (namespace, channel)
            self._published[key] = self._published.get(key, 0) + n

    def handled(
        self, namespace: str, channel: str, group: str, seconds: float, failed: bool
    ) -> None:
        labels = (namespace, channel, group)
        with self._lock:
            self._handled.observe(labels, seconds)
            if failed:
                self._failures[labels] = self._failures.get(labels, 0) + 1

    # -- bookkeeping (under the lock) ------------------------------------------------------------

    def _sweep(self) -> None:
        """Fold subscriptions that closed into the totals and forget them."""
        for key, tracked in list(self._subs.items()):
            if _closed(tracked.obj):
                self._retire(key, _sub_counts(tracked))

    def _retire(self, key: tuple[int, str | None], counts: dict[str, int]) -> None:
        tracked = self._subs.pop(key)
        total = self._retired.setdefault(tracked.labels, {})
        for name, value in counts.items():
            total[name] = total.get(name, 0) + value

    def _retire_broker(self, tracked: _Tracked, counts: dict[str, int]) -> None:
        total = self._retired_pub.setdefault(tracked.labels[0], {})
        for name, value in counts.items():
            total[name] = total.get(name, 0) + value

    # -- scraping ------------------------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        """The metric names, without reading anything (for the registry's collision check)."""
        return self._families([], [])

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            self._sweep()
            subs = list(self._subs.values())
            brokers = list(self._brokers.values())
        self._read(subs, brokers)
        return self._families(subs, brokers)

    def _read(self, subs: list[_Tracked], brokers: list[_Tracked]) -> None:
        """Read every object's statistics on its own event loop (they are not thread-safe),
        and sample the server from there when the last sample is older than the interval."""
        loops: dict[asyncio.AbstractEventLoop | None, list[_Tracked]] = {}
        for t in (*subs, *brokers):
            loops.setdefault(t.loop, []).append(t)
        for loop, objs in loops.items():
            if loop is None or loop.is_closed() or not loop.is_running() or _on(loop):
                _read_now(objs)  # nothing else runs them now (or we are that loop)
                continue
            future = asyncio.run_coroutine_threadsafe(self._read_on_loop(objs), loop)
            try:
                future.result(LOOP_WAIT)
            except Exception:  # a busy or closing loop: report what was read last
                future.cancel()

    async def _read_on_loop(self, objs: list[_Tracked]) -> None:
        _read_now(objs)
        due: dict[int, Any] = {}
        now = time.monotonic()
        for t in objs:
            b = t.obj.broker if t.sub else t.obj
            if now - self._sampled_at.get(id(b), -1e9) >= self.sample_interval:
                due[id(b)] = b
        for key, b in due.items():
            self._sampled_at[key] = now
            # the subscription's streams: one per channel, or one per partition
            pairs = sorted(
                {
                    (st, t.obj.group)
                    for t in objs
                    if t.sub and t.obj.broker is b
                    for st in _streams(t.obj)
                },
                key=lambda p: (p[0].key, p[1]),
            )[: self.max_sampled]
            try:
                await asyncio.wait_for(self._sample(b, pairs), SAMPLE_TIMEOUT)
            except Exception:  # the server is away or slow: the last sample stays
                self._sample_errors += 1

    async def _sample(self, b: Any, pairs: list[tuple[Any, str]]) -> None:
        """One pipeline: length and dead letters per stream, lag and pending per group; the
        partitions of a channel are added up (the oldest pending entry of any of them)."""
        if not pairs:
            return
        streams = list({st.key: st for st, _ in pairs}.values())
        pipe = b.redis.pipeline(transaction=False)
        for st in streams:
            pipe.xlen(st.key)
            pipe.xlen(st.dead_key)
            pipe.xinfo_groups(st.key)
        for st, group in pairs:
            pipe.xpending(st.key, group)
        replies = await pipe.execute(raise_on_error=False)
        namespace = b.settings.namespace
        # the server's clock as the broker estimated it (a subscription's link is its broker)
        clock = getattr(b, "server_time_ms", None)
        now_ms = clock() if clock is not None else int(time.time() * 1000)
        found: dict[tuple[str, str], Any] = {}
        channels_out: dict[tuple[str, str], tuple[int, int]] = {}
        for i, st in enumerate(streams):
            length, dead, groups = replies[3 * i : 3 * i + 3]
            if isinstance(length, int) and isinstance(dead, int):
                n, d = channels_out.get((namespace, st.channel), (0, 0))
                channels_out[(namespace, st.channel)] = (n + length, d + dead)
            if isinstance(groups, list):
                for g in groups:
                    found[(st.key, _text(g["name"]))] = g
        groups_out: dict[tuple[str, str, str], tuple[int | None, int, float | None]] = {}
        for (st, group), pending in zip(pairs, replies[3 * len(streams) :], strict=True):
            info = found.get((st.key, group))
            if info is None or not isinstance(pending, dict):
                continue
            lag = None if info.get("lag") is None else int(info["lag"])
            oldest = pending.get("min")
            age = None if not oldest else max(0.0, (now_ms - id_to_ms(_text(oldest))) / 1000)
            key = (namespace, st.channel, group)
            if key in groups_out:  # another partition of the channel
                lag0, pending0, age0 = groups_out[key]
                lag = None if lag is None or lag0 is None else lag + lag0
                age = max((a for a in (age, age0) if a is not None), default=None)
                pending_total = pending0 + int(pending.get("pending") or 0)
            else:
                pending_total = int(pending.get("pending") or 0)
            groups_out[key] = (lag, pending_total, age)
        with self._lock:
            self._channels.update(channels_out)
            self._groups.update(groups_out)

    def _families(self, subs: list[_Tracked], brokers: list[_Tracked]) -> list[Metric]:
        names = ["namespace", "channel", "group"] + (["consumer"] if self.consumer_label else [])
        with self._lock:
            counts: dict[_Labels, dict[str, int]] = {
                labels: dict(c) for labels, c in self._retired.items()
            }
            live: dict[_Labels, dict[str, int]] = {}
            for t in subs:
                if self._subs.get(t.key) is not t:
                    continue  # retired since this scrape began: already in the totals
                into = counts.setdefault(t.labels, {})
                for name, value in t.last.items():
                    into[name] = into.get(name, 0) + value
                gauges = live.setdefault(t.labels, {"subscriptions": 0})
                gauges["subscriptions"] += 1
                for field, _, _ in _GAUGES:
                    gauges[field] = gauges.get(field, 0) + t.last.get(field, 0)
            pub: dict[str, dict[str, int]] = {ns: dict(c) for ns, c in self._retired_pub.items()}
            queued: dict[str, int] = {}
            readers: dict[str, int] = {}
            summed = ("batches", "published", *(f for f, _, _ in (*_REQUESTS, *_WATCHES)))
            for t in brokers:
                into = pub.setdefault(t.labels[0], {})
                for name in summed:
                    into[name] = into.get(name, 0) + t.last.get(name, 0)
                queued[t.labels[0]] = queued.get(t.labels[0], 0) + t.last.get("queued", 0)
                readers[t.labels[0]] = readers.get(t.labels[0], 0) + t.last.get("readers", 0)
            published = dict(self._published)
            handled = self._handled.export()
            failures = dict(self._failures)
            # sampled values only while a live subscription reads the group: a finished
            # consumer's last lag must not stay on the dashboard for ever
            watched = {
                (t.obj.broker.settings.namespace, c.name, t.obj.group)
                for t in subs
                if self._subs.get(t.key) is t
                for c in t.obj.channels
            }
            groups = {k: v for k, v in self._groups.items() if k in watched}
            channels = {k: v for k, v in self._channels.items() if _any(k, watched)}
            errors = self._sample_errors
        out: list[Metric] = []
        sent = CounterMetricFamily(
            "broker_published_messages",
            "Messages published (OpenTelemetry: messaging.client.sent.messages).",
            labels=["namespace", "channel"],
        )
        for (ns, ch), n in sorted(published.items()):
            sent.add_metric([ns, ch], n)
        out.append(sent)
        batches = SummaryMetricFamily(
            "broker_publish_batch_messages",
            "Messages per pipeline of publish() (count: pipelines sent, sum: messages).",
            labels=["namespace"],
        )
        for ns, c in sorted(pub.items()):
            batches.add_metric([ns], count_value=c.get("batches", 0), sum_value=c["published"])
        out.append(batches)
        queue = GaugeMetricFamily(
            "broker_publish_queued_messages",
            "Publishes waiting for a pipeline.",
            labels=["namespace"],
        )
        for ns, n in sorted(queued.items()):
            queue.add_metric([ns], n)
        out.append(queue)
        for field, name, doc in (*_REQUESTS, *_WATCHES):
            per_broker = CounterMetricFamily(name, doc, labels=["namespace"])
            for ns, c in sorted(pub.items()):
                per_broker.add_metric([ns], c.get(field, 0))
            out.append(per_broker)
        watchers = GaugeMetricFamily(
            "broker_watch_readers", "Watch readers open now.", labels=["namespace"]
        )
        for ns, n in sorted(readers.items()):
            watchers.add_metric([ns], n)
        out.append(watchers)
        for field, name, doc in _COUNTERS:
            family = CounterMetricFamily(name, doc, labels=names)
            for labels, c in sorted(counts.items()):
                family.add_metric(list(labels), c.get(field, 0))
            out.append(family)
        subs_family = GaugeMetricFamily(
            "broker_subscriptions", "Open subscriptions in this process.", labels=names
        )
        for labels, g in sorted(live.items()):
            subs_family.add_metric(list(labels), g["subscriptions"])
        out.append(subs_family)
        for field, name, doc in _GAUGES:
            gauge = GaugeMetricFamily(name, doc, labels=names)
            for labels, g in sorted(live.items()):
                gauge.add_metric(list(labels), g.get(field, 0))
            out.append(gauge)
        duration = HistogramMetricFamily(
            "broker_handler_duration_seconds",
            "Duration of consume/worker handler calls (OpenTelemetry: messaging.process.duration).",
            labels=["namespace", "channel", "group"],
        )
        for labels, rows, total in sorted(handled):
            duration.add_metric(list(labels), rows, sum_value=total)
        out.append(duration)
        failed = CounterMetricFamily(
            "broker_handler_failures",
            "Handler calls that raised (each is retried, then dead-lettered).",
            labels=["namespace", "channel", "group"],
        )
        for labels in sorted({*failures, *(h[0] for h in handled)}):
            failed.add_metric(list(labels), failures.get(labels, 0))  # 0 once a call was timed
        out.append(failed)
        length = GaugeMetricFamily(
            "broker_channel_length_messages",
            "Entries in the channel (sampled).",
            labels=["namespace", "channel"],
        )
        dead = GaugeMetricFamily(
            "broker_dead_letter_messages",
            "Entries in the channel's dead letters (sampled).",
            labels=["namespace", "channel"],
        )
        for (ns, ch), (n, d) in sorted(channels.items()):
            length.add_metric([ns, ch], n)
            dead.add_metric([ns, ch], d)
        out += [length, dead]
        group_labels = ["namespace", "channel", "group"]
        lag = GaugeMetricFamily(
            "broker_group_lag_messages",
            "Entries not yet delivered to the group (sampled).",
            labels=group_labels,
        )
        pending = GaugeMetricFamily(
            "broker_group_pending_messages",
            "Entries delivered, not yet acked (sampled).",
            labels=group_labels,
        )
        oldest = GaugeMetricFamily(
            "broker_group_oldest_pending_age_seconds",
            "Age of the group's oldest pending entry, by its id (sampled).",
            labels=group_labels,
        )
        for (ns, ch, grp), (n_lag, n_pending, age) in sorted(groups.items()):
            if n_lag is not None:
                lag.add_metric([ns, ch, grp], n_lag)
            pending.add_metric([ns, ch, grp], n_pending)
            oldest.add_metric([ns, ch, grp], age or 0.0)
        out += [lag, pending, oldest]
        out.append(
            CounterMetricFamily(
                "broker_sample_errors",
                "Samples of the server that failed or timed out.",
                value=errors,
            )
        )
        return out


def _streams(sub: Any) -> list[Any]:
    """A subscription's streams (known once it is entered), else its channels' own keys."""
    streams = list(getattr(sub, "streams", None) or [])
    if streams:
        return streams
    from ._stream import Stream

    return [
        Stream(c.name, c.key, c.dead_key, c.codec, 0) for c in sub.channels if hasattr(c, "key")
    ]


def _any(channel: tuple[str, str], watched: set[tuple[str, str, str]]) -> bool:
    return any(w[:2] == channel for w in watched)


def _loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _on(loop: asyncio.AbstractEventLoop) -> bool:
    return _loop() is loop


def _closed(sub: Any) -> bool:
    # closed subscriptions are retired by subscription_closed(); this is the backstop for one
    # that never got there (its task cancelled midway)
    return bool(getattr(sub, "_closed", False)) and getattr(sub, "_tasks", None) is None


def _stats(t: _Tracked) -> Any:
    if t.channel is None:
        return t.obj.statistics()
    return t.obj.channel_statistics()[t.channel]


def _sub_counts(t: _Tracked) -> dict[str, int]:
    s = _stats(t)
    return {field: getattr(s, field, 0) for field, _, _ in _COUNTERS}


def _publisher_counts(b: Broker) -> dict[str, int]:
    p = b._publisher
    if p is None:
        return {}
    s = p.statistics()
    r = b.request_statistics()
    requests = {field: getattr(r, field) for field, _, _ in _REQUESTS}
    w = b.watch_statistics()
    watches = {field: getattr(w, field) for field, _, _ in _WATCHES}
    return {
        "batches": s.batches,
        "published": s.published,
        "queued": s.queued,
        "readers": w.readers,
        **requests,
        **watches,
    }


def _read_now(objs: list[_Tracked]) -> None:
    for t in objs:
        if t.sub:
            s = _stats(t)
            t.last = {
                **{field: getattr(s, field, 0) for field, _, _ in _COUNTERS},
                **{field: getattr(s, field, 0) for field, _, _ in _GAUGES},
            }
        else:
            t.last = _publisher_counts(t.obj)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_collector: BrokerCollector | None = None


def enable(
    registry: CollectorRegistry | None = REGISTRY,
    *,
    sample_interval: float = 5.0,
    max_sampled: int = 200,
    consumer_label: bool = False,
) -> BrokerCollector:
    """Turn metrics on for this process and register the collector in ``registry`` (default:
    prometheus_client's global one; None: register it yourself). Call it before connecting:
    brokers and subscriptions opened earlier are not seen. Calling it again returns the same
    collector (registered in the new registry too); the options of the first call hold.
    """
    global _collector
    if _collector is None:
        _collector = BrokerCollector(
            sample_interval=sample_interval, max_sampled=max_sampled, consumer_label=consumer_label
        )
    if registry is not None and registry not in _collector.registries:
        registry.register(_collector)
        _collector.registries.append(registry)
    _observe.set_sink(_collector)
    return _collector


def disable() -> None:
    """Turn metrics off and unregister the collector from every registry it was added to."""
    global _collector
    _observe.set_sink(None)
    if _collector is not None:
        for registry in _collector.registries:
            registry.unregister(_collector)
    _collector = None


@contextlib.contextmanager
def serve(
    port: int, addr: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY
) -> Iterator[int]:
    """Serve ``/metrics`` of ``registry`` over HTTP on ``addr:port`` in a thread while the
    block runs; yields the port bound (``port=0``: a free one). Scrapes never run on the
    event loop: the collector hands its reads to the loops that own the objects."""
    server, thread = start_http_server(port, addr, registry)
    try:
        yield int(server.server_port)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
