"""Run a worker in N processes on this host: restart crashed slots, stop them all gracefully.

Each slot is a child process (``python -m broker.workers.child NAME SLOT``, the spec in
``$BROKER_WORKER_SPEC``) in its own process group (a Ctrl-C on the terminal reaches only the
supervisor, which forwards one SIGTERM), with a consumer name stable per slot, so a slot
restarted after a crash replays its own pending messages at once. What a child's exit status
means to the supervisor:

- 0 (stopped) or 3 (stopped, grace period ran out): the slot is done, not restarted (a remote
  stop token, or a producer that finished); the supervisor ends when every slot is done;
- 4 (retired: ``max_memory`` or ``max_messages``): a fresh slot is started at once, with the
  same consumer name (no backoff; the restart count is not touched);
- 2 (usage error): restarting cannot help; every slot is stopped and the supervisor exits 2;
- anything else (1, killed by a signal): a crash; restarted after a backoff that doubles from
  ``backoff`` up to ``max_backoff``, and starts over once a slot ran for ``stable`` seconds.

The supervisor's own status: 0, 1 (a slot failed or was killed while stopping), 2, 3 (some
slot's grace period ran out), 128+N (a second signal N forced a fast exit).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from types import FrameType
from typing import Any

from broker._server import die_with_parent

from ._logging import event
from ._serve import CLOSE_DEADLINE, FORCE_DEADLINE, ExitCode
from ._spec import SPEC_ENV, WorkerSpec

__all__ = ["Supervisor"]

log = logging.getLogger("workers.supervisor")
_DONE = (ExitCode.OK, ExitCode.GRACE_EXPIRED)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code > ExitCode.FORCED:
        return f"forced by signal {code - ExitCode.FORCED}"
    try:
        return ExitCode(code).name.lower().replace("_", " ")
    except ValueError:
        return f"exit status {code}"


class Supervisor:
    """Keeps ``spec.processes`` slots of ``spec`` running until SIGTERM/SIGINT or :meth:`stop`.

    ``processes`` overrides ``spec.processes``.
    """

    def __init__(
        self,
        spec: WorkerSpec,
        processes: int | None = None,
        *,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        stable: float = 60.0,
    ) -> None:
        if processes is not None:
            if processes < 1:
                raise ValueError(f"processes must be >= 1, got {processes}")
            spec = dataclasses.replace(spec, processes=processes)
        if not 0 < backoff <= max_backoff or stable <= 0:
            raise ValueError("need 0 < backoff <= max_backoff and stable > 0 seconds")
        self.spec = spec
        self.processes = spec.processes
        self.backoff, self.max_backoff, self.stable = backoff, max_backoff, stable
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        #: restarts per slot since it last ran for ``stable`` seconds
        self.restarts: dict[int, int] = dict.fromkeys(range(self.processes), 0)
        #: exit status of each slot that is done (not to be restarted)
        self.finished: dict[int, int] = {}
        #: status of each slot's last crash (while it waits for its restart)
        self.crashed: dict[int, int] = {}
        #: how often each slot retired (and was replaced at once)
        self.retired: dict[int, int] = {}
        self._next_start: dict[int, float] = dict.fromkeys(range(self.processes), 0.0)
        self._started: dict[int, float] = {}
        self._stop: int | None = None
        self._force: int | None = None

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Begin a graceful stop; a second call forces a fast one (also the signal handler)."""
        if self._stop is None:
            self._stop = signum
        elif self._force is None:
            self._force = signum

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop(signum)

    def run(self, *, install_signals: bool = True, poll: float = 0.05) -> int:
        """Blocking: supervise until stopped or every slot is done; returns the exit status."""
        install = install_signals and threading.current_thread() is threading.main_thread()
        previous = {}
        if install:
            previous = {
                s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)
            }
        spec = self.spec
        event(
            log,
            logging.INFO,
            "starting",
            kind=spec.kind,
            handler=spec.target,
            processes=self.processes,
            channels=list(spec.channels),
            group=spec.group,
        )
        try:
            for slot in range(self.processes):
                self._spawn(slot)
            while self._stop is None:
                self._reap()
                fatal = [c for c in self.finished.values() if c == ExitCode.USAGE]
                if fatal:
                    self._stop = 0
                    self._shutdown("a slot failed with a usage error")
                    return ExitCode.USAGE
                if len(self.finished) == self.processes:
                    return self._done("every slot is done")
                time.sleep(poll)
            return self._shutdown(f"signal {signal.Signals(self._stop).name}")
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _spawn(self, slot: int) -> None:
        # the spec travels in the environment, not argv: its URL may hold a password, and
        # argv is readable by every user of the host
        argv = [sys.executable, "-m", "broker.workers.child", self.spec.name, str(slot)]
        env = {**os.environ, SPEC_ENV: self.spec.to_json()}
        proc = subprocess.Popen(argv, env=env, preexec_fn=die_with_parent, process_group=0)
        self.children[slot] = proc
        self._started[slot] = time.monotonic()
        event(
            log,
            logging.INFO,
            "child_started",
            slot=slot,
            child_pid=proc.pid,
            restarts=self.restarts[slot],
        )

    def _reap(self) -> None:
        now = time.monotonic()
        for slot in range(self.processes):
            if slot in self.finished:
                continue
            proc = self.children.get(slot)
            if proc is None:
                if now >= self._next_start[slot]:
                    self._spawn(slot)
                    self.crashed.pop(slot, None)
                continue
            code = proc.poll()
            if code is None:
                continue
            del self.children[slot]
            if code == ExitCode.RETIRED:
                _exited(slot, proc, code, level=logging.INFO, restart_in=0)
                self.retired[slot] = self.retired.get(slot, 0) + 1
                self._spawn(slot)
                continue
            if code in _DONE or code == ExitCode.USAGE:
                self.finished[slot] = code
                event(
                    log,
                    logging.INFO if code in _DONE else logging.ERROR,
                    "child_exited",
                    slot=slot,
                    child_pid=proc.pid,
                    code=code,
                    meaning=describe_exit(code),
                    restart=False,
                )
                continue
            self.crashed[slot] = code
            if now - self._started.get(slot, now) >= self.stable:
                self.restarts[slot] = 0  # it had run long enough: start the backoff over
            self.restarts[slot] += 1
            delay = min(self.max_backoff, self.backoff * 2 ** min(self.restarts[slot] - 1, 30))
            self._next_start[slot] = now + delay
            _exited(slot, proc, code, restart_in=round(delay, 3))

    def _shutdown(self, reason: str) -> int:
        """SIGTERM every child, wait for them (a second signal: hurry, then SIGKILL)."""
        # every child, also one that exited but was not reaped yet: its status counts too
        live = dict(self.children)
        running = [p for p in live.values() if p.poll() is None]
        event(log, logging.INFO, "stopping", reason=reason, children=len(running))
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.spec.grace + CLOSE_DEADLINE + 5
        forwarded = False
        while any(p.poll() is None for p in live.values()):
            now = time.monotonic()
            if self._force is not None and not forwarded:
                forwarded = True
                event(log, logging.WARNING, "forced", signal=signal.Signals(self._force).name)
                for proc in live.values():
                    if proc.poll() is None:
                        # their second signal: a fast exit. SIGINT, not SIGTERM again: two
                        # SIGTERMs sent close together can merge into one pending signal
                        proc.send_signal(signal.SIGINT)
                deadline = min(deadline, now + FORCE_DEADLINE + 1)
            if now >= deadline:
                for slot, proc in live.items():
                    if proc.poll() is None:
                        event(log, logging.ERROR, "child_killed", slot=slot, child_pid=proc.pid)
                        proc.kill()
                        proc.wait()
                break
            time.sleep(0.02)
        for slot, proc in live.items():
            code = proc.wait()
            if code == -signal.SIGTERM and proc in running:
                code = ExitCode.OK  # our SIGTERM came before it had set up: nothing was running
            elif code == ExitCode.RETIRED:
                code = ExitCode.OK  # it retired as the stop came: not replaced, nothing lost
            self.finished[slot] = code
            _exited(slot, proc, code)
        self.children.clear()
        for slot, code in self.crashed.items():
            # stopped while waiting for its restart: the slot's last word was a crash
            self.finished.setdefault(slot, code)
        if self._force is not None:
            return self._done("forced", ExitCode.FORCED + self._force)
        return self._done(reason)

    def _done(self, reason: str, code: int | None = None) -> int:
        codes = list(self.finished.values())
        if code is None:
            if any(c not in _DONE for c in codes):
                code = ExitCode.FAILED
            elif ExitCode.GRACE_EXPIRED in codes:
                code = ExitCode.GRACE_EXPIRED
            else:
                code = ExitCode.OK
        event(
            log,
            logging.INFO if code == ExitCode.OK else logging.WARNING,
            "stopped",
            reason=reason,
            exit=code,
            meaning=describe_exit(code),
            slots={s: self.finished[s] for s in sorted(self.finished)},
        )
        return code


def _exited(
    slot: int,
    proc: subprocess.Popen[bytes],
    code: int,
    level: int | None = None,
    **restart: Any,
) -> None:
    """Log a child's exit; ``restart_in`` (seconds) when it is restarted."""
    event(
        log,
        level if level is not None else logging.WARNING if restart else logging.INFO,
        "child_exited",
        slot=slot,
        child_pid=proc.pid,
        code=code,
        meaning=describe_exit(code),
        restart=bool(restart),
        **restart,
    )
