"""Connection settings: one frozen dataclass, built from a URL."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ._errors import ConfigurationError
from ._retry import RetryPolicy

__all__ = ["DEFAULT_URL", "Settings", "redact_url"]

DEFAULT_URL = "redis://localhost:6379/0"
_SCHEMES = ("redis", "rediss", "unix")
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.\-:]{1,64}$")


def redact_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``***`` (safe for logs and errors).

    Works on the text of the netloc only, so it also redacts URLs that do not parse (a bad
    port, say): the error about such a URL must not show the password either.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    netloc = f"{user}:***@{hostport}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclasses.dataclass(frozen=True)
class Settings:
    """Where the server is and how to talk to it.

    ``url`` is never shown in ``repr``; use :attr:`safe_url` in messages.
    """

    url: str = dataclasses.field(default=DEFAULT_URL, repr=False)
    namespace: str = "broker"
    #: seconds to keep retrying a lost connection before raising ConnectionLostError
    reconnect_deadline: float = 30.0
    connect_timeout: float = 5.0
    #: bound on the payload size accepted by decoders, in bytes
    max_payload: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        _check_url(self.url)
        if not _NAMESPACE_RE.match(self.namespace):
            raise ConfigurationError(
                f"namespace must be 1-64 characters of letters, digits, '_', '-', '.', ':', "
                f"got {self.namespace!r}"
            )
        if self.reconnect_deadline < 0 or self.connect_timeout <= 0:
            raise ConfigurationError("reconnect_deadline must be >= 0 and connect_timeout > 0")
        if self.max_payload < 1:
            raise ConfigurationError(f"max_payload must be >= 1, got {self.max_payload}")

    @classmethod
    def from_url(cls, url: str | None = None, **options: Any) -> Settings:
        """Build settings from ``url``, else ``$BROKER_URL``, else ``redis://localhost:6379/0``.

        ``namespace`` defaults to ``$BROKER_NAMESPACE`` or ``broker``.

        :raises ConfigurationError: if the URL's scheme is not redis, rediss or unix.
        """
        url = url or os.environ.get("BROKER_URL") or DEFAULT_URL
        options.setdefault("namespace", os.environ.get("BROKER_NAMESPACE") or "broker")
        return cls(url=url, **options)

    @property
    def stall_timeout(self) -> float:
        """Seconds of silence after which a connection counts as lost (a stalled server)."""
        return max(15.0, 3 * self.connect_timeout)

    @property
    def retry(self) -> RetryPolicy:
        """The reconnect policy: outages last at most ``reconnect_deadline``; one attempt gets
        what is left of it, at least ``connect_timeout``, at most :attr:`stall_timeout`."""
        return RetryPolicy(self.reconnect_deadline, self.connect_timeout, self.stall_timeout)

    @property
    def safe_url(self) -> str:
        """The URL with the password masked."""
        return redact_url(self.url)


def _check_url(url: str) -> None:
    example = "redis://[user:password@]host:6379/0, rediss://host:6380/0 or unix:///path/redis.sock"
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigurationError(
            f"invalid URL {redact_url(url)!r} ({exc}); use {example}"
        ) from None
    if parts.scheme not in _SCHEMES:
        raise ConfigurationError(
            f"unsupported URL scheme {parts.scheme!r} in {redact_url(url)!r}; use {example}"
        )
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigurationError(f"a unix URL needs a socket path; use {example}")
        return
    if not parts.hostname:
        raise ConfigurationError(f"URL {redact_url(url)!r} has no host; use {example}")
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ConfigurationError(f"database in {redact_url(url)!r} must be a number, got {db!r}")
    del port
