"""What a worker runs: a frozen spec, serialisable to JSON for child processes."""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import socket
from collections.abc import Callable
from typing import Any, Literal

from broker import ConfigurationError
from broker._names import check_channel, check_group

__all__ = ["WorkerSpec", "load_target"]


def load_target(target: str) -> Callable[..., Any]:
    """Import ``"package.module:function"``.

    :raises ConfigurationError: if it is malformed, missing or not callable.
    """
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(f"target must look like 'package.module:function', got {target!r}")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"cannot load {target!r}: {exc}") from exc
    if not callable(obj):
        raise ConfigurationError(f"{target!r} is not callable")
    return obj  # type: ignore[no-any-return]


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """A consumer (``kind="consume"``: ``async def handler(msg)``) or a producer
    (``kind="produce"``: ``async def producer(channel, stop_token)``)."""

    name: str
    kind: Literal["consume", "produce"]
    target: str
    channels: tuple[str, ...]
    group: str | None = None
    concurrency: int = 1
    group_concurrency: int | None = None
    #: seconds running handlers get to finish after a stop, before they are cancelled
    grace: float = 10.0
    url: str | None = None
    namespace: str = "broker"
    start: str = "new"
    heartbeat: float = 2.0

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", self.name):
            raise ConfigurationError(
                f"worker name must be 1-64 of [A-Za-z0-9_.-], got {self.name!r}"
            )
        if self.kind not in ("consume", "produce"):
            raise ConfigurationError(f"kind must be 'consume' or 'produce', got {self.kind!r}")
        if not self.channels:
            raise ConfigurationError("a worker needs at least one channel")
        for ch in self.channels:
            check_channel(ch)
        if self.kind == "consume":
            if self.group is None:
                raise ConfigurationError("a consuming worker needs a group")
            check_group(self.group)
        if self.concurrency < 1 or (
            self.group_concurrency is not None and self.group_concurrency < 1
        ):
            raise ConfigurationError("concurrency and group_concurrency must be >= 1")
        if self.start not in ("new", "all") and not re.fullmatch(r"\d+(-\d+)?", self.start):
            raise ConfigurationError(
                f"start must be 'new', 'all' or an entry id, got {self.start!r}"
            )
        if self.grace < 0 or self.heartbeat <= 0:
            raise ConfigurationError("grace must be >= 0 and heartbeat > 0 seconds")

    def consumer_name(self, slot: int) -> str:
        """Stable per (worker, host, slot): a restarted slot replays its own pending entries."""
        host = re.sub(r"[^A-Za-z0-9_.\-]", "-", socket.gethostname())[:60] or "host"
        return f"{self.name}-{host}-{slot}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        data = json.loads(text)
        data["channels"] = tuple(data["channels"])
        return cls(**data)
