"""``broker bench``: the benchmark harness of issue 7.

Side by side, in one run, on one server: a raw redis-py baseline written as well as redis-py
allows, this library through its public API, and FastStream's Redis Streams broker (when
installed). Throughput and client CPU per message, end-to-end latency at fixed rates, the memory
of a consumer facing a large backlog, and consumer processes in one group; medians of several
repetitions, as Markdown and one JSON line.

Modules: ``harness`` (the run), ``raw``, ``library``, ``faststream`` (the scenarios),
``latency``, ``processes`` + ``child`` (consumer subprocesses), ``durable`` (the cost of
``replicas=1``), ``report`` (tables, targets).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import click

from .._common import Config, UserError, note, run
from .common import use_uvloop
from .harness import Options, select

__all__ = ["bench"]


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise click.BadParameter(
            f"expected comma-separated integers >= 1, got {text!r}", param_hint=option
        )
    return values


@contextlib.contextmanager
def _server(config: Config) -> Iterator[str]:
    """The configured server, or a private one when no URL was given."""
    if config.url is not None:
        config.connect()  # a bad URL fails here, as a usage error
        yield config.url
        return
    from broker import EmbeddedServer

    with EmbeddedServer() as server:
        note(f"private redis-server {server.binary} at {server.url} (set --url to use another)")
        yield server.url


@click.command()
@click.option("--messages", "-n", type=click.IntRange(100), help="Messages per throughput run.")
@click.option(
    "--fs-messages",
    type=click.IntRange(100),
    help="Cap for FastStream's per-message paths (slow; the rate needs fewer).",
)
@click.option(
    "--tasks",
    type=click.IntRange(1),
    default=1000,
    show_default=True,
    help="Concurrent publishing tasks.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1),
    default=32,
    show_default=True,
    help="consume(handler, concurrency=...).",
)
@click.option(
    "--prefetch",
    type=click.IntRange(1),
    default=1000,
    show_default=True,
    help="Prefetch of the `async for` scenarios (the raw baseline reads 1000).",
)
@click.option(
    "--chunk",
    type=click.IntRange(1),
    default=1000,
    show_default=True,
    help="Chunk size of the chunked scenario.",
)
@click.option("--repeat", "-r", type=click.IntRange(1), help="Repetitions (medians quoted).")
@click.option(
    "--only",
    metavar="LIST",
    help="Comma-separated scenarios: publish, consume, latency, memory, processes, cluster, "
    "channels, durable (replicas=1 against the default), watch (watched values across "
    "processes) and request (request round trips; both only when named), raw, lib, faststream, "
    "or ids like lib.iterate. Default: all but watch and request.",
)
@click.option(
    "--faststream/--no-faststream",
    default=None,
    help="Include FastStream [default: when installed].",
)
@click.option(
    "--loop",
    "loop_choice",
    type=click.Choice(["asyncio", "uvloop", "both"]),
    help="Event loop of every measurement (and of the consumer processes); `both` runs "
    "everything on each and reports them side by side [default: uvloop when installed].",
)
@click.option("--uvloop/--no-uvloop", default=None, help="Same as --loop uvloop / --loop asyncio.")
@click.option("--rates", default="1000,5000", show_default=True, help="Latency rates, msg/s.")
@click.option(
    "--runs",
    type=click.IntRange(1),
    help="Latency: N separate runs, each reported on its own, with how many met each target "
    "(instead of medians of --repeat).",
)
@click.option("--latency-seconds", type=click.FloatRange(0.05), help="Seconds per latency run.")
@click.option("--backlog", type=click.IntRange(100), help="Backlog of the memory scenario.")
@click.option(
    "--memory-seconds",
    type=click.FloatRange(0.1),
    help="Seconds the memory scenario's consumer runs.",
)
@click.option(
    "--handler-ms",
    type=click.FloatRange(0),
    default=1.0,
    show_default=True,
    help="The memory scenario's slow handler.",
)
@click.option(
    "--processes",
    "process_counts",
    default="1,2,4",
    show_default=True,
    help="Consumer process counts.",
)
@click.option(
    "--process-messages",
    type=click.IntRange(100),
    help="Backlog drained by the consumer processes.",
)
@click.option(
    "--cluster-url",
    metavar="URL",
    help="The cluster scenario's cluster (redis+cluster://...); default: a private one.",
)
@click.option(
    "--channel-counts",
    default="1,100,1000",
    show_default=True,
    help="Channel counts of the many-channels scenario.",
)
@click.option(
    "--quick", is_flag=True, help="Tiny sizes and one repetition (unless given): a smoke test."
)
@click.option("--json", "json_only", is_flag=True, help="Print only the JSON line.")
@click.pass_obj
def bench(
    config: Config,
    messages: int | None,
    fs_messages: int | None,
    tasks: int,
    concurrency: int,
    prefetch: int,
    chunk: int,
    repeat: int | None,
    only: str | None,
    faststream: bool | None,
    loop_choice: str | None,
    uvloop: bool | None,
    rates: str,
    runs: int | None,
    latency_seconds: float | None,
    backlog: int | None,
    memory_seconds: float | None,
    handler_ms: float,
    process_counts: str,
    process_messages: int | None,
    cluster_url: str | None,
    channel_counts: str,
    quick: bool,
    json_only: bool,
) -> None:
    """Measure this library against raw redis-py and FastStream, side by side on one server.

    Without --url (or BROKER_URL) it starts a private redis-server. Writes to a fresh
    namespace (NAMESPACE-bench-<hex>) and deletes it afterwards. Prints Markdown tables, then
    one JSON line (the last line); progress goes to stderr.
    """
    from .harness import run as run_bench
    from .report import json_line, json_lines_by_loop, side_by_side, table

    def pick(value: float | None, full: float, small: float) -> float:
        return value if value is not None else (small if quick else full)

    try:
        scenarios = tuple(select(only))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--only") from None
    if faststream:
        from .faststream import available

        if available() is None:
            raise UserError(
                "--faststream: faststream is not installed (pip install 'broker[bench]')", 2
            )
    if loop_choice is not None and uvloop is not None:
        raise UserError("give --loop or --uvloop/--no-uvloop, not both", exit_code=2)
    if loop_choice is None:
        loop_choice = {True: "uvloop", False: "asyncio", None: None}[uvloop]
    choices: dict[str | None, list[bool | None]] = {
        "asyncio": [False],
        "uvloop": [True],
        "both": [False, True],
        None: [None],
    }
    loops = choices[loop_choice]
    for wanted in loops:
        if wanted:
            try:
                use_uvloop(True)
            except RuntimeError as exc:
                raise UserError(str(exc).replace("--uvloop", "--loop"), exit_code=2) from None
    base = Options(
        messages=int(pick(messages, 100_000, 2_000)),
        fs_messages=int(pick(fs_messages, 20_000, 1_000)),
        tasks=tasks,
        concurrency=concurrency,
        prefetch=prefetch,
        chunk=chunk,
        repeat=int(pick(repeat, 3, 1)),
        scenarios=scenarios,
        faststream=faststream is not False,
        rates=_ints(rates, "--rates"),
        latency_seconds=pick(latency_seconds, 3.0, 0.3),
        latency_runs=runs or 0,
        backlog=int(pick(backlog, 1_000_000, 20_000)),
        memory_seconds=pick(memory_seconds, 5.0, 1.0),
        handler_ms=handler_ms,
        processes=_ints(process_counts, "--processes"),
        process_messages=int(pick(process_messages, 200_000, 5_000)),
        cluster_url=cluster_url,
        cluster_messages=int(pick(None, 50_000, 1_000)),
        channel_counts=_ints(channel_counts, "--channel-counts"),
        channel_messages=int(pick(None, 2_000, 200)),
        request_count=int(pick(None, 2_000, 100)),
    )

    def progress(text: str) -> None:
        if not json_only:
            note(text)

    every = []
    with _server(config) as url:
        for wanted in loops:
            name = use_uvloop(wanted)
            opts = dataclasses.replace(base, uvloop=name.startswith("uvloop"))
            if len(loops) > 1:
                progress(f"--- event loop: {name}")
            every.append(run(run_bench(url, opts, progress, config.namespace)))
    if len(every) == 1:
        if not json_only:
            click.echo(table(every[0]))
            click.echo()
        click.echo(json_line(every[0]))
        return
    if not json_only:
        click.echo(side_by_side(every))
        click.echo()
    click.echo(json_lines_by_loop(every))
