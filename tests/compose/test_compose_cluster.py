"""``compose.yaml``'s ``cluster`` profile for real: six Redis nodes joined into a cluster by a
one-shot service, the example producer writing a channel of 12 partitions through a
``redis+cluster://`` URL, two consumer replicas reading it, and the broker CLI on the cluster.

Checked through the CLI inside the stack (the host cannot follow the cluster's redirections to
container addresses): every order produced is in the channel, the group has read all of them
and holds none, and the channel really has 12 partitions spread over the three primaries.
Skipped with the reason where no engine answers, except in CI.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from .stack import Compose, skip_or_fail, wait, why_not

ORDERS = 300


@pytest.fixture
def stack() -> Iterator[Compose]:
    why = why_not()
    if why:
        skip_or_fail(why)
    env = {"ORDERS_COUNT": str(ORDERS), "ORDERS_RATE": "150", "PROCESS_MS": "5",
           "BROKER_NAMESPACE": "clustered"}  # fmt: skip
    compose = Compose(["compose.yaml"], env)
    try:
        yield compose
    finally:
        # `down` leaves the services of a profile it is not told about
        compose.run("--profile", "cluster", "down", "-v", "--rmi", "local", "--remove-orphans",
                    "-t", "5", timeout=180)  # fmt: skip


def _cli(stack: Compose, *args: str) -> str:
    """The broker CLI in the stack (its image built beforehand: `run` would print the build's
    progress on stdout)."""
    done = stack.run("--profile", "cluster", "run", "--rm", "-T", "cluster-cli", *args)
    return done.stdout


def test_the_cluster_profile_runs_the_workers_on_a_cluster(stack: Compose) -> None:
    t0 = time.monotonic()
    stack.run("--profile", "cluster", "build", "--quiet", "cluster-cli", timeout=600)
    stack.run("--profile", "cluster", "up", "--build", "-d", "cluster-producer",
              "cluster-consumer", timeout=600)  # fmt: skip
    up = time.monotonic() - t0

    def producer_done() -> bool:
        (producer,) = stack.containers("cluster-producer")
        return producer.status == "exited"

    wait(producer_done, 120, "exit of the producer")
    (producer,) = stack.containers("cluster-producer")
    assert producer.exit_code == 0, stack.logs("cluster-producer")[-3000:]

    def all_read() -> bool:
        info = json.loads(_cli(stack, "info", "orders", "--json"))
        (channel,) = info
        groups = {g["name"]: g for g in channel["groups"]}
        g = groups.get("fulfilment")
        return bool(g) and g["lag"] == 0 and g["pending"] == 0

    took = wait(all_read, 120, "the consumers reading every order", every=1.0)
    (channel,) = json.loads(_cli(stack, "info", "orders", "--json"))
    assert channel["length"] == ORDERS, channel
    assert channel["partitions"] == 12, channel
    nodes = _cli(stack, "channels").strip().splitlines()
    assert any(line.split()[0] == "orders" for line in nodes[1:]), nodes
    consumers = [c for c in stack.containers("cluster-consumer") if c.status == "running"]
    assert len(consumers) == 2, consumers
    print(f"\ncluster profile: up in {up:.0f} s; {ORDERS} orders over 12 partitions, all read "
          f"and acked {took:.1f} s after the producer ended")  # fmt: skip
