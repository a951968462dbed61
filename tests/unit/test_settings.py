from __future__ import annotations

import re

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


def test_the_sentinels_own_password_is_a_query_option_kept_from_the_data_nodes() -> None:
    from broker._settings import parse_endpoint

    url = (
        "redis+sentinel://app:app-pw@h1:26379,h2:26380/orders/2"
        "?sentinel_username=watcher&sentinel_password=s3cret&health_check_interval=5"
    )
    e = parse_endpoint(url)
    assert (e.kind, e.service, e.db) == ("sentinel", "orders", 2)
    assert e.hosts == [("h1", 26379), ("h2", 26380)]
    assert (e.sentinel_username, e.sentinel_password) == ("watcher", "s3cret")
    # the data nodes get the URL's user, password and other options, not the sentinels'
    assert e.node_url == "redis://app:app-pw@h1:26379/0?health_check_interval=5"
    assert "s3cret" not in repr(e)
    safe = Settings(url=url).safe_url
    assert "s3cret" not in safe and "app-pw" not in safe
    assert "sentinel_password=***" in safe and "health_check_interval=5" in safe
    assert redact_url("redis+sentinel://h:1/s?sentinel_password=x&a=1") == (
        "redis+sentinel://h:1/s?sentinel_password=***&a=1"
    )
    # without them, the sentinels are asked without a password
    plain = parse_endpoint("redis+sentinel://h1:26379/orders")
    assert (plain.sentinel_username, plain.sentinel_password) == (None, None)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("redis://h:6379/0?sentinel_password=s3cret", "redis+sentinel:// URL only"),
        ("redis+cluster://h:7000?sentinel_password=s3cret", "redis+sentinel:// URL only"),
        ("redis+sentinel://h:26379/s?sentinel_username=u", "without sentinel_password"),
    ],
)
def test_sentinel_options_elsewhere_are_a_clear_error(url: str, words: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(words)) as caught:
        Settings(url=url).endpoint  # noqa: B018 - parsing raises
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize("suffix", ["watch", "stop"])
def test_a_namespace_whose_channel_keys_would_be_another_namespaces_own_is_refused(
    suffix: str,
) -> None:
    # `app:watch` + channel `x` is `app:watch:{x}`: the key of namespace `app`'s watched value x
    with pytest.raises(ConfigurationError, match=f"ends in ':{suffix}'.*namespace 'app'"):
        Settings.from_url("redis://h:1/0", namespace=f"app:{suffix}")
    for fine in (suffix, f"app:{suffix}s", f"app:{suffix}:x", f"{suffix}:app"):
        assert Settings.from_url("redis://h:1/0", namespace=fine).namespace == fine
