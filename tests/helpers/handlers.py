"""Handlers loaded by worker tests through 'tests.helpers.handlers:NAME'."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import redis.asyncio as aioredis

import broker

recorded: list[str] = []
_redis: aioredis.Redis | None = None


async def record(msg: broker.Message[Any]) -> None:
    recorded.append(msg.id)


async def hang(msg: broker.Message[Any]) -> None:
    recorded.append(msg.id)
    await asyncio.sleep(3600)


async def record_redis(msg: broker.Message[Any]) -> None:
    """Slow-ish handler that records into ``$TEST_DONE_KEY`` on ``$TEST_REDIS_URL``."""
    global _redis
    if _redis is None:
        _redis = aioredis.Redis.from_url(os.environ["TEST_REDIS_URL"])
    await asyncio.sleep(0.05)
    await _redis.rpush(os.environ["TEST_DONE_KEY"], msg.id)
