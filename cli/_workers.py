"""``broker worker`` (run workers on this host), ``broker workers`` (list)."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable

import click

from workers import WorkerStatus, list_workers

from ._common import INTERRUPT_ENDS, Config, UserError, run

__all__ = ["worker", "workers_cmd"]


def _supervise(ctx: click.Context, spec_kwargs: dict[str, object], processes: int) -> None:
    from broker import ConfigurationError
    from workers import Supervisor, WorkerSpec, load_target

    config: Config = ctx.obj
    try:
        spec = WorkerSpec(url=config.url, namespace=config.namespace, **spec_kwargs)  # type: ignore[arg-type]
        load_target(spec.target)  # fail here, once, rather than in every child
    except ConfigurationError as exc:
        raise UserError(str(exc), exit_code=2) from exc
    ctx.meta[INTERRUPT_ENDS] = True
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    code = Supervisor(spec, processes).run()
    ctx.exit(code)


@click.group()
def worker() -> None:
    """Run a consumer or producer worker in N processes on this host (until Ctrl-C/SIGTERM).

    Each process is a slot with a stable consumer name (<name>-<host>-<slot>), so a slot that
    crashes is restarted and replays its own pending messages. `broker stop workers/NAME`
    stops this worker on every host; `broker stop workers` stops every worker.
    """


_common_options = [
    click.option("--name", help="Worker name (default: the handler's function name)."),
    click.option("--processes", "-p", type=click.IntRange(1, 256), default=1, show_default=True),
    click.option(
        "--grace",
        type=click.FloatRange(0),
        default=10.0,
        show_default=True,
        help="Seconds running handlers get after a stop before they are cancelled.",
    ),
]


def _with_common(f: Callable[..., None]) -> Callable[..., None]:
    for option in reversed(_common_options):
        f = option(f)
    return f


@worker.command("consume")
@click.argument("channels", nargs=-1, required=True)
@click.option("--group", "-g", required=True, help="Consumer group.")
@click.option(
    "--handler", required=True, help="async def handler(msg), as package.module:function."
)
@click.option("--concurrency", "-c", type=click.IntRange(1), default=1, show_default=True)
@click.option(
    "--group-concurrency",
    type=click.IntRange(1),
    default=None,
    help="At most this many handlers across every process and host of the group.",
)
@click.option(
    "--start", default="new", show_default=True, help="Where a new group starts: new, all or an id."
)
@_with_common
@click.pass_context
def consume(
    ctx: click.Context,
    channels: tuple[str, ...],
    group: str,
    handler: str,
    concurrency: int,
    group_concurrency: int | None,
    start: str,
    name: str | None,
    processes: int,
    grace: float,
) -> None:
    """Consume CHANNELS as members of GROUP with HANDLER.

    \b
    broker worker consume orders -g billing --handler workers.examples:print_message -p 2 -c 8
    """
    _supervise(
        ctx,
        dict(
            name=name or handler.rpartition(":")[2].replace("_", "-"),
            kind="consume",
            target=handler,
            channels=channels,
            group=group,
            concurrency=concurrency,
            group_concurrency=group_concurrency,
            grace=grace,
            start=start,
        ),
        processes,
    )


@worker.command("produce")
@click.argument("channel")
@click.option(
    "--producer",
    required=True,
    help="async def producer(channel, stop_token), as package.module:function.",
)
@_with_common
@click.pass_context
def produce(
    ctx: click.Context, channel: str, producer: str, name: str | None, processes: int, grace: float
) -> None:
    """Run PRODUCER publishing to CHANNEL until stopped.

    \b
    broker worker produce orders --producer workers.examples:tick
    """
    _supervise(
        ctx,
        dict(
            name=name or producer.rpartition(":")[2].replace("_", "-"),
            kind="produce",
            target=producer,
            channels=(channel,),
            grace=grace,
        ),
        processes,
    )


@click.command("workers")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per worker.")
@click.pass_obj
def workers_cmd(config: Config, as_json: bool) -> None:
    """List the workers of the namespace on every host (from their heartbeats)."""

    async def fetch() -> list[WorkerStatus]:
        async with config.connect() as b:
            return await list_workers(b)

    rows = run(fetch())
    if as_json:
        for s in rows:
            data = {**dataclasses.asdict(s), "alive": s.alive}
            click.echo(json.dumps(data))
        return
    if not rows:
        click.echo("no workers have reported in this namespace", err=True)
        return
    head = ("WORKER", "KIND", "STATE", "ALIVE", "PID", "DONE", "FAILED")
    click.echo("{:40} {:8} {:9} {:5} {:>7} {:>8} {:>6} SEEN".format(*head))
    for s in rows:
        click.echo(
            f"{s.id:40} {s.kind:8} {s.state:9} {'yes' if s.alive else 'NO':5} {s.pid:>7} "
            f"{s.processed:>8} {s.failed:>6} {s.age:.1f}s ago"
        )
