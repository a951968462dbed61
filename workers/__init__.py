"""The worker runtime, on top of the ``broker`` library.

- :func:`serve`: run one worker slot (consumer or producer) until a stop.
- :class:`Supervisor`: run N slots as processes on this host, restart crashed ones.
- :func:`list_workers`: heartbeats of every worker of a namespace, on every host.
"""

from ._health import WorkerStatus, list_workers
from ._serve import serve
from ._spec import WorkerSpec, load_target
from ._supervisor import Supervisor

__all__ = ["Supervisor", "WorkerSpec", "WorkerStatus", "list_workers", "load_target", "serve"]
