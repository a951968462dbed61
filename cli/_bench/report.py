"""The results as Markdown tables for people and one JSON line for machines, with the targets
of issues 7 and 17 checked against ratios measured in the same run (and on the same event
loop)."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from . import request as request_bench
from . import scale
from .harness import CONSUME, PUBLISH, Results
from .latency import Latency

__all__ = [
    "Target",
    "json_line",
    "json_lines_by_loop",
    "latency_counts",
    "side_by_side",
    "table",
    "targets",
]

#: latency targets (issue 17): broker / raw, each percentile on its own
P50_BOUND = 1.2
P99_BOUND = 1.5
#: with --runs N: met when at least this share of the runs met it (4 of 5)
RUNS_SHARE = 0.8

#: the reference each scenario's ratios are taken against: (raw, FastStream)
REFERENCE: dict[str, tuple[str, str | None]] = {
    "lib.publish": ("raw.publish", "fs.publish"),
    "lib.publish_many": ("raw.publish", "fs.publish_pipelined"),
    "fs.publish": ("raw.publish", None),
    "fs.publish_pipelined": ("raw.publish", None),
    "lib.iterate": ("raw.consume", "fs.consume"),
    "lib.chunks": ("raw.consume", "fs.consume_batch"),
    "lib.consume": ("raw.consume", "fs.consume"),
    "fs.consume": ("raw.consume", None),
    "fs.consume_batch": ("raw.consume", None),
}


def label(sid: str, res: Results) -> str:
    o = res.options
    return {
        "raw.publish": "raw redis-py: pipelined XADD, batches of 1000",
        "lib.publish": f"broker: `publish()` from {o.tasks} tasks",
        "lib.publish_many": "broker: `publish_many(batch=1000)`",
        "fs.publish": f"FastStream: `publish()` from {o.tasks} tasks ({o.tasks} connections)",
        "fs.publish_pipelined": "FastStream: `publish(pipeline=)`, batches of 1000",
        "raw.consume": "raw redis-py: XREADGROUP COUNT 1000 + one XACK per batch",
        "lib.iterate": f"broker: `async for` + `msg.ack()` (prefetch {o.prefetch})",
        "lib.chunks": f"broker: `chunks({o.chunk})` + `ack(batch)` (prefetch {o.chunk_prefetch})",
        "lib.consume": f"broker: `consume(handler, concurrency={o.concurrency})`",
        "fs.consume": "FastStream: per-message `StreamSub(group=)` handler",
        "fs.consume_batch": "FastStream: `StreamSub(group=, batch=True)`, batches of 1000",
    }[sid]


def ratio(res: Results, sid: str, ref: str | None) -> float | None:
    a, b = res.throughput.get(sid), res.throughput.get(ref) if ref else None
    if a is None or b is None or not b.rate:
        return None
    return a.rate / b.rate


def _x(value: float | None, digits: int = 2) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.{digits}f}x"


@dataclasses.dataclass(frozen=True)
class Target:
    path: str
    target: str
    measured: str
    #: None: not measured in this run
    met: bool | None

    @property
    def verdict(self) -> str:
        return {True: "met", False: "**missed**", None: "not measured"}[self.met]


def _ratio_target(res: Results, path: str, target: str, sid: str, ref: str, bound: float) -> Target:
    r = ratio(res, sid, ref)
    if r is None:  # say why when FastStream was left out
        return Target(path, target, res.skipped.get(ref, "—"), None)
    return Target(path, target, _x(r), r >= bound)


def targets(res: Results) -> list[Target]:
    """The targets table of issue 7, each checked on this run's medians."""
    out = [
        _ratio_target(
            res,
            "concurrent `publish()` from 1000 tasks",
            "≥ 0.8 x raw pipelined XADD",
            "lib.publish",
            "raw.publish",
            0.8,
        ),
        _ratio_target(res, "`publish_many`", "≥ 0.9 x raw", "lib.publish_many", "raw.publish", 0.9),
        _ratio_target(
            res,
            "`async for msg` + `msg.ack()`",
            "≥ 0.75 x raw batched consume",
            "lib.iterate",
            "raw.consume",
            0.75,
        ),
        _ratio_target(
            res,
            "chunked consumption + batch ack",
            "≥ 0.85 x raw",
            "lib.chunks",
            "raw.consume",
            0.85,
        ),
        _ratio_target(
            res,
            "`consume(handler, concurrency=32)`, trivial handler",
            "≥ 0.7 x raw",
            "lib.consume",
            "raw.consume",
            0.7,
        ),
        _ratio_target(
            res,
            "per-message consumption vs FastStream's per-message stream subscriber",
            "≥ 10 x",
            "lib.iterate",
            "fs.consume",
            10.0,
        ),
    ]
    # publish vs FastStream's publisher: each of our publish paths against its fastest one
    fs_best = max(
        (res.throughput[s] for s in ("fs.publish", "fs.publish_pipelined") if s in res.throughput),
        key=lambda s: s.rate,
        default=None,
    )
    ours = [(s, res.throughput.get(s)) for s in ("lib.publish", "lib.publish_many")]
    if fs_best is None or any(s is None for _, s in ours):
        why = res.skipped.get("fs.publish", "—")
        out.append(Target("publish vs FastStream's publisher", "≥ 2 x", why, None))
    else:
        r1, r2 = (s.rate / fs_best.rate for _, s in ours if s is not None)
        out.append(
            Target(
                "publish vs FastStream's publisher (its fastest way)",
                "≥ 2 x",
                f"`publish()` {_x(r1)}, `publish_many` {_x(r2)}",
                min(r1, r2) >= 2.0,
            )
        )
    bound = f"p50 ≤ {P50_BOUND:g} x raw, p99 ≤ {P99_BOUND:g} x raw"
    for rate in res.options.rates:
        raw, lib = res.latency.get("raw", {}).get(rate), res.latency.get("lib", {}).get(rate)
        path = f"latency at {rate:,} msg/s"
        if raw is None or lib is None:
            out.append(Target(path, bound, "—", None))
            continue
        if res.latency_runs:
            n, p50s, p99s, both = latency_counts(res, rate)
            need = math.ceil(RUNS_SHARE * n)
            out.append(
                Target(
                    path,
                    f"{bound}, in ≥ {need} of {n} runs",
                    f"p50 met in {p50s}/{n}, p99 in {p99s}/{n}, both in {both}/{n}",
                    both >= need,
                )
            )
            continue
        p50, p99 = lib.p50 / raw.p50, lib.p99 / raw.p99
        out.append(
            Target(
                path,
                bound,
                f"p50 {_x(p50)}, p99 {_x(p99)}",
                p50 <= P50_BOUND and p99 <= P99_BOUND,
            )
        )
    if not res.memory:
        out.append(Target("consumer RSS with a large backlog", "bounded by prefetch", "—", None))
    else:
        payload_mb = res.machine["payload_bytes"] * res.options.backlog / 2**20
        limit = max(16.0, payload_mb / 10)
        measured = ", ".join(
            f"+{m.over_idle_mb:.1f} MB over idle, ≤ {m.max_held} held (prefetch {m.prefetch})"
            for m in res.memory
        )
        met = all(m.max_held <= m.prefetch and m.over_idle_mb <= limit for m in res.memory)
        out.append(
            Target(
                f"consumer RSS with a {res.options.backlog:,} backlog",
                f"bounded by prefetch: held ≤ prefetch, ≤ {limit:.0f} MB over idle",
                measured,
                met,
            )
        )
    return out


def latency_counts(res: Results, rate: int) -> tuple[int, int, int, int]:
    """Over the separate latency runs at ``rate``: (runs, p50 met, p99 met, both met)."""
    n = p50s = p99s = both = 0
    for one in res.latency_runs:
        raw, lib = one["raw"].get(rate), one["lib"].get(rate)
        if raw is None or lib is None:
            continue
        n += 1
        a, b = lib.p50 <= P50_BOUND * raw.p50, lib.p99 <= P99_BOUND * raw.p99
        p50s += a
        p99s += b
        both += a and b
    return n, p50s, p99s, both


def _runs_table(res: Results) -> list[str]:
    lines = [
        "",
        f"### Latency, run by run ({len(res.latency_runs)} runs of "
        f"{res.options.latency_seconds:g} s per rate; ms)",
        "",
        "| run | rate msg/s | raw p50 | broker p50 | p50 x raw | raw p99 | broker p99 | p99 x raw "
        "| target |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i, one in enumerate(res.latency_runs, 1):
        for rate in res.options.rates:
            raw, lib = one["raw"].get(rate), one["lib"].get(rate)
            if raw is None or lib is None:
                continue
            r50, r99 = lib.p50 / raw.p50, lib.p99 / raw.p99
            met = r50 <= P50_BOUND and r99 <= P99_BOUND
            lines.append(
                f"| {i} | {rate:,} | {raw.p50:.2f} | {lib.p50:.2f} | {_x(r50)} | {raw.p99:.2f} | "
                f"{lib.p99:.2f} | {_x(r99)} | {'met' if met else '**missed**'} |"
            )
    lines.append("")
    for rate in res.options.rates:
        n, p50s, p99s, both = latency_counts(res, rate)
        lines.append(
            f"- {rate:,} msg/s: p50 ≤ {P50_BOUND:g}x in {p50s}/{n} runs, p99 ≤ {P99_BOUND:g}x in "
            f"{p99s}/{n}, both in {both}/{n}."
        )
    return lines


def _lat(value: Latency | None, attr: str) -> str:
    return "—" if value is None else f"{getattr(value, attr):.2f}"


def table(res: Results) -> str:
    """Markdown: targets first (ratios), then throughput, latency, memory, processes."""
    m, o = res.machine, res.options
    lines = [
        f"broker bench: redis-server {m['redis_server']} at {m['server']}, Python {m['python']}, "
        f"{m['loop']}, redis-py {m['redis_py']}"
        + (f" + hiredis {m['hiredis']}" if m["hiredis"] else " (no hiredis)")
        + f", FastStream {m['faststream'] or 'not installed'}; {m['cores']} cores {m['cpu']}, "
        f"{m['platform']}.",
        f"Payload: a msgpack dict of 5 fields, {m['payload_bytes']} bytes. {o.messages:,} messages "
        f"per run (FastStream's per-message paths: {min(o.messages, o.fs_messages):,}); "
        f"medians of {o.repeat} run{'s' if o.repeat > 1 else ''}; CPU is this client process's "
        "(`time.process_time`), the server is another process.",
        "",
        "### Targets (issues 7 and 17), ratios from this run",
        "",
        "| path | target | measured | |",
        "|---|---|---|---|",
    ]
    lines += [f"| {t.path} | {t.target} | {t.measured} | {t.verdict} |" for t in targets(res)]
    if res.throughput or res.skipped:
        lines += [
            "",
            "### Throughput",
            "",
            "| scenario | x raw | x FastStream | msg/s | CPU µs/msg |",
            "|---|---:|---:|---:|---:|",
        ]
        for sid in [*PUBLISH, *CONSUME]:
            s = res.throughput.get(sid)
            if s is None:
                if sid in res.skipped:
                    lines.append(f"| {label(sid, res)} | | | {res.skipped[sid]} | |")
                continue
            raw_ref, fs_ref = REFERENCE.get(sid, (sid, None))
            lines.append(
                f"| {label(sid, res)} | {_x(ratio(res, sid, raw_ref))} | "
                f"{_x(ratio(res, sid, fs_ref)) if fs_ref else ''} | {s.rate:,.0f} | "
                f"{s.cpu_us:.1f} |"
            )
    if res.latency:
        lines += [
            "",
            f"### Latency, publish → in the consumer's hands ({o.latency_seconds:g} s per rate)",
            "",
            "| path | rate msg/s | p50 ms | p99 ms | max ms | p50 x raw | p99 x raw |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for rate in o.rates:
            raw = res.latency.get("raw", {}).get(rate)
            for side, name in (
                ("raw", "raw redis-py: XADD / XREADGROUP BLOCK"),
                ("lib", "broker: `publish` / `async for`"),
            ):
                v = res.latency.get(side, {}).get(rate)
                rel50 = v.p50 / raw.p50 if v and raw and side == "lib" else None
                rel99 = v.p99 / raw.p99 if v and raw and side == "lib" else None
                lines.append(
                    f"| {name} | {rate:,} | {_lat(v, 'p50')} | {_lat(v, 'p99')} | "
                    f"{_lat(v, 'max')} | {_x(rel50) if side == 'lib' else ''} | "
                    f"{_x(rel99) if side == 'lib' else ''} |"
                )
    if res.latency_runs:
        lines += _runs_table(res)
    if res.memory:
        lines += [
            "",
            f"### Memory: one consumer process, `async for` with a {o.handler_ms:g} ms handler, "
            f"{o.memory_seconds:g} s against a backlog of {o.backlog:,}",
            "",
            "| prefetch | idle RSS MB | peak RSS MB | over idle MB | most held | consumed |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {x.prefetch} | {x.idle_mb:.1f} | {x.peak_mb:.1f} | {x.over_idle_mb:.1f} | "
            f"{x.max_held} | {x.consumed:,} |"
            for x in res.memory
        ]
    if res.durable is not None:
        lines += _durable(res)
    if res.processes:
        one = res.processes.get(min(res.processes))
        lines += [
            "",
            f"### Consumer processes in one group, draining a backlog of {o.process_messages:,} "
            f"(`async for` + `msg.ack()`, prefetch {o.prefetch})",
            "",
            "| processes | x 1 process | msg/s | CPU µs/msg (all consumers) |",
            "|---:|---:|---:|---:|",
        ]
        for k, s in sorted(res.processes.items()):
            rel = s.rate / one.rate if one and one.rate else None
            lines.append(f"| {k} | {_x(rel)} | {s.rate:,.0f} | {s.cpu_us:.1f} |")
    if res.watch is not None:
        lines += res.watch.lines()
    if res.request is not None:
        lines += request_bench.lines(res.request)
    if res.cluster is not None:
        lines += [
            "",
            f"### A cluster (3 primaries, 3 replicas) against one server: a channel of "
            f"{scale.PARTITIONS} partitions, keyed messages, {o.cluster_messages:,} per path",
            "",
            scale.cluster_table(res.cluster),
        ]
    if res.channels:
        lines += [
            "",
            f"### Many channels in one subscription: one of them receives {o.channel_messages:,} "
            f"messages at {o.channel_rate:,}/s (publisher in the same process)",
            "",
            scale.channels_table(res.channels),
        ]
    return "\n".join(lines)


def _durable(res: Results) -> list[str]:
    d = res.durable
    assert d is not None
    o = res.options
    lines = [
        "",
        f"### Durable publishes: `replicas=1` (one `WAIT` per pipelined batch) against the "
        f"default, on {d.where}",
        "",
        "| path | replicas=0 msg/s | replicas=1 msg/s | x default | CPU µs/msg 0 / 1 |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {
        "durable.publish": f"`publish()` from {o.tasks} tasks",
        "durable.publish_many": "`publish_many(batch=1000)`",
    }
    for sid, sides in d.throughput.items():
        plain, waited = sides.get(0), sides.get(1)
        if plain is None or waited is None:
            continue
        rel = waited.rate / plain.rate if plain.rate else None
        lines.append(
            f"| {names.get(sid, sid)} | {plain.rate:,.0f} | {waited.rate:,.0f} | {_x(rel)} | "
            f"{plain.cpu_us:.1f} / {waited.cpu_us:.1f} |"
        )
    if d.latency:
        plain_l, waited_l = d.latency.get(0), d.latency.get(1)
        lines += [
            "",
            f"An awaited `publish()` at {d.rate:,} msg/s ({o.latency_seconds:g} s), ms:",
            "",
            "| replicas | p50 | p99 | max |",
            "|---:|---:|---:|---:|",
            f"| 0 | {_lat(plain_l, 'p50')} | {_lat(plain_l, 'p99')} | {_lat(plain_l, 'max')} |",
            f"| 1 | {_lat(waited_l, 'p50')} | {_lat(waited_l, 'p99')} | {_lat(waited_l, 'max')} |",
        ]
    return lines


def json_line(res: Results) -> str:
    """Everything on one line (the last line of ``broker bench``'s output)."""
    through: dict[str, Any] = {}
    for sid, s in res.throughput.items():
        raw_ref, fs_ref = REFERENCE.get(sid, (sid, None))
        through[sid] = {
            **s.to_json(),
            "vs_raw": _round(ratio(res, sid, raw_ref)),
            "vs_faststream": _round(ratio(res, sid, fs_ref)),
        }
    doc: dict[str, Any] = {
        "bench": "broker",
        "schema": 1,
        "machine": res.machine,
        "options": {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(res.options).items()
        },
        "throughput": through,
        "skipped": res.skipped,
        "latency_ms": {
            side: {str(rate): v.to_json() for rate, v in rates.items()}
            for side, rates in res.latency.items()
        },
        "latency_runs": [
            {
                side: {str(rate): v.to_json() for rate, v in rates.items()}
                for side, rates in one.items()
            }
            for one in res.latency_runs
        ],
        "memory": [m.to_json() for m in res.memory],
        "processes": {str(k): s.to_json() for k, s in res.processes.items()},
        "durable": None if res.durable is None else res.durable.to_json(),
        "targets": [dataclasses.asdict(t) for t in targets(res)],
        "cluster": None if res.cluster is None else res.cluster.to_json(),
        "channels": [c.to_json() for c in res.channels],
        "watch": None if res.watch is None else res.watch.to_json(),
        "request": res.request,
        "seconds": round(res.seconds, 1),
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


def side_by_side(every: list[Results]) -> str:
    """Several runs of the harness, one per event loop: the targets side by side, then each
    run's own tables (every ratio is taken within one loop's run)."""
    names = [r.machine["loop"] for r in every]
    per = [targets(r) for r in every]
    lines = [
        "### Targets on each event loop (ratios within each loop's own run)",
        "",
        "| path | target | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for i, t in enumerate(per[0]):
        cells = []
        for ts in per:
            u = ts[i] if i < len(ts) else None
            cells.append("—" if u is None else f"{u.measured} ({u.verdict})")
        lines.append(f"| {t.path} | {t.target} | " + " | ".join(cells) + " |")
    if all(r.throughput for r in every):
        lines += [
            "",
            "### Throughput on each event loop: x raw (msg/s)",
            "",
            "| scenario | " + " | ".join(names) + " |",
            "|---|" + "---:|" * len(names),
        ]
        for sid in [*PUBLISH, *CONSUME]:
            if not any(sid in r.throughput for r in every):
                continue
            cells = []
            for r in every:
                s = r.throughput.get(sid)
                ref = REFERENCE.get(sid, (sid, None))[0]
                cells.append("—" if s is None else f"{_x(ratio(r, sid, ref))} ({s.rate:,.0f})")
            lines.append(f"| {label(sid, every[0])} | " + " | ".join(cells) + " |")
    for name, r in zip(names, every, strict=True):
        lines += ["", f"## Event loop: {name}", "", table(r)]
    return "\n".join(lines)


def json_lines_by_loop(every: list[Results]) -> str:
    """One JSON line: each loop's document (as :func:`json_line`) under ``loops``."""
    docs = {r.machine["loop"]: json.loads(json_line(r)) for r in every}
    return json.dumps(
        {"bench": "broker", "schema": 1, "loops": docs}, separators=(",", ":"), ensure_ascii=False
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
