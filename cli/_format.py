"""How messages and tables look on stdout.

Four message formats, one per class with ``write(msg)``:

- ``JsonLines`` (piped output, ``--json``): one object per line with ``channel``, ``id``,
  ``timestamp`` (ISO 8601, UTC), ``headers`` and ``data``; ``"foreign": true`` when the entry
  had no ``d`` field (``data`` is then its fields); ``"error"`` and ``fields`` (the raw entry)
  instead of aborting when the payload cannot be decoded. Bytes are written as
  ``{"$base64": "..."}``, so they never pass for text (a msgpack extension type as
  ``{"$ext": code, "$base64": "..."}``).
- ``Pretty`` (a terminal, ``--pretty``): channel, id, local time and headers on one colored line,
  then the data as JSON, indented when it does not fit the line.
- ``RawPayloads`` (``--raw``): the payload bytes as stored, newline separated.
- ``Template`` (``--format``): ``{channel} {id} {time} {ms} {headers} {data} {error}``.
"""

from __future__ import annotations

import base64
import json
import math
import shutil
import string
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import click
import msgpack

from broker import Message

from ._common import note

__all__ = [
    "TOKENS",
    "JsonLines",
    "MessageOutput",
    "Pretty",
    "RawPayloads",
    "Template",
    "TooDeep",
    "check_template",
    "dump",
    "duration",
    "id_time",
    "iso_time",
    "jsonable",
    "local_time",
    "message_record",
    "plural",
    "table",
]

TOKENS = ("channel", "id", "time", "ms", "headers", "data", "error")


# -- values ------------------------------------------------------------------------------------


#: how deep data is printed: deeper data (a payload of nested arrays decodes fine) is reported
#: as not printable instead of ending the command with a RecursionError
MAX_DEPTH = 200


class TooDeep(ValueError):
    """The data is nested deeper than :data:`MAX_DEPTH`."""

    def __init__(self) -> None:
        super().__init__(f"cannot print: data nested deeper than {MAX_DEPTH} levels")


def jsonable(value: Any, _depth: int = 0) -> Any:
    """``value`` with everything JSON cannot hold made explicit (bytes as ``{"$base64": ...}``).

    :raises TooDeep: if it is nested deeper than :data:`MAX_DEPTH`.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$base64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, msgpack.ExtType):
        return {"$ext": value.code, "$base64": base64.b64encode(value.data).decode("ascii")}
    if isinstance(value, dict | list | tuple) and _depth >= MAX_DEPTH:
        raise TooDeep()
    if isinstance(value, dict):
        return {_key(k, _depth): jsonable(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v, _depth + 1) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)  # msgpack Timestamp, ...


def _key(key: Any, depth: int = 0) -> str:
    if isinstance(key, bytes):
        return key.decode("utf-8", "backslashreplace")
    return key if isinstance(key, str) else json.dumps(jsonable(key, depth + 1))


def dump(value: Any, indent: int | None = None) -> str:
    """JSON text of an already :func:`jsonable` value."""
    separators = None if indent else (", ", ": ")
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators)


def iso(msg: Message[Any]) -> str | None:
    return iso_time(id_time(msg.id))


def iso_time(when: datetime | None) -> str | None:
    """ISO 8601 in UTC with milliseconds: ``2024-05-01T12:00:00.123Z`` (None for None)."""
    if when is None:
        return None
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def plural(n: int, word: str) -> str:
    if n == 1:
        return f"1 {word}"
    return f"{n} {word[:-1]}ies" if word.endswith("y") else f"{n} {word}s"


def id_time(entry_id: str) -> datetime | None:
    """When an entry was added, from its id (UTC); None past the year 9999 (Redis takes ids up
    to ``2**64 - 1`` ms, ``XADD key 99999999999999-0 ...``)."""
    try:
        return datetime.fromtimestamp(int(entry_id.split("-", 1)[0]) / 1000, tz=UTC)
    except (OverflowError, ValueError, OSError):
        return None


def local_time(when: datetime | None) -> str:
    if when is None:
        return "(time out of range)"
    local = when.astimezone()
    return f"{local:%Y-%m-%d %H:%M:%S}.{local.microsecond // 1000:03d}"


def duration(seconds: float) -> str:
    """``850ms``, ``3.2s``, ``5m12s``, ``2h03m``, ``3d04h``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def message_record(msg: Message[Any], *, deliveries: bool = False) -> dict[str, Any]:
    """The JSON object of one message (see the module docstring)."""
    error = msg.error
    try:
        data = None if error is not None else jsonable(msg.data)
    except TooDeep as exc:
        data, error = None, str(exc)
    record: dict[str, Any] = {
        "channel": msg.channel,
        "id": msg.id,
        "timestamp": iso(msg),
        "headers": msg.headers,
        "data": data,
    }
    if msg.foreign:
        record["foreign"] = True
    if error is not None:
        record["error"] = error
        record["fields"] = jsonable(msg.fields)
    if deliveries:
        record["deliveries"] = msg.deliveries
    return record


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(str(r[i])) for r in (headers, *rows)) for i in range(len(headers))]
    return [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in (headers, *rows)
    ]


# -- message outputs ----------------------------------------------------------------------------


class MessageOutput(Protocol):
    def write(self, msg: Message[Any]) -> None: ...


class JsonLines:
    def __init__(self, *, deliveries: bool = False) -> None:
        self._out = sys.stdout
        self._deliveries = deliveries

    def write(self, msg: Message[Any]) -> None:
        record = message_record(msg, deliveries=self._deliveries)
        try:
            line = json.dumps(record, ensure_ascii=False)
            self._out.write(line + "\n")
        except UnicodeEncodeError:  # a lone surrogate, or a terminal that is not UTF-8
            self._out.write(json.dumps(record) + "\n")
        self._out.flush()


def _write_line(out: Any, line: str) -> None:
    """``line`` in one write; what the stream cannot encode (a lone surrogate, which a JSON
    payload can carry, or a terminal that is not UTF-8) is written as a backslash escape."""
    try:
        out.write(line)
    except UnicodeEncodeError:  # raised before anything was written
        encoding = getattr(out, "encoding", None) or "utf-8"
        out.write(line.encode(encoding, "backslashreplace").decode(encoding))
    out.flush()


class Pretty:
    def __init__(self, *, color: bool, deliveries: bool = False) -> None:
        self._out = sys.stdout
        self._color = color
        self._deliveries = deliveries
        self._width = shutil.get_terminal_size((100, 24)).columns

    def _style(self, text: str, **kw: Any) -> str:
        return click.style(text, **kw) if self._color else text

    def write(self, msg: Message[Any]) -> None:
        parts = [
            self._style(msg.channel, fg="cyan", bold=True),
            self._style(msg.id, fg="yellow"),
            self._style(local_time(id_time(msg.id)), dim=True),
        ]
        plain = len(msg.channel) + len(msg.id) + 25
        if self._deliveries and msg.deliveries > 1:
            parts.append(self._style(f"delivery {msg.deliveries}", fg="red"))
        if msg.headers:
            h = _visible(" ".join(f"{k}={v}" for k, v in msg.headers.items()))
            parts.append(self._style(h, fg="magenta"))
            plain += len(h) + 1
        if msg.error is not None:
            error = _visible(f"cannot decode: {msg.error}")
            parts.append(self._style(error, fg="red", bold=True))
            body = _bytes_text(msg.fields.get(b"d", b""))
        else:
            if msg.foreign:
                parts.append(self._style("(foreign entry)", fg="blue"))
                plain += 16
            body = self._body(msg.data, self._width - plain)
        _write_line(self._out, " ".join(parts) + ("\n" if "\n" in body else " ") + body + "\n")

    def _body(self, data: Any, room: int) -> str:
        if isinstance(data, bytes):
            return _bytes_text(data)
        try:
            value = jsonable(data)
        except TooDeep as exc:
            return self._style(str(exc), fg="red", bold=True)
        text = _visible(dump(value))
        if len(text) <= room or not isinstance(value, dict | list):
            return text
        return "\n".join("    " + _visible(line) for line in dump(value, indent=2).splitlines())


def _visible(text: str) -> str:
    """``text`` for a terminal: control characters (DEL and C1 ones included, which JSON leaves
    as they are) as escapes, so no message can move the cursor or retitle the window."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _bytes_text(data: bytes) -> str:
    text = repr(data)
    return text if len(text) <= 400 else text[:400] + f"... ({len(data)} bytes)"


class RawPayloads:
    """Payload bytes as stored (binary safe); entries without a payload are noted on stderr."""

    def __init__(self) -> None:
        self._out = sys.stdout.buffer

    def write(self, msg: Message[Any]) -> None:
        payload = msg.fields.get(b"d")
        if payload is None:
            note(f"{msg.channel} {msg.id}: foreign entry without a payload, skipped")
            return
        self._out.write(payload + b"\n")
        self._out.flush()


def check_template(template: str) -> str:
    """``template`` if it uses only :data:`TOKENS`.

    :raises click.BadParameter: naming the tokens.
    """
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise click.BadParameter(f"{exc} (write {{{{ and }}}} for literal braces)") from None
    valid = ", ".join("{" + t + "}" for t in TOKENS)
    for field in fields:
        if field not in TOKENS:
            raise click.BadParameter(f"unknown token {{{field}}}; use {valid}")
    return template


class Template:
    def __init__(self, template: str) -> None:
        self._out = sys.stdout
        self._template = template

    def write(self, msg: Message[Any]) -> None:
        data, error = msg.data, msg.error
        if error is None and not isinstance(data, str):
            try:
                data = dump(jsonable(data))
            except TooDeep as exc:
                error = str(exc)
        values = {
            "channel": msg.channel,
            "id": msg.id,
            "time": iso(msg) or "",
            "ms": msg.id.split("-", 1)[0],
            "headers": dump(msg.headers),
            "data": "" if error else data,
            "error": error or "",
        }
        _write_line(self._out, self._template.format_map(values) + "\n")
