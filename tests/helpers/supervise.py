"""Run a Supervisor in its own process: python -m tests.helpers.supervise SPEC_JSON PROCESSES"""

from __future__ import annotations

import logging
import sys

from workers import Supervisor, WorkerSpec

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(Supervisor(WorkerSpec.from_json(sys.argv[1]), int(sys.argv[2])).run())
