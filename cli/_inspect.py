"""Read-only inspection: ``broker info``, ``broker channels`` and ``broker pending``."""

from __future__ import annotations

import json
from typing import Any

import click

import broker

from ._common import Config, channel_missing, check_channels, note, run
from ._format import duration, id_time, iso_time, local_time, plural, table

__all__ = ["channels", "info", "pending"]

#: idle seconds beyond which a pending entry was released by a closing subscription (the
#: library marks it "idle since forever" so the next claim takes it at once)
RELEASED = 10**8


def _when(entry_id: str | None) -> str | None:
    return None if entry_id is None else iso_time(id_time(entry_id))


async def _report(ch: broker.Channel[Any]) -> dict[str, Any]:
    info = await ch.info()
    groups = []
    for g in info.groups:
        consumers = await ch.consumers(g.name)
        groups.append(
            {
                "name": g.name,
                "consumers": [
                    {"name": c.name, "pending": c.pending, "idle": round(c.idle, 3)}
                    for c in consumers
                ],
                "pending": g.pending,
                "lag": g.lag,
                "last_delivered_id": g.last_delivered_id,
            }
        )
    return {
        "name": info.name,
        "length": info.length,
        "first_id": info.first_id,
        "first_time": _when(info.first_id),
        "last_id": info.last_id,
        "last_time": _when(info.last_id),
        "dead_letters": info.dead_letters,
        "partitions": info.partitions,
        "groups": groups,
    }


async def _reports(config: Config, names: tuple[str, ...]) -> list[dict[str, Any]]:
    async with config.connect() as b:
        if names:
            missing = await check_channels(b, names)
            if missing:
                raise channel_missing(missing[0], b.namespace)
        else:
            names = tuple(await b.channels())
            if not names:
                note(f"no channels in namespace {b.namespace!r}")
        return [await _report(b.channel(n)) for n in names]


def _point(entry_id: str | None) -> str:
    if entry_id is None:
        return "-"
    return f"{entry_id} ({local_time(id_time(entry_id))})"


@click.command()
@click.argument("names", nargs=-1, metavar="[CHANNEL...]")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of channel objects.")
@click.pass_obj
def info(config: Config, names: tuple[str, ...], as_json: bool) -> None:
    """Length, first and last entry, dead letters, groups and consumers of CHANNELs (all
    channels of the namespace when none is given).

    Lag is the number of entries a group has not been handed yet ("?" where Redis cannot
    tell); idle is the time since a consumer last read.
    """
    reports = run(_reports(config, names))
    if as_json:
        click.echo(json.dumps(reports, indent=2))
        return
    for r in reports:
        parts = f" ({r['partitions']} partitions)" if r["partitions"] > 1 else ""
        click.echo(
            f"channel {r['name']}{parts}: {plural(r['length'], 'entry')}, "
            f"first {_point(r['first_id'])}, last {_point(r['last_id'])}, "
            f"{plural(r['dead_letters'], 'dead letter')}"
        )
        for g in r["groups"]:
            lag = "?" if g["lag"] is None else g["lag"]
            members = plural(len(g["consumers"]), "consumer")
            click.echo(
                f"  group {g['name']}: {members}, {g['pending']} pending, lag {lag}, "
                f"last delivered {g['last_delivered_id']}"
            )
            for c in g["consumers"]:
                click.echo(
                    f"    consumer {c['name']}: {c['pending']} pending, idle {duration(c['idle'])}"
                )


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON array of channel objects.")
@click.pass_obj
def channels(config: Config, as_json: bool) -> None:
    """List the channels of the namespace with their length, groups, lag and dead letters."""
    reports = run(_reports(config, ()))
    rows = []
    for r in reports:
        lags = [g["lag"] for g in r["groups"]]
        r["max_lag"] = None if None in lags else max(lags, default=0)
        rows.append(
            [
                r["name"],
                str(r["length"]),
                str(len(r["groups"])),
                "?" if r["max_lag"] is None else str(r["max_lag"]),
                str(r["dead_letters"]),
                "-" if r["last_id"] is None else local_time(id_time(r["last_id"])),
            ]
        )
    if as_json:
        keys = ("name", "length", "first_id", "last_id", "last_time", "dead_letters", "max_lag")
        out = [
            {k: r[k] for k in keys} | {"groups": [g["name"] for g in r["groups"]]} for r in reports
        ]
        click.echo(json.dumps(out, indent=2))
    elif rows:
        for line in table(["CHANNEL", "LENGTH", "GROUPS", "MAX LAG", "DEAD", "LAST"], rows):
            click.echo(line)


async def _pending(
    config: Config, name: str, group: str, consumer: str | None, count: int
) -> tuple[list[broker.PendingEntry], int]:
    async with config.connect() as b:
        if await check_channels(b, [name]):
            raise channel_missing(name, b.namespace)
        ch = b.channel(name)
        entries = await ch.pending(group, count=count, consumer=consumer)
        total = sum(
            c.pending for c in await ch.consumers(group) if consumer is None or c.name == consumer
        )
        return entries, total


@click.command()
@click.argument("channel")
@click.option("-g", "--group", required=True, help="The consumer group.")
@click.option("--consumer", help="Only the entries held by this consumer.")
@click.option(
    "-n",
    "--count",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Show the oldest N pending entries.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON array of entries.")
@click.pass_obj
def pending(
    config: Config, channel: str, group: str, consumer: str | None, count: int, as_json: bool
) -> None:
    """Entries of CHANNEL delivered to GROUP and not acked yet: id, owner, idle, deliveries.

    "released" entries were fetched by a subscription that closed before handing them out;
    the next consumer to claim takes them at once.
    """
    entries, total = run(_pending(config, channel, group, consumer, count))
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "id": e.id,
                        "consumer": e.consumer,
                        "idle": round(e.idle, 3),
                        "deliveries": e.deliveries,
                        "time": _when(e.id),
                        "released": e.idle >= RELEASED,
                    }
                    for e in entries
                ],
                indent=2,
            )
        )
        return
    if not entries:
        note(f"nothing pending in group {group!r} of {channel!r}")
        return
    rows = [
        [
            e.id,
            e.consumer,
            "released" if e.idle >= RELEASED else duration(e.idle),
            str(e.deliveries),
        ]
        for e in entries
    ]
    for line in table(["ID", "CONSUMER", "IDLE", "DELIVERIES"], rows):
        click.echo(line)
    if total > len(entries):
        note(f"showing the oldest {len(entries)} of {total} pending entries (raise -n)")
