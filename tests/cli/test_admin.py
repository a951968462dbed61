"""info, channels, pending, group, dead and stop: round trips against a real server."""

from __future__ import annotations

import asyncio
import json

import pytest

import broker

from .conftest import json_lines


async def make_pending(ch: broker.Channel, group: str, consumer: str, n: int) -> list[str]:
    """Deliver ``n`` messages to ``consumer`` of ``group`` and do not ack them."""
    got: list[str] = []
    async with ch.subscribe(group=group, consumer=consumer, start="all", prefetch=n) as sub:
        async for msg in sub:
            got.append(msg.id)
            if len(got) == n:
                break
    return got


async def test_info_and_channels(client, name, invoke):
    ch = client.channel(name)
    ids = await ch.publish_many({"n": i} for i in range(5))
    await client.channel(name + "-2").publish(1)
    held = await make_pending(ch, "billing", "c1", 2)

    info = await invoke("info", name, "--json")
    assert info.exit_code == 0, info.output
    (report,) = json.loads(info.stdout)
    assert report["length"] == 5 and report["first_id"] == ids[0] and report["last_id"] == ids[-1]
    assert report["first_time"].endswith("Z") and report["dead_letters"] == 0
    (group,) = report["groups"]
    assert group["name"] == "billing" and group["pending"] == 2
    assert group["consumers"][0]["name"] == "c1" and group["consumers"][0]["pending"] == 2
    assert group["consumers"][0]["idle"] >= 0 and group["last_delivered_id"] == held[-1]

    text = await invoke("info", name)
    assert f"channel {name}: 5 entries" in text.stdout
    assert "group billing: 1 consumer, 2 pending" in text.stdout
    assert "consumer c1: 2 pending, idle" in text.stdout

    every = json.loads((await invoke("info", "--json")).stdout)
    assert [r["name"] for r in every] == [name, name + "-2"]

    listing = await invoke("channels")
    assert listing.stdout.splitlines()[0].split()[:3] == ["CHANNEL", "LENGTH", "GROUPS"]
    assert listing.stdout.splitlines()[1].split()[:3] == [name, "5", "1"]
    as_json = json.loads((await invoke("channels", "--json")).stdout)
    assert as_json[0]["name"] == name and as_json[0]["groups"] == ["billing"]

    missing = await invoke("info", name + "-nope")
    assert missing.exit_code == 1 and "does not exist" in missing.stderr


async def test_empty_namespace(invoke):
    result = await invoke("channels")
    assert result.exit_code == 0 and result.stdout == "" and "no channels" in result.stderr
    assert json.loads((await invoke("info", "--json")).stdout) == []


async def test_pending(client, name, invoke):
    ch = client.channel(name)
    await ch.publish_many({"n": i} for i in range(6))
    held = await make_pending(ch, "g", "alice", 4)
    result = await invoke("pending", name, "--group", "g", "--json")
    assert result.exit_code == 0, result.output
    entries = json.loads(result.stdout)
    assert [e["id"] for e in entries] == held
    assert {e["consumer"] for e in entries} == {"alice"} and entries[0]["deliveries"] == 1
    assert not any(e["released"] for e in entries)
    table = await invoke("pending", name, "-g", "g", "-n", "2")
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ID", "CONSUMER", "IDLE", "DELIVERIES"]
    assert lines[1].split()[0] == held[0] and len(lines) == 3
    assert "showing the oldest 2 of 4" in table.stderr
    other = await invoke("pending", name, "-g", "g", "--consumer", "bob", "--json")
    assert json.loads(other.stdout) == []
    nogroup = await invoke("pending", name, "-g", "nope")
    assert nogroup.exit_code == 1 and "has no consumer group 'nope'" in nogroup.stderr


async def test_group_create_reset_delete(client, name, invoke, raw):
    ch = client.channel(name)
    ids = await ch.publish_many({"n": i} for i in range(3))
    created = await invoke("group", "create", name, "g", "--start", "all")
    assert created.exit_code == 0 and "created group 'g'" in created.stdout
    again = await invoke("group", "create", name, "g")
    assert again.exit_code == 0 and "already exists" in again.stderr
    (g,) = await raw.xinfo_groups(ch.key)
    assert g["last-delivered-id"] == b"0-0"

    moved = await invoke("group", "reset", name, "g", "--start", ids[1])
    assert moved.exit_code == 0, moved.output
    (g,) = await raw.xinfo_groups(ch.key)
    assert g["last-delivered-id"].decode() == ids[1]
    await invoke("group", "reset", name, "g", "--start", "new")
    (g,) = await raw.xinfo_groups(ch.key)
    assert g["last-delivered-id"].decode() == ids[2]
    needs_start = await invoke("group", "reset", name, "g")
    assert needs_start.exit_code == 2 and "--start" in needs_start.stderr

    deleted = await invoke("group", "delete", name, "g")
    assert deleted.exit_code == 0 and await raw.xinfo_groups(ch.key) == []
    gone = await invoke("group", "delete", name, "g")
    assert gone.exit_code == 1 and "has no consumer group 'g'" in gone.stderr
    bad = await invoke("group", "create", name, "g2", "--start", "yesterday")
    assert bad.exit_code == 2 and "Invalid value for '--start'" in bad.stderr
    fresh = await invoke("group", "create", name + "-new", "g")
    assert fresh.exit_code == 0  # creates the channel too


async def kill_messages(ch: broker.Channel, n: int) -> list[str]:
    """Publish ``n`` messages and fail each once with max_deliveries=1: they go dead."""
    ids = await ch.publish_many({"n": i} for i in range(n))
    seen = 0
    async with ch.subscribe(group="workers", start="all", max_deliveries=1, prefetch=8) as sub:
        async for msg in sub:
            msg.nack(error=RuntimeError(f"boom {msg.data['n']}"))
            seen += 1
            if seen == n:
                break
        async with asyncio.timeout(10):
            while (await ch.info()).dead_letters < n:
                await asyncio.sleep(0.02)
    return ids


async def test_dead_list_replay_purge(client, name, invoke):
    ch = client.channel(name)
    ids = await kill_messages(ch, 3)

    listed = await invoke("dead", "list", name, "--json")
    assert listed.exit_code == 0, listed.output
    letters = json.loads(listed.stdout)
    assert [d["original_id"] for d in letters] == ids
    assert letters[0]["group"] == "workers" and "boom 0" in letters[0]["error"]
    assert letters[0]["deliveries"] >= 1 and letters[0]["data"] == {"n": 0}
    table = await invoke("dead", "list", name)
    assert "ORIGINAL ID" in table.stdout and ids[0] in table.stdout

    one = await invoke("dead", "replay", name, letters[0]["id"])
    assert one.exit_code == 0 and len(one.stdout.split()) == 1
    twice = await invoke("dead", "replay", name, letters[0]["id"])  # idempotent per entry
    assert twice.stdout == "" and "already replayed or not found" in twice.stderr
    rest = await invoke("dead", "replay", name)
    assert len(rest.stdout.split()) == 2 and "replayed 2" in rest.stderr
    assert (await ch.info()).dead_letters == 0
    replayed = json_lines((await invoke("tail", name, "-n", "3")).stdout)
    assert sorted(r["data"]["n"] for r in replayed) == [0, 1, 2]

    await kill_messages(client.channel(name + "-p"), 2)
    refused = await invoke("dead", "purge", name + "-p", input="n\n")
    assert refused.exit_code == 1 and "nothing purged" in refused.stderr
    assert (await client.channel(name + "-p").info()).dead_letters == 2
    confirmed = await invoke("dead", "purge", name + "-p", input="y\n")
    assert confirmed.exit_code == 0 and "purged 2" in confirmed.stdout
    await kill_messages(client.channel(name + "-p"), 1)
    yes = await invoke("dead", "purge", name + "-p", "--yes")
    assert yes.exit_code == 0 and "purged" in yes.stdout
    empty = await invoke("dead", "purge", name + "-p", "--yes")
    assert empty.exit_code == 0 and "no dead letters" in empty.stderr
    missing = await invoke("dead", "list", name + "-nope")
    assert missing.exit_code == 1 and "does not exist" in missing.stderr


async def test_stop_fires_and_resets(client, name, invoke):
    fired = await invoke("stop", name, "--reason", "deploy 42", "--ttl", "60")
    assert fired.exit_code == 0, fired.output
    assert f"fired stop token {name!r}" in fired.stdout
    async with client.stop_token(name) as token:  # a token that starts later sees the record
        assert token.stopped and token.reason == "deploy 42"
    reset = await invoke("stop", "--reset", name)
    assert reset.exit_code == 0 and "reset stop token" in reset.stdout
    async with client.stop_token(name) as token:
        assert not token.stopped
    not_set = await invoke("stop", "--reset", name)
    assert "was not set" in not_set.stdout
    usage = await invoke("stop", "--reset", name, "--ttl", "5")
    assert usage.exit_code == 2
    bad_ttl = await invoke("stop", name, "--ttl", "0")
    assert bad_ttl.exit_code == 2


@pytest.mark.parametrize("bad", ["bad name", "{x}", "a\n"])
async def test_stop_with_a_bad_name_says_stop_token_name(invoke, bad):
    """Not "invalid channel name": the argument is a stop token's name."""
    result = await invoke("stop", bad, url="redis://127.0.0.1:1/0")  # no server needed
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith("error: invalid stop token name "), line
