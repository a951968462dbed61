"""Every error a user can cause: one line on stderr naming the fix, a status, no traceback."""

from __future__ import annotations

import pytest

from broker import EmbeddedServer

from .conftest import assert_clean


def one_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert_clean(err)
    return err


async def test_unreachable_server(name, invoke, sh):
    url = "redis://127.0.0.1:1/0"
    results = [await invoke("tail", name, url=url), await invoke("publish", name, "1", url=url)]
    for result in results:
        assert result.exit_code == 1
        err = one_line(result.stderr)
        assert "cannot connect to redis://127.0.0.1:1/0" in err and "--url or BROKER_URL" in err
    done = await sh("info", url=url)
    assert done.code == 1 and "cannot connect" in one_line(done.err)


@pytest.mark.parametrize(
    "url", ["http://localhost:6379/0", "redis://", "redis://host:99999/0", "redis://localhost/abc"]
)
async def test_bad_url(name, invoke, url):
    result = await invoke("tail", name, url=url)
    assert result.exit_code == 2
    err = one_line(result.stderr)
    assert "URL" in err and "(set --url or BROKER_URL)" in err


async def test_wrong_password_never_shows_the_password(name, invoke, sh):
    with EmbeddedServer(password="s3cret-pw") as server:
        wrong = f"redis://:wrong-pw@127.0.0.1:{server.port}/0"
        result = await invoke("tail", name, url=wrong)
        assert result.exit_code == 1
        err = one_line(result.stderr)
        assert "authentication failed" in err and "wrong-pw" not in err and ":***@" in err
        none = await sh("channels", url=f"redis://127.0.0.1:{server.port}/0")
        assert none.code == 1 and "authentication failed" in one_line(none.err)
        ok = await invoke("channels", url=server.url)
        assert ok.exit_code == 0 and "s3cret-pw" not in ok.output


async def test_wrong_type_of_key(client, name, invoke, raw):
    key = client.channel(name).key
    await raw.set(key, "x")
    for args, stdin in (
        (("tail", name), None),
        (("tail", name, "-f"), None),
        (("info", name), None),
        (("publish", name, "1"), None),
        (("publish", name), '{"a": 1}\n'),  # pipelined from stdin
        (("pending", name, "-g", "g"), None),
        (("dead", "list", name), None),
    ):
        result = await invoke(*args, input=stdin)
        assert result.exit_code == 1, (args, result.output)
        err = one_line(result.stderr)
        # the key, so the user can look at it (`redis-cli TYPE ...`) or delete it
        assert f"the key {key!r} of channel {name!r} is not a Redis stream" in err, (args, err)


@pytest.mark.parametrize("value", ["abc", "12-x", "-5x", "2024-13-45", "99999999999999999999999"])
async def test_bad_position(client, name, invoke, value):
    await client.channel(name).publish(1)
    for option in ("--from", "--until"):
        result = await invoke("tail", name, option, value)
        assert result.exit_code == 2
        err = one_line(result.stderr)
        assert f"Invalid value for '{option}'" in err and "-5m" in err


async def test_bad_channel_and_namespace_names(invoke):
    result = await invoke("tail", "has space")
    assert result.exit_code == 2 and "invalid channel name" in one_line(result.stderr)
    ns = await invoke("--namespace", "bad ns", "channels")
    assert ns.exit_code == 2 and "namespace must be" in one_line(ns.stderr)
    assert "(set --namespace or BROKER_NAMESPACE)" in ns.stderr


async def test_usage_errors_are_one_line(name, invoke):
    for args in (
        ("tail",),
        ("tail", name, "-n", "3", "--from-beginning"),
        ("nope",),
        ("tail", name, "--json", "--raw"),
        ("pending", name),
        ("--bogus",),
    ):
        result = await invoke(*args)
        assert result.exit_code == 2, args
        assert "--help" in one_line(result.stderr)


async def test_verbose_shows_the_traceback(name, invoke):
    quiet = await invoke("tail", name, url="redis://127.0.0.1:1/0")
    assert "Traceback" not in quiet.stderr
    loud = await invoke("-v", "tail", name, url="redis://127.0.0.1:1/0")
    assert loud.exit_code == 1
    assert "Traceback" in loud.stderr and loud.stderr.splitlines()[-1].startswith("error: ")


async def test_version_and_help(invoke):
    version = await invoke("--version")
    assert version.exit_code == 0 and version.stdout.startswith("broker, version ")
    help_ = await invoke("tail", "--help")
    assert help_.exit_code == 0 and "read-only" in help_.stdout
