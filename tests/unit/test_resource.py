"""``cancel_all``: what a cleanup leaves behind."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from broker._resource import cancel_all


async def test_an_error_of_a_task_that_ended_before_the_cleanup_counts_as_retrieved() -> None:
    """Seen in the Sentinel tests: a subscription closed while its reader had failed printed
    "Task exception was never retrieved" (the failure nobody was left to handle)."""
    seen: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))

    async def fail() -> None:
        raise RuntimeError("the group was deleted")

    async def wait() -> None:
        await asyncio.sleep(30)

    failed, waiting = asyncio.create_task(fail()), asyncio.create_task(wait())
    await asyncio.sleep(0)
    assert failed.done()
    await cancel_all([failed, waiting])
    assert waiting.cancelled()
    del failed, waiting
    gc.collect()
    await asyncio.sleep(0)
    assert not [c for c in seen if "never retrieved" in str(c.get("message"))], seen
