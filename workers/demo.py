"""The demo: the example workers passing 30 orders, on a real server.

Runs what a user would type, as processes: a consumer worker with three slots
(``broker worker broker.workers.examples:process_order --channel orders --group billing
-p 3 -c 2``),
then a producer (``broker worker broker.workers.examples:orders --channel orders`` with
``ORDERS_COUNT=30``), shows ``broker workers``, and stops the consumer with SIGTERM.

``broker demo`` (or ``python -m broker.workers.demo``) uses ``$BROKER_URL`` when set, otherwise it
starts a private ``redis-server`` for the duration of the demo and stops it afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import broker
from broker import EmbeddedServer
from broker._server import die_with_parent

from ._health import WorkerStatus, list_workers
from .examples import say

ORDERS = 30
#: seconds the whole demo may take before it gives up
BOUND = 60.0


@contextlib.contextmanager
def server_url(url: str | None) -> Iterator[str]:
    """``url`` (or ``$BROKER_URL``) if given, else a private embedded server's URL."""
    url = url or os.environ.get("BROKER_URL")
    if url:
        yield url
        return
    with EmbeddedServer() as server:
        say(f"started a private redis-server ({server.binary}) on {server.url}")
        yield server.url
    say("stopped the private redis-server")


class _Demo:
    def __init__(self, url: str) -> None:
        self.url = url
        self.namespace = f"demo-{uuid.uuid4().hex[:6]}"
        self.processed: list[str] = []

    @contextlib.asynccontextmanager
    async def broker(
        self, *args: str, env: dict[str, str] | None = None
    ) -> AsyncIterator[asyncio.subprocess.Process]:
        """``broker ARGS`` as a child process (killed if the demo ends first)."""
        shown = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        say(f"$ {shown + ' ' if shown else ''}broker {' '.join(args)}")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "broker.cli.main",
            "--url",
            self.url,
            "--namespace",
            self.namespace,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, **(env or {})},
            preexec_fn=die_with_parent,
        )
        try:
            yield proc
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    async def echo(self, proc: asyncio.subprocess.Process, keep: bool) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            say(f"  {line}")
            if keep and line.startswith("processed order "):
                self.processed.append(line.split()[2])

    async def run(self) -> int:
        async with (
            broker.connect(self.url, namespace=self.namespace) as b,
            self.broker(
                "worker",
                "broker.workers.examples:process_order",
                "--channel",
                "orders",
                "--group",
                "billing",
                "--start",
                "all",
                "-p",
                "3",
                "-c",
                "2",
                "--heartbeat",
                "0.5",
            ) as consumer,
            asyncio.TaskGroup() as tg,
        ):
            tg.create_task(self.echo(consumer, keep=True))
            await _until(lambda: _running(b, 3), consumer)
            async with self.broker(
                "worker",
                "broker.workers.examples:orders",
                "--channel",
                "orders",
                env={"ORDERS_COUNT": str(ORDERS), "ORDERS_RATE": "30"},
            ) as producer:
                await self.echo(producer, keep=False)
                produced = await producer.wait()
            orders = b.channel("orders")
            await _until(lambda: _drained(b, orders), consumer)
            workers = await list_workers(b)
            async with self.broker("workers") as table:
                await self.echo(table, keep=False)
                await table.wait()
            say(f"$ kill -TERM {consumer.pid}")
            consumer.send_signal(signal.SIGTERM)
            stopped = await asyncio.wait_for(consumer.wait(), 30)
            info = await orders.info()
        split = {f"slot {w.slot}": w.processed for w in sorted(workers, key=lambda w: w.slot)}
        pending = sum(g.pending for g in info.groups)
        delivered = len(set(self.processed))
        say(
            f"\n{delivered}/{ORDERS} orders delivered, split {split}; pending after acks: "
            f"{pending}; exit status: producer {produced}, consumer {stopped}"
        )
        ok = delivered == ORDERS and pending == 0 and produced == stopped == 0
        return 0 if ok else 1


async def _until(check: Callable[[], Awaitable[bool]], watch: asyncio.subprocess.Process) -> None:
    async with asyncio.timeout(BOUND):
        while not await check():
            if watch.returncode is not None:
                raise RuntimeError(f"the consumer worker exited with status {watch.returncode}")
            await asyncio.sleep(0.1)


async def _running(b: broker.Broker, n: int) -> bool:
    return sum(w.state == "running" and w.alive for w in await list_workers(b)) == n


async def _drained(b: broker.Broker, orders: broker.Channel[object]) -> bool:
    info = await orders.info()
    workers: list[WorkerStatus] = await list_workers(b)
    settled = bool(info.groups) and info.groups[0].lag == 0 and info.groups[0].pending == 0
    return settled and sum(w.processed for w in workers) >= ORDERS


async def run(url: str) -> int:
    return await _Demo(url).run()


def main(url: str | None = None) -> int:
    with server_url(url) as resolved:
        return asyncio.run(run(resolved))


if __name__ == "__main__":
    raise SystemExit(main())
