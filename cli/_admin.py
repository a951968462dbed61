"""Management: ``broker group``, ``broker dead`` (dead letters) and ``broker stop``."""

from __future__ import annotations

import contextlib
import getpass
import json
import socket
import sys
from collections.abc import Iterator
from typing import Any

import click

import broker
from broker._names import check_stop_name

from ._common import Config, UserError, channel_missing, check_channels, note, run
from ._format import dump, duration, jsonable, table
from ._progress import progress
from ._time import PositionType

__all__ = ["dead", "group", "stop"]

REPLAY_CHUNK = 100


# -- groups -------------------------------------------------------------------------------------


@click.group()
def group() -> None:
    """Create, move or delete a consumer group."""


_START = PositionType(keywords=("new", "all"))


async def _create(config: Config, name: str, group_name: str, start: str) -> bool:
    async with config.connect() as b:
        return await b.channel(name).create_group(group_name, start)


@group.command("create")
@click.argument("channel")
@click.argument("group_name", metavar="GROUP")
@click.option(
    "--start",
    type=_START,
    default="new",
    show_default=True,
    help="Where the group starts: new (entries added from now on), all, or an id/time.",
)
@click.pass_obj
def group_create(config: Config, channel: str, group_name: str, start: str) -> None:
    """Create GROUP on CHANNEL (and the channel if needed); a no-op if it exists."""
    if run(_create(config, channel, group_name, start)):
        click.echo(f"created group {group_name!r} on channel {channel!r} at {start}")
    else:
        note(
            f"group {group_name!r} already exists on {channel!r}; unchanged "
            "(move it with `broker group reset`)"
        )


async def _reset(config: Config, name: str, group_name: str, start: str) -> None:
    async with config.connect() as b:
        if await check_channels(b, [name]):
            raise channel_missing(name, b.namespace)
        await b.channel(name).reset_group(group_name, start)


@group.command("reset")
@click.argument("channel")
@click.argument("group_name", metavar="GROUP")
@click.option(
    "--start",
    type=_START,
    required=True,
    help="The new position: new (skip everything so far), all, or an id/time.",
)
@click.pass_obj
def group_reset(config: Config, channel: str, group_name: str, start: str) -> None:
    """Move GROUP's position on CHANNEL; pending entries stay pending."""
    run(_reset(config, channel, group_name, start))
    click.echo(f"moved group {group_name!r} of channel {channel!r} to {start}")


async def _delete(config: Config, name: str, group_name: str) -> bool:
    async with config.connect() as b:
        if await check_channels(b, [name]):
            raise channel_missing(name, b.namespace)
        return await b.channel(name).delete_group(group_name)


@group.command("delete")
@click.argument("channel")
@click.argument("group_name", metavar="GROUP")
@click.pass_obj
def group_delete(config: Config, channel: str, group_name: str) -> None:
    """Delete GROUP from CHANNEL, with its pending list."""
    if not run(_delete(config, channel, group_name)):
        raise broker.GroupMissingError(channel, group_name)
    click.echo(f"deleted group {group_name!r} of channel {channel!r}")


# -- dead letters -------------------------------------------------------------------------------


@click.group()
def dead() -> None:
    """List, replay or purge the dead letters of a channel."""


async def _dead_channel(b: broker.Broker, name: str) -> broker.Channel[Any]:
    """The channel, if it or its dead letters exist."""
    ch = b.channel(name)
    if await check_channels(b, [name]) and (await ch.info()).dead_letters == 0:
        raise channel_missing(name, b.namespace)
    return ch


def _dead_record(d: broker.DeadLetter) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": d.id,
        "original_id": d.original_id,
        "group": d.group,
        "consumer": d.consumer,
        "deliveries": d.deliveries,
        "error": d.error,
    }
    payload = d.fields.get(b"d")
    if payload is None:
        record["fields"] = jsonable(d.fields)
    else:
        try:
            record["data"] = jsonable(broker.MsgpackCodec().decode(payload))
        except ValueError:
            record["data"] = jsonable(payload)
    return record


async def _dead_list(config: Config, name: str, count: int) -> list[broker.DeadLetter]:
    async with config.connect() as b:
        return await (await _dead_channel(b, name)).dead_letters(count=count)


@dead.command("list")
@click.argument("channel")
@click.option(
    "-n",
    "--count",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Show the oldest N dead letters.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON array (with the decoded data).")
@click.pass_obj
def dead_list(config: Config, channel: str, count: int, as_json: bool) -> None:
    """Dead letters of CHANNEL: original id, group, deliveries and the error."""
    letters = run(_dead_list(config, channel, count))
    if as_json:
        click.echo(json.dumps([_dead_record(d) for d in letters], indent=2))
        return
    if not letters:
        note(f"no dead letters on {channel!r}")
        return
    rows = []
    for d in letters:
        record = _dead_record(d)
        data = dump(record.get("data", record.get("fields")))
        rows.append([d.id, d.original_id, d.group, str(d.deliveries), d.error, data[:60]])
    for line in table(["DEAD ID", "ORIGINAL ID", "GROUP", "DELIVERIES", "ERROR", "DATA"], rows):
        click.echo(line)


@contextlib.contextmanager
def _bar(total: int) -> Iterator[Any]:
    if total >= REPLAY_CHUNK and sys.stderr.isatty():
        with progress(total, "replaying") as advance:
            yield advance
    else:
        yield lambda n: None


async def _replay(config: Config, name: str, ids: tuple[str, ...]) -> tuple[list[str], int]:
    async with config.connect() as b:
        ch = await _dead_channel(b, name)
        todo = list(ids) or [d.id for d in await ch.dead_letters(count=10_000_000)]
        new_ids: list[str] = []
        with _bar(len(todo)) as advance:
            for i in range(0, len(todo), REPLAY_CHUNK):
                chunk = todo[i : i + REPLAY_CHUNK]
                new_ids += await ch.replay_dead(chunk)
                advance(len(chunk))
        return new_ids, len(todo)


@dead.command("replay")
@click.argument("channel")
@click.argument("ids", nargs=-1, metavar="[DEAD_ID...]")
@click.pass_obj
def dead_replay(config: Config, channel: str, ids: tuple[str, ...]) -> None:
    """Move dead letters (all, or the given dead-letter ids) back to CHANNEL; print new ids.

    Each entry moves atomically, so replaying an entry twice appends it once.
    """
    new_ids, asked = run(_replay(config, channel, ids))
    if new_ids:
        click.echo("\n".join(new_ids))
    skipped = asked - len(new_ids)
    note(
        f"replayed {len(new_ids)} dead letters to {channel!r}"
        + (f"; {skipped} were already replayed or not found" if skipped else "")
    )


async def _dead_count(config: Config, name: str) -> int:
    async with config.connect() as b:
        return (await (await _dead_channel(b, name)).info()).dead_letters


async def _purge(config: Config, name: str) -> int:
    async with config.connect() as b:
        return await b.channel(name).purge_dead()


@dead.command("purge")
@click.argument("channel")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def dead_purge(config: Config, channel: str, yes: bool) -> None:
    """Delete every dead letter of CHANNEL (asks first unless --yes)."""
    count = run(_dead_count(config, channel))
    if count == 0:
        note(f"no dead letters on {channel!r}")
        return
    if not yes and not click.confirm(
        f"Delete {count} dead letters of {channel!r}?", err=True, default=False
    ):
        raise UserError("nothing purged (pass --yes to skip the question)")
    purged = run(_purge(config, channel))
    click.echo(f"purged {purged} dead letters of {channel!r}")


# -- stop tokens --------------------------------------------------------------------------------


def _default_reason() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "someone"
    return f"`broker stop` by {user}@{socket.gethostname()}"


async def _stop(
    config: Config,
    name: str,
    reason: str | None,
    ttl: float | None,
    reset: bool,
    replicas: int = 0,
) -> int:
    """Fire (or clear) the stop; how many listeners received it (or 1 if a stop was cleared)."""
    async with config.connect() as b:
        source = b.stop_source(name)
        if reset:
            return int(await source.reset())
        return await source.stop(reason or _default_reason(), ttl=ttl, replicas=replicas)


@click.command()
@click.argument("name")
@click.option("--reason", help="Why; shown to the stopped streams [default: who and where].")
@click.option(
    "--ttl",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Forget the stop after this long (hosts starting later no longer see it).",
)
@click.option("--reset", is_flag=True, help="Clear the stop instead, so streams may start again.")
@click.option(
    "--replicas",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    metavar="N",
    help="Return only once N replicas have the record (WAIT; see Failover in the README).",
)
@click.pass_obj
def stop(
    config: Config,
    name: str,
    reason: str | None,
    ttl: float | None,
    reset: bool,
    replicas: int,
) -> None:
    """Fire the stop token NAME: every stream wrapped by it, on every host, ends between
    messages. The stop is also recorded, so hosts that connect later see it (until --ttl)."""
    if reset and (reason is not None or ttl is not None or replicas):
        raise click.UsageError("--reset takes no --reason, --ttl or --replicas")
    try:
        check_stop_name(name)  # before connecting: a bad name needs no server to be told
    except broker.ConfigurationError as exc:
        raise UserError(str(exc), exit_code=2) from None
    result = run(_stop(config, name, reason, ttl, reset, replicas))
    if reset:
        click.echo(f"reset stop token {name!r}" if result else f"stop token {name!r} was not set")
        return
    expiry = f"; the record expires in {duration(ttl)}" if ttl else ""
    click.echo(
        f"fired stop token {name!r}: {result} listening processes got it now, later ones "
        f"see the record{expiry}"
    )
