"""``broker publish``: one message from the command line, or many from stdin.

DATA is JSON (strict: a bad DATA is a usage error; ``--text`` sends it as a string). Without
DATA, or with ``-``, stdin is read as JSON lines (blank lines skipped), one message per line,
published in pipelined batches; ``--text`` and ``--raw`` make each line a string or the raw
bytes, ``--whole`` makes all of stdin one message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from typing import IO, Any

import click

from ._common import Config, UserError, loads_json, note, run
from ._progress import progress

__all__ = ["publish"]

CHUNK = 1 << 16
PROGRESS_MIN = 1 << 20  # bytes of stdin from which a progress bar is worth showing


def _headers(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE")
        out[key] = value
    return out


@click.command()
@click.argument("channel")
@click.argument("data", required=False)
@click.option(
    "-H",
    "--header",
    "headers",
    multiple=True,
    metavar="KEY=VALUE",
    callback=_headers,
    help="A header for every message (repeatable).",
)
@click.option("--text", is_flag=True, help="Send DATA (or each line) as a string, not JSON.")
@click.option(
    "--raw", is_flag=True, help="Send the bytes as they are, with the raw codec (no JSON parsing)."
)
@click.option("--whole", is_flag=True, help="Send all of stdin as one message, not one per line.")
@click.option(
    "--codec",
    type=click.Choice(["msgpack", "json"]),
    default="msgpack",
    show_default=True,
    help="Encoding of the payloads (--raw uses the raw codec).",
)
@click.option(
    "--batch",
    type=click.IntRange(1, 100_000),
    default=1000,
    show_default=True,
    help="Entries per pipeline when reading stdin.",
)
@click.option(
    "--replicas",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    metavar="N",
    help="Return only once N replicas have the messages (WAIT; see Failover in the README).",
)
@click.option("-q", "--quiet", is_flag=True, help="Do not print the ids.")
@click.pass_obj
def publish(
    config: Config,
    channel: str,
    data: str | None,
    headers: dict[str, str],
    text: bool,
    raw: bool,
    whole: bool,
    codec: str,
    batch: int,
    replicas: int,
    quiet: bool,
) -> None:
    """Publish DATA (JSON) to CHANNEL, or JSON lines from stdin; print the new ids.

    \b
      broker publish orders '{"id": 1}'
      broker publish orders < orders.jsonl
      broker publish logs --text 'plain words'
      tail -f app.log | broker publish logs --raw
    """
    if text and raw:
        raise click.UsageError("give only one of --text and --raw")
    if whole and data not in (None, "-"):
        raise click.UsageError("--whole reads stdin; leave DATA out")
    mode = "raw" if raw else "text" if text else "json"
    parse = _parser(mode)
    if data is not None and data != "-":
        try:
            payload = parse(os.fsencode(data))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="DATA") from None
        run(
            _publish_one(
                config, channel, "raw" if raw else codec, payload, headers, quiet, replicas
            )
        )
        return
    stdin = sys.stdin.buffer
    if _isatty(stdin):
        note("reading one message per line from stdin; end with Ctrl-D")
    run(
        _publish_stdin(
            config,
            channel,
            "raw" if raw else codec,
            mode,
            headers,
            stdin,
            batch=batch,
            whole=whole,
            quiet=quiet,
            replicas=replicas,
        )
    )


def _parser(mode: str) -> Callable[[bytes], Any]:
    def parse_json(line: bytes) -> Any:
        return loads_json(line, "or use --text or --raw")

    def parse_text(line: bytes) -> str:
        try:
            return line.decode()
        except UnicodeDecodeError:
            raise ValueError("not UTF-8 text; use --raw for bytes") from None

    parsers: dict[str, Callable[[bytes], Any]] = {
        "json": parse_json,
        "text": parse_text,
        "raw": bytes,
    }
    return parsers[mode]


def _isatty(stream: IO[Any]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _print_ids(ids: list[str]) -> None:
    if ids:
        sys.stdout.write("\n".join(ids) + "\n")
        sys.stdout.flush()


async def _publish_one(
    config: Config,
    name: str,
    codec: str,
    payload: Any,
    headers: dict[str, str],
    quiet: bool,
    replicas: int = 0,
) -> None:
    async with config.connect() as b:
        ch = b.channel(name, codec=codec, replicas=replicas)
        msg_id = await ch.publish(payload, headers=headers or None)
    if not quiet:
        _print_ids([msg_id])


async def _publish_stdin(
    config: Config,
    name: str,
    codec: str,
    mode: str,
    headers: dict[str, str],
    stdin: IO[bytes],
    *,
    batch: int,
    whole: bool,
    quiet: bool,
    replicas: int = 0,
) -> None:
    parse = _parser(mode)
    published = 0
    async with config.connect() as b, StdinChunks(stdin) as chunks:
        ch = b.channel(name, codec=codec, replicas=replicas)
        if whole:
            body = b"".join([c async for c in chunks])
            try:
                payload = parse(body)
            except ValueError as exc:
                raise UserError(f"stdin is {exc}") from None
            _print_ids([] if quiet else [await ch.publish(payload, headers=headers or None)])
            return
        lineno = 0
        rest = b""
        with _progress(stdin, quiet) as advance:
            async for chunk in chunks:
                if chunk:
                    lines = (rest + chunk).split(b"\n")
                    rest = lines.pop()
                else:  # the end: a last line without a newline still counts
                    lines, rest = ([rest] if rest else []), b""
                items: list[Any] = []
                for line in lines:
                    lineno += 1
                    if line.endswith(b"\r"):
                        line = line[:-1]
                    if mode == "json" and not line.strip():
                        continue
                    try:
                        payload = parse(line)
                    except ValueError as exc:
                        raise UserError(
                            f"stdin line {lineno} is {exc} ({published} messages before it "
                            "were published)"
                        ) from None
                    items.append((payload, headers) if headers else payload)
                if items:
                    ids = await ch.publish_many(items, batch=batch)
                    published += len(ids)
                    if not quiet:
                        _print_ids(ids)
                advance(len(chunk))
    if not quiet and published == 0:
        note("stdin held no messages; nothing published")


@contextlib.contextmanager
def _progress(stdin: IO[bytes], quiet: bool) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr, only on a terminal, for a large regular file on stdin, and
    only when the ids are not printed to the same terminal."""
    size = 0
    with contextlib.suppress(OSError, ValueError, AttributeError):
        st = os.fstat(stdin.fileno())
        size = st.st_size if stat.S_ISREG(st.st_mode) else 0
    shown = size >= PROGRESS_MIN and _isatty(sys.stderr) and (quiet or not _isatty(sys.stdout))
    if not shown:
        yield lambda n: None
        return
    with progress(size, "publishing", bytes_=True) as advance:
        yield advance


class StdinChunks:
    """Chunks of stdin as they arrive, read by a daemon thread.

    A blocking read cannot be cancelled, so it runs in a daemon thread (which does not keep a
    Ctrl-C'd process alive) and reads the file descriptor directly, without the buffered
    reader's lock. A semaphore bounds the chunks waiting in the queue. An empty chunk ends.
    """

    def __init__(self, stream: IO[bytes], depth: int = 8) -> None:
        self._read = _reader(stream)
        self._slots = threading.Semaphore(depth)
        self._queue: asyncio.Queue[bytes | BaseException] = asyncio.Queue()
        self._closed = threading.Event()
        self._done = False

    async def __aenter__(self) -> StdinChunks:
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._pump, args=(loop,), name="stdin", daemon=True).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closed.set()

    def _pump(self, loop: asyncio.AbstractEventLoop) -> None:
        while not self._closed.is_set():
            if not self._slots.acquire(timeout=0.1):
                continue
            try:
                item: bytes | BaseException = self._read(CHUNK)
            except Exception as exc:
                item = exc
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is reading any more
                return
            if not isinstance(item, bytes) or not item:
                return

    def __aiter__(self) -> StdinChunks:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        self._slots.release()
        if isinstance(item, BaseException):
            raise item
        self._done = not item
        return item


def _reader(stream: IO[bytes]) -> Callable[[int], bytes]:
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        read1 = getattr(stream, "read1", stream.read)
        return lambda n: bytes(read1(n))
    return lambda n: os.read(fd, n)
