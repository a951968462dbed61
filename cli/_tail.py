"""``broker tail``: print what arrives on channels, read-only by default.

A plain tail reads with ``XRANGE``/``XREAD`` and no consumer group: it never takes messages from
workers and leaves nothing pending. ``--group G --consumer X`` is the explicit opt-in to read as
a member of an existing group; then each message is acked once it was printed.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import click

import broker

from ._common import INTERRUPT_ENDS, Config, UserError, channel_missing, check_channels, note, run
from ._format import JsonLines, MessageOutput, Pretty, RawPayloads, Template, check_template
from ._time import PositionType

__all__ = ["tail"]

DEFAULT_LAST = 10
#: without --follow, a group read ends after this many seconds without a new message
GROUP_IDLE = 2.0


def _template(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    return None if value is None else check_template(value)


@click.command()
@click.argument("channels", nargs=-1, required=True, metavar="CHANNEL...")
@click.option(
    "-n",
    "--lines",
    "last",
    type=click.IntRange(min=0),
    metavar="N",
    help=f"Start with the last N messages of each channel [default: {DEFAULT_LAST}].",
)
@click.option("--from-beginning", is_flag=True, help="Start with the oldest message.")
@click.option(
    "--from",
    "start",
    type=PositionType(),
    metavar="ID|TIME",
    help="Start at this id or time (inclusive): 1714564800123-0, "
    "2024-05-01T12:00:00Z, -30s, -5m, -2h, -1d.",
)
@click.option(
    "--until",
    type=PositionType(),
    metavar="ID|TIME",
    help="Stop after this id or time (inclusive).",
)
@click.option(
    "-f",
    "--follow",
    is_flag=True,
    help="Keep waiting for new messages (end with Ctrl-C); without it, exit at the end.",
)
@click.option(
    "-c", "--count", type=click.IntRange(min=1), metavar="N", help="Exit after N messages."
)
@click.option(
    "--group",
    metavar="G",
    help="Opt-in: read as a member of the existing group G (acks what it prints).",
)
@click.option(
    "--consumer", metavar="X", help="The consumer name within --group (required with it)."
)
@click.option(
    "--codec",
    type=click.Choice(["msgpack", "json", "raw"]),
    default="msgpack",
    show_default=True,
    help="How the payloads were encoded.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="One JSON object per line (the default when stdout is not a terminal).",
)
@click.option(
    "--pretty", is_flag=True, help="The readable view (the default on a terminal), even when piped."
)
@click.option("--raw", is_flag=True, help="Payload bytes only, newline separated (binary safe).")
@click.option(
    "--format",
    "template",
    callback=_template,
    metavar="TEMPLATE",
    help="A line per message from tokens {channel} {id} {time} {ms} {headers} "
    "{data} {error}, e.g. '{channel} {id} {data}'.",
)
@click.option(
    "--color/--no-color",
    default=None,
    help="Color the readable view [default: on a terminal, unless NO_COLOR is set].",
)
@click.pass_context
def tail(
    ctx: click.Context,
    channels: tuple[str, ...],
    last: int | None,
    from_beginning: bool,
    start: str | None,
    until: str | None,
    follow: bool,
    count: int | None,
    group: str | None,
    consumer: str | None,
    codec: str,
    as_json: bool,
    pretty: bool,
    raw: bool,
    template: str | None,
    color: bool | None,
) -> None:
    """Print the messages of one or more CHANNELs, merged in id order.

    By default: the last 10 messages of each channel, then exit (like tail). -f follows from
    the last id seen; -n N, --from-beginning or --from ID|TIME pick the start, --until ID|TIME
    and -c N the end. Each message is labelled with its channel and id.

    A tail is read-only: no consumer group, nothing acked, nothing left pending, so it never
    takes messages from workers. Output: readable and colored on a terminal, one JSON object
    per line otherwise (bytes as {"$base64": "..."}; undecodable payloads get an "error"
    field instead of stopping the tail). Status and gaps (a start older than the oldest kept
    entry) go to stderr. Ctrl-C and a closed pipe end it with status 0.

    With --group G --consumer X it reads as that member of the existing group instead (from
    the group's position), and acks each message once printed; without -f it then exits after
    2 s without a new message. With -c N it fetches no more than the N it prints.
    """
    if sum(x is not None for x in (last, start)) + from_beginning > 1:
        raise click.UsageError("give only one of -n, --from-beginning and --from")
    if as_json + pretty + raw + (template is not None) > 1:
        raise click.UsageError("give only one of --json, --pretty, --raw and --format")
    if consumer is not None and group is None:
        raise click.UsageError("--consumer goes with --group")
    if group is not None:
        if consumer is None:
            raise click.UsageError("--group needs --consumer (the member name to read as)")
        if last is not None or start is not None or from_beginning or until is not None:
            raise click.UsageError(
                "-n, --from, --from-beginning and --until do not apply with --group: a group "
                "reads from its own position (move it with `broker group reset`)"
            )
    if len(set(channels)) != len(channels):
        raise click.UsageError(f"channels repeat: {' '.join(channels)}")

    output = _output(as_json, pretty, raw, template, color, deliveries=group is not None)
    ctx.meta[INTERRUPT_ENDS] = True  # Ctrl-C is how a follow ends: exit 0
    config: Config = ctx.obj
    if group is not None:
        assert consumer is not None
        run(_group_tail(config, channels, codec, group, consumer, follow, count, output))
        return
    if until is not None and int(until.split("-")[0]) < time.time() * 1000 - 1000:
        follow = False  # ids grow with the clock: nothing can be added at or before --until
    position: dict[str, Any] = {"until": until, "follow": follow, "count": count}
    if from_beginning:
        position["start"] = "beginning"
    elif start is not None:
        position["start"] = start
    else:
        position["last"] = DEFAULT_LAST if last is None else last
    run(_tail(config, channels, codec, position, output))


def _output(
    as_json: bool,
    pretty: bool,
    raw: bool,
    template: str | None,
    color: bool | None,
    *,
    deliveries: bool,
) -> MessageOutput:
    if raw:
        return RawPayloads()
    if template is not None:
        return Template(template)
    if as_json or not (pretty or sys.stdout.isatty()):
        return JsonLines(deliveries=deliveries)
    if color is None:
        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    return Pretty(color=color, deliveries=deliveries)


async def _tail(
    config: Config,
    names: tuple[str, ...],
    codec: str,
    position: dict[str, Any],
    output: MessageOutput,
) -> None:
    async with config.connect() as b:
        missing = await check_channels(b, names)
        if missing and not position["follow"]:
            raise channel_missing(missing[0], b.namespace)
        for name in missing:
            note(f"channel {name!r} does not exist yet; waiting for it")
        channels = [b.channel(n, codec=codec) for n in names]
        async with b.tail(channels, **position) as messages:
            for name, first in messages.gaps.items():
                note(
                    f"gap in {name!r}: the start point is older than its oldest entry "
                    f"(earlier entries were trimmed); starting at {first}"
                )
            async for msg in messages:
                output.write(msg)


async def _group_tail(
    config: Config,
    names: tuple[str, ...],
    codec: str,
    group: str,
    consumer: str,
    follow: bool,
    count: int | None,
    output: MessageOutput,
) -> None:
    async with config.connect() as b:
        missing = await check_channels(b, names)
        if missing:
            raise channel_missing(missing[0], b.namespace)
        channels = [b.channel(n, codec=codec) for n in names]
        for ch in channels:
            info = await ch.info()
            if group not in {g.name for g in info.groups}:
                raise UserError(
                    f"channel {ch.name!r} has no consumer group {group!r} "
                    f"(create it with `broker group create {ch.name} {group}`)"
                )
        printed = 0
        # with a count, one message at a time: whatever it fetched beyond the count would be
        # held by this consumer name instead of going to the group's workers
        options: dict[str, Any] = {} if count is None else {"prefetch": 1}
        async with b.subscribe(channels, group=group, consumer=consumer, **options) as messages:
            while count is None or printed < count:
                try:
                    async with asyncio.timeout(None if follow else GROUP_IDLE):
                        msg: broker.Message[Any] = await anext(messages)
                except (StopAsyncIteration, TimeoutError):
                    break
                output.write(msg)
                printed += 1
                if printed == count:
                    messages.stop()  # before the ack, whose room would let one more read out
                msg.ack()  # only once it was printed: a broken pipe leaves it pending
