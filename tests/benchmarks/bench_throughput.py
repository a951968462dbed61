"""Kept for old instructions: ``python -m tests.benchmarks.bench_throughput [N]`` is
``python -m tests.benchmarks --only publish,consume -n N``."""

from __future__ import annotations

import sys

from .__main__ import main

if __name__ == "__main__":
    n = sys.argv[1] if len(sys.argv) > 1 else "100000"
    main(["--only", "publish,consume", "-n", n, *sys.argv[2:]])
