"""The ``broker`` command: the group, the global options, and the one error boundary.

Every error a user can cause ends as one line on stderr (``error: ... (the fix)``) and an exit
status: 2 for usage errors (bad arguments, bad URL, bad name), 1 for runtime errors (server
unreachable, wrong password, wrong key type, missing channel or group), 130 for Ctrl-C. A
traceback is printed only with ``--verbose``. Ctrl-C ends ``tail`` and ``server`` normally
(status 0), and a closed pipe (``broker tail x | head``) ends any command quietly with status 0.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Any, NoReturn

import click

import broker

from ._admin import dead, group, stop
from ._bench import bench
from ._common import INTERRUPT_ENDS, Config, UserError
from ._inspect import channels, info, pending
from ._publish import publish
from ._request import request
from ._server import demo, server
from ._tail import tail
from ._top import top
from ._watch import watch
from ._workers import worker, workers_cmd

__all__ = ["BrokerGroup", "cli", "main"]

URL_WHERE = "--url or BROKER_URL"


class BrokerGroup(click.Group):
    """The CLI's error boundary: every exception out of parsing (``make_context``) or a
    command (``invoke``) becomes one line through :func:`describe` and an exit status."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:  # an error in the global options
            _fail(exc, verbose=False)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.NoArgsIsHelpError):
            raise
        except BrokenPipeError:
            _silence_stdout()
            raise click.exceptions.Exit(0) from None
        except KeyboardInterrupt:
            raise click.exceptions.Exit(0 if ctx.meta.get(INTERRUPT_ENDS) else 130) from None
        except Exception as exc:
            config = ctx.obj if isinstance(ctx.obj, Config) else None
            _fail(exc, verbose=config is not None and config.verbose)


def describe(exc: BaseException) -> tuple[int, str]:
    """The exit status and the one line for an error (the whole mapping, in one place)."""
    if isinstance(exc, click.UsageError):
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        return 2, exc.format_message() + where
    if isinstance(exc, click.ClickException):
        return exc.exit_code, exc.format_message()
    if isinstance(exc, click.Abort):
        return 1, "aborted"
    if isinstance(exc, UserError):
        return exc.exit_code, str(exc)
    if isinstance(exc, broker.AuthenticationError):
        return 1, f"authentication failed: {exc} (put the right user:password in {URL_WHERE})"
    if isinstance(exc, broker.ConnectionLostError):
        return 1, f"{exc} (is the server running? set {URL_WHERE})"
    if isinstance(exc, broker.ConfigurationError):
        return 2, str(exc)
    if isinstance(exc, broker.GroupMissingError):
        return 1, (
            f"channel {exc.channel!r} has no consumer group {exc.group!r} "
            f"(see `broker info {exc.channel}`)"
        )
    if isinstance(exc, broker.BrokerError | broker.ServerNotFoundError):
        return 1, str(exc)
    return 1, f"unexpected {type(exc).__name__}: {exc} (run with --verbose for the traceback)"


def _fail(exc: BaseException, *, verbose: bool) -> NoReturn:
    code, line = describe(exc)
    try:
        if verbose:
            traceback.print_exception(exc, file=sys.stderr)
        click.echo(f"error: {line}", err=True)
    except BrokenPipeError:
        pass
    raise click.exceptions.Exit(code) from None


def _silence_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so the flush at exit cannot fail again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


@click.group(cls=BrokerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--url",
    envvar="BROKER_URL",
    metavar="URL",
    help="Redis URL: redis://[user:password@]host:6379/0, rediss://..., unix://... "
    "[env BROKER_URL; default redis://localhost:6379/0]",
)
@click.option(
    "--namespace",
    envvar="BROKER_NAMESPACE",
    default="broker",
    show_default=True,
    help="Key prefix of the channels [env BROKER_NAMESPACE].",
)
@click.option("-v", "--verbose", is_flag=True, help="Log details; show tracebacks on errors.")
@click.version_option(broker.__version__, "--version", prog_name="broker")
@click.pass_context
def cli(ctx: click.Context, url: str | None, namespace: str, verbose: bool) -> None:
    """broker: tail, publish and manage channels (Redis Streams)."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format="broker: %(name)s: %(message)s")
    ctx.obj = Config(url=url or None, namespace=namespace, verbose=verbose)


for command in (
    tail,
    publish,
    request,
    info,
    channels,
    pending,
    group,
    dead,
    stop,
    server,
    demo,
    worker,
    workers_cmd,
    bench,
    top,
    watch,
):
    cli.add_command(command)


def main() -> None:
    """The console script ``broker``."""
    cli(prog_name="broker")


if __name__ == "__main__":
    main()
