"""``broker publish``: DATA, stdin JSON lines, text, raw bytes, headers, errors."""

from __future__ import annotations

import json

from .conftest import assert_clean, json_lines


async def test_publish_data_prints_the_id(client, name, invoke):
    result = await invoke("publish", name, '{"id": 1}', "-H", "k=v", "--header", "x=y=z")
    assert result.exit_code == 0, result.output
    (mid,) = result.stdout.split()
    async with client.tail(name, start="beginning", follow=False) as t:
        (msg,) = [m async for m in t]
    assert msg.id == mid and msg.data == {"id": 1} and msg.headers == {"k": "v", "x": "y=z"}


async def test_stdin_json_lines_then_tail_them_back(name, invoke, sh):
    lines = [{"n": i, "s": "é"} for i in range(2500)] + ["text", 3, None, [1]]
    body = "\n".join(json.dumps(x) for x in lines[:10]) + "\n\n  \n"
    body += "\n".join(json.dumps(x) for x in lines[10:])  # no newline after the last line
    done = await sh("publish", name, "--batch", "300", input=body.encode())
    assert done.code == 0, done.err
    assert_clean(done.err)
    ids = done.out.split()
    assert len(ids) == len(lines) and len(set(ids)) == len(ids)
    back = await invoke("tail", name, "--from-beginning")
    records = json_lines(back.stdout)
    assert [r["data"] for r in records] == lines
    assert [r["id"] for r in records] == ids
    dash = await invoke("publish", name, "-", "-q", input='{"dash": true}\n')
    assert dash.exit_code == 0 and dash.stdout == ""


async def test_text_raw_and_whole(client, name, invoke):
    text = await invoke("publish", name, "--text", "not json")
    assert text.exit_code == 0, text.output
    lines = await invoke("publish", name, "--text", input="a\n\nb\n")
    assert len(lines.stdout.split()) == 3  # blank lines are messages in text mode
    whole = await invoke("publish", name, "--whole", input='{\n  "multi": "line"\n}\n')
    assert whole.exit_code == 0 and len(whole.stdout.split()) == 1
    records = json_lines((await invoke("tail", name, "--from-beginning")).stdout)
    assert [r["data"] for r in records] == ["not json", "a", "", "b", {"multi": "line"}]

    raw_name = name + "-raw"
    raw = await invoke("publish", raw_name, "--raw", input=b"\x00\xff\nplain\n")
    assert raw.exit_code == 0 and len(raw.stdout.split()) == 2
    out = await invoke("tail", raw_name, "--from-beginning", "--raw")
    assert out.stdout_bytes == b"\x00\xff\nplain\n"
    async with client.tail(
        client.channel(raw_name, codec="raw"), start="beginning", follow=False
    ) as t:
        assert [m.data async for m in t] == [b"\x00\xff", b"plain"]


async def test_json_codec(client, name, invoke):
    assert (await invoke("publish", name, "--codec", "json", "[1, 2]")).exit_code == 0
    async with client.tail(
        client.channel(name, codec="json"), start="beginning", follow=False
    ) as t:
        assert [m.data async for m in t] == [[1, 2]]
    tailed = await invoke("tail", name, "--codec", "json")
    assert json_lines(tailed.stdout)[0]["data"] == [1, 2]


async def test_bad_json(name, invoke, raw, client):
    arg = await invoke("publish", name, "{nope")
    assert arg.exit_code == 2
    assert arg.stderr.startswith("error: Invalid value for DATA: not valid JSON")
    assert len(arg.stderr.splitlines()) == 1 and "--text" in arg.stderr
    stdin = await invoke("publish", name, input='{"ok": 1}\n{"ok": 2}\nnope\n')
    assert stdin.exit_code == 1
    assert "stdin line 3 is not valid JSON" in stdin.stderr
    assert await raw.exists(client.channel(name).key) == 0  # nothing of the bad batch was sent
    header = await invoke("publish", name, "1", "-H", "novalue")
    assert header.exit_code == 2 and "is not KEY=VALUE" in header.stderr
    both = await invoke("publish", name, "1", "--text", "--raw")
    assert both.exit_code == 2


async def test_empty_stdin(name, invoke):
    result = await invoke("publish", name, input="")
    assert result.exit_code == 0 and result.stdout == ""
    assert "nothing published" in result.stderr


async def test_progress_bar_on_a_terminal_for_a_large_file(
    name, redis_url, namespace, tmp_path, invoke
):
    import asyncio
    import os
    import pty

    from .conftest import ENV, ROOT, argv

    data = tmp_path / "big.jsonl"
    data.write_text("".join(json.dumps({"n": i, "pad": "x" * 40}) + "\n" for i in range(25_000)))
    assert data.stat().st_size >= 1 << 20
    leader, follower = pty.openpty()
    try:
        with data.open("rb") as stdin:
            proc = await asyncio.create_subprocess_exec(
                *argv(redis_url, namespace, "publish", name, "-q"),
                stdin=stdin,
                stdout=asyncio.subprocess.PIPE,
                stderr=follower,
                cwd=ROOT,
                env=ENV,
            )
            os.close(follower)
            follower = -1
            out, _ = await asyncio.wait_for(proc.communicate(), 20)
        err = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            err += chunk
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    assert proc.returncode == 0, err
    assert out == b"" and b"publishing" in err and b"100%" in err
    assert "━".encode() in err, err[-400:]  # drawn by rich (the test extras install it)
    info = await invoke("info", name, "--json")
    assert json.loads(info.stdout)[0]["length"] == 25_000
