"""Connection settings: one frozen dataclass, built from a URL."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit, urlunsplit

from ._errors import ConfigurationError
from ._retry import RetryPolicy

__all__ = ["DEFAULT_URL", "Endpoint", "Settings", "parse_endpoint", "redact_url"]

DEFAULT_URL = "redis://localhost:6379/0"
_SCHEMES = (
    "redis",
    "rediss",
    "unix",
    "redis+cluster",
    "rediss+cluster",
    "redis+sentinel",
    "rediss+sentinel",
)
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.\-:]{1,64}")
#: namespace endings whose channel keys would be another namespace's own keys
_RESERVED_SUFFIXES = {"watch": "watched values'", "stop": "stop records'"}


def redact_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``***`` (safe for logs and errors).

    Works on the text of the netloc only, so it also redacts URLs that do not parse (a bad
    port, say): the error about such a URL must not show the password either.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    query = _SENTINEL_SECRET.sub(r"\1***", parts.query)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        if query == parts.query:
            return url
        return urlunsplit(parts._replace(query=query))
    user = userinfo.split(":", 1)[0]
    netloc = f"{user}:***@{hostport}"
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


#: the sentinels' own password, a query option of a Sentinel URL (masked like the password)
_SENTINEL_SECRET = re.compile(r"((?:^|&)sentinel_password=)[^&]*")
#: query options that are the sentinels' credentials, not the data nodes'
SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")


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
    #: seconds a requester's reply inbox outlives the requester (refreshed every third of it)
    reply_ttl: float = 60.0

    def __post_init__(self) -> None:
        parse_endpoint(self.url)
        if not _NAMESPACE_RE.fullmatch(self.namespace):  # `$` would let a final newline in
            raise ConfigurationError(
                f"namespace must be 1-64 characters of letters, digits, '_', '-', '.', ':', "
                f"got {self.namespace!r}"
            )
        base, _, last = self.namespace.rpartition(":")
        if base and last in _RESERVED_SUFFIXES:
            # channel keys are `<namespace>:{<channel>}`: those of `app:watch` would be the
            # watched values' keys of `app` (`app:watch:{<name>}`), and so for stop records
            raise ConfigurationError(
                f"namespace {self.namespace!r} ends in ':{last}': its channels' keys would be "
                f"the {_RESERVED_SUFFIXES[last]} keys of namespace {base!r}; choose another"
            )
        if self.reconnect_deadline < 0 or self.connect_timeout <= 0:
            raise ConfigurationError("reconnect_deadline must be >= 0 and connect_timeout > 0")
        if self.max_payload < 1:
            raise ConfigurationError(f"max_payload must be >= 1, got {self.max_payload}")
        if not self.reply_ttl >= 0.3:
            raise ConfigurationError(f"reply_ttl must be >= 0.3 seconds, got {self.reply_ttl!r}")

    @classmethod
    def from_url(cls, url: str | None = None, **options: Any) -> Settings:
        """Build settings from ``url``, else ``$BROKER_URL``, else ``redis://localhost:6379/0``.

        ``namespace`` defaults to ``$BROKER_NAMESPACE`` or ``broker``.

        :raises ConfigurationError: if the URL is not one of ``redis://``, ``rediss://``,
            ``unix://``, ``redis+cluster://`` or ``redis+sentinel://`` (``rediss+`` for TLS).
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
    def endpoint(self) -> Endpoint:
        """What the URL points at (one server, a cluster, a Sentinel set)."""
        return parse_endpoint(self.url)

    @property
    def safe_url(self) -> str:
        """The URL with the password masked."""
        return redact_url(self.url)


_EXAMPLE = (
    "redis://[user:password@]host:6379/0, rediss://host:6380/0, unix:///path/redis.sock, "
    "redis+cluster://host:7000[,host:7001...] or "
    "redis+sentinel://[user:password@]host:26379[,host:26380...]/service_name[/db]"
    "[?sentinel_password=...]"
)


def _split_hosts(url: str, hostlist: str) -> list[tuple[str, int]]:
    """``h1:p1,h2:p2`` (IPv6 in brackets) as ``[(host, port), ...]``."""
    hosts: list[tuple[str, int]] = []
    for part in hostlist.split(","):
        host, sep, port = part.rpartition(":")
        if not sep:
            host, port = part, ""
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host:
            raise ConfigurationError(f"URL {redact_url(url)!r} has an empty host; use {_EXAMPLE}")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigurationError(
                f"invalid URL {redact_url(url)!r} (port {port!r} of host {host!r}); use {_EXAMPLE}"
            )
        hosts.append((host, int(port)))
    return hosts


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """What a URL points at: one server, a cluster (its seed nodes) or a Sentinel set."""

    #: "single", "cluster" or "sentinel"
    kind: str
    #: a single-server URL redis-py understands (for a cluster or Sentinel: the first host's,
    #: which carries the user, password, TLS and query options for every node)
    node_url: str
    hosts: list[tuple[str, int]]
    #: the Sentinel service (master) name
    service: str | None = None
    db: int = 0
    #: the sentinels' own credentials (``?sentinel_username=&sentinel_password=``), for
    #: sentinels started with ``requirepass`` or an ACL; the URL's user and password are the
    #: data nodes'
    sentinel_username: str | None = None
    sentinel_password: str | None = dataclasses.field(default=None, repr=False)


def _urlsplit(url: str) -> SplitResult:
    """``urlsplit``, except that a list of hosts (``h1:1,[::1]:2``) is kept as it is: the
    bracket checks of some Python releases (Debian 12's 3.11.2) refuse a list with an IPv6
    host as an "Invalid IPv6 URL"; the hosts are split and checked by :func:`_split_hosts`."""
    scheme, sep, rest = url.partition("://")
    ends = [i for i in (rest.find(c) for c in "/?#") if i >= 0]
    netloc = rest[: min(ends, default=len(rest))]
    if not sep or "," not in netloc:
        return urlsplit(url)
    return urlsplit(f"{scheme}://host{rest[len(netloc) :]}")._replace(netloc=netloc)


def parse_endpoint(url: str) -> Endpoint:
    """Check ``url`` and say what it points at.

    :raises ConfigurationError: with a sentence that shows valid URLs.
    """
    try:
        parts = _urlsplit(url)
    except ValueError as exc:
        raise ConfigurationError(
            f"invalid URL {redact_url(url)!r} ({exc}); use {_EXAMPLE}"
        ) from None
    scheme = parts.scheme
    if scheme not in _SCHEMES:
        raise ConfigurationError(
            f"unsupported URL scheme {scheme!r} in {redact_url(url)!r}; use {_EXAMPLE}"
        )
    if scheme == "unix":
        if not parts.path:
            raise ConfigurationError(f"a unix URL needs a socket path; use {_EXAMPLE}")
        return Endpoint("single", url, [])
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    if not hostlist:
        raise ConfigurationError(f"URL {redact_url(url)!r} has no host; use {_EXAMPLE}")
    base, _, kind = scheme.partition("+")
    path = parts.path.strip("/")
    options = parse_qsl(parts.query, keep_blank_values=True)
    sentinel_auth = {k: v for k, v in options if k in SENTINEL_OPTIONS}
    if sentinel_auth and kind != "sentinel":
        raise ConfigurationError(
            f"{' and '.join(sorted(sentinel_auth))} in {redact_url(url)!r}: the sentinels' "
            "credentials are options of a redis+sentinel:// URL only"
        )
    if "sentinel_username" in sentinel_auth and not sentinel_auth.get("sentinel_password"):
        raise ConfigurationError(
            f"sentinel_username without sentinel_password in {redact_url(url)!r}"
        )
    if kind == "sentinel":
        hosts = _split_hosts(url, hostlist)
        service, _, db = path.partition("/")
        if not service:
            raise ConfigurationError(
                f"a Sentinel URL names its service: {redact_url(url)!r}; use {_EXAMPLE}"
            )
        if db and not db.isdigit():
            raise ConfigurationError(
                f"database in {redact_url(url)!r} must be a number, got {db!r}"
            )
    else:
        if kind == "cluster":
            hosts = _split_hosts(url, hostlist)
            if path not in ("", "0"):
                raise ConfigurationError(
                    f"a cluster has database 0 only, got {path!r} in {redact_url(url)!r}"
                )
            db = ""
        else:
            if "," in hostlist:
                raise ConfigurationError(
                    f"several hosts in {redact_url(url)!r}: use redis+cluster:// for a cluster "
                    "or redis+sentinel:// for Sentinel"
                )
            try:
                parts.port  # noqa: B018 - raises ValueError on a bad port
            except ValueError as exc:
                raise ConfigurationError(
                    f"invalid URL {redact_url(url)!r} ({exc}); use {_EXAMPLE}"
                ) from None
            if not parts.hostname:
                raise ConfigurationError(f"URL {redact_url(url)!r} has no host; use {_EXAMPLE}")
            if path and not path.isdigit():
                raise ConfigurationError(
                    f"database in {redact_url(url)!r} must be a number, got {path!r}"
                )
            return Endpoint("single", url, [], db=int(path or 0))
    host, port = hosts[0]
    shown = f"[{host}]" if ":" in host else host
    node_netloc = f"{userinfo}{at}{shown}:{port}"
    query = parts.query
    if sentinel_auth:  # the data nodes' options without the sentinels' credentials
        query = urlencode([(k, v) for k, v in options if k not in SENTINEL_OPTIONS])
    node_url = urlunsplit((base, node_netloc, "/0", query, ""))
    if kind != "sentinel":
        return Endpoint(kind, node_url, hosts, None, int(db or 0))
    return Endpoint(
        kind,
        node_url,
        hosts,
        service,
        int(db or 0),
        sentinel_username=sentinel_auth.get("sentinel_username") or None,
        sentinel_password=sentinel_auth.get("sentinel_password") or None,
    )
