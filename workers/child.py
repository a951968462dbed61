"""Entry point of one supervised worker process: ``python -m workers.child SPEC_JSON SLOT``."""

from __future__ import annotations

import asyncio
import logging
import sys

from ._serve import serve
from ._spec import WorkerSpec


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    spec = WorkerSpec.from_json(sys.argv[1])
    asyncio.run(serve(spec, int(sys.argv[2]), install_signals=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
