"""The progress bars of long commands: rich when installed, click's bar otherwise."""

from __future__ import annotations

import io
import sys

import pytest

from cli._progress import progress


def test_rich_draws_items_done_of_total() -> None:
    out = io.StringIO()
    with progress(3000, "replaying", file=out) as advance:
        for _ in range(3):
            advance(1000)
    text = out.getvalue()
    assert "replaying" in text and "3000/3000" in text and "100%" in text and "━" in text


def test_bytes_are_shown_as_sizes() -> None:
    out = io.StringIO()
    with progress(2_000_000, "publishing", file=out, bytes_=True) as advance:
        advance(2_000_000)
    assert "publishing" in out.getvalue() and "2.0/2.0 MB" in out.getvalue()


def test_without_rich_click_draws_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rich", None)  # `import rich` raises ImportError
    out = io.StringIO()
    with progress(10, "replaying", file=out) as advance:
        advance(10)
    assert "replaying" in out.getvalue() and "━" not in out.getvalue()
