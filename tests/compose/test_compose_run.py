"""compose.yaml brought up for real (testcontainers' compose support): needs a Docker engine.

``compose.yaml`` plus ``compose.test.yaml`` on top: a producer publishes ``ORDERS_COUNT``
orders, three consumer replicas run ``tests.helpers.receipts:record`` (one receipt per handled
order), a tail follows. The tests compare the ids produced with the ids handled, then kill one
consumer container mid-load and check that the others take over its messages.

Where no Docker engine answers (this project's CI machines have at most the docker client) these
tests are reported as skipped with the reason; ``test_compose_file.py`` still validates the files.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from tests.compose.composefile import ROOT
from tests.conftest import compare_ids
from tests.helpers.receipts import Receipts, parse

pytestmark = pytest.mark.compose

FILES = ["compose.yaml", "tests/compose/compose.test.yaml"]
KEY = "compose:{orders}"  # BROKER_NAMESPACE defaults to compose
GROUP = "fulfilment"
RECEIPTS = "compose:receipts"
COUNT, RATE = 600, 40  # 15 s of orders: long enough to kill a consumer in the middle


def _why_not() -> str | None:
    """None when compose can run here, else why not."""
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


def _wait(check: Callable[[], bool], bound: float, what: str, every: float = 0.5) -> float:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > bound:
            pytest.fail(f"no {what} after {bound}s")
        time.sleep(every)
    return time.monotonic() - t0


class Stack:
    def __init__(self, compose: Any) -> None:
        self.compose = compose
        host, port = compose.get_service_host_and_port("redis", 6379)
        host = "127.0.0.1" if host in (None, "0.0.0.0", "") else host
        self.redis = redis.Redis(host=host, port=int(port))

    def containers(self, service: str) -> list[Any]:
        return [c for c in self.compose.get_containers(include_all=True) if c.Service == service]

    def receipts(self) -> Receipts:
        return Receipts(parse(self.redis.lrange(RECEIPTS, 0, -1)))

    def produced(self) -> list[str]:
        return [eid.decode() for eid, _ in self.redis.xrange(KEY)]

    def pending_of(self, hostname: str) -> set[str]:
        prefix = f"process-order-{hostname}-".encode()
        rows = self.redis.xpending_range(KEY, GROUP, "-", "+", 100_000)
        return {r["message_id"].decode() for r in rows if r["consumer"].startswith(prefix)}

    def producer_done(self) -> bool:
        (producer,) = self.containers("producer")
        if producer.State == "exited":
            assert producer.ExitCode == 0, self.compose.get_logs("producer")
            return True
        return False

    def consumers_healthy(self) -> bool:
        consumers = self.containers("consumer")
        return len(consumers) == 3 and all(c.Health == "healthy" for c in consumers)


@pytest.fixture
def stack(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    why_not = _why_not()
    if why_not:
        pytest.skip(f"compose tests did not run: {why_not} (they need a Docker engine)")
    from testcontainers.compose import DockerCompose

    monkeypatch.setenv("COMPOSE_PROJECT_NAME", f"brokertest{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("ORDERS_COUNT", str(COUNT))
    monkeypatch.setenv("ORDERS_RATE", str(RATE))
    monkeypatch.setenv("PROCESS_MS", "40")
    # not `up --wait`: the producer exits (0) once its orders are out, which --wait reports
    # as a failure; the tests wait for what they need themselves
    compose = DockerCompose(ROOT, compose_file_name=FILES, build=True, wait=False)
    with compose:
        s = Stack(compose)
        try:
            yield s
        finally:
            out, err = compose.get_logs()
            print(f"\n--- compose logs (last 3000 characters) ---\n{(out + err)[-3000:]}")
            s.redis.close()


def test_every_order_produced_is_processed(stack: Stack) -> None:
    t0 = time.monotonic()
    healthy = _wait(stack.consumers_healthy, 120, "3 healthy consumers (broker worker --check)")
    _wait(stack.producer_done, COUNT / RATE + 120, "producer exit")
    produced = stack.produced()
    assert len(produced) == COUNT

    def all_handled() -> bool:
        return set(produced) <= stack.receipts().ids

    _wait(all_handled, 120, f"receipts for all {COUNT} orders")
    got = stack.receipts()
    hosts = {h: len(ids) for h, ids in got.by_host().items()}
    tail_out, _ = stack.compose.get_logs("tail")
    tailed = [ln for ln in tail_out.splitlines() if '"channel": "orders"' in ln]
    print(
        f"\n[compose] {COUNT} orders produced and handled in {time.monotonic() - t0:.1f}s "
        f"(consumers healthy after {healthy:.1f}s): per container {hosts}, duplicates "
        f"{len(got.duplicated())}; the tail printed {len(tailed)} lines"
    )
    compare_ids(produced, got.ids)
    assert not got.duplicated(), got.duplicated()
    assert len(hosts) == 3, f"not every replica handled orders: {hosts}"
    assert tailed, "the tail service printed no order"
    json.loads(tailed[0].split(" | ", 1)[-1].strip())  # compose prefixes "tail-1  | "


def test_killing_a_consumer_container_loses_nothing(stack: Stack) -> None:
    _wait(stack.consumers_healthy, 120, "3 healthy consumers")

    def busy() -> bool:
        return len(stack.receipts().ids) >= 100

    _wait(busy, 120, "100 orders handled", every=0.1)
    assert not stack.producer_done(), "the producer finished before the kill: not mid-load"
    victim = stack.containers("consumer")[0]
    hostname = victim.ID[:12]  # a container's host name is its short id
    subprocess.run(["docker", "kill", victim.ID], check=True, capture_output=True, timeout=30)
    t_kill = time.time()
    time.sleep(0.5)
    pending_at_kill = stack.pending_of(hostname)

    _wait(stack.producer_done, COUNT / RATE + 120, "producer exit")
    produced = stack.produced()

    def all_handled() -> bool:
        return set(produced) <= stack.receipts().ids

    _wait(all_handled, 180, f"receipts for all {COUNT} orders (after the kill)")
    got = stack.receipts()
    by_others: dict[str, float | None] = {}
    for i in pending_at_kill:
        times = [x.at for x in got.items if x.id == i and x.host != hostname and x.at > t_kill]
        by_others[i] = min(times, default=None)
    not_taken = sorted(i for i, at in by_others.items() if at is None)
    takeover = max((at for at in by_others.values() if at), default=t_kill) - t_kill
    dups = got.duplicated()
    print(
        f"\n[compose kill] consumer {hostname} killed with {len(pending_at_kill)} pending; "
        f"the others handled them within {takeover:.1f}s of the kill; per container "
        f"{ {h: len(ids) for h, ids in got.by_host().items()} }; duplicates {len(dups)}"
    )
    compare_ids(produced, got.ids)
    assert not not_taken, f"pending on the killed consumer, never handled by another: {not_taken}"
    assert set(dups) <= pending_at_kill, sorted(set(dups) - pending_at_kill)


def test_integration_suite_against_the_compose_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    why_not = _why_not()
    if why_not:
        pytest.skip(f"compose tests did not run: {why_not} (they need a Docker engine)")
    monkeypatch.setenv("COMPOSE_PROJECT_NAME", f"brokertest{uuid.uuid4().hex[:8]}")
    base = ["docker", "compose", "-f", "compose.yaml"]
    try:
        done = subprocess.run(
            [*base, "run", "--rm", "tests"], cwd=ROOT, timeout=900, capture_output=True
        )
    finally:
        subprocess.run([*base, "down", "-v"], cwd=ROOT, timeout=120, capture_output=True)
    assert done.returncode == 0, done.stdout.decode()[-3000:] + done.stderr.decode()[-3000:]
