"""``broker watch``: print a watched value and follow it, or set, get or delete it.

Following prints the current value (if any), then each newer version; a terminal too slow for
the writer gets the newest, not a backlog. Output: readable on a terminal (``v<version>`` and
the value as JSON), one JSON object per line otherwise (``{"name", "version", "value"}``, bytes
as ``{"$base64": "..."}``).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

import broker

from ._common import INTERRUPT_ENDS, Config, UserError, loads_json, note, run
from ._format import TooDeep, _write_line, dump, jsonable

__all__ = ["watch"]


@click.command()
@click.argument("name")
@click.option("--get", "get_once", is_flag=True, help="Print the current value once and exit.")
@click.option("--set", "new", metavar="VALUE", help="Set the value (JSON); prints the new version.")
@click.option("--delete", is_flag=True, help="Delete the value (the version counter stays).")
@click.option(
    "--if-version",
    type=click.IntRange(min=0),
    metavar="N",
    help="With --set or --delete: only if the current version is N (0: no value set).",
)
@click.option(
    "--ttl",
    type=click.FloatRange(min=0, min_open=True),
    metavar="S",
    help="With --set: the value expires after S seconds unless set again.",
)
@click.option("--text", is_flag=True, help="With --set: VALUE is a string, not JSON.")
@click.option("-c", "--count", type=click.IntRange(min=1), metavar="N", help="Exit after N values.")
@click.option(
    "--codec",
    type=click.Choice(["msgpack", "json", "raw"]),
    default="msgpack",
    show_default=True,
    help="How the value is encoded.",
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
@click.pass_context
def watch(
    ctx: click.Context,
    name: str,
    get_once: bool,
    new: str | None,
    delete: bool,
    if_version: int | None,
    ttl: float | None,
    text: bool,
    count: int | None,
    codec: str,
    as_json: bool,
    pretty: bool,
) -> None:
    """Print the value NAME and follow it (end with Ctrl-C); or --get, --set VALUE, --delete.

    \b
      broker watch config
      broker watch config --set '{"rate": 10}'
      broker watch leader --set '"host-a"' --if-version 0 --ttl 10
      broker watch config --get

    A --set or --delete with --if-version N that finds another version changes nothing and
    exits with status 1, naming the current version.
    """
    if get_once + (new is not None) + delete > 1:
        raise click.UsageError("give only one of --get, --set and --delete")
    if if_version is not None and new is None and not delete:
        raise click.UsageError("--if-version goes with --set or --delete")
    if ttl is not None and new is None:
        raise click.UsageError("--ttl goes with --set")
    if text and new is None:
        raise click.UsageError("--text goes with --set")
    if as_json and pretty:
        raise click.UsageError("give only one of --json and --pretty")
    config: Config = ctx.obj
    if new is not None:
        value = new if text else _parse(new)
        if codec == "raw" and not isinstance(value, str):
            raise click.BadParameter("the raw codec takes a string: add --text", param_hint="VALUE")
        run(_set(config, name, codec, value, if_version, ttl))
        return
    if delete:
        run(_delete(config, name, codec, if_version))
        return
    write = _writer(name, json_lines=as_json or not (pretty or sys.stdout.isatty()))
    if get_once:
        run(_get(config, name, codec, write))
        return
    ctx.meta[INTERRUPT_ENDS] = True  # Ctrl-C is how a follow ends: exit 0
    run(_follow(config, name, codec, count, write))


def _parse(text: str) -> Any:
    try:
        return loads_json(text, "or use --text")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="VALUE") from None


def _writer(name: str, *, json_lines: bool) -> Any:
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")

    def write(v: broker.Version[Any]) -> None:
        try:
            value = jsonable(v.value)
        except TooDeep as exc:
            value = str(exc)
        if json_lines:
            record = {"name": name, "version": v.version, "value": value}
            line = json.dumps(record, ensure_ascii=False)
        else:
            label = click.style(f"v{v.version}", fg="yellow") if color else f"v{v.version}"
            line = f"{label} {dump(value)}"
        _write_line(sys.stdout, line + "\n")

    return write


async def _set(
    config: Config, name: str, codec: str, value: Any, if_version: int | None, ttl: float | None
) -> None:
    async with config.connect() as b:
        version = await b.watch(name, codec=codec).set(value, if_version=if_version, ttl=ttl)
    click.echo(str(version))


async def _delete(config: Config, name: str, codec: str, if_version: int | None) -> None:
    async with config.connect() as b:
        if not await b.watch(name, codec=codec).delete(if_version=if_version):
            note(f"watch {name!r} had no value")


async def _get(config: Config, name: str, codec: str, write: Any) -> None:
    async with config.connect() as b:
        try:
            current = await b.watch(name, codec=codec).get()
        except ValueError as exc:  # a ConfigurationError is one too: a bad name
            if isinstance(exc, broker.ConfigurationError):
                raise
            raise UserError(f"cannot decode the value of {name!r}: {exc} (try --codec)") from exc
    if current is None:
        raise UserError(f"watch {name!r} has no value (never set, deleted or expired)")
    write(current)


async def _follow(config: Config, name: str, codec: str, count: int | None, write: Any) -> None:
    async with config.connect() as b:
        w = b.watch(name, codec=codec)
        async with w.subscribe() as values:
            printed = 0
            async for v in values:
                write(v)
                printed += 1
                if printed == count:
                    break
