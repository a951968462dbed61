"""A private Redis Cluster on loopback for demos and tests: ``masters`` primaries with
``replicas`` replicas each, started from the same binary as :class:`EmbeddedServer` (PATH or the
embedded one) and assembled with ``CLUSTER`` commands (no ``redis-cli`` needed).

``with EmbeddedCluster() as cluster: cluster.url`` gives ``redis+cluster://127.0.0.1:p1,...``.
"""

from __future__ import annotations

import contextlib
import socket
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from ._server import EmbeddedServer, _free_port
from ._wire import pack

__all__ = ["EmbeddedCluster"]

SLOTS = 16384


class EmbeddedCluster:
    """A Redis Cluster of private servers, stopped by PID on exit (even when a test fails).

    :param masters: primaries; the 16384 slots are split evenly between them.
    :param replicas: replicas per primary.
    :param node_timeout: ``cluster-node-timeout`` in ms (failover starts after about this long).
    """

    def __init__(
        self,
        *,
        masters: int = 3,
        replicas: int = 1,
        node_timeout: int = 2000,
        appendonly: bool = False,
        extra: list[str] | None = None,
    ) -> None:
        if masters < 1 or replicas < 0:
            raise ValueError("masters must be >= 1 and replicas >= 0")
        self.masters = masters
        self.replicas = replicas
        self.node_timeout = node_timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="broker-cluster-")
        self.nodes: list[EmbeddedServer] = []
        for i in range(masters * (1 + replicas)):
            folder = Path(self._tmp.name, f"node{i}")
            folder.mkdir()
            self.nodes.append(
                EmbeddedServer(
                    appendonly=appendonly,
                    directory=str(folder),
                    extra=[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        str(node_timeout),
                        # the bus port is not port + 10000: ephemeral ports are often > 55535
                        "--cluster-port",
                        str(_free_port()),
                        # a replica promoted after its primary died must take over at once
                        "--cluster-replica-validity-factor",
                        "0",
                        # the cluster keeps serving the slots that are covered
                        "--cluster-require-full-coverage",
                        "no",
                        *(extra or []),
                    ],
                )
            )

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[: self.masters])
        return f"redis+cluster://{hosts}"

    def start(self, timeout: float = 30.0) -> EmbeddedCluster:
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            node.start()
        ids = [_call(n.port, "CLUSTER", "MYID").decode() for n in self.nodes]
        per = SLOTS // self.masters
        for i in range(self.masters):
            last = SLOTS - 1 if i == self.masters - 1 else (i + 1) * per - 1
            _call(self.nodes[i].port, "CLUSTER", "ADDSLOTSRANGE", i * per, last)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            _call(node.port, "CLUSTER", "MEET", "127.0.0.1", first.port, bus_port(first))
        # every node must know every other before a replica can follow its primary
        while not all(_known(n.port) >= len(self.nodes) for n in self.nodes):
            _check_time(deadline, "the nodes to meet")
            time.sleep(0.05)
        for r in range(self.replicas):
            for m in range(self.masters):
                replica = self.nodes[self.masters * (1 + r) + m]
                _call(replica.port, "CLUSTER", "REPLICATE", ids[m])
        self.wait_ok(deadline - time.monotonic())
        return self

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every running node says the cluster is ok and sees every replica."""
        deadline = time.monotonic() + timeout
        while True:
            running = [n for n in self.nodes if n.process is not None]
            if all(_state_ok(n.port) for n in running) and self._replicas_synced(running):
                return
            _check_time(deadline, "the cluster to be ok")
            time.sleep(0.05)

    def _replicas_synced(self, running: list[EmbeddedServer]) -> bool:
        for n in running:
            info = _info(n.port, "replication")
            if info.get("role") == "slave" and info.get("master_link_status") != "up":
                return False
        return True

    def primaries(self) -> list[EmbeddedServer]:
        """The running nodes that are primaries now (failovers change which)."""
        return [
            n
            for n in self.nodes
            if n.process is not None and _info(n.port, "replication").get("role") == "master"
        ]

    def node_of_slot(self, slot: int) -> EmbeddedServer:
        """The running primary that owns ``slot`` now."""
        for n in self.primaries():
            for row in _call(n.port, "CLUSTER", "SLOTS"):
                if int(row[0]) <= slot <= int(row[1]) and int(row[2][1]) == n.port:
                    return n
        raise LookupError(f"no running primary owns slot {slot}")

    def migrate_slot(self, slot: int, target: EmbeddedServer, batch: int = 10) -> int:
        """Move ``slot`` to ``target`` (a primary) as ``redis-cli --cluster reshard`` does:
        mark it importing and migrating, ``MIGRATE`` its keys in batches, then give it to the
        target on every primary. Returns the number of keys moved."""
        source = self.node_of_slot(slot)
        if source is target:
            return 0
        src_id = _call(source.port, "CLUSTER", "MYID").decode()
        dst_id = _call(target.port, "CLUSTER", "MYID").decode()
        _call(target.port, "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        _call(source.port, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        moved = 0
        while keys := _call(source.port, "CLUSTER", "GETKEYSINSLOT", slot, batch):
            _call(source.port, "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
        for node in [target, source, *(n for n in self.primaries() if n not in (target, source))]:
            _call(node.port, "CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        return moved

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        with contextlib.suppress(OSError):
            self._tmp.cleanup()

    def __enter__(self) -> EmbeddedCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def bus_port(node: EmbeddedServer) -> int:
    """A node's cluster bus port (chosen again when its first choice was taken)."""
    return int(node.extra[node.extra.index("--cluster-port") + 1])


def _check_time(deadline: float, what: str) -> None:
    if time.monotonic() > deadline:
        raise RuntimeError(f"timed out waiting for {what}")


def _known(port: int) -> int:
    return sum(1 for line in _call(port, "CLUSTER", "NODES").decode().splitlines() if line)


def _state_ok(port: int) -> bool:
    try:
        return b"cluster_state:ok" in _call(port, "CLUSTER", "INFO")
    except OSError:
        return False


def _info(port: int, section: str) -> dict[str, str]:
    text = _call(port, "INFO", section).decode()
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def _call(port: int, *args: bytes | str | int, password: str | None = None) -> Any:
    """One command over a plain socket (RESP2), for setting the cluster up and inspecting it
    (``password``: ``AUTH`` first, for a server or sentinel started with ``requirepass``)."""
    payload = pack(*args)
    if password is not None:
        payload = pack("AUTH", password) + payload
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        reader = s.makefile("rb")
        if password is not None:
            _read(reader)  # +OK (a wrong password raises)
        return _read(reader)


def _read(f: Any) -> Any:
    line = f.readline()
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)
        return data[:-2]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read(f) for _ in range(n)]
    raise RuntimeError(f"unexpected reply {line!r}")
