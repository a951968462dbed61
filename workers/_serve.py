"""Run one worker slot: the loop is shaped like trio's ``serve_listeners``.

It signals ready only after setup (connected, stop tokens subscribed, subscription entered,
heartbeat written), never returns unless stopped or finished, and shuts down in two steps: stop
taking work (buffered messages are released to other consumers at once), give running handlers
``grace`` seconds, then cancel them (their messages stay pending and are delivered again).

Stops come from SIGTERM/SIGINT (with ``install_signals``; a second one cancels at once), the
remote stop tokens ``workers`` (every worker of the namespace), ``workers/<name>`` (this worker
on every host) and ``spec.stop_tokens``, or the ``stop`` argument. A consumer slot also stops
itself: it *retires* (the same graceful stop, then :attr:`ExitCode.RETIRED`) once it handled
``spec.max_messages`` or its memory reached ``spec.max_memory``, and it *fails* when a handler
raised ``MemoryError`` (the message stays pending; the supervisor restarts the slot).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import broker
from broker import BrokerError, ConfigurationError, StopSource, StopToken
from broker._resource import cancel_and_wait

from ._health import forget, rss_bytes, write_heartbeat
from ._logging import event
from ._metrics import metrics_endpoint
from ._run import Runner, make_runner
from ._spec import WorkerSpec
from ._target import Target, inspect_target

__all__ = ["ExitCode", "Outcome", "serve"]

log = logging.getLogger("workers")
#: seconds a forced stop (second signal) gets for its cleanup before the process exits anyway
FORCE_DEADLINE = 3.0
#: seconds the work gets to close (send acks, release) after its handlers were cancelled
CLOSE_DEADLINE = 10.0


class ExitCode(enum.IntEnum):
    """How a worker process (a slot, or the supervisor) ended."""

    #: stopped by a signal or a stop token (or the producer finished); nothing was cancelled
    OK = 0
    #: the worker failed: its error could not be recovered (the supervisor restarts such slots)
    FAILED = 1
    #: bad arguments or configuration
    USAGE = 2
    #: stopped, but the grace period ran out: running handlers were cancelled (left pending)
    GRACE_EXPIRED = 3
    #: the slot retired (``max_memory`` or ``max_messages``): the supervisor starts a fresh one
    #: at once, under the same consumer name
    RETIRED = 4
    #: 128 + N: a second signal N forced a fast exit (130: Ctrl-C twice, 143: SIGTERM twice)
    FORCED = 128


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How :func:`serve` ended (when it did not raise)."""

    reason: str
    #: a remote stop token ended it
    remote: bool
    processed: int
    failed: int
    cancelled: int
    grace_expired: bool
    #: the signal that forced a fast exit, if any
    forced: int | None = None
    #: why the slot retired (``max_memory``, ``max_messages``), if it did
    retired: str | None = None

    @property
    def exit_code(self) -> int:
        if self.forced is not None:
            return ExitCode.FORCED + self.forced
        if self.retired is not None:  # cancelled handlers (if any) are replayed by the next
            return ExitCode.RETIRED
        return ExitCode.GRACE_EXPIRED if self.grace_expired else ExitCode.OK


class _Slot:
    """The state of one running slot, shared by the heartbeat, the signals and the loop."""

    def __init__(self, spec: WorkerSpec, slot: int) -> None:
        self.spec, self.slot = spec, slot
        self.wid = spec.worker_id(slot)
        self.state = "starting"
        self.started = time.time()  # the server's clock once connected
        self.t0 = time.monotonic()
        self.stop = StopSource()
        self.remote = False
        self.forced: int | None = None
        self.force = asyncio.Event()
        self.runner: Runner | None = None
        #: this slot is its process (it may end it with os._exit when a handler hangs)
        self.owns_process = False
        #: why the slot is retiring, while it is (a signal or a remote stop turns that into a
        #: plain stop: the supervisor must not start a fresh one)
        self.retiring: str | None = None
        #: the error that ends the slot (a handler's MemoryError)
        self.fatal: BaseException | None = None
        #: the stop's reason, when it differs from the token's (a stop during a retirement)
        self.reason: str | None = None

    def retire(self, reason: str) -> None:
        if self.stop.stopped:
            return
        self.retiring = reason
        event(log, logging.INFO, "retiring", reason=reason, rss_mib=_mib(rss_bytes()))
        self.stop.stop(f"retiring: {reason}")

    def fail(self, exc: BaseException) -> None:
        if self.fatal is None:
            self.fatal = exc
        self.retiring = None
        if not self.stop.stopped:
            self.stop.stop(f"fatal {type(exc).__name__} in a handler")

    def _instead_of_retiring(self, reason: str) -> bool:
        """A real stop arriving while the slot retires: it ends as stopped, not retired."""
        if self.retiring is None:
            return False
        self.retiring = None
        self.reason = reason
        event(log, logging.INFO, "stopping", reason=reason, was="retiring")
        return True

    def on_signal(self, sig: signal.Signals) -> None:
        if not self.stop.stopped:
            self.stop.stop(f"signal {sig.name}")
            return
        if self._instead_of_retiring(f"signal {sig.name}"):
            return
        if self.forced is None:
            self.forced = sig.value
            event(log, logging.WARNING, "forced", signal=sig.name, exit_within=FORCE_DEADLINE)
            self.force.set()
            # the cleanup is bounded, but a handler that ignores cancellation is not
            asyncio.get_running_loop().call_later(
                FORCE_DEADLINE, os._exit, ExitCode.FORCED + sig.value
            )

    def on_remote(self, token: StopToken) -> None:
        name = getattr(token, "name", "?")
        why = f": {token.reason}" if token.reason else ""
        if not self.stop.stopped:
            self.remote = True
            self.stop.stop(f"stop token {name!r}{why}")
        elif self._instead_of_retiring(f"stop token {name!r}{why}"):
            self.remote = True

    def status(self) -> dict[str, Any]:
        spec, r = self.spec, self.runner
        return {
            "name": spec.name,
            "kind": spec.kind,
            "host": spec.hostname,
            "pid": os.getpid(),
            "slot": self.slot,
            "processes": spec.processes,
            "consumer": spec.consumer_name(self.slot) if spec.kind == "consume" else None,
            "channels": list(spec.channels),
            "group": spec.group,
            "state": self.state,
            "started": self.started,
            "processed": r.processed if r else 0,
            "failed": r.failed if r else 0,
            "in_flight": r.in_flight() if r else 0,
            "interval": spec.heartbeat,
            "handler": spec.target,
            "rss": rss_bytes(),
        }


def _mib(n: int) -> float:
    return round(n / 2**20, 1)


class _Heartbeat:
    def __init__(self, b: broker.Broker, slot: _Slot) -> None:
        self.b, self.slot = b, slot
        self.failing = False
        self.wake = asyncio.Event()

    async def write(self) -> None:
        try:
            await write_heartbeat(self.b, self.slot.wid, self.slot.status())
        except BrokerError as exc:
            if not self.failing:
                self.failing = True
                event(log, logging.WARNING, "heartbeat_failed", error=str(exc))
            return
        if self.failing:
            self.failing = False
            event(log, logging.INFO, "heartbeat_restored")

    async def run(self) -> None:
        max_memory = self.slot.spec.max_memory
        while True:
            await self.write()
            if max_memory is not None and self.slot.state == "running":
                # also between messages: a handler may grow the process while it runs
                rss = rss_bytes()
                if rss >= max_memory * 2**20:
                    self.slot.retire(f"rss {rss / 2**20:.1f} MiB (--max-memory)")
            self.wake.clear()
            try:
                async with asyncio.timeout(self.slot.spec.heartbeat):
                    await self.wake.wait()
            except TimeoutError:
                pass


async def serve(
    spec: WorkerSpec,
    slot: int = 0,
    *,
    ready: Callable[[], None] | None = None,
    stop: StopToken | None = None,
    install_signals: bool = False,
) -> Outcome:
    """Run ``spec`` as slot ``slot`` until stopped (or, for a producer, finished).

    ``ready()`` is called once the slot is set up. With ``install_signals`` (a process that
    runs one slot), SIGTERM/SIGINT stop it and a second one forces a fast exit: running work is
    cancelled at once and the process exits within :data:`FORCE_DEADLINE` seconds.

    :raises ConfigurationError: if the handler cannot be loaded or does not match ``spec.kind``.
    :raises BrokerError: (or the handler's error, for a producer; a consumer handler's
        ``MemoryError``) if the worker failed.
    """
    s = _Slot(spec, slot)
    s.owns_process = install_signals
    remove_parent = stop.on_stop(lambda t: s.stop.stop(t.reason or "stopped")) if stop else None
    loop = asyncio.get_running_loop()
    sigs = (signal.SIGTERM, signal.SIGINT) if install_signals else ()
    for sig in sigs:
        loop.add_signal_handler(sig, s.on_signal, sig)
    event(
        log,
        logging.INFO,
        "starting",
        kind=spec.kind,
        handler=spec.target,
        channels=list(spec.channels),
        group=spec.group,
        concurrency=spec.concurrency,
    )
    try:
        target = inspect_target(spec.target)
        if target.kind != spec.kind:
            raise ConfigurationError(
                f"{spec.target} is a {target.kind}r by its signature, "
                f"but the worker was given as a {spec.kind}r"
            )
        with metrics_endpoint(spec, slot):  # --metrics-port: this slot's /metrics
            return await _serve(spec, slot, s, target, ready)
    except Exception as exc:
        event(log, logging.ERROR, "failed", error=type(exc).__name__, detail=str(exc)[:500])
        raise
    finally:
        for sig in sigs:
            loop.remove_signal_handler(sig)
        if remove_parent is not None:
            remove_parent()


async def _serve(
    spec: WorkerSpec,
    slot: int,
    s: _Slot,
    target: Target,
    ready: Callable[[], None] | None,
) -> Outcome:
    failure: list[Exception] = []
    grace_expired = False
    finished = "producer finished" if spec.kind == "produce" else "subscription ended"
    async with (
        broker.connect(spec.url, namespace=spec.namespace) as b,
        contextlib.AsyncExitStack() as stack,
    ):
        stack.push_async_callback(forget, b, s.wid)  # last: after the work and the tokens
        s.started = b.server_time_ms() / 1000  # one clock for every host
        for name in ("workers", f"workers/{spec.name}", *spec.stop_tokens):
            token = await stack.enter_async_context(b.stop_token(name))
            token.on_stop(s.on_remote)
        runner = s.runner = make_runner(b, spec, slot, target, s)
        heart = _Heartbeat(b, s)

        async def on_ready() -> None:
            s.state = "running"
            await heart.write()
            event(
                log,
                logging.INFO,
                "ready",
                consumer=spec.consumer_name(slot) if spec.kind == "consume" else None,
                heartbeat=f"{spec.heartbeat}s",
            )
            if ready is not None:
                ready()

        hurry = asyncio.Event()

        async def work() -> None:
            try:
                await runner.run(on_ready, s.stop.token, hurry)
            except Exception as exc:  # reported (and raised) below, after the cleanup
                failure.append(exc)
                return
            if isinstance(s.fatal, Exception):
                failure.append(s.fatal)
            elif spec.kind == "consume" and not s.stop.stopped:
                # a consumer only ends when stopped: ending otherwise is a failure (the
                # supervisor restarts the slot), never a quiet "done"
                failure.append(BrokerError("the subscription ended without a stop"))

        async with asyncio.TaskGroup() as tg:
            beat = tg.create_task(heart.run(), name=f"{s.wid} heartbeat")
            job = tg.create_task(work(), name=f"{s.wid} work")
            stopped = tg.create_task(s.stop.token.wait(), name=f"{s.wid} stop")
            forced = tg.create_task(s.force.wait(), name=f"{s.wid} force")
            try:
                await asyncio.wait({job, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not job.done():
                    s.state = "stopping"
                    heart.wake.set()
                    event(
                        log,
                        logging.INFO,
                        "stopping",
                        reason=s.stop.token.reason,
                        in_flight=runner.in_flight(),
                        grace=spec.grace,
                    )
                    await asyncio.wait(
                        {job, forced}, timeout=spec.grace, return_when=asyncio.FIRST_COMPLETED
                    )
                if not job.done():
                    grace_expired = s.forced is None
                    if grace_expired:
                        event(
                            log,
                            logging.WARNING,
                            "grace_expired",
                            grace=spec.grace,
                            cancelling=runner.in_flight(),
                        )
                    hurry.set()
                    await asyncio.wait({job}, timeout=CLOSE_DEADLINE)
                    if not job.done() and s.owns_process:
                        # a handler ignores cancellation: nothing more can be sent or released;
                        # its message stays pending (delivered again), so end the process now
                        code = (
                            s.forced + ExitCode.FORCED
                            if s.forced is not None
                            else ExitCode.RETIRED
                            if s.retiring is not None
                            else ExitCode.GRACE_EXPIRED
                        )
                        event(
                            log,
                            logging.ERROR,
                            "stuck",
                            detail="a handler ignores cancellation",
                            exit=code,
                        )
                        logging.shutdown()
                        os._exit(code)
            finally:
                for task in (job, stopped, forced, beat):
                    await cancel_and_wait(task)
    reason = (s.reason or s.stop.token.reason) if s.stop.stopped else finished
    outcome = Outcome(
        reason=reason or "stopped",
        remote=s.remote,
        processed=runner.processed,
        failed=runner.failed,
        cancelled=runner.cancelled,
        grace_expired=grace_expired,
        forced=s.forced,
        retired=s.retiring,
    )
    if failure:
        raise failure[0]
    event(
        log,
        logging.INFO,
        "stopped",
        reason=outcome.reason,
        processed=outcome.processed,
        failed=outcome.failed,
        cancelled=outcome.cancelled,
        exit=outcome.exit_code,
        uptime=f"{time.monotonic() - s.t0:.1f}s",
    )
    return outcome
