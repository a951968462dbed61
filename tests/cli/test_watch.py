"""``broker watch``: set, get, delete, follow, compare-and-set conflicts, usage errors."""

from __future__ import annotations

import asyncio

from broker import Version

from .conftest import argv, assert_clean, finish, interrupt, json_lines, spawn


async def test_set_get_delete(client, name, invoke):
    first = await invoke("watch", name, "--set", '{"rate": 10}')
    assert first.exit_code == 0, first.output
    assert first.stdout == "1\n"
    assert (await invoke("watch", name, "--set", "[1, 2]")).stdout == "2\n"
    got = await invoke("watch", name, "--get")
    assert got.exit_code == 0, got.output
    assert json_lines(got.stdout) == [{"name": name, "version": 2, "value": [1, 2]}]
    pretty = await invoke("watch", name, "--get", "--pretty")
    assert pretty.stdout == "v2 [1, 2]\n"
    assert await client.watch(name).get() == Version([1, 2], 2)
    text = await invoke("watch", name, "--set", "plain words", "--text", "--ttl", "30")
    assert text.stdout == "3\n"
    assert (await client.watch(name).get()) == Version("plain words", 3)
    gone = await invoke("watch", name, "--delete", "--if-version", "3")
    assert gone.exit_code == 0, gone.output
    missing = await invoke("watch", name, "--get")
    assert missing.exit_code == 1
    assert f"error: watch {name!r} has no value" in missing.stderr


async def test_version_conflict_is_one_line_and_status_1(client, name, invoke):
    await client.watch(name).set("a")
    await client.watch(name).set("b")
    result = await invoke("watch", name, "--set", '"c"', "--if-version", "1")
    assert result.exit_code == 1
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and "expected version 1, found version 2" in line
    ok = await invoke("watch", name, "--set", '"c"', "--if-version", "2")
    assert ok.exit_code == 0 and ok.stdout == "3\n"
    taken = await invoke("watch", name, "--set", '"d"', "--if-version", "0")
    assert taken.exit_code == 1 and "found version 3" in taken.stderr


async def test_usage_errors(name, invoke):
    cases = [
        (["--set", "not json"], "not valid JSON"),
        (["--set", "1", "--ttl", "0"], "--ttl"),
        (["--set", "1", "--if-version", "-1"], "--if-version"),
        (["--get", "--delete"], "only one of"),
        (["--if-version", "1"], "goes with --set or --delete"),
        (["--ttl", "5"], "goes with --set"),
    ]
    for args, words in cases:
        result = await invoke("watch", name, *args)
        assert result.exit_code == 2, (args, result.output)
        assert words in result.stderr, (args, result.stderr)
    bad = await invoke("watch", "bad name", "--get")
    assert bad.exit_code == 2 and "invalid watch name" in bad.stderr


async def test_follow_prints_current_then_newer(client, name, redis_url, namespace):
    w = client.watch(name)
    await w.set({"n": 0})
    proc = await spawn(*argv(redis_url, namespace, "watch", name, "-c", "3"))
    try:
        async with asyncio.timeout(20):
            # the first line comes from the current value; then each set
            first = await proc.stdout.readline()
            assert json_lines(first.decode()) == [{"name": name, "version": 1, "value": {"n": 0}}]
            await w.set({"n": 1})
            second = await proc.stdout.readline()
            assert json_lines(second.decode())[0]["version"] == 2
            await w.set(b"\x00")
        done = await finish(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert done.code == 0, done.err
    assert json_lines(done.out) == [{"name": name, "version": 3, "value": {"$base64": "AA=="}}]
    assert_clean(done.err)


async def test_follow_ends_with_ctrl_c(client, name, redis_url, namespace):
    proc = await spawn(*argv(redis_url, namespace, "watch", name))
    try:
        await asyncio.sleep(1.0)  # started and waiting: nothing set yet
        await client.watch(name).set(7)
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert json_lines(line.decode()) == [{"name": name, "version": 1, "value": 7}]
        done = await interrupt(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert done.code == 0, done.err
    assert_clean(done.err)
