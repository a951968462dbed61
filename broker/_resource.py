"""The shape of every resource: an async context manager whose ``aclose()`` is idempotent."""

from __future__ import annotations

import abc
from types import TracebackType

__all__ = ["AsyncResource"]


class AsyncResource(abc.ABC):
    """``async with resource:`` closes it on exit, whatever happened (see trio's AsyncResource)."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release everything; safe to call twice, releases even when it fails midway."""

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
