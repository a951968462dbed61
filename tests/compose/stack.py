"""Driving ``compose.yaml`` for real, for the compose tests: the docker CLI, a publisher on the
host, the receipts the consumers write.

- :func:`why_not` says why compose cannot run here (no client, no engine, no plugin), and
  :func:`skip_or_fail` turns that into a skip, or a failure where the tier is required (``CI``
  set to ``true``, or ``BROKER_REQUIRE_COMPOSE=1``, which ``.ci/run`` sets).
- :class:`Compose` runs ``docker compose -p PROJECT -f ... ARGS`` with an environment of its own
  (no ``os.environ`` changes) and describes containers through ``docker inspect``.
- :class:`Publisher` publishes numbered orders from the host at a fixed rate, through the
  library, on a thread of its own, and records the id of every publish that returned one.
- :class:`Stack` is the project brought up from ``compose.yaml`` + ``compose.test.yaml``.

Every wait has a bound and fails the test with what it waited for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis

import broker
from tests.helpers.receipts import Receipts, parse

ROOT = Path(__file__).resolve().parents[2]
OVERLAY = "tests/compose/compose.test.yaml"
NAMESPACE = "compose"  # BROKER_NAMESPACE's default in compose.yaml
CHANNEL = "orders"
KEY = f"{NAMESPACE}:{{{CHANNEL}}}"
GROUP = "fulfilment"
WORKER = "process-order"  # the consumers' --name: stop token workers/process-order
RECEIPTS = "compose:receipts"
CLAIM_IDLE = 3.0  # the overlay's --claim-idle


def why_not() -> str | None:
    """None when ``docker compose`` can run containers here, else why not."""
    if shutil.which("docker") is None:
        return "no docker client on PATH"
    try:
        if subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode != 0:
            return "no Docker engine answers (`docker info` failed)"
        version = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=20)
        if version.returncode != 0:
            return "the docker client has no compose plugin"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker did not answer: {exc}"
    return None


def required() -> bool:
    """In CI the compose tier must run: fail instead of skipping."""
    return os.environ.get("CI", "").lower() == "true" or os.environ.get(
        "BROKER_REQUIRE_COMPOSE", ""
    ) not in ("", "0")


def skip_or_fail(why: str) -> None:
    message = f"compose tests did not run: {why} (they need a Docker engine with compose)"
    if required():
        pytest.fail(f"{message}; required here (CI=true or BROKER_REQUIRE_COMPOSE=1)", False)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def docker(*args: str, timeout: float = 60, check: bool = True) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        pytest.fail(f"`docker {' '.join(args)}` failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def wait(check: Callable[[], bool], bound: float, what: str, every: float = 0.2) -> float:
    """Poll ``check`` until true; returns the seconds it took, fails after ``bound``."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > bound:
            pytest.fail(f"no {what} after {bound:.0f}s", False)
        time.sleep(every)
    return time.monotonic() - t0


@dataclasses.dataclass(frozen=True)
class Container:
    id: str
    name: str
    service: str
    hostname: str
    status: str  # running, paused, exited, ...
    exit_code: int
    health: str | None  # healthy, unhealthy, starting; None without a health check
    restart_count: int
    started_at: str

    @classmethod
    def from_inspect(cls, raw: dict[str, Any]) -> Container:
        state = raw["State"]
        return cls(
            id=raw["Id"],
            name=raw["Name"].lstrip("/"),
            service=raw["Config"]["Labels"].get("com.docker.compose.service", ""),
            hostname=raw["Config"]["Hostname"],
            status=state["Status"],
            exit_code=int(state["ExitCode"]),
            health=(state.get("Health") or {}).get("Status"),
            restart_count=int(raw.get("RestartCount", 0)),
            started_at=state["StartedAt"],
        )

    @property
    def consumer(self) -> str:
        """Its worker slot's consumer name (one slot per container: ``-p`` is 1)."""
        return f"{WORKER}-{self.hostname}-0"

    def processes(self) -> list[tuple[int, int, str]]:
        """(host pid, host ppid, command line) of each process in the container."""
        out = docker("top", self.id, "-eo", "pid,ppid,args")
        rows = []
        for line in out.splitlines()[1:]:
            pid, ppid, args = line.split(None, 2)
            rows.append((int(pid), int(ppid), args))
        return rows


class Compose:
    """``docker compose`` for one project, with an environment of its own."""

    def __init__(self, files: Iterable[str], env: dict[str, str], project: str | None = None):
        self.project = project or f"brokertest{uuid.uuid4().hex[:8]}"
        self.files = list(files)
        self.env = {**os.environ, **env, "COMPOSE_PROJECT_NAME": self.project}

    def argv(self, *args: str) -> list[str]:
        argv = ["docker", "compose", "-p", self.project]
        for f in self.files:
            argv += ["-f", f]
        return [*argv, *args]

    def run(
        self,
        *args: str,
        timeout: float = 180,
        check: bool = True,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            self.argv(*args), cwd=ROOT, env={**self.env, **(env or {})},
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if check and done.returncode != 0:
            pytest.fail(
                f"`docker compose {' '.join(args)}` failed ({done.returncode}):\n"
                f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}",
                False,
            )
        return done

    def containers(self, service: str | None = None) -> list[Container]:
        """Every container of the project (or of ``service``), running or not, by name."""
        ids = self.run("ps", "-aq", *([service] if service else [])).stdout.split()
        if not ids:
            return []
        raw = json.loads(docker("inspect", *ids))
        return sorted((Container.from_inspect(r) for r in raw), key=lambda c: c.name)

    def logs(self, service: str | None = None) -> str:
        done = self.run("logs", "--no-color", *([service] if service else []), check=False)
        return done.stdout + done.stderr

    def down(self) -> None:
        """Containers, networks, volumes and the images built for the project, gone."""
        self.run("down", "-v", "--rmi", "local", "--remove-orphans", "-t", "5", timeout=120)


class Publisher:
    """``count`` orders at ``rate`` per second (an absolute schedule), published from the host
    through the library on a thread of its own. ``ids``: every publish that returned an id, in
    order; ``errors``: the publishes that raised (what, and when).

    Every publisher started is in :attr:`started` until :meth:`stop_all` (a fixture calls it
    after each test, so a failed test leaves none publishing)."""

    started: ClassVar[list[Publisher]] = []

    @classmethod
    def stop_all(cls) -> None:
        while cls.started:
            cls.started.pop().stop()

    def __init__(self, url: str, count: int, rate: float, tag: str) -> None:
        self.url, self.count, self.rate, self.tag = url, count, rate, tag
        self.ids: list[str] = []
        self.errors: list[str] = []
        self.longest_stall = 0.0  # the longest single publish, seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"publisher-{tag}", daemon=True)
        self.failure: BaseException | None = None

    def start(self) -> Publisher:
        self.started.append(self)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by join()
            self.failure = exc

    async def _main(self) -> None:
        async with broker.connect(self.url, namespace=NAMESPACE, reconnect_deadline=60) as b:
            ch = b.channel(CHANNEL)
            t0 = time.monotonic()
            for n in range(self.count):
                if self._stop.is_set():
                    return
                delay = t0 + n / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                t = time.monotonic()
                try:
                    self.ids.append(await ch.publish({"test": self.tag, "n": n}))
                except broker.BrokerError as exc:
                    self.errors.append(f"{n}: {type(exc).__name__}: {exc}")
                self.longest_stall = max(self.longest_stall, time.monotonic() - t)

    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self, bound: float) -> Publisher:
        self._thread.join(bound)
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(10)
            pytest.fail(f"the publisher {self.tag} did not finish within {bound:.0f}s", False)
        if self.failure is not None:
            raise AssertionError(f"the publisher {self.tag} failed: {self.failure!r}")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


class Stack:
    """compose.yaml + the test overlay, up: the redis service on ``127.0.0.1:port``."""

    def __init__(self, compose: Compose, port: int) -> None:
        self.compose = compose
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.redis = redis.Redis(host="127.0.0.1", port=port, socket_timeout=10)

    # -- what is there --------------------------------------------------------------------------

    def consumers(self, status: str | None = "running") -> list[Container]:
        every = self.compose.containers("consumer")
        return [c for c in every if status is None or c.status == status]

    def healthy_consumers(self, n: int) -> bool:
        consumers = self.consumers()
        return len(consumers) == n and all(c.health == "healthy" for c in consumers)

    def ensure_consumers(self, n: int, bound: float = 90) -> list[Container]:
        """Exactly ``n`` running, healthy consumer replicas (dead ones replaced)."""
        for c in self.consumers(status=None):
            if c.status not in ("running", "paused"):
                docker("rm", "-f", c.id)
        self.compose.run(
            "up", "-d", "--no-deps", "--no-recreate", "--no-build", "--scale", f"consumer={n}",
            "consumer",
        )  # fmt: skip
        wait(lambda: self.healthy_consumers(n), bound, f"{n} healthy consumers")
        return self.consumers()

    def receipts(self, ids: Iterable[str] | None = None) -> Receipts:
        """The receipts so far (of ``ids`` only, when given)."""
        every = parse(self.redis.lrange(RECEIPTS, 0, -1))
        if ids is None:
            return Receipts(every)
        wanted = set(ids)
        return Receipts([r for r in every if r.id in wanted])

    def handled(self, ids: Iterable[str]) -> bool:
        wanted = set(ids)
        return wanted <= self.receipts(wanted).ids

    def pending_count(self, consumer: str) -> int:
        summary = self.redis.xpending(KEY, GROUP)
        for row in summary.get("consumers") or []:
            if row["name"].decode() == consumer:
                return int(row["pending"])
        return 0

    def pending_of(self, consumer: str) -> set[str]:
        rows = self.redis.xpending_range(KEY, GROUP, "-", "+", 100_000, consumername=consumer)
        return {r["message_id"].decode() for r in rows}

    def held_by(self, consumer: str, settle: float = 1.0) -> set[str]:
        """Everything pending on ``consumer``, a replica that just stopped acking (frozen,
        cut off or killed), from now until ``settle`` s later (well under the claim time).

        One snapshot is not enough: a read it had blocked in the server before it stopped is
        still served to it when the next entry arrives, and that batch is held as well.
        """
        held: set[str] = set()
        end = time.monotonic() + settle
        while True:
            held |= self.pending_of(consumer)
            if time.monotonic() >= end:
                return held
            time.sleep(0.05)

    def stream_ids(self, after: str = "-") -> list[str]:
        """Ids in the stream (after ``after``, exclusive, when given)."""
        start = "-" if after == "-" else f"({after}"
        return [eid.decode() for eid, _ in self.redis.xrange(KEY, start, "+")]

    def last_id(self) -> str:
        rows = self.redis.xrevrange(KEY, "+", "-", count=1)
        return rows[0][0].decode() if rows else "0-0"

    def wait_for_pending(self, consumer: str, at_least: int, bound: float = 30) -> None:
        """Until ``consumer`` holds at least ``at_least`` pending entries."""
        wait(
            lambda: self.pending_count(consumer) >= at_least,
            bound,
            f"{at_least} pending entries held by {consumer}",
            every=0.02,
        )

    def close(self) -> None:
        self.redis.close()


def report(label: str, **figures: object) -> None:
    """One line of figures, for the run's output (``-s``) and the log."""
    line = "; ".join(f"{k.replace('_', ' ')} {v}" for k, v in figures.items())
    print(f"\n[compose {label}] {line}")


def by_host(got: Receipts) -> dict[str, int]:
    return {h: len(ids) for h, ids in sorted(got.by_host().items())}
