"""Fixtures of the multi-host tier: a bridge, three network namespaces ("hosts") and a server.

The session builds the network once (:mod:`tests.multihost.netns`) and starts a private
``redis-server`` in a namespace of its own, bound to its address there only (so nothing leaves
the machine). ``redis_url`` is overridden here, so the shared ``client`` and ``raw`` fixtures of
``tests/conftest.py`` talk to that server from the root namespace, over the bridge.

If the namespaces cannot be created every test of this tier fails with the reason — except for
a non-root user outside CI, where they are reported as skipped with that reason (``.ci/run``
sets ``BROKER_REQUIRE_MULTIHOST=1``, so in CI they always run or fail).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.multihost.netns import Host, HostProcess, Network, NetworkError, broker_cli


@pytest.fixture(scope="session")
def net() -> Iterator[Network]:
    network = Network(n_hosts=3)
    problem = None
    try:
        network.build()
    except NetworkError as exc:
        problem = str(exc)
    if problem is not None and os.geteuid() != 0 and not os.environ.get("BROKER_REQUIRE_MULTIHOST"):
        pytest.skip(
            f"multihost tests did not run: they need root for `ip netns` ({problem}); "
            "CI runs them as root (BROKER_REQUIRE_MULTIHOST=1 makes this a failure)"
        )
    if problem is not None:  # outside the except: the report shows the reason, not a chain
        pytest.fail(f"multihost: cannot build the test network: {problem}", pytrace=False)
    print(
        f"\n[multihost] bridge {network.bridge} {network.gateway}/24, server {network.url} "
        f"in {network.server_host}, "
        + ", ".join(f"{h} ({h.veth_root}<->{h.veth_host})" for h in network.hosts)
    )
    try:
        yield network
    finally:
        network.teardown()


@pytest.fixture(scope="session")
def redis_url(net: Network) -> str:
    """The bridge's server (overrides the loopback one of ``tests/conftest.py`` here)."""
    return net.url


Spawn = Callable[[Host, str, list[str], str], HostProcess]
StartCli = Callable[..., HostProcess]


@pytest.fixture
def spawn(net: Network, tmp_path: Path) -> Iterator[Spawn]:
    """``spawn(host, module, args, tag)``: run ``python -m module args`` inside ``host``.

    Every process started through it is SIGKILLed (by PID) at the end of the test if still
    running; its stdout/stderr are files in the test's tmp dir. Every host's link is up again
    afterwards.
    """
    started: list[HostProcess] = []

    def start(host: Host, module: str, args: list[str], tag: str) -> HostProcess:
        hp = net.spawn(host, module, args, tmp_path, tag)
        started.append(hp)
        return hp

    try:
        yield start
    finally:
        for hp in started:
            hp.kill()
        for host in net.hosts:  # a test that failed while a host was cut must not leave it so
            net.restore(host)


@pytest.fixture
def start_cli(net: Network, tmp_path: Path, namespace: str) -> Iterator[StartCli]:
    """``start_cli(host, args, tag, env=None)``: run ``broker <args>`` inside ``host``.

    The server and the test's namespace come from ``BROKER_URL``/``BROKER_NAMESPACE`` (also
    what the receipts handler reads). Every process started through it has its process group
    SIGKILLed at the end of the test (a worker's supervisor with its slots), and every host's
    link is up again afterwards.
    """
    started: list[HostProcess] = []

    def start(
        host: Host, args: list[str], tag: str, env: dict[str, str] | None = None
    ) -> HostProcess:
        full = {"BROKER_URL": net.url, "BROKER_NAMESPACE": namespace, **(env or {})}
        hp = net.run_in(host, [*broker_cli(), *args], tmp_path, tag, env=full)
        started.append(hp)
        return hp

    try:
        yield start
    finally:
        for hp in started:
            hp.kill()
        for host in net.hosts:
            net.restore(host)
