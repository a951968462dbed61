"""The benchmark harness on a private redis-server: ``python -m tests.benchmarks [OPTIONS]``.

The options are those of ``broker bench`` (``--quick``, ``--only``, ``--repeat``, ``--json``,
...; see ``broker bench --help``). Unlike ``broker bench``, this always starts its own server,
even when ``BROKER_URL`` is set. Not part of the test run.
"""

from __future__ import annotations

import sys

from broker import EmbeddedServer
from broker.cli.main import cli


def main(argv: list[str]) -> None:
    with EmbeddedServer() as server:
        print(f"private redis-server {server.binary} at {server.url}", file=sys.stderr)
        # click's standalone mode ends with SystemExit: the server still stops on the way out
        cli.main(["--url", server.url, "bench", *argv], prog_name="python -m tests.benchmarks")


if __name__ == "__main__":
    main(sys.argv[1:])
