"""Which server the demo and the tests start: one rule, in ``find_server_binary`` (the shell
scripts no longer guess with ``command -v``, which also finds non-executable files)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from broker import EmbeddedServer, ServerNotFoundError, _server


def _fake(folder: Path, name: str, version: str, executable: bool = True) -> Path:
    path = folder / name
    path.write_text(f"#!/bin/sh\necho 'Redis server v={version} sha=0 malloc=libc bits=64'\n")
    mode = stat.S_IRUSR | stat.S_IWUSR | (stat.S_IXUSR if executable else 0)
    path.chmod(mode)
    return path


def test_a_non_executable_redis_server_on_path_is_passed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake(tmp_path, "redis-server", "7.0.0", executable=False)
    monkeypatch.delenv("BROKER_REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    found = _server.find_server_binary()
    assert Path(found) != tmp_path / "redis-server"
    assert os.access(found, os.X_OK)


def test_valkey_server_on_path_then_the_embedded_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BROKER_REDIS_SERVER", raising=False)
    valkey = _fake(tmp_path, "valkey-server", "9.0.0")
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server here
    assert _server.find_server_binary() == str(valkey)
    valkey.unlink()
    embedded = _server._embedded_binary()
    if embedded is None:
        with pytest.raises(ServerNotFoundError, match="broker\\[server\\]"):
            _server.find_server_binary()
    else:
        assert _server.find_server_binary() == embedded
        assert _server.server_version(embedded) >= (7, 2, 0)
    monkeypatch.setattr(_server, "_embedded_binary", lambda: None)
    with pytest.raises(ServerNotFoundError, match="apt-get install redis-server"):
        _server.find_server_binary()


def test_an_old_server_is_refused_with_a_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = _fake(tmp_path, "redis-server", "6.2.14")
    monkeypatch.setenv("BROKER_REDIS_SERVER", str(old))
    with pytest.raises(ServerNotFoundError, match=r"Redis 6\.2\.14; broker needs Redis >= 7\.0"):
        EmbeddedServer()


def test_broker_redis_server_must_be_an_executable_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKER_REDIS_SERVER", str(tmp_path))  # a folder
    with pytest.raises(ServerNotFoundError, match="not an executable file"):
        _server.find_server_binary()
    assert shutil.which("sh")
