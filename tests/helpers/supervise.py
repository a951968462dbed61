"""Run a Supervisor in its own process, logging JSON lines to stderr.

usage: python -m tests.helpers.supervise SPEC_JSON [PROCESSES [BACKOFF]]
"""

from __future__ import annotations

import sys

from broker.workers import Supervisor, WorkerSpec, configure_logging

if __name__ == "__main__":
    spec = WorkerSpec.from_json(sys.argv[1])
    processes = int(sys.argv[2]) if len(sys.argv) > 2 else None
    backoff = float(sys.argv[3]) if len(sys.argv) > 3 else 0.5
    configure_logging(spec.log_level, "json", role="supervisor")
    sys.exit(Supervisor(spec, processes, backoff=backoff).run())
