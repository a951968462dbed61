"""``broker top``: its data layer on the real server, its rendering, and the real command in a
real terminal (tmux, read back with ``capture-pane``) while workers run."""

from __future__ import annotations

import asyncio
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest
from rich.console import Console

import broker
from broker.cli._top import Frame, TopSampler, render
from broker.workers._health import write_heartbeat
from tests.cli.conftest import ENV, ROOT


async def test_the_sampler_reads_rates_lag_pending_and_slots_without_joining(
    client: broker.Broker, name: str, raw: Any
) -> None:
    ch = client.channel(name)
    ids = await ch.publish_many(range(10))
    await ch.create_group("billing", start="all")
    await raw.xreadgroup("billing", "c1", {ch.key: ">"}, count=10)  # 10 pending
    await raw.xack(ch.key, "billing", *ids[:6])
    await ch.create_group("audit", start="new")
    await raw.xadd(ch.dead_key, {"d": b"x"})
    status = {
        "name": "w",
        "kind": "consume",
        "host": "h1",
        "pid": 42,
        "slot": 0,
        "processes": 1,
        "consumer": "w-h1-0",
        "channels": [name],
        "group": "billing",
        "state": "running",
        "started": time.time(),
        "processed": 100,
        "failed": 1,
        "in_flight": 2,
        "interval": 5.0,
        "handler": "m:f",
    }
    await write_heartbeat(client, "w/h1/0", status)
    before = await raw.xinfo_groups(ch.key)
    sampler = TopSampler(client, [name, "never-made"])
    first = await sampler.sample()
    t0 = time.monotonic()
    await ch.publish_many(range(20))
    await raw.xack(ch.key, "billing", *ids[6:])
    await write_heartbeat(client, "w/h1/0", {**status, "processed": 130, "failed": 4})
    await asyncio.sleep(0.2)
    second = await sampler.sample()
    elapsed = time.monotonic() - t0
    after = await raw.xinfo_groups(ch.key)
    assert first.interval is None and first.channels[0].publish_rate is None
    row, missing = second.channels
    assert (missing.name, missing.length, missing.groups) == ("never-made", 0, [])
    assert row.name == name and row.length == 30 and row.dead_letters == 1
    assert second.interval is not None and 0.2 <= second.interval <= elapsed + 0.5
    assert row.publish_rate == pytest.approx(20 / second.interval)
    billing, audit = sorted(row.groups, key=lambda g: g.name != "billing")
    assert (billing.name, billing.lag, billing.consumers) == ("billing", 20, 1)
    assert billing.pending == 0 and billing.oldest_pending is None
    assert billing.ack_rate == pytest.approx(4 / second.interval)
    assert (audit.name, audit.lag, audit.pending) == ("audit", 20, 0)
    first_billing = next(g for g in first.channels[0].groups if g.name == "billing")
    assert first_billing.pending == 4 and first_billing.oldest_pending is not None
    assert 0 <= first_billing.oldest_pending < 30
    (slot,) = second.slots
    assert (slot.id, slot.host, slot.state, slot.in_flight) == ("w/h1/0", "h1", "running", 2)
    assert slot.handled_rate == pytest.approx(30 / second.interval)
    assert slot.failed_rate == pytest.approx(3 / second.interval)
    # read-only: no consumer joined, nothing more delivered by the sampling
    assert [(g["name"], g["consumers"]) for g in before] == [
        (g["name"], g["consumers"]) for g in after
    ]
    assert [g["entries-read"] for g in before] == [g["entries-read"] for g in after]
    assert await raw.exists(f"{client.namespace}:{{never-made}}") == 0


def test_render_shows_every_column() -> None:
    from broker.cli._top import ChannelRow, GroupRow, SlotRow

    frame = Frame(
        "ns",
        "redis://h:6379/0",
        1.0,
        [ChannelRow("orders", 1200, 3, 250.0, [GroupRow("billing", 3, 12, 5, 2.5, 248.0)])],
        2,
        [SlotRow("process-order/h/0", "h", "running", 77, 4, 120.0, 0.5, 9000, 3, 40 << 20)],
    )
    console = Console(record=True, width=160)
    console.print(render(frame))
    text = console.export_text()
    for part in ("orders", "billing", "1200", "250", "248", "12", "2.5s", "channels (+2 more)"):
        assert part in text, (part, text)
    for part in ("process-order/h/0", "running", "77", "120", "0.5", "9000", "40.0 MiB"):
        assert part in text, (part, text)


#: a tmux server of the tests' own (never anyone else's), killed at the end of the test
SOCKET = f"broker-test-{uuid.uuid4().hex[:8]}"


def tmux(*args: str) -> str:
    return subprocess.run(
        ["tmux", "-L", SOCKET, *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout


async def test_top_in_a_terminal_while_workers_run(
    redis_url: str, namespace: str, tmp_path: pathlib.Path
) -> None:
    if not shutil.which("tmux"):
        pytest.fail("tmux is needed (apt-get install tmux; .ci/run installs it)")
    env = {**ENV, "BROKER_URL": redis_url, "BROKER_NAMESPACE": namespace}
    cli = [sys.executable, "-m", "broker.cli.main"]
    consumer = await asyncio.create_subprocess_exec(
        *cli,
        "worker",
        "broker.workers.examples:process_order",
        "--channel",
        "orders",
        "--group",
        "billing",
        "-p",
        "2",
        "-c",
        "2",
        "--heartbeat",
        "0.5",
        cwd=ROOT,
        env={**env, "PROCESS_MS": "20"},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    producer = await asyncio.create_subprocess_exec(
        *cli,
        "worker",
        "broker.workers.examples:orders",
        "--channel",
        "orders",
        cwd=ROOT,
        env={**env, "ORDERS_COUNT": "0", "ORDERS_RATE": "40"},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    session = f"top-{uuid.uuid4().hex[:6]}"
    # the terminal's own size, not a COLUMNS inherited from whoever started the tmux server
    # a shell that survives the Ctrl-C (a trap handler: reset to the default in its child)
    # waits for broker top and writes its exit status: tmux itself sometimes leaves a pane's
    # exited process unreaped, its status unknown
    status_file = tmp_path / "status"
    top = " ".join(["env", "-u", "COLUMNS", "-u", "LINES", *cli, "top", "--interval", "0.5"])
    command = f"sh -c 'trap : INT; {top}; echo $? > {status_file}'"
    screen = ""
    try:
        tmux(
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            "150",
            "-y",
            "40",
            "-c",
            str(ROOT),
            "-e",
            f"BROKER_URL={redis_url}",
            "-e",
            f"BROKER_NAMESPACE={namespace}",
            command,
        )
        tmux("set-option", "-t", session, "remain-on-exit", "on")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            screen = tmux("capture-pane", "-p", "-t", session)
            rows = [line.split() for line in screen.splitlines() if "process-order/" in line]
            orders = [line.split() for line in screen.splitlines() if line.startswith(" orders ")]
            if (
                len(rows) == 2
                and all(r[2] == "running" and r[7] not in ("-", "0") for r in rows)
                and "orders/" in screen
                and orders
                and orders[0][1] == "billing"
                and orders[0][3] not in ("-", "0", "0.0")  # a publish rate
                and orders[0][4] not in ("-", "0", "0.0")  # an ack rate
            ):
                break
        else:
            pytest.fail(f"broker top never showed the workers:\n{screen}")
        print(f"\n--- capture-pane of broker top ---\n{screen}")
        assert "broker top  namespace " + namespace in screen, screen
        orders_row = next(
            line for line in screen.splitlines() if line.lstrip().startswith("orders")
        )
        assert "billing" in orders_row, orders_row
        tmux("send-keys", "-t", session, "C-c")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not status_file.exists():
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.1)  # the line is written
        status = status_file.read_text().strip() if status_file.exists() else "none"
        assert status == "0", (status, tmux("capture-pane", "-p", "-t", session))
    finally:
        subprocess.run(["tmux", "-L", SOCKET, "kill-server"], capture_output=True, timeout=10)
        for proc in (producer, consumer):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (producer, consumer):
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    assert consumer.returncode == 0 and producer.returncode == 0


def test_top_without_rich_is_a_one_line_usage_error(redis_url: str) -> None:
    code = (
        "import sys; sys.modules['rich'] = None\n"
        "from broker.cli.main import main; sys.argv = ['broker', 'top', '-n', '1']; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**ENV, "BROKER_URL": redis_url},
        cwd=ROOT,
    )
    assert done.returncode == 2, done
    assert done.stderr == "error: broker top needs rich: pip install 'broker[top]'\n", done.stderr
