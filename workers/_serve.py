"""Run one worker slot: the loop is shaped like trio's ``serve_listeners``.

It signals ready only after setup (connected, stop tokens subscribed, heartbeat written), never
returns unless stopped, and shuts down in two steps: stop taking messages, give running handlers
``grace`` seconds, then cancel them (their messages stay pending and are delivered again).

Stops come from SIGTERM/SIGINT (when ``install_signals``), the remote stop ``workers`` (every
worker of the namespace) or ``workers/<name>`` (this worker on every host), or ``stop``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

import broker
from broker import StopSource, StopToken
from broker._resource import cancel_and_wait

from ._health import remove_heartbeat, worker_id, write_heartbeat
from ._spec import WorkerSpec, load_target

__all__ = ["serve"]

log = logging.getLogger("workers")


async def serve(
    spec: WorkerSpec,
    slot: int = 0,
    *,
    ready: Callable[[], None] | None = None,
    stop: StopToken | None = None,
    install_signals: bool = False,
) -> None:
    """Run ``spec`` as slot ``slot`` until stopped."""
    target = load_target(spec.target)
    local = StopSource()
    if stop is not None:
        stop.on_stop(lambda t: local.stop(t.reason))
    loop = asyncio.get_running_loop()
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, local.stop, f"signal {sig.name}")
    counters = {"processed": 0, "failed": 0}
    wid = worker_id(spec.name, slot)
    try:
        async with broker.connect(spec.url, namespace=spec.namespace) as b:
            async with (
                b.stop_token("workers", parent=local.token) as fleet,
                b.stop_token(f"workers/{spec.name}", parent=fleet) as token,
            ):
                info: dict[str, Any] = {
                    "name": spec.name,
                    "kind": spec.kind,
                    "slot": slot,
                    "started": time.time(),
                    "interval": spec.heartbeat,
                    "state": "running",
                }

                async def beat() -> None:
                    while True:
                        await write_heartbeat(b, wid, {**info, **counters})
                        await asyncio.sleep(spec.heartbeat)

                await write_heartbeat(b, wid, {**info, **counters})
                # owned by this block: each is stopped with cancel_and_wait in the finally (a
                # single cancel can be lost inside redis-py on 3.11, and a heartbeat that
                # outlived its worker would report a dead worker as alive)
                heart = asyncio.create_task(beat(), name=f"{wid} heartbeat")
                work = asyncio.create_task(
                    _work(b, spec, slot, target, token, counters), name=f"{wid} work"
                )
                stopper = asyncio.create_task(token.wait(), name=f"{wid} stop")
                try:
                    if ready is not None:
                        ready()
                    await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    if not work.done():
                        info["state"] = "stopping"
                        log.info("%s: stopping (%s); grace %ss", wid, token.reason, spec.grace)
                        done, _ = await asyncio.wait({work}, timeout=spec.grace)
                        if not done:
                            log.warning("%s: grace period over; cancelling handlers", wid)
                finally:
                    for task in (work, stopper, heart):
                        await cancel_and_wait(task)
                    await _forget(b, wid)
                if not work.cancelled() and work.exception() is not None:
                    raise work.exception()  # type: ignore[misc]
    finally:
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)


async def _work(
    b: broker.Broker,
    spec: WorkerSpec,
    slot: int,
    target: Callable[..., Any],
    token: StopToken,
    counters: dict[str, int],
) -> None:
    if spec.kind == "produce":
        await target(b.channel(spec.channels[0]), token)
        return

    async def counted(msg: broker.Message[Any]) -> None:
        try:
            await target(msg)
        except Exception:
            counters["failed"] += 1
            raise
        counters["processed"] += 1

    assert spec.group is not None
    await b.consume(
        list(spec.channels),
        counted,
        group=spec.group,
        consumer=spec.consumer_name(slot),
        concurrency=spec.concurrency,
        group_concurrency=spec.group_concurrency,
        stop=token,
        start=spec.start,
    )


async def _forget(b: broker.Broker, wid: str) -> None:
    """Remove the heartbeat, briefly: with the server gone it goes stale on its own."""
    try:
        async with asyncio.timeout(1.0):
            await remove_heartbeat(b, wid)
    except (TimeoutError, broker.BrokerError) as exc:
        log.warning("%s: heartbeat not removed (%s); it will be reported stale", wid, exc)
