"""A private Sentinel set on loopback for demos and tests: one master, ``replicas`` replicas and
``sentinels`` sentinels, started from the same binary as :class:`EmbeddedServer` (PATH or the
embedded one; a sentinel is the same binary with ``--sentinel`` and a config file of its own),
assembled with ``REPLICAOF`` (no ``redis-cli`` needed).

``with EmbeddedSentinel() as s: s.url`` gives ``redis+sentinel://127.0.0.1:p1,.../<service>``.
Short ``down-after-milliseconds`` and ``failover-timeout`` make a dead master replaced within a
few seconds.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

from ._server import EmbeddedServer
from ._server_cluster import _call, _check_time, _info

__all__ = ["EmbeddedSentinel"]


class _SentinelProcess(EmbeddedServer):
    """One sentinel: the server binary in sentinel mode, with a config file it may rewrite
    (a sentinel records what it learns there)."""

    def __init__(self, directory: str, lines: list[str]) -> None:
        super().__init__(directory=directory)
        self.lines = lines

    def _argv(self) -> list[str]:
        conf = Path(self.directory, "sentinel.conf")
        # written at each start: the port may have been chosen again (taken meanwhile)
        conf.write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    f"bind {self.bind}",
                    "daemonize no",
                    f"dir {self.directory}",
                    f"logfile {Path(self.directory, 'redis.log')}",
                    *self.lines,
                ]
            )
            + "\n"
        )
        return [self.binary, str(conf), "--sentinel"]


class EmbeddedSentinel:
    """A Sentinel set of private servers, stopped by PID on exit (even when a test fails).

    :param service: the name the sentinels monitor the master under.
    :param replicas: replicas of the master.
    :param sentinels: sentinel processes; ``quorum`` of them must agree that the master is down.
    :param down_after: ``down-after-milliseconds``: silence after which a node counts as down.
        Sentinels ping every second: at 1000 one late reply (a loaded machine) counts a
        healthy master as down, and a master promoted a moment before was failed over again.
    :param failover_timeout: ``failover-timeout`` in ms (a failed failover is retried after
        twice this).
    :param extra: more arguments for the data nodes (``--user ...``, say).
    :param sentinel_password: the sentinels' ``requirepass`` (they use it with each other
        too); :attr:`url` then carries it as ``?sentinel_password=``.
    """

    def __init__(
        self,
        *,
        service: str = "broker-test",
        replicas: int = 1,
        sentinels: int = 3,
        quorum: int = 2,
        down_after: int = 2000,
        failover_timeout: int = 3000,
        extra: list[str] | None = None,
        sentinel_password: str | None = None,
    ) -> None:
        if replicas < 0 or sentinels < 1 or not 1 <= quorum <= sentinels:
            raise ValueError("replicas must be >= 0, sentinels >= 1, 1 <= quorum <= sentinels")
        self.service = service
        self.quorum = quorum
        self.down_after = down_after
        self.failover_timeout = failover_timeout
        self.sentinel_password = sentinel_password
        self._tmp = tempfile.TemporaryDirectory(prefix="broker-sentinel-")
        #: the data nodes; the first is the master when the set starts (failovers change which)
        self.nodes: list[EmbeddedServer] = []
        for i in range(1 + replicas):
            folder = Path(self._tmp.name, f"node{i}")
            folder.mkdir()
            self.nodes.append(
                EmbeddedServer(
                    directory=str(folder),
                    extra=[
                        # a new replica syncs at once, not after the default 5 s
                        "--repl-diskless-sync-delay",
                        "0",
                        "--repl-ping-replica-period",
                        "1",
                        *(extra or []),
                    ],
                )
            )
        self.sentinels: list[_SentinelProcess] = []
        for i in range(sentinels):
            folder = Path(self._tmp.name, f"sentinel{i}")
            folder.mkdir()
            sentinel = _SentinelProcess(str(folder), [])
            sentinel.password = sentinel_password  # its readiness PING authenticates
            self.sentinels.append(sentinel)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        if self.sentinel_password is None:
            return f"redis+sentinel://{hosts}/{self.service}"
        secret = urlencode({"sentinel_password": self.sentinel_password})
        return f"redis+sentinel://{hosts}/{self.service}?{secret}"

    def start(self, timeout: float = 30.0) -> EmbeddedSentinel:
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            node.start()
        master = self.nodes[0]
        for node in self.nodes[1:]:
            _call(node.port, "REPLICAOF", "127.0.0.1", master.port)
        self.wait_replicated(deadline - time.monotonic())
        for sentinel in self.sentinels:
            sentinel.lines = [
                f"sentinel monitor {self.service} 127.0.0.1 {master.port} {self.quorum}",
                f"sentinel down-after-milliseconds {self.service} {self.down_after}",
                f"sentinel failover-timeout {self.service} {self.failover_timeout}",
                f"sentinel parallel-syncs {self.service} 1",
            ]
            if self.sentinel_password is not None:
                # clients and the other sentinels must AUTH; a sentinel uses it with the others
                pw = self.sentinel_password
                sentinel.lines += [f"requirepass {pw}", f"sentinel sentinel-pass {pw}"]
            sentinel.start()
        self.wait_ready(deadline - time.monotonic())
        return self

    # -- state --------------------------------------------------------------------------------

    def running(self) -> list[EmbeddedServer]:
        return [n for n in self.nodes if n.process is not None]

    def master(self) -> EmbeddedServer:
        """The data node the sentinels name as master now (a running one)."""
        ports = set()
        for sentinel in self.sentinels:
            if sentinel.process is None:
                continue
            with contextlib.suppress(OSError, RuntimeError):
                reply = self._ask(sentinel, "GET-MASTER-ADDR-BY-NAME", self.service)
                if reply:
                    ports.add(int(reply[1]))
        for node in self.running():
            if node.port in ports and _role(node.port) == "master":
                return node
        raise LookupError(f"no running master for {self.service!r} (sentinels name {ports})")

    def replicas_of(self, master: EmbeddedServer) -> list[EmbeddedServer]:
        """Running nodes that replicate ``master`` with their link up."""
        out = []
        for node in self.running():
            if node is master:
                continue
            info = _safe_info(node.port)
            if (
                info.get("role") == "slave"
                and info.get("master_port") == str(master.port)
                and info.get("master_link_status") == "up"
            ):
                out.append(node)
        return out

    def wait_replicated(self, timeout: float = 30.0) -> None:
        """Wait until every running node but the master replicates it with its link up."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(LookupError, OSError, RuntimeError):
                master = self._master_by_role()
                if len(self.replicas_of(master)) == len(self.running()) - 1:
                    return
            _check_time(deadline, "the replicas to sync")
            time.sleep(0.05)

    def _master_by_role(self) -> EmbeddedServer:
        masters = [n for n in self.running() if _role(n.port) == "master"]
        if len(masters) != 1:
            raise LookupError(f"{len(masters)} running masters")
        return masters[0]

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the replicas sync and every running sentinel agrees on the master and
        knows its replicas and the other sentinels (a failover needs them)."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(LookupError, OSError, RuntimeError):
                master = self._master_by_role()
                replicas = self.replicas_of(master)
                live = [s for s in self.sentinels if s.process is not None]
                if len(replicas) == len(self.running()) - 1 and all(
                    self._sentinel_sees(s, master, len(replicas), len(live) - 1) for s in live
                ):
                    return
            _check_time(deadline, "the Sentinel set to be ready")
            time.sleep(0.05)

    def _sentinel_sees(
        self, sentinel: EmbeddedServer, master: EmbeddedServer, replicas: int, others: int
    ) -> bool:
        reply = self._ask(sentinel, "MASTER", self.service)
        state = {reply[i].decode(): reply[i + 1].decode() for i in range(0, len(reply), 2)}
        flags = state.get("flags", "")
        return (
            int(state.get("port", 0)) == master.port
            and "down" not in flags
            and "failover" not in flags
            and int(state.get("num-slaves", 0)) >= replicas
            and int(state.get("num-other-sentinels", 0)) >= others
        )

    def wait_master(self, not_port: int, timeout: float = 30.0) -> EmbeddedServer:
        """Wait until a node other than the one on ``not_port`` is master, as the sentinels
        say and as the node itself says; return it."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(LookupError, OSError, RuntimeError):
                master = self.master()
                if master.port != not_port:
                    return master
            _check_time(deadline, "a new master")
            time.sleep(0.05)

    def wait_agreed(self, port: int, timeout: float = 30.0) -> None:
        """Wait until every running sentinel names the node on ``port`` as the master.

        Start a killed master again only after this: a master without persistence comes back
        empty, and a sentinel that has not yet heard of the failover may still take it for the
        master and turn the promoted node into its replica, which then wipes its data in the
        resync (the Redis Sentinel documentation warns against restarting such masters
        automatically for this reason).
        """
        deadline = time.monotonic() + timeout
        while True:
            named = set()
            for sentinel in self.sentinels:
                if sentinel.process is None:
                    continue
                with contextlib.suppress(OSError, RuntimeError):
                    reply = self._ask(sentinel, "GET-MASTER-ADDR-BY-NAME", self.service)
                    named.add(int(reply[1]) if reply else None)
                    continue
                named.add(None)
            if named == {port}:
                return
            _check_time(deadline, f"every sentinel to name port {port} (they name {named})")
            time.sleep(0.05)

    def rejoin(self, node: EmbeddedServer, timeout: float = 30.0) -> None:
        """Start a stopped data node again as a replica of the master, and wait until it has
        synced. Call it once :meth:`wait_agreed` names the master.

        A node without persistence comes back empty and as a master. The sentinels make it a
        replica only when they next look at it (up to 10 s); until then a failover could
        promote the empty node (seen under load: the new master missed the sentinels' pings
        for ``down_after`` a second after its promotion, and every write was lost). Here it is
        made a replica at once (``REPLICAOF``), and has synced when this returns.
        """
        master = self.master()
        node.start()
        _call(node.port, "REPLICAOF", "127.0.0.1", master.port)
        deadline = time.monotonic() + timeout
        while True:
            info = _safe_info(node.port)
            if (
                info.get("master_link_status") == "up"
                and info.get("master_sync_in_progress") == "0"
            ):
                return
            _check_time(deadline, f"port {node.port} to sync from port {master.port}")
            time.sleep(0.05)

    def _ask(self, sentinel: EmbeddedServer, *args: bytes | str | int) -> Any:
        return _call(sentinel.port, "SENTINEL", *args, password=self.sentinel_password)

    # -- faults -------------------------------------------------------------------------------

    def failover(self) -> None:
        """``SENTINEL FAILOVER``: promote a replica without waiting for agreement (the old
        master becomes a replica of the new one)."""
        for sentinel in self.sentinels:
            if sentinel.process is not None:
                self._ask(sentinel, "FAILOVER", self.service)
                return
        raise RuntimeError("no sentinel is running")

    def node_at(self, port: int) -> EmbeddedServer:
        return next(n for n in self.nodes if n.port == port)

    # -- lifetime -----------------------------------------------------------------------------

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for node in self.nodes:
            node.stop()

    def close(self) -> None:
        for sentinel in self.sentinels:
            sentinel.close()
        for node in self.nodes:
            node.close()
        with contextlib.suppress(OSError):
            self._tmp.cleanup()

    def __enter__(self) -> EmbeddedSentinel:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _role(port: int) -> str:
    return _safe_info(port).get("role", "")


def _safe_info(port: int) -> dict[str, str]:
    try:
        return _info(port, "replication")
    except (OSError, RuntimeError):
        return {}
