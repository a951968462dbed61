"""``broker worker --metrics-port``: each slot's /metrics scraped over HTTP while it runs, and a
trace started in this process continuing in the worker processes, one span per delivery."""

from __future__ import annotations

import asyncio
import json
import pathlib
import random
import signal
import socket
import sys
import urllib.request
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

import broker
from broker.workers import list_workers
from tests.cli.conftest import ENV, ROOT

N = 30
FLAKY = {4, 11, 25}  # fail on their first delivery


def free_ports(n: int) -> int:
    """A port P with P..P+n-1 free just now, below the ephemeral range (32768 and up on
    Linux), where the clients' own outgoing connections would take ports at random."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20_000, 32_000 - n)
        try:
            for p in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return base
    raise RuntimeError("no free ports")


def scrape(port: int) -> tuple[str, dict[str, dict[tuple[tuple[str, str], ...], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return text, out


async def test_worker_metrics_per_slot_and_a_trace_across_processes(
    spans: InMemorySpanExporter,
    client: broker.Broker,
    redis_url: str,
    namespace: str,
    tmp_path: pathlib.Path,
) -> None:
    port = free_ports(2)
    trace_file = tmp_path / "spans.jsonl"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker.cli.main",
        "--url",
        redis_url,
        "--namespace",
        namespace,
        "worker",
        "tests.helpers.traced:handle",
        "--channel",
        "orders",
        "--group",
        "billing",
        "--start",
        "all",
        "-p",
        "2",
        "-c",
        "2",
        "--heartbeat",
        "0.3",
        "--metrics-port",
        str(port),
        "--metrics-addr",
        "127.0.0.1",
        cwd=ROOT,
        env={**ENV, "TRACE_FILE": str(trace_file)},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(30):
            while sum(w.state == "running" for w in await list_workers(client)) < 2:
                assert proc.returncode is None, await proc.stderr.read()  # type: ignore[union-attr]
                await asyncio.sleep(0.1)
        orders = client.channel("orders")
        sent: dict[str, int] = {}
        with trace.get_tracer("test").start_as_current_span("checkout") as root:
            for i in range(N):
                sent[await orders.publish({"n": i, "fail_first": i in FLAKY})] = i
        async with asyncio.timeout(30):
            while True:
                info = await orders.info()
                done = sum(w.processed for w in await list_workers(client))
                if info.groups and info.groups[0].pending == 0 and info.groups[0].lag == 0:
                    if done == N:
                        break
                await asyncio.sleep(0.1)
        scraped = [await asyncio.to_thread(scrape, port + s) for s in (0, 1)]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, await proc.stderr.read()  # type: ignore[union-attr]

    texts = [text for text, _ in scraped]
    slots = [samples for _, samples in scraped]
    g = (("channel", "orders"), ("group", "billing"), ("namespace", namespace))

    def total(name: str) -> float:
        return sum(slot[name][g] for slot in slots)

    print("\n--- /metrics of slot 0 (excerpt) ---")
    print(
        "\n".join(line for line in texts[0].splitlines() if "billing" in line or "sample" in line)
    )
    assert all(slot["broker_subscriptions"][g] == 1 for slot in slots)
    assert all(slot["broker_delivered_messages_total"][g] > 0 for slot in slots)  # both worked
    assert total("broker_delivered_messages_total") == N + len(FLAKY)
    assert total("broker_acked_messages_total") == N
    assert total("broker_nacked_messages_total") == len(FLAKY)
    assert total("broker_handler_failures_total") == len(FLAKY)
    assert total("broker_handler_duration_seconds_count") == N + len(FLAKY)
    assert total("broker_dead_lettered_messages_total") == 0
    for slot in slots:
        assert slot["broker_group_lag_messages"][g] >= 0
        assert slot["broker_channel_length_messages"][g[:1] + g[2:]] == N

    # the trace: checkout -> send orders (this process) -> process orders (a worker process)
    finished = spans.get_finished_spans()
    sends = {s.attributes["messaging.message.id"]: s for s in finished if s.name == "send orders"}
    assert set(sends) == set(sent)
    rows = [json.loads(line) for line in trace_file.read_text().splitlines()]
    process = [r for r in rows if r["name"] == "process orders"]
    work = [r for r in rows if r["name"] == "work"]
    trace_id = f"{root.get_span_context().trace_id:032x}"
    assert len(process) == N + len(FLAKY) and len(work) == N + len(FLAKY)
    assert {r["pid"] for r in process} <= {r["pid"] for r in rows} and len(
        {r["pid"] for r in process}
    ) == 2
    by_message: dict[str, list[dict[str, Any]]] = {}
    for r in process:
        by_message.setdefault(r["attributes"]["messaging.message.id"], []).append(r)
        send_id = f"{sends[r['attributes']['messaging.message.id']].context.span_id:016x}"
        assert r["kind"] == "CONSUMER" and r["trace_id"] == trace_id
        assert r["parent_id"] == send_id and r["links"] == [send_id]
    assert {r["parent_id"] for r in work} == {r["span_id"] for r in process}
    for mid, deliveries in by_message.items():
        got = sorted(
            (d["attributes"]["messaging.redis.message.delivery_count"], d["status"])
            for d in deliveries
        )
        if sent[mid] in FLAKY:
            assert got == [(1, "ERROR"), (2, "UNSET")], (mid, got)
        else:
            assert got == [(1, "UNSET")], (mid, got)
    flaky_id = next(m for m, i in sent.items() if i == min(FLAKY))
    checkout = next(s for s in finished if s.name == "checkout")
    print("--- spans of one retried message ---")
    print(f"checkout       span {checkout.context.span_id:016x} parent -  (pid of the test)")
    send = sends[flaky_id]
    assert send.parent is not None
    print(f"send orders    span {send.context.span_id:016x} parent {send.parent.span_id:016x}")
    count = "messaging.redis.message.delivery_count"
    for d in sorted(by_message[flaky_id], key=lambda d: d["attributes"][count]):
        print(
            f"process orders span {d['span_id']} parent {d['parent_id']} links {d['links']} "
            f"delivery {d['attributes'][count]} {d['status']} (pid {d['pid']})"
        )


async def test_metrics_port_errors_are_one_line_usage_errors(
    redis_url: str, namespace: str
) -> None:
    base = [sys.executable, "-m", "broker.cli.main", "--url", redis_url, "--namespace", namespace]
    worker = ["worker", "tests.helpers.handlers:record", "--channel", "c", "--group", "g"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        for extra, expected in (
            (["-p", "2", "--metrics-port", "65535"], "metrics_port must leave room for 2"),
            (["--metrics-port", str(busy), "--metrics-addr", "127.0.0.1"], "cannot serve metrics"),
        ):
            proc = await asyncio.create_subprocess_exec(
                *base,
                *worker,
                *extra,
                cwd=ROOT,
                env=ENV,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            _, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 2, (extra, err.decode())
            assert expected in err.decode(), err.decode()
            assert "Traceback" not in err.decode()
