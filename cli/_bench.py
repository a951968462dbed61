"""``broker bench``: the benchmark harness, side by side with a raw redis-py baseline."""

from __future__ import annotations

import click

from ._common import Config, run

__all__ = ["bench"]


@click.command()
@click.option("--messages", "-n", type=click.IntRange(100), default=20_000, show_default=True)
@click.option(
    "--tasks",
    type=click.IntRange(1),
    default=100,
    show_default=True,
    help="Concurrent publishing tasks.",
)
@click.pass_obj
def bench(config: Config, messages: int, tasks: int) -> None:
    """Measure throughput against a hand-written redis-py loop, on the configured server.

    Writes to a fresh namespace and deletes it afterwards.
    """
    from workers.bench import run as bench_run
    from workers.bench import table

    config.connect()  # a bad URL fails here, as a usage error
    click.echo(table(run(bench_run(config.url, messages, tasks))))
