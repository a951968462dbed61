"""The test network gets through iptables' ``FORWARD`` chain whatever its policy.

Docker sets that policy to ``DROP`` with ``bridge-nf-call-iptables=1``, so frames between two
ports of the test bridge were dropped and the hosts could not reach the server. The network
inserts one ``ACCEPT`` rule for its own bridge and deletes it in teardown, also when building
failed half-way.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.multihost.netns import (
    Network,
    NetworkError,
    _bridge_filtered,
    _iptables,
    forward_policy,
)

pytestmark = pytest.mark.multihost


def _tagged(bridge: str) -> list[str]:
    return [ln for ln in _iptables("-S", "FORWARD").splitlines() if f'{bridge}"' in ln]


@pytest.fixture
def iptables() -> None:
    if shutil.which("iptables") is None:
        pytest.skip("no `iptables` command: nothing filters bridged traffic through it here")


@pytest.fixture
def drop_policy(iptables: None) -> Iterator[str]:
    """The ``FORWARD`` policy set to ``DROP`` (as Docker does) for the test, then put back."""
    before = forward_policy()
    assert before is not None, _iptables("-S", "FORWARD")
    if before != "DROP":
        _iptables("-P", "FORWARD", "DROP")
    try:
        yield before
    finally:
        if before != "DROP":
            _iptables("-P", "FORWARD", before)


def test_the_session_bridge_has_its_rule(net: Network, iptables: None) -> None:
    rules = _tagged(net.bridge)
    print(
        f"\n[multihost] FORWARD policy {forward_policy()}, bridge-nf-call-iptables "
        f"{int(_bridge_filtered())}, rules for {net.bridge}: {rules}"
    )
    assert len(rules) == (1 if _bridge_filtered() else 0), rules


def test_hosts_reach_the_server_under_a_drop_policy_and_the_rule_goes(
    drop_policy: str, net: Network
) -> None:
    # `net` (the session's network) first: its lock and names are taken, ours are new
    network = Network(n_hosts=1)
    network.build()  # checks that host1 reaches the server over the bridge
    try:
        bridge = network.bridge
        assert forward_policy() == "DROP"
        assert len(_tagged(bridge)) == (1 if _bridge_filtered() else 0), _tagged(bridge)
    finally:
        network.teardown()
    assert _tagged(bridge) == [], "teardown left the FORWARD rule"
    print(f"\n[multihost] {bridge}: reached under FORWARD DROP (was {drop_policy}); rule removed")


def test_a_failed_build_removes_the_rule(
    net: Network, iptables: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[str]] = []
    network = Network(n_hosts=1)

    def fail(host: object, timeout: float = 0) -> None:
        seen.append(_tagged(network.bridge))
        raise NetworkError("made to fail by the test")

    monkeypatch.setattr(network, "_check_reach", fail)
    with pytest.raises(NetworkError, match="made to fail"):
        network.build()
    # the failure happened after the rule was inserted (where one is needed)
    assert seen and len(seen[0]) == (1 if _bridge_filtered() else 0), seen
    assert _tagged(network.bridge) == [], "a failed build left the FORWARD rule"
