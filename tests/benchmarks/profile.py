"""CPU profile of one library scenario of the benchmark, with py-spy (the bench extra).

usage: python -m tests.benchmarks.profile {publish,publish_many,iterate,chunks,consume}
       [-n MESSAGES] [--out /tmp/prof_NAME] [--url URL]

Starts a private redis-server unless --url is given, prepares the scenario (a consume scenario's
backlog is written first, unprofiled), attaches ``py-spy record`` to this process for the timed
part only, and writes ``OUT.raw`` (collapsed stacks, for flamegraph/speedscope) and ``OUT.txt``
(the functions with most own and most cumulative time).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import linecache
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import broker
from broker.cli._bench import library, raw
from broker.cli._bench.common import Run, fresh_name, redis_client, unlink_namespace, use_uvloop

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ("publish", "publish_many", "iterate", "chunks", "consume")


@contextlib.contextmanager
def spying(raw_out: Path, rate: int) -> Iterator[None]:
    spy = shutil.which("py-spy")
    if spy is None:
        sys.exit("py-spy is not installed: pip install 'broker[bench]'")
    proc = subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(os.getpid()),
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--output",
            str(raw_out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)  # attached and sampling
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        if not raw_out.exists():
            sys.exit(f"py-spy wrote nothing: {err.decode()[-1000:]}")


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def _short(frame: str, line: bool = False) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m["file"]
    for marker in ("site-packages/", str(ROOT) + "/", "lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    if line and m["line"]:
        code = linecache.getline(m["file"], int(m["line"])).strip()
        return f"{m['func']} ({path}:{m['line']})  {code[:70]}"
    return f"{m['func']} ({path})"


def summarize(raw_out: Path, header: str, top: int = 30) -> str:
    own: collections.Counter[str] = collections.Counter()
    lines: collections.Counter[str] = collections.Counter()
    cumulative: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw_out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        lines[_short(stack.split(";")[-1], line=True)] += n
        for f in set(frames):
            cumulative[f] += n
    out = [
        header,
        f"samples: {total} (active CPU only; idle waits are not sampled)",
        "C work without a Python frame (uvloop's loop, socket reads, task wake-ups) is charged to",
        "the innermost Python frame: Runner.run is the event loop itself, and an `await` line",
        "includes resuming the coroutine (on Python 3.11 the line shown can be the statement",
        "before the `await`). Source lines are as they were when profiled.",
        "",
    ]
    for title, counter in (
        ("functions by own time", own),
        ("functions by cumulative time", cumulative),
        ("lines by own time", lines),
    ):
        out += [f"top {top} {title}:", f"{'%':>6}  {'samples':>8}  function"]
        for name, n in counter.most_common(top):
            out.append(f"{100 * n / max(total, 1):6.1f}  {n:8d}  {name}")
        out.append("")
    return "\n".join(out)


async def profile(url: str, scenario: str, n: int, out: Path, rate: int) -> None:
    r = redis_client(url)
    ns = fresh_name("profile")
    try:
        async with broker.connect(url, namespace=ns) as b:
            ch = b.channel(scenario)
            if scenario not in ("publish", "publish_many"):
                await raw.fill(r, ch.key, n)
            runs: dict[str, Callable[[], Awaitable[Run]]] = {
                "publish": lambda: library.publish(ch, n, 1000),
                "publish_many": lambda: library.publish_many(ch, n),
                "iterate": lambda: library.iterate(ch, "g", n, 1000),
                "chunks": lambda: library.chunks(ch, "g", n, 1000, 2000),
                "consume": lambda: library.consume(b, ch, "g", n, 32),
            }
            raw_out = out.with_suffix(".raw")
            with spying(raw_out, rate):
                result = await runs[scenario]()
            header = (
                f"broker {scenario}: {n:,} messages at {result.rate:,.0f} msg/s under py-spy "
                f"({result.cpu_us:.1f} µs CPU/msg), {os.path.basename(sys.executable)} "
                f"{sys.version.split()[0]}, {type(asyncio.get_running_loop()).__module__}"
            )
            out.with_suffix(".txt").write_text(summarize(raw_out, header))
            print(f"wrote {out.with_suffix('.txt')} and {raw_out}")
    finally:
        await unlink_namespace(r, ns)
        await r.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.profile")
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("-n", "--messages", type=int, default=300_000)
    parser.add_argument("--out", type=Path, help="default /tmp/prof_SCENARIO")
    parser.add_argument("--url", help="a running server (default: a private one)")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--uvloop", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args()
    use_uvloop(args.uvloop)
    out = args.out or Path(f"/tmp/prof_{args.scenario}")

    def go(url: str) -> None:
        asyncio.run(profile(url, args.scenario, args.messages, out, args.rate))

    if args.url:
        go(args.url)
    else:
        with broker.EmbeddedServer() as server:
            go(server.url)


if __name__ == "__main__":
    main()
