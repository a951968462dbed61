"""Channel names and the Redis keys derived from them (the wire format's key layout)."""

from __future__ import annotations

import re
import socket

from ._errors import ConfigurationError

__all__ = [
    "channel_key",
    "check_channel",
    "check_group",
    "check_stop_name",
    "check_watch_name",
    "dead_key",
    "host_label",
    "inbox_key",
    "semaphore_key",
]


def host_label(host: str | None = None) -> str:
    """``host`` (or the machine's hostname) reduced to ``[A-Za-z0-9_.-]``, at most 60 long: the
    host part of consumer names and worker ids."""
    raw = host or socket.gethostname()
    return re.sub(r"[^A-Za-z0-9_.\-]", "-", raw)[:60] or "host"


MAX_NAME = 200
_NAME_RE = re.compile(r"[A-Za-z0-9_.:/@+=\-]+")
_ALLOWED = "letters, digits and _ . : / @ + = -"


def _check(kind: str, name: object) -> str:
    if not isinstance(name, str):
        raise ConfigurationError(f"{kind} name must be a str, got {type(name).__name__}")
    if not 1 <= len(name) <= MAX_NAME:
        raise ConfigurationError(f"{kind} name must be 1-{MAX_NAME} characters, got {len(name)}")
    if not _NAME_RE.fullmatch(name):  # not match(): `$` also matches before a final newline
        raise ConfigurationError(
            f"invalid {kind} name {name!r}: use only {_ALLOWED} (no braces, no whitespace)"
        )
    return name


def check_channel(name: object) -> str:
    """Return ``name`` if it is a valid channel name.

    :raises ConfigurationError: if it is empty, too long, or has braces, whitespace or other
        characters outside letters, digits and ``_ . : / @ + = -``.
    """
    return _check("channel", name)


def check_group(name: object) -> str:
    """Return ``name`` if it is a valid group or consumer name (same rules as channels)."""
    return _check("group", name)


def check_stop_name(name: object) -> str:
    """Return ``name`` if it is a valid stop token name (same rules as channels)."""
    return _check("stop token", name)


def check_watch_name(name: object) -> str:
    """Return ``name`` if it is a valid watched value name (same rules as channels)."""
    return _check("watch", name)


def channel_key(namespace: str, channel: str) -> str:
    """``<namespace>:{<channel>}``: the braces are a Cluster hash tag shared by companion keys."""
    return f"{namespace}:{{{channel}}}"


def dead_key(namespace: str, channel: str) -> str:
    """The channel's dead-letter stream (same hash slot as the channel)."""
    return f"{namespace}:{{{channel}}}:dead"


def semaphore_key(namespace: str, channel: str, group: str) -> str:
    """The lease set of a group-wide concurrency limit (same hash slot as the channel)."""
    return f"{namespace}:{{{channel}}}:sem:{group}"


def inbox_key(namespace: str, inbox: str) -> str:
    """``<namespace>:{reply~<inbox>}``: a requester's reply stream, in a slot of its own. ``~`` is
    not allowed in channel names, so no channel can collide, and :func:`channel_from_key` (hence
    ``broker.channels()``) does not take it for one."""
    return f"{namespace}:{{reply~{inbox}}}"


def channel_from_key(namespace: str, key: str) -> str | None:
    """Inverse of :func:`channel_key` (a partition's key ``{name#3}`` gives its channel's name);
    None when ``key`` is not a channel key of ``namespace``."""
    prefix = f"{namespace}:{{"
    if key.startswith(prefix) and key.endswith("}"):
        name = key[len(prefix) : -1]
        base, sep, part = name.rpartition("#")
        if sep and part.isascii() and part.isdigit():
            name = base
        if _NAME_RE.fullmatch(name):
            return name
    return None
