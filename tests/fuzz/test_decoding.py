"""What decodes entries, against arbitrary fields: the codecs, the headers, ``decode_entry`` (every
subscription and tail builds its messages with it), and the CLI's outputs of what it built.

The documented outcomes only: a codec returns a value or raises ``ValueError``; headers decode
to ``dict[str, str]`` or raise ``ValueError``; an entry becomes a message (its data decoded), a
foreign message (no ``d`` field: its fields as a dict), or a message with ``error`` set (which a
subscription dead-letters and a tail shows); every CLI output writes one line (or one record)
for any message, never raises.
"""

from __future__ import annotations

import io
import json
import sys
from typing import Any

import msgpack
import pytest
from hypothesis import strategies as st

import broker
from broker._codec import fast_decoder, get_codec, unpack_headers
from broker._decode import decode_entry, decode_new
from broker._stream import Stream
from tests.fuzz.conftest import BUDGET, Examples, run_for

# -- payloads -----------------------------------------------------------------------------------

#: text with everything a JSON document can smuggle in, lone surrogates included
texts = st.one_of(
    st.text(alphabet=st.characters(exclude_categories=()), max_size=12),
    st.sampled_from(["\ud800", "a\udfff", "\udc80\n", "\x00", "\u2028", "{data}", "\x1b[31m"]),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
    st.binary(max_size=12),
)
data = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(texts, st.integers()), inner, max_size=4),
    ),
    max_leaves=12,
)


def _msgpack(value: Any) -> bytes:
    try:
        return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError):
        return b"\xc1"


def _json(value: Any) -> bytes:
    try:
        return json.dumps(value, default=lambda b: b.hex()).encode()  # surrogates as \\udXXX
    except (TypeError, ValueError):
        return b"{"


def _nested(kind: str, depth: int) -> bytes:
    if kind == "msgpack-array":
        return b"\x91" * depth + b"\xc0"
    if kind == "msgpack-map":
        return b"\x81\xc0" * depth + b"\xc0"
    if kind == "json-array":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


payloads = st.one_of(
    st.binary(max_size=200),
    data.map(_msgpack),
    data.map(_json),
    st.builds(
        _nested,
        st.sampled_from(["msgpack-array", "msgpack-map", "json-array", "json-object"]),
        st.integers(1, 3000),
    ),
    # msgpack extension types (a timestamp is ext -1), and lengths that lie
    st.builds(
        lambda code, body: msgpack.packb(msgpack.ExtType(code, body)),
        st.integers(0, 127),
        st.binary(max_size=12),
    ),
    st.sampled_from(
        [b"\xdb\xff\xff\xff\xff", b"\xdd\x7f\xff\xff\xff", b"\xc7\x04\xff\x00", b"\xd6\xff\x00"]
    ),
)
headers = st.one_of(
    st.none(),
    st.binary(max_size=60),
    st.dictionaries(st.one_of(texts, st.integers(), st.binary(max_size=4)), data, max_size=4).map(
        _msgpack
    ),
    data.map(_msgpack),
)
names = st.one_of(st.sampled_from([b"d", b"h", b"d", b"x"]), st.binary(max_size=8))


@st.composite
def entries(draw: st.DrawFn) -> Any:
    """Fields as the server sends them (a flat list), as a dict, or missing."""
    fields: list[bytes] = []
    if draw(st.booleans()):
        fields += [b"d", draw(payloads)]
    if draw(st.booleans()):
        h = draw(headers)
        if h is not None:
            fields += [b"h", h]
    for _ in range(draw(st.integers(0, 3))):
        fields += [draw(names), draw(st.binary(max_size=40))]
    order = draw(st.permutations(range(len(fields) // 2)))
    flat = [x for i in order for x in fields[2 * i : 2 * i + 2]]
    shape = draw(st.sampled_from(["list", "list", "dict", "odd", "none"]))
    if shape == "dict":
        return dict(zip(flat[::2], flat[1::2], strict=True))
    if shape == "odd":
        return [*flat, b"d"]
    if shape == "none":
        return draw(st.sampled_from([None, [], {}]))
    return flat


def channel(codec: str, max_payload: int) -> Stream:
    """The stream of channel ``orders``, as subscriptions and tails decode it."""
    return Stream(
        "orders", "broker:{orders}", "broker:{orders}:dead", get_codec(codec), max_payload
    )


CODECS = ["msgpack", "json", "raw"]


# -- the targets ----------------------------------------------------------------------------------


def test_fuzz_codecs_and_headers() -> None:
    examples = Examples("codecs and headers")

    def body(raw: bytes, codec: str) -> None:
        examples.hit()
        c = get_codec(codec)
        try:
            value = c.decode(raw)
        except ValueError:
            value = _FAILED
        try:
            fast = fast_decoder(c)(raw)
        except Exception:  # the fast path may raise anything: callers fall back to decode()
            fast = _FAILED
        if fast is not _FAILED and value is not _FAILED:
            assert _same(fast, value)
        try:
            h = unpack_headers(raw)
        except ValueError:
            return
        assert isinstance(h, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in h.items()
        )

    run_for(
        examples,
        body,
        st.one_of(payloads, headers.filter(bool)),
        st.sampled_from(CODECS),
        budget=BUDGET / 2,
    )


_FAILED = object()


def _same(a: Any, b: Any) -> bool:
    return a is b or a == b or (a != a and b != b) or repr(a) == repr(b)


def test_fuzz_decode_entry_and_cli_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.cli import _format

    examples = Examples("decode_entry and CLI outputs")
    channels = {(c, m): channel(c, m) for c in CODECS for m in (64, 16 << 20)}
    out = io.BytesIO()
    stdout = io.TextIOWrapper(out, encoding="utf-8", errors="strict", write_through=True)
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(io.BytesIO(), encoding="utf-8"))
    outputs = [
        _format.JsonLines(deliveries=True),
        _format.Pretty(color=True, deliveries=True),
        _format.Pretty(color=False, deliveries=True),
        _format.Template("{channel} {id} {time} {ms} {headers} {data} {error}"),
        _format.RawPayloads(),
    ]

    def body(fields: Any, codec: str, small: bool, deliveries: int, entry_id: str) -> None:
        examples.hit()
        ch = channels[codec, 64 if small else 16 << 20]
        msg = decode_entry(ch, entry_id, fields, deliveries)
        as_dict = (
            fields
            if isinstance(fields, dict)
            else dict(zip((fields or [])[::2], (fields or [])[1::2], strict=False))
        )
        assert (msg.id, msg.channel, msg.deliveries) == (entry_id, "orders", deliveries)
        if b"d" not in as_dict:
            assert msg.foreign and msg.error is None and isinstance(msg.data, dict)
            assert all(isinstance(k, str) for k in msg.data)
        elif msg.error is not None:
            assert isinstance(msg.error, str) and msg.data is None and not msg.foreign
            assert msg.error.startswith(f"{codec}: ")
        else:
            assert not msg.foreign and _same(msg.data, ch.codec.decode(as_dict[b"d"]))
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in msg.headers.items())
        if not isinstance(fields, dict):
            # the hot path of every subscription decodes a read's new entries in one loop
            # (decode_new): the same messages, and the same ones set aside to settle
            taken: list[Any] = []
            (put_aside,) = decode_new(ch, [(entry_id.encode(), fields)], None, taken) or [None]
            first = decode_entry(ch, entry_id, fields, 1)
            new = taken[0] if taken else put_aside
            assert (new in taken) == (first.error is None and bool(fields)), (fields, new)
            assert (new.id, new.deliveries, new.foreign, new.error) == (
                first.id,
                1,
                first.foreign,
                first.error,
            )
            assert _same(new.data, first.data) and new.headers == first.headers
            assert new.fields == first.fields
        for output in outputs:
            out.seek(0)
            out.truncate()
            output.write(msg)
            written = out.getvalue()
            if isinstance(output, _format.RawPayloads):
                continue
            assert written.endswith(b"\n"), (output, written)
            if isinstance(output, _format.Pretty) and not output._color:
                # a terminal view: nothing from the message may reach the terminal as a control
                # character (an escape sequence in a header could rewrite the screen)
                text = written.decode("utf-8").replace("\n", "")
                assert text.isprintable() or all(c.isprintable() or c == " " for c in text), text
            if isinstance(output, _format.JsonLines):
                [line] = written.splitlines()
                record = json.loads(line)
                assert record["id"] == msg.id and ("error" in record) == (
                    record["data"] is None and "fields" in record
                )

    run_for(
        examples,
        body,
        entries(),
        st.sampled_from(CODECS),
        st.booleans(),
        st.integers(1, 10),
        # any id Redis takes: up to 2**64-1 ms, far past the year 9999
        st.builds(
            lambda ms, seq: f"{ms}-{seq}",
            st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 253402300799999, 2**64 - 1])),
            st.integers(0, 2**64 - 1),
        ),
        budget=BUDGET / 2,
    )


# -- what the fuzzer found, as regular tests ----------------------------------------------------


def test_json_nested_too_deep_is_a_value_error() -> None:
    """The Codec contract: ValueError on bad input (json.loads raised RecursionError)."""
    with pytest.raises(ValueError, match="invalid JSON"):
        get_codec("json").decode(b"[" * 100_000)
    msg = decode_entry(channel("json", 16 << 20), "1-0", [b"d", b"[" * 100_000])
    assert msg.error is not None and msg.error.startswith("json: invalid JSON")


def _unbuffered(monkeypatch: pytest.MonkeyPatch) -> io.BytesIO:
    out = io.BytesIO()
    stream = io.TextIOWrapper(out, encoding="utf-8", errors="strict", write_through=True)
    monkeypatch.setattr(sys, "stdout", stream)
    return out


def test_data_nested_deeper_than_printable_is_a_record_not_a_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """msgpack decodes 1000 levels; printing them recursed past Python's limit and ended
    `broker tail` (and `broker dead list`) with a RecursionError."""
    from broker.cli import _format
    from broker.cli._admin import _dead_record

    payload = b"\x91" * 1000 + b"\xc0"
    msg = decode_entry(channel("msgpack", 16 << 20), "1-0", [b"d", payload])
    assert msg.error is None  # it decodes: only printing it is a problem
    out = _unbuffered(monkeypatch)
    _format.JsonLines().write(msg)
    record = json.loads(out.getvalue())
    assert record["data"] is None and "nested deeper than 200 levels" in record["error"]
    assert record["fields"] == {"d": {"$base64": _format.jsonable(payload)["$base64"]}}
    for output in (_format.Pretty(color=False), _format.Template("{id} {data} {error}")):
        out.seek(0)
        out.truncate()
        output.write(msg)
        assert b"nested deeper than 200 levels" in out.getvalue()
    letter = broker.DeadLetter("2-0", "1-0", "g", "c", "boom", 5, {b"d": payload})
    assert _dead_record(letter)["data"] == _format.jsonable(payload)  # the raw bytes instead


@pytest.mark.parametrize("template", [None, "{data}"])
def test_a_lone_surrogate_from_a_json_payload_is_printed_escaped(
    monkeypatch: pytest.MonkeyPatch, template: str | None
) -> None:
    """JSON can carry "\\ud800"; the readable view and --format raised UnicodeEncodeError."""
    from broker.cli import _format

    msg = decode_entry(channel("json", 16 << 20), "1-0", [b"d", b'{"\\ud800": "x\\udfff"}'])
    assert msg.data == {"\ud800": "x\udfff"}
    out = _unbuffered(monkeypatch)
    output = _format.Pretty(color=False) if template is None else _format.Template(template)
    output.write(msg)
    assert b"\\ud800" in out.getvalue() and b"\\udfff" in out.getvalue()


def test_the_readable_view_escapes_control_characters(monkeypatch: pytest.MonkeyPatch) -> None:
    """Headers and strings from a message reached the terminal raw: ESC sequences, DEL, C1."""
    from broker.cli import _format

    evil = "\x1b]0;owned\x07\x1b[2J\x7f\x9b"
    msg = broker.Message("1-0", "orders", {"a": evil}, {"trace": evil}, 1, False, None, {}, None)
    out = _unbuffered(monkeypatch)
    _format.Pretty(color=False).write(msg)
    text = out.getvalue().decode()
    assert text.endswith("\n") and text.replace("\n", "").isprintable(), repr(text)
    assert "\\x1b" in text
