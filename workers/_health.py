"""Worker heartbeats: one key per running worker slot.

- ``<namespace>:workers:<name>/<host>/<slot>``: msgpack of the slot's status. A slot is *alive*
  while its last heartbeat is younger than three intervals; after that it is *stale* (its event
  loop is blocked, its host is cut off, or it died) and is listed as such, with the age of its
  last heartbeat, until the key expires after :func:`gone_after` seconds (a minute, or ten
  intervals if longer): then it is gone for good. A slot that stops cleanly removes its key.
- ``<namespace>:workers:live``: a sorted set of those ids (score: last write, server ms), so
  listing needs no ``SCAN``; ids whose key expired are dropped from it by the next listing.

Times are the server's clock, so hosts with skewed clocks agree on what is alive.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import resource
import sys
from typing import Any

import msgpack

from broker import Broker, BrokerError

__all__ = [
    "WorkerStatus",
    "check_health",
    "forget",
    "gone_after",
    "list_workers",
    "remove_heartbeat",
    "rss_bytes",
    "write_heartbeat",
]

log = logging.getLogger("workers.health")


def index_key(namespace: str) -> str:
    return f"{namespace}:workers:live"


def status_key(namespace: str, wid: str) -> str:
    return f"{namespace}:workers:{wid}"


@dataclasses.dataclass(frozen=True)
class WorkerStatus:
    """One worker slot, as its last heartbeat described it."""

    id: str
    name: str
    kind: str
    host: str
    pid: int
    slot: int
    processes: int
    consumer: str | None
    channels: list[str]
    group: str | None
    state: str
    started: float
    seen: float
    processed: int
    failed: int
    in_flight: int
    interval: float
    handler: str
    #: resident memory of the slot's process in bytes (None: not reported)
    rss: int | None = None
    #: seconds since the last heartbeat, by the server's clock
    age: float = 0.0
    #: seconds since the slot started, by the server's clock
    uptime: float = 0.0

    @property
    def alive(self) -> bool:
        """Seen within three heartbeat intervals; else stale (listed until it is gone)."""
        return self.age < 3 * self.interval


#: seconds without a heartbeat after which a slot is gone for good (its key expires)
GONE_AFTER = 60.0


def gone_after(interval: float) -> float:
    """Seconds without a heartbeat after which a slot is gone: a minute, or ten intervals."""
    return max(GONE_AFTER, 10 * interval)


def ttl_ms(interval: float) -> int:
    return max(1, int(gone_after(interval) * 1000))


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
#: (pid, fd) of this process's open /proc/<pid>/statm: one pread per reading (under 1 µs,
#: cheap enough to check after every message), reopened in a forked child
_statm: tuple[int, int] | None = None


def rss_bytes() -> int:
    """Resident memory of this process now (Linux ``/proc``); elsewhere its peak."""
    global _statm
    pid = os.getpid()
    try:
        if _statm is None or _statm[0] != pid:
            _statm = (pid, os.open(f"/proc/{pid}/statm", os.O_RDONLY | os.O_CLOEXEC))
        return int(os.pread(_statm[1], 128, 0).split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


async def write_heartbeat(b: Broker, wid: str, info: dict[str, Any]) -> None:
    """Write (or refresh) slot ``wid``'s status; it expires after three ``info["interval"]``."""
    seen_ms = b.server_time_ms()
    payload = msgpack.packb({**info, "id": wid, "seen": seen_ms / 1000})
    key, index = status_key(b.namespace, wid), index_key(b.namespace)

    async def write() -> None:
        pipe = b.redis.pipeline(transaction=False)
        pipe.set(key, payload, px=ttl_ms(info["interval"]))
        pipe.zadd(index, {wid: seen_ms})  # after the key: a listing never finds an id first
        await pipe.execute()

    await b.call(write)


async def remove_heartbeat(b: Broker, wid: str) -> None:
    async def remove() -> None:
        pipe = b.redis.pipeline(transaction=False)
        pipe.delete(status_key(b.namespace, wid))
        pipe.zrem(index_key(b.namespace), wid)
        await pipe.execute()

    await b.call(remove)


async def list_workers(b: Broker) -> list[WorkerStatus]:
    """Every worker slot that is not gone, alive or stale (see :attr:`WorkerStatus.alive`), on
    every host, by id."""
    index = index_key(b.namespace)
    ids = [i.decode() for i in await b.call(lambda: b.redis.zrange(index, 0, -1))]
    if not ids:
        return []

    async def fetch() -> list[Any]:
        pipe = b.redis.pipeline(transaction=False)
        for wid in ids:
            pipe.get(status_key(b.namespace, wid))
        return list(await pipe.execute())

    now = b.server_time_ms() / 1000
    out, gone = [], []
    for wid, raw in zip(ids, await b.call(fetch), strict=True):
        if raw is None:
            gone.append(wid)
            continue
        try:
            info = msgpack.unpackb(raw)
            status = WorkerStatus(
                age=max(0.0, now - info["seen"]),
                uptime=max(0.0, now - info["started"]),
                **{n: info[n] for n in _REQUIRED},
                **{n: info[n] for n in _OPTIONAL if n in info},
            )
        except Exception:  # written by another version: not ours to interpret
            continue
        out.append(status)
    if gone:
        # expired keys; a slot that comes back re-adds itself with its next heartbeat
        await b.call(lambda: b.redis.zrem(index, *gone))
    return out


_REQUIRED = [f.name for f in dataclasses.fields(WorkerStatus) if f.default is dataclasses.MISSING]
#: fields a heartbeat of an older version may lack
_OPTIONAL = ["rss"]


async def check_health(b: Broker, host: str, name: str | None = None) -> tuple[bool, str]:
    """Whether every slot of this host's worker(s) (named ``name``, or all) reports running.

    Returns ``(healthy, one line saying why)``.
    """
    mine = [w for w in await list_workers(b) if w.host == host and name in (None, w.name)]
    which = f"worker {name!r}" if name else "worker"
    if not mine:
        return False, (
            f"no {which} has a heartbeat from host {host!r} in namespace {b.namespace!r} "
            "(not running, or another --url/--namespace/--host)"
        )
    for w in mine:
        if not w.alive:
            return False, f"{w.id} last reported {w.age:.1f}s ago (pid {w.pid})"
        if w.state != "running":
            return False, f"{w.id} is {w.state} (pid {w.pid})"
    for wname in sorted({w.name for w in mine}):
        slots = {w.slot for w in mine if w.name == wname}
        expected = max(w.processes for w in mine if w.name == wname)
        missing = sorted(set(range(expected)) - slots)
        if missing:
            listed = ", ".join(map(str, missing))
            return False, (
                f"worker {wname!r} on {host!r}: slot {listed} of {expected} has no heartbeat "
                "(restarting?)"
            )
    done = sum(w.processed for w in mine)
    failed = sum(w.failed for w in mine)
    return True, (
        f"healthy: {len(mine)} slot(s) of {', '.join(sorted({w.name for w in mine}))} on "
        f"{host!r} running; processed {done}, failed {failed}"
    )


async def forget(b: Broker, wid: str) -> None:
    """Remove a heartbeat, briefly: with the server gone it expires on its own."""
    try:
        async with asyncio.timeout(1.0):
            await remove_heartbeat(b, wid)
    except (TimeoutError, BrokerError) as exc:
        log.warning("heartbeat not removed (%s); it expires on its own", exc)
