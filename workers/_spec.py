"""What a worker runs and how: a frozen spec, serialisable to JSON for child processes."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Literal

from broker import ConfigurationError
from broker._names import check_channel, check_group, check_stop_name
from broker._names import host_label as this_host

__all__ = ["LOG_FORMATS", "LOG_LEVELS", "SPEC_ENV", "WorkerSpec", "this_host"]

#: the environment variable that hands a spec (JSON) to a child process
SPEC_ENV = "BROKER_WORKER_SPEC"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """A consumer (``kind="consume"``: ``async def handler(msg)``) or a producer
    (``kind="produce"``: an async generator, or ``async def producer(channel, stop_token)``).

    ``processes`` slots run on this host (see :class:`Supervisor`); each slot's consumer name is
    ``<name>-<host>-<slot>``. ``host`` overrides the hostname in consumer names and heartbeats
    (for hosts that share one, like network namespaces).
    """

    name: str
    kind: Literal["consume", "produce"]
    target: str
    channels: tuple[str, ...]
    group: str | None = None
    concurrency: int = 1
    group_concurrency: int | None = None
    #: deliveries after which a failing message goes to the channel's dead letters
    max_deliveries: int = 5
    #: seconds after which another consumer's pending message is claimed
    claim_idle: float = 60.0
    #: seconds running handlers get to finish after a stop, before they are cancelled
    grace: float = 10.0
    url: str | None = None
    namespace: str = "broker"
    start: str = "new"
    #: seconds between heartbeats; a heartbeat expires after three intervals
    heartbeat: float = 2.0
    processes: int = 1
    #: remote stop tokens that stop this worker, besides ``workers`` and ``workers/<name>``
    stop_tokens: tuple[str, ...] = ()
    host: str | None = None
    log_level: str = "info"
    log_format: str = "text"
    #: a consumer slot retires (finishes what it runs, exits, and the supervisor starts a
    #: fresh one at once) once its resident memory reaches this many MiB ...
    max_memory: int | None = None
    #: ... or once it handled this many messages (like gunicorn's max_requests)
    max_messages: int | None = None
    #: the channels have this many partitions (recorded on the server by the first process
    #: to use a channel; None: whatever is recorded, unpartitioned if nothing). Declare it on
    #: producers and consumers alike: whichever starts first creates the channel
    partitions: int | None = None
    #: slot N serves Prometheus ``/metrics`` on ``metrics_port + N`` (None: no metrics)
    metrics_port: int | None = None
    metrics_addr: str = "0.0.0.0"

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ConfigurationError(
                f"worker name must be 1-64 of [A-Za-z0-9_.-], got {self.name!r}"
            )
        if self.kind not in ("consume", "produce"):
            raise ConfigurationError(f"kind must be 'consume' or 'produce', got {self.kind!r}")
        if not self.channels:
            raise ConfigurationError("a worker needs at least one --channel")
        for ch in self.channels:
            check_channel(ch)
        for token in self.stop_tokens:
            check_stop_name(token)
        if self.kind == "consume":
            if self.group is None:
                raise ConfigurationError("a consumer needs a --group")
            check_group(self.group)
        else:
            if self.group is not None:
                raise ConfigurationError("a producer takes no --group (it publishes)")
            if len(self.channels) != 1:
                raise ConfigurationError(
                    f"a producer publishes into one --channel, got {len(self.channels)}"
                )
            if self.max_memory is not None or self.max_messages is not None:
                raise ConfigurationError(
                    "--max-memory and --max-messages are for consumers (a producer is not "
                    "restarted where it left off)"
                )
        for label, value in (
            ("concurrency", self.concurrency),
            ("group_concurrency", self.group_concurrency),
            ("max_deliveries", self.max_deliveries),
            ("processes", self.processes),
            ("max_memory", self.max_memory),
            ("max_messages", self.max_messages),
            ("partitions", self.partitions),
        ):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigurationError(f"{label} must be an int >= 1, got {value!r}")
        if self.start not in ("new", "all") and not re.fullmatch(r"\d+(-\d+)?", self.start):
            raise ConfigurationError(
                f"start must be 'new', 'all' or an entry id, got {self.start!r}"
            )
        if self.grace < 0 or self.heartbeat <= 0 or self.claim_idle <= 0:
            raise ConfigurationError(
                "grace must be >= 0 seconds, heartbeat and claim_idle > 0 seconds"
            )
        if self.metrics_port is not None and not 0 < self.metrics_port <= 65536 - self.processes:
            raise ConfigurationError(
                f"metrics_port must leave room for {self.processes} slot(s) below 65536, "
                f"got {self.metrics_port}"
            )
        if self.log_level not in LOG_LEVELS or self.log_format not in LOG_FORMATS:
            raise ConfigurationError(
                f"log_level must be one of {LOG_LEVELS} and log_format one of {LOG_FORMATS}"
            )

    @property
    def hostname(self) -> str:
        return this_host(self.host)

    def consumer_name(self, slot: int) -> str:
        """Stable per (worker, host, slot): a restarted slot replays its own pending entries."""
        return f"{self.name}-{self.hostname}-{slot}"

    def worker_id(self, slot: int) -> str:
        """``<name>/<host>/<slot>``: the heartbeat's id."""
        return f"{self.name}/{self.hostname}/{slot}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        data: dict[str, Any] = json.loads(text)
        data["channels"] = tuple(data["channels"])
        data["stop_tokens"] = tuple(data.get("stop_tokens", ()))
        return cls(**data)
