"""``broker worker`` (run a worker on this host, or check its health), ``broker workers`` (list)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any

import click
from click.core import ParameterSource

from broker.workers import WorkerStatus, list_workers
from broker.workers._spec import LOG_FORMATS, LOG_LEVELS

from ._common import Config, UserError, run
from ._format import duration, table

__all__ = ["worker", "workers_cmd"]

#: options that only mean something for a consumer
_CONSUMER_ONLY = (
    "group",
    "concurrency",
    "group_concurrency",
    "max_deliveries",
    "claim_idle",
    "start",
    "max_memory",
    "max_messages",
)


@click.command(
    epilog="""\b
Handler kinds (told from the signature):
  async def handler(msg)              a consumer: needs --group, any number of --channel
  async def orders(): yield payload   a producer: publishes each item into its one --channel
  async def producer(channel, stop)   a producer: given the channel and the stop token

\b
Exit status:
  0        stopped by SIGTERM/SIGINT or a stop token, or the producer finished
  1        a worker failed: a slot had crashed when the stop came; --check: unhealthy
  2        usage error
  3        stopped, but the grace period ran out: running handlers were cancelled
           (their messages stay pending and are delivered again)
  4        (a slot) retired by --max-memory/--max-messages: replaced at once
  128+N    a second signal N forced a fast exit (130: Ctrl-C twice, 143: SIGTERM twice)

\b
Examples:
  broker worker handlers:handle --channel orders --group billing   # ./handlers.py
  broker worker broker.workers.examples:orders --channel orders
  broker worker broker.workers.examples:process_order --channel orders --group billing -p 2 -c 8
  broker worker --check --name process-order      # for a container health check
  broker stop workers/process-order               # stop it on every host""",
)
@click.argument("handler", required=False, metavar="MODULE:HANDLER")
@click.option(
    "--channel", "channels", multiple=True, metavar="NAME", help="A channel (repeat for more)."
)
@click.option("--group", "-g", help="Consumer group (consumers only; required for them).")
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Handlers in flight per process.",
)
@click.option(
    "--processes",
    "-p",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="Worker processes (slots) on this host; a crashed one is restarted with backoff.",
)
@click.option(
    "--group-concurrency",
    type=click.IntRange(1),
    default=None,
    help="At most this many handlers across every process and host of the group.",
)
@click.option(
    "--max-deliveries",
    type=click.IntRange(1),
    default=5,
    show_default=True,
    help="Deliveries after which a failing message goes to the dead letters.",
)
@click.option(
    "--claim-idle",
    type=click.FloatRange(0, min_open=True),
    default=60.0,
    show_default=True,
    help="Seconds after which another consumer's pending message is taken over.",
)
@click.option(
    "--start",
    default="new",
    show_default=True,
    help="Where a new group starts: new, all or an entry id.",
)
@click.option(
    "--max-memory",
    type=click.IntRange(1),
    metavar="MB",
    help="Retire a slot whose resident memory reached MB MiB: it stops taking messages, "
    "finishes and acks what runs, exits, and a fresh one starts at once (consumers).",
)
@click.option(
    "--max-messages",
    type=click.IntRange(1),
    metavar="N",
    help="Retire a slot after it handled N messages, the same way (consumers).",
)
@click.option(
    "--partitions",
    type=click.IntRange(1, 1024),
    metavar="P",
    help="The channels have P partitions. The first process to use a channel records the "
    "count; a process that declares another count is refused. Declare it on producers and "
    "consumers alike (whichever starts first creates the channel); without it a process uses "
    "the recorded count, or makes a new channel unpartitioned.",
)
@click.option(
    "--stop-token",
    "stop_tokens",
    multiple=True,
    metavar="NAME",
    help="Also stop on this remote stop token (besides `workers` and `workers/NAME`).",
)
@click.option(
    "--grace",
    type=click.FloatRange(0),
    default=10.0,
    show_default=True,
    help="Seconds running handlers get after a stop before they are cancelled.",
)
@click.option(
    "--name",
    help="Worker name (default: the handler's function name, _ as -): in consumer names "
    "<name>-<host>-<slot>, heartbeats and `broker stop workers/NAME`.",
)
@click.option(
    "--host",
    envvar="BROKER_HOST",
    help="This host's name in consumer names and heartbeats [env BROKER_HOST; default: the "
    "hostname].",
)
@click.option(
    "--heartbeat",
    type=click.FloatRange(0, min_open=True),
    default=2.0,
    show_default=True,
    help="Seconds between heartbeats (a heartbeat expires after three).",
)
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True)
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default="text",
    show_default=True,
    help="json: one object per line (ts, level, event, fields).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    metavar="PORT",
    help="Serve Prometheus /metrics, per slot: slot N on PORT+N (needs broker[metrics]).",
)
@click.option(
    "--metrics-addr",
    default="0.0.0.0",
    show_default=True,
    help="Address the /metrics endpoints listen on.",
)
@click.option(
    "--check",
    is_flag=True,
    help="Do not run: exit 0 if this host's worker(s) (--name, or all) report healthy, "
    "else 1 with the reason.",
)
@click.pass_context
def worker(
    ctx: click.Context,
    handler: str | None,
    channels: tuple[str, ...],
    group: str | None,
    concurrency: int,
    processes: int,
    group_concurrency: int | None,
    max_deliveries: int,
    claim_idle: float,
    start: str,
    stop_tokens: tuple[str, ...],
    grace: float,
    name: str | None,
    host: str | None,
    heartbeat: float,
    log_level: str,
    log_format: str,
    metrics_port: int | None,
    metrics_addr: str,
    check: bool,
    max_memory: int | None,
    max_messages: int | None,
    partitions: int | None,
) -> None:
    """Run MODULE:HANDLER as a consumer or producer worker in P processes on this host.

    It runs until SIGTERM/SIGINT, a remote stop token (`broker stop workers`: every worker;
    `broker stop workers/NAME`: this one on every host; --stop-token), or, for a producer,
    until it finishes. A stop is graceful: no new messages are taken, fetched ones are released
    to other consumers, running handlers get --grace seconds to finish (and are acked), then
    they are cancelled (left pending). A second signal forces a fast exit.

    MODULE is imported with the current folder first on the import path, as uvicorn,
    gunicorn, celery and arq do: `broker worker handlers:handle` runs ./handlers.py.

    Each process is a slot with a stable consumer name (<name>-<host>-<slot>): a slot that
    crashes is restarted with backoff and replays its own pending messages; a handler's
    MemoryError ends its slot that way too (the message stays pending, it is not a handler
    failure). --max-memory/--max-messages retire a slot gracefully and start a fresh one at
    once. Every slot writes a heartbeat (see `broker workers`); logs go to stderr, one line per
    lifecycle event or failure.
    """
    config: Config = ctx.obj
    if check:
        _check(config, name or (_default_name(handler) if handler else None), host)
        return
    if handler is None:
        raise click.UsageError("missing MODULE:HANDLER (or --check)", ctx=ctx)
    from broker import ConfigurationError
    from broker.workers import Supervisor, WorkerSpec, inspect_target
    from broker.workers._target import import_from_current_folder

    import_from_current_folder()
    try:
        target = inspect_target(handler)
    except ConfigurationError as exc:
        raise click.UsageError(str(exc), ctx=ctx) from exc
    if not channels:
        raise click.UsageError("give at least one --channel", ctx=ctx)
    if target.kind == "consume":
        if group is None:
            raise click.UsageError(
                f"{handler} is a consumer (async def handler(msg)): it needs --group", ctx=ctx
            )
    else:
        what = "an async generator" if target.style == "generate" else "given (channel, stop)"
        for option in _CONSUMER_ONLY:
            if ctx.get_parameter_source(option) in (
                ParameterSource.COMMANDLINE,
                ParameterSource.ENVIRONMENT,
            ):
                flag = "--" + option.replace("_", "-")
                raise click.UsageError(
                    f"{flag} is for consumers; {handler} is a producer ({what})", ctx=ctx
                )
        if len(channels) != 1:
            raise click.UsageError(
                f"{handler} is a producer ({what}): it publishes into exactly one --channel, "
                f"got {len(channels)}",
                ctx=ctx,
            )
    if metrics_port is not None and importlib.util.find_spec("prometheus_client") is None:
        raise UserError("--metrics-port needs prometheus_client: pip install 'broker[metrics]'", 2)
    try:
        spec = WorkerSpec(
            name=name or _default_name(handler),
            kind=target.kind,
            target=handler,
            channels=channels,
            group=group if target.kind == "consume" else None,
            concurrency=concurrency,
            group_concurrency=group_concurrency,
            max_deliveries=max_deliveries,
            claim_idle=claim_idle,
            grace=grace,
            url=config.url,
            namespace=config.namespace,
            start=start,
            heartbeat=heartbeat,
            processes=processes,
            stop_tokens=stop_tokens,
            host=host,
            log_level=log_level,
            log_format=log_format,
            max_memory=max_memory,
            max_messages=max_messages,
            partitions=partitions,
            metrics_port=metrics_port,
            metrics_addr=metrics_addr,
        )
        config.connect()  # a bad URL or namespace: one line now, not one per child
    except ConfigurationError as exc:
        raise UserError(str(exc), exit_code=2) from exc
    from broker.workers import configure_logging

    configure_logging(
        log_level,
        log_format,
        worker=f"{spec.name}/{spec.hostname}",
        role="supervisor",
        pid=os.getpid(),
    )
    ctx.exit(Supervisor(spec).run())


def _default_name(handler: str) -> str:
    return handler.rpartition(":")[2].rpartition(".")[2].replace("_", "-") or "worker"


def _check(config: Config, name: str | None, host: str | None) -> None:
    from broker.workers import check_health, this_host

    async def probe() -> tuple[bool, str]:
        async with config.connect() as b:
            return await check_health(b, this_host(host), name)

    healthy, line = run(probe())
    if not healthy:
        raise UserError(f"unhealthy: {line}")
    click.echo(line)


@click.command("workers")
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON array of worker slots ([] when none)."
)
@click.pass_obj
def workers_cmd(config: Config, as_json: bool) -> None:
    """List the workers of the namespace on every host, from their heartbeats.

    A slot without a heartbeat for three intervals (its event loop blocked, its host cut
    off, or dead) is listed as stale with the age of its last one, until it has been silent
    for a minute (or ten intervals): then it is gone.
    """

    async def fetch() -> list[WorkerStatus]:
        async with config.connect() as b:
            return await list_workers(b)

    rows = run(fetch())
    if as_json:
        click.echo(json.dumps([_record(s) for s in rows], indent=2))
        return
    if not rows:
        click.echo("no workers in this namespace", err=True)
        return
    head = (
        "WORKER",
        "KIND",
        "STATE",
        "PID",
        "CHANNELS",
        "IN FLIGHT",
        "DONE",
        "FAILED",
        "RSS",
        "UP",
        "LAST SEEN",
    )
    body = [
        (
            s.id,
            s.kind,
            s.state if s.alive else "stale",  # no heartbeat for 3 intervals: blocked or dead
            str(s.pid),
            ",".join(s.channels) + (f" ({s.group})" if s.group else ""),
            str(s.in_flight),
            str(s.processed),
            str(s.failed),
            "-" if s.rss is None else f"{s.rss / 2**20:.1f}M",
            duration(s.uptime),
            f"{duration(s.age)} ago",
        )
        for s in rows
    ]
    for line in table(head, body):
        click.echo(line)


def _record(s: WorkerStatus) -> dict[str, Any]:
    return {**dataclasses.asdict(s), "alive": s.alive}
