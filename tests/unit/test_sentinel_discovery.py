"""Where the master is, behind Sentinel: the newest configuration wins.

Seen in CI: after a SIGKILL of the master, the test started the killed node again (empty, and a
master until the sentinels make it a replica). One sentinel had not yet heard of the failover and
named the old node, which was no longer down; redis-py believed the first sentinel that answered,
every connection went to the empty node, and the check read an empty stream: every acknowledged
durable publish looked lost. :class:`broker._clients.EpochSentinel` asks them all and believes the
highest ``config-epoch`` among the first majority to answer.

The sentinels here are stand-ins answering ``SENTINEL MASTERS`` as redis-py parses it, so each
case is exact; the Sentinel tests in ``tests/integration`` run the real thing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.exceptions as rex
from redis.asyncio.sentinel import MasterNotFoundError

from broker._clients import EpochSentinel


class FakeSentinel:
    def __init__(self, port: int | None, epoch: int = 0, *, delay: float = 0.0) -> None:
        self.port, self.epoch, self.delay = port, epoch, delay
        self.asked = 0

    async def sentinel_masters(self) -> dict[str, Any]:
        self.asked += 1
        await asyncio.sleep(self.delay)
        if self.port is None:
            raise rex.ConnectionError("connection refused")
        state = {
            "ip": "127.0.0.1",
            "port": self.port,
            "config-epoch": self.epoch,
            "is_master": True,
            "is_sdown": False,
            "is_odown": False,
            "num-other-sentinels": 2,
        }
        return {"svc": state}

    def __repr__(self) -> str:
        return f"FakeSentinel({self.port})"


def manager(*fakes: FakeSentinel) -> EpochSentinel:
    s = EpochSentinel([])
    s.sentinels = list(fakes)
    return s


async def test_a_stale_sentinel_first_in_the_list_does_not_win() -> None:
    stale, a, b = FakeSentinel(6001, 1), FakeSentinel(6002, 2), FakeSentinel(6002, 2)
    assert await manager(stale, a, b).discover_master("svc") == ("127.0.0.1", 6002)


async def test_the_newest_epoch_wins_whatever_the_order_of_answers() -> None:
    # the stale sentinel answers first and fastest; the majority answers later
    stale, a, b = FakeSentinel(6001, 1), FakeSentinel(6002, 2, delay=0.02), FakeSentinel(6002, 2)
    assert await manager(stale, a, b).discover_master("svc") == ("127.0.0.1", 6002)


async def test_one_silent_sentinel_does_not_slow_discovery() -> None:
    silent = FakeSentinel(6001, 1, delay=30)
    found = await asyncio.wait_for(
        manager(silent, FakeSentinel(6002, 2), FakeSentinel(6002, 2)).discover_master("svc"), 2
    )
    assert found == ("127.0.0.1", 6002)


async def test_sentinels_that_fail_are_skipped_and_named_when_none_answers() -> None:
    assert await manager(
        FakeSentinel(None), FakeSentinel(None), FakeSentinel(6003, 4)
    ).discover_master("svc") == ("127.0.0.1", 6003)
    with pytest.raises(MasterNotFoundError, match="connection refused"):
        await manager(FakeSentinel(None), FakeSentinel(None)).discover_master("svc")


async def test_an_unknown_service_is_master_not_found() -> None:
    with pytest.raises(MasterNotFoundError, match="no master for 'other'"):
        await manager(FakeSentinel(6001)).discover_master("other")
