"""The worker runtime, on top of the ``broker`` library.

- :func:`serve`: run one worker slot (consumer or producer) until a stop; returns an
  :class:`Outcome` whose ``exit_code`` is an :class:`ExitCode`.
- :class:`Supervisor`: run N slots as processes on this host, restart crashed ones.
- :func:`list_workers`, :func:`check_health`: heartbeats of every worker, on every host.
- :func:`inspect_target`: load ``package.module:function`` and tell consumer from producer.
"""

from ._health import WorkerStatus, check_health, list_workers
from ._logging import configure as configure_logging
from ._serve import ExitCode, Outcome, serve
from ._spec import WorkerSpec, this_host
from ._supervisor import Supervisor
from ._target import Target, inspect_target, load_target

__all__ = [
    "ExitCode",
    "Outcome",
    "Supervisor",
    "Target",
    "WorkerSpec",
    "WorkerStatus",
    "check_health",
    "configure_logging",
    "inspect_target",
    "list_workers",
    "load_target",
    "serve",
    "this_host",
]
