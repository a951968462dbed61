"""The worker CLI on four "hosts": orders produced on host 1, consumed on hosts 2 and 3.

Every worker is the real ``broker worker`` command (a supervisor and its slot processes), run
with ``ip netns exec`` on a host with its own address, link and host name; Redis runs on a host
of its own. Consumers run ``tests.helpers.receipts:record``, which leaves one receipt per handled
message, so each test compares the ids published with the ids handled (both sides reported) and
counts duplicates. The figures (messages, duplicates, takeover time) are printed: run with ``-s``.

Consumers claim a dead or cut-off consumer's messages after ``CLAIM_IDLE`` seconds
(``--claim-idle``; the default of 60 s would make these tests slow) and beat every
``HEARTBEAT`` seconds (``--heartbeat``), so ``broker worker --check`` notices a death quickly.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis.asyncio as aioredis

import broker
from tests.conftest import compare_ids
from tests.helpers.receipts import Receipts
from tests.multihost.conftest import StartCli
from tests.multihost.netns import Host, HostProcess, Network
from tests.multihost.support import exit_code, report, until

pytestmark = pytest.mark.multihost

GROUP = "g"
CLAIM_IDLE = 2.0
#: seconds between worker heartbeats (one expires after three): --check notices a death fast
HEARTBEAT = 0.5
PRODUCER = "broker.workers.examples:orders"
RECORD = "tests.helpers.receipts:record"


class Fleet:
    """One test's workers: a producer on host 1, consumers on hosts 2 and 3."""

    def __init__(
        self,
        net: Network,
        start_cli: StartCli,
        client: broker.Broker,
        raw: aioredis.Redis,
        namespace: str,
        channel: str,
    ) -> None:
        self.net, self.start_cli, self.client, self.raw = net, start_cli, client, raw
        self.namespace, self.channel = namespace, channel
        self.key = client.channel(channel).key
        self.receipts_key = f"{namespace}:receipts"
        self.h1, self.h2, self.h3 = net.hosts
        self.procs: list[HostProcess] = []

    def consumers(
        self,
        hosts: list[Host],
        *,
        process_ms: int,
        name: str = "consumer",
        concurrency: int = 4,
        processes: int = 2,
        extra: tuple[str, ...] = (),
    ) -> list[HostProcess]:
        args = [
            "worker", RECORD, "--channel", self.channel, "--group", GROUP,
            "--concurrency", str(concurrency), "--processes", str(processes),
            "--name", name, "--start", "all", "--claim-idle", str(CLAIM_IDLE),
            "--heartbeat", str(HEARTBEAT), "--grace", "5", *extra,
        ]  # fmt: skip
        env = {"RECEIPTS_KEY": self.receipts_key, "PROCESS_MS": str(process_ms)}
        started = [self.start_cli(h, args, f"{name}-{h.hostname}", env) for h in hosts]
        self.procs += started
        return started

    def producer(self, count: int, rate: float, tag: str = "producer") -> HostProcess:
        args = ["worker", PRODUCER, "--channel", self.channel, "--name", "producer"]
        env = {"ORDERS_COUNT": str(count), "ORDERS_RATE": str(rate)}
        hp = self.start_cli(self.h1, args, tag, env)
        self.procs.append(hp)
        return hp

    def report(self) -> str:
        return report(self.procs)

    async def check(self, host: Host, name: str = "consumer") -> int:
        """``broker worker --check --name NAME`` on ``host``: its exit status."""
        done = await asyncio.to_thread(
            self.net.run_cli,
            host,
            ["worker", "--check", "--name", name],
            env={"BROKER_URL": self.net.url, "BROKER_NAMESPACE": self.namespace},
            timeout=30,
        )
        return done.returncode

    async def healthy(self, hosts: list[Host], watch: list[HostProcess]) -> float:
        async def all_ok() -> bool:
            codes = await asyncio.gather(*(self.check(h) for h in hosts))
            return all(c == 0 for c in codes)

        return await until(
            all_ok, bound=30, what="`broker worker --check` passing", watch=watch, every=0.1
        )

    async def receipts(self) -> Receipts:
        return await Receipts.fetch(self.raw, self.receipts_key)

    async def produced(self) -> list[str]:
        return [eid.decode() for eid, _ in await self.raw.xrange(self.key)]

    async def produce(self, count: int, rate: float, tag: str = "producer") -> list[str]:
        """Run the producer on host 1 to its end; the ids it added."""
        before = set(await self.produced())
        hp = self.producer(count, rate, tag)
        code = await exit_code(hp, 30 + count / rate)
        assert code == 0, f"the producer failed:\n{hp.describe()}"
        ids = [i for i in await self.produced() if i not in before]
        assert len(ids) == count, f"the producer added {len(ids)} of {count}:\n{hp.describe()}"
        return ids

    async def pending_of(self, host: Host, name: str = "consumer") -> set[str]:
        """Ids pending on ``host``'s consumers (named ``<name>-<host>-<slot>``), server side."""
        prefix = f"{name}-{host.hostname}-".encode()
        rows = await self.raw.xpending_range(self.key, GROUP, "-", "+", 100_000)
        return {r["message_id"].decode() for r in rows if r["consumer"].startswith(prefix)}

    async def all_handled(
        self, ids: set[str] | list[str], bound: float, watch: list[HostProcess]
    ) -> Receipts:
        want = set(ids)
        last: Receipts | None = None

        async def done() -> bool:
            nonlocal last
            last = await self.receipts()
            return want <= last.ids

        await until(done, bound=bound, what=f"receipts for all {len(want)} ids", watch=watch,
                    every=0.05)  # fmt: skip
        assert last is not None
        return last


@pytest.fixture
def fleet(
    net: Network,
    start_cli: StartCli,
    client: broker.Broker,
    raw: aioredis.Redis,
    namespace: str,
    name: str,
) -> Fleet:
    return Fleet(net, start_cli, client, raw, namespace, name)


def _per_host(r: Receipts) -> dict[str, int]:
    return {h: len(ids) for h, ids in sorted(r.by_host().items())}


async def _settled(fleet: Fleet, bound: float = 10.0) -> broker.GroupInfo:
    """The group once nothing is pending (acks are batched and follow the receipts)."""
    group: broker.GroupInfo | None = None

    async def no_pending() -> bool:
        nonlocal group
        info = await fleet.client.channel(fleet.channel).info()
        group = next(g for g in info.groups if g.name == GROUP)
        return group.pending == 0

    await until(no_pending, bound=bound, what="the group with nothing pending", every=0.05)
    assert group is not None
    return group


# -- 1. normal operation ----------------------------------------------------------------------


async def test_every_message_from_host1_is_handled_once_on_hosts_2_and_3(fleet: Fleet) -> None:
    n = 600
    consumers = fleet.consumers([fleet.h2, fleet.h3], process_ms=5)
    ready = await fleet.healthy([fleet.h2, fleet.h3], consumers)
    t0 = time.monotonic()
    produced = await fleet.produce(n, rate=400)
    got = await fleet.all_handled(produced, bound=60, watch=consumers)
    took = time.monotonic() - t0
    per_host = _per_host(got)
    dups = got.duplicated()
    group = await _settled(fleet)

    # a stop fired from host 1 ends both consumers (the worker's own token, workers/<name>)
    t_stop = time.monotonic()
    stopped = await asyncio.to_thread(
        fleet.net.run_cli,
        fleet.h1,
        ["stop", "workers/consumer"],
        env={"BROKER_URL": fleet.net.url, "BROKER_NAMESPACE": fleet.namespace},
        timeout=30,
    )
    codes = await asyncio.gather(*(exit_code(c, 30) for c in consumers))
    stop_to_exit = time.monotonic() - t_stop
    checks_after = [await fleet.check(h) for h in (fleet.h2, fleet.h3)]
    print(
        f"\n[normal] {n} orders from host1 handled by hosts 2 and 3 in {took:.2f}s "
        f"(healthy after {ready:.2f}s): per host {per_host}, receipts {len(got.items)}, "
        f"duplicates {len(dups)}; group pending {group.pending}, lag {group.lag}; "
        f"`broker stop workers/consumer` on host1 -> both exited (codes {codes}) in "
        f"{stop_to_exit * 1000:.0f} ms; --check afterwards {checks_after}"
    )
    compare_ids(produced, got.ids)
    assert not dups, f"handled more than once in normal operation: {dups}"
    assert set(per_host) == {"host2", "host3"}, per_host
    assert min(per_host.values()) >= n // 10, f"one host did almost nothing: {per_host}"
    assert group.pending == 0 and group.lag == 0, group
    assert stopped.returncode == 0, stopped.stderr
    assert codes == [0, 0], fleet.report()
    assert all(c != 0 for c in checks_after), "--check passes for a worker that stopped"


# -- 2. kill -9 on host 2 ---------------------------------------------------------------------


async def test_sigkill_on_host2_host3_takes_over_its_pending(fleet: Fleet) -> None:
    n, rate = 450, 150
    c2, c3 = fleet.consumers([fleet.h2, fleet.h3], process_ms=40)
    await fleet.healthy([fleet.h2, fleet.h3], [c2, c3])
    producer = fleet.producer(n, rate)

    async def host2_busy() -> bool:
        r = await fleet.receipts()
        return len(r.by_host().get("host2", ())) >= 30 and bool(await fleet.pending_of(fleet.h2))

    await until(host2_busy, bound=30, what="host2 busy (30 receipts, some pending)",
                watch=[c2, c3, producer])  # fmt: skip
    c2.kill()  # its supervisor and both slots at once, like a machine that dies
    t_kill = time.time()
    assert c2.proc.returncode == -9, c2.describe()
    await asyncio.sleep(0.2)  # what the kernel had sent before the kill reaches the server
    pending_at_kill = await fleet.pending_of(fleet.h2)
    assert pending_at_kill, "host2 had nothing pending when killed"

    assert await exit_code(producer, 30 + n / rate) == 0, producer.describe()
    produced = await fleet.produced()
    assert len(produced) == n
    got = await fleet.all_handled(produced, bound=30 + 3 * CLAIM_IDLE, watch=[c3])
    done_at = time.time()

    async def host2_unhealthy() -> bool:
        return await fleet.check(fleet.h2) != 0

    # its heartbeats stop: --check on host 2 fails once the last one expired (3 intervals)
    unhealthy = (
        time.time()
        - t_kill
        + await until(host2_unhealthy, bound=10, what="--check failing on host2", every=0.2)
    )
    taken = {i: got.first_at(i, "host3") for i in pending_at_kill}
    not_taken = sorted(i for i, at in taken.items() if at is None or at < t_kill)
    dups = got.duplicated()
    takeover = max((at for at in taken.values() if at is not None), default=t_kill) - t_kill
    print(
        f"\n[kill -9 host2] {n} orders; host2 killed with {len(pending_at_kill)} pending; "
        f"host3 handled all of them, the last {takeover:.2f}s after the kill (claim idle "
        f"{CLAIM_IDLE:g}s); everything handled {done_at - t_kill:.2f}s after the kill; per "
        f"host {_per_host(got)}; duplicates {len(dups)} (handled on host2, killed before the "
        f"ack): {sorted(dups.items())[:10]}; --check on host2 failing by {unhealthy:.2f}s "
        f"after the kill (heartbeat {HEARTBEAT:g}s)"
    )
    compare_ids(produced, got.ids)
    assert not not_taken, f"host2 had these pending; host3 never handled them: {not_taken}"
    assert set(dups) <= pending_at_kill, "a duplicate that was not pending on host2 at the kill"
    assert c3.poll() is None, c3.describe()


# -- 3. host 3 cut off, then back -------------------------------------------------------------


async def test_host3_cut_off_longer_than_claim_idle_then_back(fleet: Fleet) -> None:
    c2, c3 = fleet.consumers([fleet.h2, fleet.h3], process_ms=40)
    await fleet.healthy([fleet.h2, fleet.h3], [c2, c3])
    first = fleet.producer(300, 150, tag="producer-1")

    async def host3_busy() -> bool:
        r = await fleet.receipts()
        return len(r.by_host().get("host3", ())) >= 20 and bool(await fleet.pending_of(fleet.h3))

    await until(host3_busy, bound=30, what="host3 busy (20 receipts, some pending)",
                watch=[c2, c3, first])  # fmt: skip

    # While cut, host 3 cannot ack, but the server can still add entries to its pending list
    # (a blocked XREADGROUP it had sent is answered into the dead link): poll its pending list
    # during the whole cut; those are what host 2 must take over, and what may be handled twice.
    held: set[str] = set()
    cut_for = 0.0
    fleet.net.cut(fleet.h3)
    t_cut = time.time()
    try:
        await asyncio.sleep(0.2)

        async def taken_over() -> bool:
            nonlocal held
            now_pending = await fleet.pending_of(fleet.h3)
            held |= now_pending
            r = await fleet.receipts()
            by2 = {i for i in held if (at := r.first_at(i, "host2")) and at > t_cut}
            # longer than the claim idle time, host 3 holds nothing, host 2 handled all of it
            return time.time() - t_cut > CLAIM_IDLE + 1 and not now_pending and by2 == held

        took_over = await until(taken_over, bound=30, what="host2 taking over host3's messages",
                                watch=[c2, c3], every=0.1)  # fmt: skip
        taken_at = time.time()
        assert c3.poll() is None, f"host3's worker exited while cut off:\n{c3.describe()}"
    finally:
        cut_for = time.time() - t_cut
        fleet.net.restore(fleet.h3)
    t_up = time.time()
    assert await exit_code(first, 30) == 0, first.describe()

    # host 3 resumes: it handles new messages, published after the link is back, until
    # then the producer runs (its connections come back when TCP retransmits, which after a
    # few seconds of silence can itself take seconds)
    second = fleet.producer(0, 100, tag="producer-2")  # 0: until stopped

    def is_new(mid: str) -> bool:
        return int(mid.split("-")[0]) > t_up * 1000  # the server's clock is this machine's

    async def host3_resumed() -> bool:
        r = await fleet.receipts()
        return sum(x.host == "host3" and is_new(x.id) for x in r.items) >= 10

    await until(host3_resumed, bound=30, what="host3 handling 10 new messages",
                watch=[c2, c3, second])  # fmt: skip
    stopped = await asyncio.to_thread(
        fleet.net.run_cli,
        fleet.h1,
        ["stop", "workers/producer"],
        env={"BROKER_URL": fleet.net.url, "BROKER_NAMESPACE": fleet.namespace},
        timeout=30,
    )
    assert stopped.returncode == 0, stopped.stderr
    assert await exit_code(second, 30) == 0, second.describe()
    produced = await fleet.produced()
    got = await fleet.all_handled(produced, bound=30, watch=[c2, c3])
    dups = got.duplicated()
    new = [i for i in produced if is_new(i)]
    after_up = sorted(x.at for x in got.items if x.host == "host3" and is_new(x.id))
    second3 = len(after_up)
    resumed = after_up[0] - t_up
    print(
        f"\n[cut host3] {len(produced)} orders; host3 cut for {cut_for:.2f}s (claim idle "
        f"{CLAIM_IDLE:g}s) holding {len(held)} messages; host2 had handled all of them "
        f"{taken_at - t_cut:.2f}s after the cut (wait {took_over:.2f}s); link up -> first "
        f"new message handled on host3 {resumed:.2f}s later ({second3} of {len(new)} sent "
        f"after the link came back); per host {_per_host(got)}; duplicates {len(dups)} "
        f"(at most the {len(held)} held): {sorted(dups.items())[:10]}"
    )
    compare_ids(produced, got.ids)
    assert set(dups) <= held, f"duplicates beyond what host3 held: {set(dups) - held}"
    assert c2.poll() is None and c3.poll() is None, fleet.report()


# -- 4. a stop token fired on host 1 ----------------------------------------------------------


async def test_stop_token_from_host1_stops_hosts_2_and_3(fleet: Fleet) -> None:
    token = f"halt-{uuid.uuid4().hex[:8]}"
    n, rate = 400, 200
    consumers = fleet.consumers(
        [fleet.h2, fleet.h3], process_ms=100, concurrency=2, extra=("--stop-token", token)
    )
    await fleet.healthy([fleet.h2, fleet.h3], consumers)
    producer = fleet.producer(n, rate)

    async def both_busy() -> bool:
        hosts = (await fleet.receipts()).by_host()
        return all(len(hosts.get(h, ())) >= 10 for h in ("host2", "host3"))

    await until(both_busy, bound=30, what="both hosts handling", watch=[*consumers, producer])
    t_stop = time.monotonic()
    fired = await asyncio.to_thread(
        fleet.net.run_cli,
        fleet.h1,
        ["stop", token, "--reason", "test over"],
        env={"BROKER_URL": fleet.net.url, "BROKER_NAMESPACE": fleet.namespace},
        timeout=30,
    )
    assert fired.returncode == 0, fired.stderr

    async def timed(hp: HostProcess) -> tuple[int, float]:
        code = await exit_code(hp, 30)
        return code, time.monotonic() - t_stop

    ended = await asyncio.gather(*(timed(c) for c in consumers))
    assert await exit_code(producer, 30 + n / rate) == 0, producer.describe()
    checks_after = [await fleet.check(h) for h in (fleet.h2, fleet.h3)]

    produced = await fleet.produced()
    got = await fleet.receipts()
    # a graceful stop acks what it handled: nothing handled is left pending
    pending = {
        r["message_id"].decode()
        for r in await fleet.raw.xpending_range(fleet.key, GROUP, "-", "+", 100_000)
    }
    handled_not_acked = got.ids & pending
    # the rest was never delivered, or released by the stopping hosts: a fresh member gets it
    rest = await _drain(fleet.client, fleet.channel, set(produced) - got.ids)
    print(
        f"\n[stop token] `broker stop {token}` on host1 (reached {fired.stdout.strip() or '?'})"
        f": exit codes {[c for c, _ in ended]}, stop -> exit "
        f"{[f'{t * 1000:.0f} ms' for _, t in ended]}; handled {len(got.ids)} of {n} before "
        f"the stop (per host {_per_host(got)}), {len(pending)} left pending (released), "
        f"{len(rest)} taken by a fresh consumer afterwards; --check afterwards {checks_after}"
    )
    assert [c for c, _ in ended] == [0, 0], fleet.report()
    assert max(t for _, t in ended) < 15, ended
    assert not handled_not_acked, f"handled but left pending: {sorted(handled_not_acked)[:10]}"
    assert not got.duplicated(), got.duplicated()
    assert all(c != 0 for c in checks_after), "--check passes for a worker that stopped"
    compare_ids(produced, got.ids | rest)


async def _drain(client: broker.Broker, channel: str, want: set[str]) -> set[str]:
    """Read ``want`` as a fresh member of the group (no claim wait: released entries are idle
    "forever"); at most 20 s."""
    got: set[str] = set()
    if not want:
        return got
    async with client.channel(channel).subscribe(
        group=GROUP, consumer="drain", claim_idle=3600, claim_interval=0.2, prefetch=64
    ) as messages:
        try:
            async with asyncio.timeout(20):
                async for msg in messages:
                    got.add(msg.id)
                    msg.ack()
                    if want <= got:
                        break
        except TimeoutError:
            pass  # the caller's comparison names what is missing
    return got
