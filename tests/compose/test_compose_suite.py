"""``docker compose run --rm tests``: the unit and integration tiers inside the stack.

The ``tests`` service (compose.yaml, profile ``tests``) runs on ``python:3.11-slim`` with the
repository mounted read-only, copies it, and runs ``bash .ci/test tests/unit tests/integration``
(without the cluster variants, which start their own cluster, not the stack's ``redis``)
with ``BROKER_TEST_URL`` pointing at the ``redis`` service (and ``BROKER_VENV=/tmp/venv``, an
absolute path: the ``.ci/setup`` case that once failed). Skipped with the reason where no engine
answers, except in CI (``CI=true`` or ``BROKER_REQUIRE_COMPOSE=1``).
"""

from __future__ import annotations

import re
import time

import pytest

from tests.compose.stack import Compose, report, skip_or_fail, why_not

pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]


def test_the_unit_and_integration_tiers_pass_inside_the_stack() -> None:
    why = why_not()
    if why:
        skip_or_fail(why)
    compose = Compose(["compose.yaml"], {})
    t0 = time.monotonic()
    try:
        done = compose.run("run", "--rm", "tests", timeout=840, check=False)
    finally:
        compose.down()
    out = done.stdout + done.stderr
    summary = [ln for ln in out.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    ran_on = [ln for ln in out.splitlines() if ln.startswith("broker tests ran on:")]
    skipped = [ln for ln in out.splitlines() if ln.startswith("SKIPPED")]
    report(
        "tests service",
        exit=done.returncode,
        pytest=summary[-1].strip("= ") if summary else "no summary",
        server=ran_on[-1].split(":", 1)[1].strip() if ran_on else "?",
        took=f"{time.monotonic() - t0:.1f}s",
        skipped=skipped or "none",
    )
    assert done.returncode == 0, out[-5000:]
    assert summary and " passed" in summary[-1] and "failed" not in summary[-1], summary
    assert ran_on and "BROKER_TEST_URL" in ran_on[-1], ran_on
    assert not skipped, skipped  # the one test a server without TLS cannot run is deselected
