"""One supervised worker process: ``python -m broker.workers.child NAME SLOT``, its spec in
the environment.

The spec (JSON) is in ``$BROKER_WORKER_SPEC``; NAME is only there for ``ps``.

Exits with the :class:`workers.ExitCode` of the slot (2 on a configuration error, 1 when the
worker failed; both are logged by :func:`workers.serve`).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Coroutine
from typing import Any

from broker import ConfigurationError

from ._logging import configure
from ._serve import ExitCode, Outcome, serve
from ._spec import SPEC_ENV, WorkerSpec
from ._target import import_from_current_folder


def main() -> int:
    spec = WorkerSpec.from_json(os.environ.pop(SPEC_ENV))  # not inherited by the handler's children
    slot = int(sys.argv[2])
    import_from_current_folder()
    configure(spec.log_level, spec.log_format, worker=spec.worker_id(slot), pid=os.getpid())
    try:
        outcome = _run(serve(spec, slot, install_signals=True))
    except ConfigurationError:
        return ExitCode.USAGE
    except Exception:
        return ExitCode.FAILED
    return outcome.exit_code


def _run(main: Coroutine[Any, Any, Outcome]) -> Outcome:
    """On uvloop when it is installed (the ``broker[uvloop]`` extra) and not turned off with
    ``BROKER_UVLOOP=0``: the same code, less CPU per message."""
    if os.environ.get("BROKER_UVLOOP", "1") != "0":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            outcome: Outcome = uvloop.run(main)  # typed Any where uvloop is not installed
            return outcome
    return asyncio.run(main)


if __name__ == "__main__":
    raise SystemExit(main())
