"""Entries of a stream as messages: the one place raw fields become a :class:`Message`.

A decode failure is reported in ``message.error``, never raised: a subscription dead-letters
such an entry, a tail hands it out; a foreign entry (no ``d`` field) arrives as a dict of its
fields.
"""

from __future__ import annotations

from typing import Any

from ._codec import fast_decoder, unpack_headers
from ._message import Message, Settles
from ._stream import Stream

__all__ = ["decode_entry", "decode_new"]


def decode_new(
    stream: Stream, entries: list[Any], owner: Settles | None, out: Any
) -> list[Message[Any]]:
    """New entries (first delivery) of one ``XREADGROUP`` reply as messages appended to
    ``out``; returns those that cannot be handed out (undecodable, or deleted already: empty
    fields), to be settled by the caller. ``entries`` is emptied.

    The hot path of every subscription: what ``publish()`` writes (only a ``d`` field) is
    decoded in this loop, without a call per entry to :func:`decode_entry` (which the rest
    goes through, so the outcome is the same).
    """
    bad: list[Message[Any]] = []
    decode = fast_decoder(stream.codec)
    limit = stream.max_payload
    channel = stream.channel
    append = out.append
    # popped in order (reversed first), so each entry's lists are freed as soon as it is
    # decoded: the garbage collector counts container allocations net of frees, and a read of
    # a thousand entries held whole until the end would trigger several collections
    entries.reverse()
    pop = entries.pop
    while entries:
        raw_id, fields = pop()
        if type(fields) is list and len(fields) == 2 and fields[0] == b"d":
            payload = fields[1]
            if len(payload) <= limit:
                try:
                    data = decode(payload)
                except Exception:  # decode_entry below reports it
                    pass
                else:
                    append(
                        Message(
                            raw_id.decode(),
                            channel,
                            data,
                            None,  # no headers: the dict is made if asked for
                            1,
                            False,
                            None,
                            payload,  # the fields {b"d": payload}, made if asked for
                            owner,
                            stream,
                        )
                    )
                    continue
        msg = decode_entry(stream, raw_id.decode(), fields, 1, owner)
        if msg.error is None and fields:
            append(msg)
        else:
            bad.append(msg)
    return bad


def decode_entry(
    stream: Stream,
    entry_id: str,
    fields: dict[bytes, bytes] | list[bytes] | None,
    deliveries: int = 1,
    owner: Settles | None = None,
) -> Message[Any]:
    """Build a message from raw fields (a dict, or the server's flat list); a decode failure is
    reported in ``message.error``, never raised."""
    if isinstance(fields, list):
        if len(fields) == 2 and fields[0] == b"d":  # what publish() writes: the fast path
            payload = fields[1]
            if len(payload) <= stream.max_payload:
                try:
                    data = fast_decoder(stream.codec)(payload)
                except Exception:  # the general path below reports it
                    pass
                else:
                    return Message(
                        entry_id,
                        stream.channel,
                        data,
                        None,
                        deliveries,
                        False,
                        None,
                        payload,
                        owner,
                        stream,
                    )
        fields = dict(zip(fields[::2], fields[1::2], strict=False))
    return _decode_fields(stream, entry_id, fields or {}, deliveries, owner)


def _decode_fields(
    stream: Stream,
    entry_id: str,
    fields: dict[bytes, bytes],
    deliveries: int,
    owner: Settles | None,
) -> Message[Any]:
    payload = fields.get(b"d")
    name = stream.channel
    if payload is None:
        data: Any = {k.decode(errors="replace"): _maybe_text(v) for k, v in fields.items()}
        return Message(entry_id, name, data, {}, deliveries, True, None, fields, owner, stream)
    try:
        if len(payload) > stream.max_payload:
            raise ValueError(
                f"payload of {len(payload)} bytes exceeds max_payload ({stream.max_payload})"
            )
        data = stream.codec.decode(payload)
        headers = unpack_headers(fields.get(b"h"))
    except Exception as exc:  # a codec may raise anything on hostile input (RecursionError...)
        error = f"{stream.codec.name}: {exc}"
        return Message(entry_id, name, None, {}, deliveries, False, error, fields, owner, stream)
    return Message(entry_id, name, data, headers, deliveries, False, None, fields, owner, stream)


def _maybe_text(value: bytes) -> str | bytes:
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value
