from __future__ import annotations

import pytest

import broker
from broker import ConfigurationError, Settings
from broker._settings import redact_url


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost:6379/0",
        "rediss://user:pw@example.com:6380/2",
        "unix:///var/run/redis.sock",
        "redis://:only-password@h:1/0",
    ],
)
def test_valid_urls(url: str) -> None:
    assert Settings.from_url(url).url == url


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://localhost", "unsupported URL scheme 'http'"),
        ("redis://localhost:notaport/0", "invalid URL"),
        ("redis:///0", "has no host"),
        ("redis://h:1/abc", "must be a number"),
        ("unix://", "socket path"),
    ],
)
def test_invalid_urls_say_what_a_valid_one_is(url: str, words: str) -> None:
    with pytest.raises(ConfigurationError, match=words):
        Settings.from_url(url)


def test_password_never_in_repr_or_errors() -> None:
    s = Settings.from_url("redis://app:hunter2@h:1/0")
    assert "hunter2" not in repr(s) and "hunter2" not in s.safe_url
    assert redact_url("rediss://u:pw@host:6380/1") == "rediss://u:***@host:6380/1"
    with pytest.raises(ConfigurationError) as info:
        Settings.from_url("ftp://app:hunter2@h/0")
    assert "hunter2" not in str(info.value)
    assert "hunter2" not in repr(broker.connect("redis://app:hunter2@h:1/0"))


def test_env_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_URL", "redis://envhost:7000/3")
    monkeypatch.setenv("BROKER_NAMESPACE", "prod")
    s = Settings.from_url()
    assert (s.url, s.namespace) == ("redis://envhost:7000/3", "prod")
    monkeypatch.delenv("BROKER_URL")
    assert Settings.from_url().url == "redis://localhost:6379/0"


def test_bad_namespace_and_options() -> None:
    with pytest.raises(ConfigurationError, match="namespace"):
        Settings.from_url("redis://h:1/0", namespace="has space")
    with pytest.raises(ConfigurationError, match="max_payload"):
        Settings(max_payload=0)
