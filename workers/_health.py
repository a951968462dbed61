"""Worker heartbeats: one hash per namespace, one field per running worker slot."""

from __future__ import annotations

import dataclasses
import os
import socket
from typing import Any

import msgpack

from broker import Broker

__all__ = ["WorkerStatus", "heartbeat_key", "list_workers", "remove_heartbeat", "write_heartbeat"]


def heartbeat_key(namespace: str) -> str:
    return f"{namespace}:workers"


@dataclasses.dataclass(frozen=True)
class WorkerStatus:
    id: str
    name: str
    kind: str
    host: str
    pid: int
    slot: int
    state: str
    started: float
    seen: float
    processed: int
    failed: int
    interval: float
    #: seconds since the last heartbeat, by the server's clock (hosts' clocks may differ)
    age: float = 0.0

    @property
    def alive(self) -> bool:
        """Seen within three heartbeat intervals."""
        return self.age < 3 * self.interval


def worker_id(name: str, slot: int) -> str:
    return f"{name}/{socket.gethostname()}/{slot}"


async def write_heartbeat(b: Broker, wid: str, info: dict[str, Any]) -> None:
    seen = b.server_time_ms() / 1000  # one clock for every host: the server's
    info = {**info, "seen": seen, "host": socket.gethostname(), "pid": os.getpid()}
    await b.call(lambda: b.redis.hset(heartbeat_key(b.namespace), wid, msgpack.packb(info)))


async def remove_heartbeat(b: Broker, wid: str) -> None:
    await b.call(lambda: b.redis.hdel(heartbeat_key(b.namespace), wid))


async def list_workers(b: Broker, *, prune_after: float = 3600.0) -> list[WorkerStatus]:
    """Every worker that reported; entries silent for ``prune_after`` seconds are removed."""
    rows = await b.call(lambda: b.redis.hgetall(heartbeat_key(b.namespace)))
    out = []
    now = b.server_time_ms() / 1000
    names = [f.name for f in dataclasses.fields(WorkerStatus) if f.name not in ("id", "age")]
    for raw_id, raw in rows.items():
        wid = raw_id.decode(errors="replace")
        try:
            info = msgpack.unpackb(raw)
            status = WorkerStatus(id=wid, age=now - info["seen"], **{n: info[n] for n in names})
        except Exception:  # a foreign or old field: not ours to interpret
            continue
        if status.age > prune_after:
            await remove_heartbeat(b, wid)
            continue
        out.append(status)
    return sorted(out, key=lambda s: s.id)
