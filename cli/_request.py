"""``broker request``: send one request and print its answer as JSON."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

import broker

from ._common import Config, UserError, loads_json, run
from ._format import dump, jsonable
from ._publish import _headers

__all__ = ["request"]


@click.command()
@click.argument("channel")
@click.argument("data")
@click.option(
    "-H",
    "--header",
    "headers",
    multiple=True,
    metavar="KEY=VALUE",
    callback=_headers,
    help="A header of the request (repeatable).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    metavar="S",
    help="Seconds to wait for the answer.",
)
@click.option(
    "--codec",
    type=click.Choice(["msgpack", "json"]),
    default="msgpack",
    show_default=True,
    help="Encoding of the request's payload (answers are always msgpack).",
)
@click.pass_obj
def request(
    config: Config,
    channel: str,
    data: str,
    headers: dict[str, str],
    timeout: float,
    codec: str,
) -> None:
    """Send DATA (JSON) to CHANNEL as a request and print the answer (JSON).

    A consumer's handler answers with its return value. No answer within --timeout, or a
    handler that raised, is one line on stderr and exit status 1.

    \b
      broker request prices '{"sku": "A1"}' --timeout 2
    """
    try:
        payload = loads_json(os.fsencode(data))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="DATA") from None
    answer = run(_request(config, channel, codec, payload, headers, timeout))
    sys.stdout.write(dump(jsonable(answer)) + "\n")
    sys.stdout.flush()


async def _request(
    config: Config,
    name: str,
    codec: str,
    payload: Any,
    headers: dict[str, str],
    timeout: float,  # noqa: ASYNC109 - the answer's deadline
) -> Any:
    async with config.connect() as b:
        try:
            return await b.channel(name, codec=codec).request(
                payload, timeout=timeout, headers=headers or None
            )
        except broker.RemoteError as exc:
            text = " ".join(exc.text.split())  # one line, whatever the handler's text
            raise UserError(f"the responder raised {exc.type}: {text}") from None
