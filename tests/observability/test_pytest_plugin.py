"""The pytest plugin, as its users get it: a fresh pytest process in a folder of their own.

Loaded through the package's ``pytest11`` entry point (nothing configured), it must be harmless
to a project that uses none of its fixtures, and the README's "Testing your handlers" example,
taken from the README itself, must pass as written.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
import sys
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
#: the user's environment: none of the project's settings
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "PYTEST_"))}


async def pytest_in(
    folder: pathlib.Path, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str]:
    if "no:asyncio" not in args:
        # pytest-asyncio itself warns when a project leaves this unset (not the plugin's doing)
        args = ("-o", "asyncio_default_fixture_loop_scope=function", *args)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pytest",
        "-W",
        "error",
        "-p",
        "no:cacheprovider",
        *args,
        cwd=folder,
        env={**ENV, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out.decode()


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Testing your handlers", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return code


async def test_harmless_to_a_project_that_uses_none_of_it(tmp_path: pathlib.Path) -> None:
    (tmp_path / "test_plain.py").write_text("def test_ok():\n    assert True\n")
    code, out = await pytest_in(tmp_path, "-q")
    assert code == 0 and "1 passed" in out, out
    assert "broker tests ran on" not in out, out  # no server was started
    assert "warning" not in out.lower(), out
    code, out = await pytest_in(tmp_path, "-q", "-p", "no:asyncio")  # without pytest-asyncio
    assert code == 0 and "1 passed" in out and "warning" not in out.lower(), out
    code, listed = await pytest_in(tmp_path, "--fixtures", "-q")
    assert code == 0, listed
    for fixture in ("broker_url", "broker_namespace", "broker_client"):
        assert fixture in listed, listed


async def test_the_readme_example_passes_on_a_server_of_its_own(tmp_path: pathlib.Path) -> None:
    """No BROKER_TEST_URL: the plugin starts (and stops) a private local server."""
    (tmp_path / "test_billing.py").write_text(readme_example())
    code, out = await pytest_in(tmp_path, "-q")
    assert code == 0, out
    assert "2 passed" in out, out
    assert re.search(r"broker tests ran on: local \S*redis-server", out), out


async def test_on_a_given_server_the_example_leaves_no_key_behind(
    tmp_path: pathlib.Path, redis_url: str, raw: Any
) -> None:
    before = {k async for k in raw.scan_iter(count=1000)}
    (tmp_path / "test_billing.py").write_text(readme_example())
    code, out = await pytest_in(tmp_path, "-q", env={"BROKER_TEST_URL": redis_url})
    assert code == 0 and "2 passed" in out, out
    assert "broker tests ran on: BROKER_TEST_URL" in out, out
    after = {k async for k in raw.scan_iter(count=1000)}
    assert after - before == set(), sorted(after - before)[:10]


async def test_a_failing_handler_test_fails_with_the_reason(
    tmp_path: pathlib.Path, redis_url: str
) -> None:
    """The helper must be able to fail a user's test: a handler that never acks times out."""
    (tmp_path / "test_stuck.py").write_text(
        "import asyncio, pytest\n"
        "from broker.testing import run_handler\n\n"
        "async def stuck(msg):\n"
        "    await asyncio.sleep(60)\n\n"
        "@pytest.mark.asyncio\n"
        "async def test_stuck(broker_client):\n"
        "    await run_handler(broker_client, 'orders', stuck, [1], within=0.3)\n"
    )
    code, out = await pytest_in(tmp_path, "-q", env={"BROKER_TEST_URL": redis_url})
    assert code == 1, out
    assert "TimeoutError: 1 of 1 messages not settled after 0.3s" in out, out


def test_the_plugin_is_declared_as_a_pytest11_entry_point() -> None:
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="pytest11") if e.name == "broker"]
    assert ep.value == "broker.pytest_plugin"
