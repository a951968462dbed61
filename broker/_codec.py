"""Payload codecs: msgpack (default), JSON and raw bytes. Never pickle."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

import msgpack

from ._errors import ConfigurationError

__all__ = [
    "Codec",
    "JsonCodec",
    "MsgpackCodec",
    "RawCodec",
    "fast_decoder",
    "get_codec",
    "pack_headers",
    "unpack_headers",
]


class Codec(Protocol):
    """Turns payloads into bytes and back. ``decode`` raises ``ValueError`` on bad input."""

    name: str

    def encode(self, data: Any) -> bytes: ...

    def decode(self, raw: bytes) -> Any: ...


class MsgpackCodec:
    """msgpack, with bytes kept as bytes and str as str."""

    name = "msgpack"

    def encode(self, data: Any) -> bytes:
        try:
            return msgpack.packb(data, use_bin_type=True)  # type: ignore[no-any-return]
        except (TypeError, ValueError, OverflowError) as exc:
            raise TypeError(f"cannot encode {type(data).__name__} as msgpack: {exc}") from exc

    def decode(self, raw: bytes) -> Any:
        try:
            # the unpacker's own limits derive from len(raw): no bomb can allocate beyond it
            return msgpack.unpackb(raw, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises several unrelated types
            raise ValueError(
                f"invalid msgpack ({type(exc).__name__}: {exc or 'no detail'})"
            ) from exc


class JsonCodec:
    """UTF-8 JSON."""

    name = "json"

    def encode(self, data: Any) -> bytes:
        try:
            return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
        except (TypeError, ValueError) as exc:
            raise TypeError(f"cannot encode {type(data).__name__} as JSON: {exc}") from exc

    def decode(self, raw: bytes) -> Any:
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # nested too deep
            raise ValueError(f"invalid JSON: {exc}") from exc


class RawCodec:
    """Bytes in, bytes out (``str`` is encoded as UTF-8)."""

    name = "raw"

    def encode(self, data: Any) -> bytes:
        if isinstance(data, str):
            return data.encode()
        if isinstance(data, bytes | bytearray | memoryview):
            return bytes(data)
        raise TypeError(f"the raw codec takes bytes or str, got {type(data).__name__}")

    def decode(self, raw: bytes) -> bytes:
        return raw


_CODECS: dict[str, Codec] = {c.name: c for c in (MsgpackCodec(), JsonCodec(), RawCodec())}


def get_codec(codec: str | Codec) -> Codec:
    """Resolve a codec name ('msgpack', 'json', 'raw') or pass a codec object through.

    :raises ConfigurationError: if the name is unknown.
    """
    if isinstance(codec, str):
        try:
            return _CODECS[codec]
        except KeyError:
            raise ConfigurationError(
                f"unknown codec {codec!r}; use one of {', '.join(sorted(_CODECS))}"
            ) from None
    if not (callable(getattr(codec, "encode", None)) and callable(getattr(codec, "decode", None))):
        raise ConfigurationError(f"codec must be a name or have encode/decode, got {codec!r}")
    return codec


_HEADERS = MsgpackCodec()


def pack_headers(headers: dict[str, str] | None) -> bytes | None:
    """Encode headers (a str -> str map) for the ``h`` field, or None when there are none."""
    if not headers:
        return None
    for k, v in headers.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"headers must map str to str, got {k!r}: {v!r}")
    return _HEADERS.encode(headers)


def unpack_headers(raw: bytes | None) -> dict[str, str]:
    """Decode the ``h`` field; raises ValueError when it is not a map."""
    if not raw:
        return {}
    value = _HEADERS.decode(raw)
    if not isinstance(value, dict):
        raise ValueError(f"headers are not a map but {type(value).__name__}")
    return {str(k): v if isinstance(v, str) else str(v) for k, v in value.items()}


def fast_decoder(codec: Codec) -> Callable[[bytes], Any]:
    """The codec's decode for the hot path: for msgpack the C function itself, with its default
    options (no Python frame per message, no keyword arguments merged per call: ``raw=False``
    is msgpack's default, and a map with keys other than str or bytes, which
    ``strict_map_key`` refuses, raises here and is decoded by ``codec.decode`` instead, with
    the same result). It may raise anything on bad input; callers fall back to
    ``codec.decode``, which reports the error."""
    if type(codec) is MsgpackCodec:
        return _UNPACK
    return codec.decode


_UNPACK: Callable[[bytes], Any] = msgpack.unpackb
