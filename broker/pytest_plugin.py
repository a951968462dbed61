"""The pytest plugin shipped with broker (entry point ``pytest11``: ``broker``).

Fixtures, each used only when a test asks for it (nothing is started otherwise, and nothing is
autouse):

- ``broker_url`` (session): a real server. ``$BROKER_TEST_URL`` when set; else a private local
  ``redis-server`` (``$BROKER_REDIS_SERVER``, else the one on PATH, else the embedded one of the
  ``server`` extra), started for the session and stopped after it; else a ``redis:7.0``
  container through testcontainers, when no local server exists or ``BROKER_TEST_DOCKER=1``.
- ``broker_namespace``: a fresh key prefix per test.
- ``broker_client``: a connected :class:`broker.Broker` in that namespace; every key of the
  namespace is deleted after the test.

With them, :func:`broker.testing.run_handler` runs a handler against published messages and
waits until they are acked. Turn the plugin off with ``-p no:broker``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import broker

__all__ = ["broker_client", "broker_namespace", "broker_url"]

#: what the session's server is, for the terminal summary (empty unless ``broker_url`` ran)
_SERVER_NOTE: list[str] = []


def _docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _redis_container(image: str = "redis:7.0") -> Any:
    try:
        from testcontainers.community.redis import RedisContainer
    except ImportError:  # testcontainers < 4.15 has it at the old place only
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                from testcontainers.redis import RedisContainer
        except ImportError:
            pytest.fail(
                "no local redis-server and testcontainers is not installed: "
                "pip install 'broker[test]' (or set BROKER_TEST_URL)",
                pytrace=False,
            )
    return RedisContainer(image)


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    """A real Redis for the session (``$BROKER_TEST_URL``, a private local server, or Docker)."""
    from broker import EmbeddedServer, ServerNotFoundError

    explicit = os.environ.get("BROKER_TEST_URL")
    if explicit:
        _SERVER_NOTE.append("BROKER_TEST_URL")
        yield explicit
        return
    want_docker = os.environ.get("BROKER_TEST_DOCKER", "") not in ("", "0")
    if not want_docker:
        try:
            server = EmbeddedServer()
        except ServerNotFoundError as exc:
            if not _docker_answers():
                pytest.fail(f"no Redis server for the tests: {exc}", pytrace=False)
            _SERVER_NOTE.append(f"no local server ({exc}); using a container")
        else:
            _SERVER_NOTE.append(f"local {server.binary}")
            with server:
                yield server.url
            return
    if not _docker_answers():
        pytest.fail("BROKER_TEST_DOCKER=1 but no Docker engine answers", pytrace=False)
    with _redis_container() as container:
        _SERVER_NOTE.append("a redis:7.0 container")
        host = container.get_container_host_ip()
        port = container.get_exposed_port(6379)
        yield f"redis://{host}:{port}/0"


@pytest.fixture
def broker_namespace() -> str:
    """A fresh namespace (key prefix) for one test."""
    return f"t{uuid.uuid4().hex[:10]}"


async def _broker_client(broker_url: str, broker_namespace: str) -> AsyncIterator[broker.Broker]:
    """A connected :class:`broker.Broker` in a fresh namespace; its keys are deleted after."""
    from broker.testing import isolated

    async with isolated(broker_url, broker_namespace) as b:
        yield b


def _needs_pytest_asyncio() -> None:
    """A connected Broker in a fresh namespace (needs pytest-asyncio)."""
    pytest.fail(
        "the broker_client fixture needs pytest-asyncio: pip install pytest-asyncio "
        "(or 'broker[test]')",
        pytrace=False,
    )


broker_client: Any
try:
    import pytest_asyncio
except ImportError:  # an async fixture needs pytest-asyncio; say so when it is used
    broker_client = pytest.fixture(_needs_pytest_asyncio, name="broker_client")
else:
    broker_client = pytest_asyncio.fixture(_broker_client, name="broker_client")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _SERVER_NOTE:
        terminalreporter.write_line(f"broker tests ran on: {'; '.join(_SERVER_NOTE)}")
