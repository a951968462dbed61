"""Run a worker in N processes on this host: restart crashed slots, stop them all gracefully.

Each slot is a child process (``python -m workers.child SPEC SLOT``) whose consumer name is
stable, so a slot restarted after a crash replays its own pending messages at once.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from types import FrameType

from broker._server import die_with_parent

from ._spec import WorkerSpec

__all__ = ["Supervisor"]

log = logging.getLogger("workers.supervisor")
#: seconds a slot must run before its restart backoff starts over
STABLE = 60.0


class Supervisor:
    """Keeps ``processes`` slots of ``spec`` running until SIGTERM/SIGINT or :meth:`stop`."""

    def __init__(self, spec: WorkerSpec, processes: int = 1, *, max_backoff: float = 30.0) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        self.spec = spec
        self.processes = processes
        self.max_backoff = max_backoff
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.restarts: dict[int, int] = dict.fromkeys(range(processes), 0)
        self._next_start: dict[int, float] = dict.fromkeys(range(processes), 0.0)
        self._stopping = False
        self._started: dict[int, float] = {}
        self._finished: set[int] = set()

    def _spawn(self, slot: int) -> None:
        argv = [sys.executable, "-m", "workers.child", self.spec.to_json(), str(slot)]
        self.children[slot] = subprocess.Popen(argv, preexec_fn=die_with_parent)
        self._started[slot] = time.monotonic()
        log.info("slot %d: started pid %d", slot, self.children[slot].pid)

    def stop(self, *_: object) -> None:
        """Begin a graceful stop (also the SIGTERM/SIGINT handler)."""
        self._stopping = True

    def run(self, *, install_signals: bool = True, poll: float = 0.1) -> int:
        """Blocking: supervise until stopped; returns 0 when every child exited cleanly."""
        if install_signals:
            previous = {
                s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)
            }
        try:
            for slot in range(self.processes):
                self._spawn(slot)
            while not self._stopping:
                time.sleep(poll)
                self._reap()
                if len(self._finished) == self.processes:
                    log.info("every slot finished (a remote stop, or producers that ended)")
                    return 0
            return self._shutdown()
        finally:
            if install_signals:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop()

    def _reap(self) -> None:
        now = time.monotonic()
        for slot in range(self.processes):
            proc = self.children.get(slot)
            if proc is not None and proc.poll() is None:
                continue
            if proc is not None and proc.returncode == 0:
                # a clean exit is a stop (`broker stop workers`), not a crash: no restart
                self.children.pop(slot)
                self._finished.add(slot)
                log.info("slot %d: finished", slot)
                continue
            if slot in self._finished:
                continue
            if proc is not None:
                self.children.pop(slot)
                if now - self._started.get(slot, now) > STABLE:
                    self.restarts[slot] = 0  # it had run long enough: start the backoff over
                self.restarts[slot] += 1
                delay = min(self.max_backoff, 0.5 * 2 ** min(self.restarts[slot] - 1, 10))
                self._next_start[slot] = now + delay
                log.warning(
                    "slot %d: exited with %s; restarting in %.1fs", slot, proc.returncode, delay
                )
            elif now >= self._next_start[slot]:
                self._spawn(slot)

    def _shutdown(self) -> int:
        for proc in self.children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.spec.grace + 10
        codes = []
        for slot, proc in self.children.items():
            try:
                codes.append(proc.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                log.error("slot %d: did not stop in time; killing pid %d", slot, proc.pid)
                proc.kill()
                codes.append(proc.wait())
        return 0 if all(c == 0 for c in codes) else 1
