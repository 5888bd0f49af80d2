"""The machine's services the tests use for real: reachable, or the test skips (fails
under ``CI=true``, where every service must be up).

``TIDINGS_TEST_REDIS`` and ``TIDINGS_TEST_POSTGRES`` point the tests at other servers.
By default they use Redis database 15 on 127.0.0.1:6379 (not 0, which apps use) and
the PostgreSQL database ``test`` on 127.0.0.1:5432; each test keeps to a key prefix or
schema of its own and removes it afterwards.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from urllib.parse import urlsplit

import pytest

REDIS_URL = os.environ.get("TIDINGS_TEST_REDIS", "redis://127.0.0.1:6379/15")
POSTGRES_URL = os.environ.get("TIDINGS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def require(service: str, host: str, port: int) -> None:
    """Skip (or fail under CI) unless ``host:port`` accepts connections."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return
    except OSError as exc:
        reason = f"{service} is not reachable on {host}:{port} ({exc})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI needs every service", pytrace=False)
    pytest.skip(reason)


def _address(url: str, port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or port


def require_redis() -> None:
    require("Redis", *_address(REDIS_URL, 6379))


def require_postgres() -> None:
    require("PostgreSQL", *_address(POSTGRES_URL, 5432))


def unique_schema() -> str:
    """A PostgreSQL schema name no other test uses."""
    return f"tidings_test_{uuid.uuid4().hex[:12]}"


async def drop_schema(schema: str, url: str = POSTGRES_URL) -> None:
    """Drop ``schema`` and everything in it."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


def unique_prefix() -> str:
    """A key prefix no other test uses."""
    return f"tidings-test-{uuid.uuid4().hex[:12]}"


async def drop_prefix(prefix: str, url: str = REDIS_URL) -> None:
    """Delete every key under ``prefix``."""
    from redis.asyncio import Redis

    redis = Redis.from_url(url)
    try:
        keys = [key async for key in redis.scan_iter(match=f"{prefix}:*", count=1000)]
        for start in range(0, len(keys), 1000):
            await redis.delete(*keys[start : start + 1000])
    finally:
        await redis.aclose()


def drop_prefix_now(prefix: str, url: str = REDIS_URL) -> None:
    """:func:`drop_prefix`, for code outside an event loop."""
    asyncio.run(drop_prefix(prefix, url))
