"""``broker top``: a live view of channels, groups and worker slots, refreshed until Ctrl-C.

Two layers: :class:`TopSampler` reads the server (read-only: ``XINFO``, ``XLEN``, ``XPENDING``
summaries and the workers' heartbeats; it never joins a group, so nothing becomes pending) and
turns two reads into rates; :func:`render` draws a :class:`Frame` with ``rich``. Rates are
deltas between two samples: publishes from ``entries-added`` (Redis 7; else the length), acks
as delivered minus still pending (``entries-read - pending``, Redis 7), handled and failed per
slot from the heartbeats' counters.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

import broker
from broker._message import id_to_ms
from broker.workers import list_workers

from ._common import INTERRUPT_ENDS, Config, UserError, run
from ._format import duration

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = ["ChannelRow", "Frame", "GroupRow", "SlotRow", "TopSampler", "render", "top"]

#: channels shown at most (the rest are counted in the title)
MAX_CHANNELS = 50
#: where Redis cannot tell a group's lag, entries counted at most (shown as "10000+")
LAG_COUNT = 10_000


@dataclasses.dataclass(frozen=True)
class GroupRow:
    name: str
    consumers: int
    #: entries not yet delivered (counted up to LAG_COUNT + 1 where Redis cannot tell)
    lag: int | None
    pending: int
    #: seconds since the oldest pending entry was added (None: nothing pending)
    oldest_pending: float | None
    #: acks per second since the previous sample (None: first sample, or Redis < 7)
    ack_rate: float | None


@dataclasses.dataclass(frozen=True)
class ChannelRow:
    name: str
    length: int
    dead_letters: int
    #: entries added per second since the previous sample (None: first sample)
    publish_rate: float | None
    groups: list[GroupRow]


@dataclasses.dataclass(frozen=True)
class SlotRow:
    id: str
    host: str
    state: str
    pid: int
    in_flight: int
    processed: int
    failed: int
    handled_rate: float | None
    failed_rate: float | None
    #: resident memory in bytes, when the slot reports it
    rss: int | None


@dataclasses.dataclass(frozen=True)
class Frame:
    namespace: str
    url: str
    #: seconds between the two samples the rates come from (None on the first)
    interval: float | None
    channels: list[ChannelRow]
    hidden_channels: int
    slots: list[SlotRow]


class TopSampler:
    """Samples the server; each :meth:`sample` returns a frame with rates since the last one."""

    def __init__(self, b: broker.Broker, channels: Sequence[str] = ()) -> None:
        self.b = b
        self.names = list(channels)
        self._at: float | None = None
        #: channel -> entries added; (channel, group) -> acked so far; slot -> (done, failed)
        self._added: dict[str, int] = {}
        self._acked: dict[tuple[str, str], int] = {}
        self._slots: dict[str, tuple[int, int]] = {}
        #: channel objects kept, so a partitioned channel's streams are resolved once
        self._channels: dict[str, broker.Channel[Any]] = {}

    async def sample(self) -> Frame:
        b = self.b
        names = self.names or await b.channels()
        hidden = max(0, len(names) - MAX_CHANNELS)
        names = names[:MAX_CHANNELS]
        rows = await b.call(lambda: self._read(names)) if names else []
        workers = await list_workers(b)
        now = time.monotonic()
        dt = None if self._at is None else max(now - self._at, 1e-6)
        self._at = now
        channels = []
        added: dict[str, int] = {}
        acked: dict[tuple[str, str], int] = {}
        now_ms = b.server_time_ms()
        for name, (stream, dead, groups, pendings) in zip(names, rows, strict=True):
            length = int(stream.get("length", 0)) if stream else 0
            entries = stream.get("entries-added") if stream else None
            added[name] = int(entries) if entries is not None else length
            group_rows = []
            for g, summary in zip(groups, pendings, strict=True):
                gname = _text(g["name"])
                pending = int(g["pending"])
                read = g.get("entries-read")
                lag = None if g.get("lag") is None else int(g["lag"])
                if read is None and entries is not None and lag is not None and lag <= LAG_COUNT:
                    read = int(entries) - lag  # delivered so far, from the counted lag
                ack_rate = None
                if read is not None:
                    acked[(name, gname)] = done = int(read) - pending
                    before = self._acked.get((name, gname))
                    if dt is not None and before is not None:
                        ack_rate = max(0, done - before) / dt
                oldest = summary.get("min") if isinstance(summary, dict) else None
                group_rows.append(
                    GroupRow(
                        name=gname,
                        consumers=int(g["consumers"]),
                        lag=lag,
                        pending=pending,
                        oldest_pending=None
                        if not oldest or not pending
                        else max(0.0, (now_ms - id_to_ms(_text(oldest))) / 1000),
                        ack_rate=ack_rate,
                    )
                )
            before_added = self._added.get(name)
            channels.append(
                ChannelRow(
                    name=name,
                    length=length,
                    dead_letters=int(dead or 0),
                    publish_rate=None
                    if dt is None or before_added is None
                    else max(0, added[name] - before_added) / dt,
                    groups=group_rows,
                )
            )
        slots = []
        counts: dict[str, tuple[int, int]] = {}
        for w in workers:
            counts[w.id] = (w.processed, w.failed)
            prev = self._slots.get(w.id)
            slots.append(
                SlotRow(
                    id=w.id,
                    host=w.host,
                    state=w.state if w.alive else "silent",
                    pid=w.pid,
                    in_flight=w.in_flight,
                    processed=w.processed,
                    failed=w.failed,
                    handled_rate=None
                    if dt is None or prev is None
                    else max(0, w.processed - prev[0]) / dt,
                    failed_rate=None
                    if dt is None or prev is None
                    else max(0, w.failed - prev[1]) / dt,
                    rss=getattr(w, "rss", None),
                )
            )
        self._added, self._acked, self._slots = added, acked, counts
        return Frame(b.namespace, b.settings.safe_url, dt, channels, hidden, slots)

    async def _read(self, names: list[str]) -> list[tuple[Any, int, list[Any], list[Any]]]:
        """Two pipelines: stream info, dead letters and groups per stream (one per channel, or
        one per partition); then one pending summary per group, and a bounded count where
        Redis cannot tell a lag. A partitioned channel's streams are added up into one row. A
        channel that does not exist (yet) shows as empty."""
        r = self.b.redis
        for name in names:
            if name not in self._channels:
                self._channels[name] = self.b.channel(name)
        per_channel = [await self._channels[n].streams(record=False) for n in names]
        streams = [st for sts in per_channel for st in sts]
        pipe = r.pipeline(transaction=False)
        for st in streams:
            pipe.xinfo_stream(st.key)
            pipe.xlen(st.dead_key)
            pipe.xinfo_groups(st.key)
        first = await pipe.execute(raise_on_error=False)
        out = []
        pipe = r.pipeline(transaction=False)
        for i, st in enumerate(streams):
            info, dead, groups = first[3 * i : 3 * i + 3]
            if isinstance(info, Exception):
                if "no such key" not in str(info).lower():
                    raise info
                info, groups = None, []
            groups = groups if isinstance(groups, list) else []
            for g in groups:
                pipe.xpending(st.key, _text(g["name"]))
                if g.get("lag") is None:  # Redis cannot tell: count, up to a bound
                    last = _text(g["last-delivered-id"])
                    pipe.xrange(st.key, min=f"({last}", count=LAG_COUNT + 1)
            out.append((info, dead if isinstance(dead, int) else 0, groups))
        summaries = list(await pipe.execute(raise_on_error=False)) if len(pipe) else []
        rows = []
        for info, dead, groups in out:
            mine = []
            for g in groups:
                mine.append(summaries.pop(0))
                if g.get("lag") is None:
                    after = summaries.pop(0)
                    g["lag"] = len(after) if isinstance(after, list) else None
            rows.append((info, dead, groups, mine))
        merged = []
        for sts in per_channel:
            parts, rows = rows[: len(sts)], rows[len(sts) :]
            merged.append(parts[0] if len(parts) == 1 else _merge(parts))
        return merged


def _merge(
    parts: list[tuple[Any, int, list[Any], list[Any]]],
) -> tuple[Any, int, list[Any], list[Any]]:
    """The streams of a partitioned channel as one: lengths, lags and pending added up, the
    oldest pending entry of any partition, the most consumers any partition has."""

    def total(values: list[Any]) -> int | None:
        return None if any(v is None for v in values) else sum(int(v) for v in values)

    infos = [info for info, _, _, _ in parts if info is not None]
    info = None
    if infos:
        info = {
            "length": sum(int(i.get("length", 0)) for i in infos),
            "entries-added": total([i.get("entries-added") for i in infos]),
        }
    groups: dict[str, list[tuple[Any, Any]]] = {}
    for _, _, gs, summaries in parts:
        for g, summary in zip(gs, summaries, strict=True):
            groups.setdefault(_text(g["name"]), []).append((g, summary))
    merged_groups, merged_summaries = [], []
    for name, rows in groups.items():
        merged_groups.append(
            {
                "name": name,
                "consumers": max(int(g["consumers"]) for g, _ in rows),
                "pending": sum(int(g["pending"]) for g, _ in rows),
                "lag": total([g.get("lag") for g, _ in rows]),
                "entries-read": total([g.get("entries-read") for g, _ in rows]),
            }
        )
        oldest = [
            _text(s["min"]) for _, s in rows if isinstance(s, dict) and s.get("min") is not None
        ]
        merged_summaries.append({"min": min(oldest, key=_id_key) if oldest else None})
    return info, sum(dead for _, dead, _, _ in parts), merged_groups, merged_summaries


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return "-"


def render(frame: Frame) -> RenderableType:
    """The screen for one frame: a title line, the channels and groups, the worker slots."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    every = "" if frame.interval is None else f", rates over {frame.interval:.1f}s"
    title = Text.assemble(
        ("broker top", "bold"),
        f"  namespace {frame.namespace} on {frame.url}{every}  ",
        (time.strftime("%H:%M:%S"), "dim"),
        ("  (Ctrl-C quits)", "dim"),
    )
    more = f" (+{frame.hidden_channels} more)" if frame.hidden_channels else ""
    look: dict[str, Any] = {"title_justify": "left", "box": box.SIMPLE_HEAD, "pad_edge": False}
    channels = Table(title=f"channels{more}", **look)
    for head in ("CHANNEL", "GROUP"):
        channels.add_column(head, no_wrap=True)
    for head in ("LENGTH", "PUB/S", "ACK/S", "LAG", "PENDING", "OLDEST"):
        channels.add_column(head, justify="right", no_wrap=True)
    channels.add_column("DEAD", justify="right")
    channels.add_column("CONSUMERS", justify="right")
    for ch in frame.channels:
        dead = Text(str(ch.dead_letters), style="red" if ch.dead_letters else "")
        first = (ch.name, str(ch.length), _rate(ch.publish_rate))
        if not ch.groups:
            channels.add_row(first[0], "-", first[1], first[2], "-", "-", "-", "-", dead, "-")
        for i, g in enumerate(ch.groups):
            name, length, pub = first if i == 0 else ("", "", "")
            oldest = "-" if g.oldest_pending is None else duration(g.oldest_pending)
            channels.add_row(
                name,
                g.name,
                length,
                pub,
                _rate(g.ack_rate),
                "?" if g.lag is None else f"{LAG_COUNT}+" if g.lag > LAG_COUNT else str(g.lag),
                str(g.pending),
                oldest,
                dead if i == 0 else "",
                str(g.consumers),
            )
    if not frame.channels:
        channels.add_row("(none)", *[""] * 9)
    slots = Table(title="worker slots", **look)
    for head in ("SLOT", "HOST", "STATE", "PID"):
        slots.add_column(head, no_wrap=True)
    for head in ("IN FLIGHT", "DONE/S", "FAILED/S", "DONE", "FAILED", "RSS"):
        slots.add_column(head, justify="right", no_wrap=True)
    for s in frame.slots:
        state = Text(s.state, style="green" if s.state == "running" else "yellow")
        slots.add_row(
            s.id,
            s.host,
            state,
            str(s.pid),
            str(s.in_flight),
            _rate(s.handled_rate),
            _rate(s.failed_rate),
            str(s.processed),
            str(s.failed),
            _size(s.rss),
        )
    if not frame.slots:
        slots.add_row("(none)", *[""] * 9)
    return Group(title, channels, slots)


@click.command()
@click.argument("channels", nargs=-1, metavar="[CHANNEL...]")
@click.option(
    "--interval",
    "-i",
    type=click.FloatRange(0.1),
    default=1.0,
    show_default=True,
    help="Seconds between refreshes.",
)
@click.option(
    "--iterations",
    "-n",
    type=click.IntRange(1),
    default=None,
    help="Stop after this many screens (the first comes one interval in, with rates).",
)
@click.pass_context
def top(
    ctx: click.Context, channels: tuple[str, ...], interval: float, iterations: int | None
) -> None:
    """A live view of channels (length, publish and ack rates, lag, pending, oldest pending,
    dead letters, consumers) and worker slots (state, in flight, handled and failed rates, RSS),
    refreshed every second until Ctrl-C. Read-only: it joins no group, so it takes nothing.

    On a terminal the screen is redrawn in place; piped, one screen is printed per refresh."""
    try:
        from rich.console import Console
        from rich.live import Live
    except ImportError:
        raise UserError("broker top needs rich: pip install 'broker[top]'", exit_code=2) from None
    config: Config = ctx.obj
    ctx.meta[INTERRUPT_ENDS] = True
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # piped: whole lines, no wrapping at 80 columns

    async def main() -> None:
        async with config.connect() as b:
            for name in channels:
                b.channel(name)  # a bad name: a usage error now
            sampler = TopSampler(b, channels)
            await sampler.sample()  # the baseline for the first rates
            shown = 0
            if console.is_terminal:
                with Live(console=console, auto_refresh=False, screen=False) as live:
                    while iterations is None or shown < iterations:
                        await asyncio.sleep(interval)
                        live.update(render(await sampler.sample()), refresh=True)
                        shown += 1
                return
            while iterations is None or shown < iterations:
                await asyncio.sleep(interval)
                console.print(render(await sampler.sample()))
                shown += 1

    run(main())
