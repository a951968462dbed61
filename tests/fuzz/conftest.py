"""The fuzz tier: property tests (Hypothesis) run for a time budget instead of a fixed count.

Each target is an ordinary ``@given`` test body run in batches until its budget is spent:
``$BROKER_FUZZ_SECONDS`` seconds each (default 60; CI runs 24; ``BROKER_FUZZ_SECONDS=5``
for a quick local pass). A failure stops the run at once and Hypothesis prints the shrunk
example; each one found so far is also a regular test next to its target. The example counts
and times are printed in the summary at the end of the run.

Why Hypothesis and not atheris: what parses bytes here is either C (hiredis, msgpack) that
atheris cannot instrument without rebuilding it, or short Python whose branches structured
generators reach without coverage guidance; and Hypothesis shrinks what it finds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.strategies import SearchStrategy

#: seconds per fuzz target
BUDGET = float(os.environ.get("BROKER_FUZZ_SECONDS", "60"))
#: what each target did, for the summary line
RUNS: list[tuple[str, int, float]] = []

FUZZ = settings(
    database=None,  # CI starts clean; a failure prints its reproduction instead
    deadline=None,  # the machine is shared: timing is not a failure
    derandomize=False,
    phases=(Phase.generate, Phase.shrink),
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)


class Examples:
    """Counts the examples a target ran: call :meth:`hit` first thing in the test body."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0

    def hit(self) -> None:
        self.count += 1


def run_for(
    examples: Examples,
    body: Callable[..., None],
    *strategies: SearchStrategy[Any],
    budget: float | None = None,
    batch_seconds: float = 2.0,
) -> int:
    """Run ``given(*strategies)(body)`` in batches until ``budget`` seconds are spent.

    Each batch draws fresh random examples; a failing one raises at once (shrunk). Returns the
    number of examples run.
    """
    budget = BUDGET if budget is None else budget
    start = time.monotonic()
    size = 20
    while True:
        before = examples.count
        t0 = time.monotonic()
        settings(FUZZ, max_examples=size)(given(*strategies)(body))()
        took = time.monotonic() - t0
        ran = examples.count - before
        elapsed = time.monotonic() - start
        if elapsed >= budget:
            break
        # aim a batch at batch_seconds, and never much past the budget
        per = took / max(1, ran)
        room = min(batch_seconds, budget - elapsed)
        size = max(5, min(100_000, int(room / max(per, 1e-6))))
    RUNS.append((examples.name, examples.count, time.monotonic() - start))
    return examples.count


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A fuzz target runs for its budget: the suite's per-test timeout (which catches hangs)
    grows with it."""
    for item in items:
        if "tests/fuzz/" in item.nodeid.replace("\\", "/") and "fuzz" in item.name:
            item.add_marker(pytest.mark.timeout(max(120, int(2 * BUDGET) + 60)))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for name, examples, seconds in RUNS:
        terminalreporter.write_line(
            f"fuzz {name}: {examples} examples in {seconds:.1f}s ({examples / seconds:.0f}/s)"
        )
