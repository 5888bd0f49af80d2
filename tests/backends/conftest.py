"""Backends the contract suite runs against."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tidings import Bus

from ..services import (
    POSTGRES_URL,
    REDIS_URL,
    drop_prefix,
    drop_schema,
    require_postgres,
    require_redis,
    unique_prefix,
    unique_schema,
)

BusFactory = Callable[..., Bus]
#: Makes this test's store hold something other than tidings' data; the driver's error.
BreakStore = Callable[[], Awaitable[type[Exception]]]


@pytest.fixture(params=["memory", "sqlite", "sqlite-msgpack", "redis", "redis-msgpack", "postgres"])
def backend_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
async def redis_prefix(backend_name: str) -> AsyncIterator[str]:
    """A key prefix of this test's own on the machine's Redis, deleted afterwards."""
    if not backend_name.startswith("redis"):
        yield ""
        return
    require_redis()
    prefix = unique_prefix()
    try:
        yield prefix
    finally:
        await drop_prefix(prefix)


@pytest.fixture
async def pg_schema(backend_name: str) -> AsyncIterator[str]:
    """A schema of this test's own on the machine's PostgreSQL, dropped afterwards."""
    if not backend_name.startswith("postgres"):
        yield ""
        return
    require_postgres()
    schema = unique_schema()
    try:
        yield schema
    finally:
        await drop_schema(schema)


@pytest.fixture
def make_bus(backend_name: str, tmp_path: Path, redis_prefix: str, pg_schema: str) -> BusFactory:
    """Make buses on one store: the same file for sqlite, the same key prefix for
    redis, fresh memory otherwise."""

    def make(**options: Any) -> Bus:
        if backend_name == "memory":
            options.setdefault("check_serializable", True)
            options.pop("consume", None)
            return Bus(**options)
        codec = "msgpack" if backend_name.endswith("msgpack") else "json"
        if backend_name.startswith("redis"):
            url = f"{REDIS_URL}?prefix={redis_prefix}&codec={codec}"
        elif backend_name.startswith("postgres"):
            url = f"{POSTGRES_URL}?schema={pg_schema}&codec={codec}"
        else:
            url = f"sqlite:///{tmp_path / 'events.db'}?codec={codec}"
        options.setdefault("backend", url)
        bus = Bus(**options)
        bus.backend.poll_s = 0.01  # type: ignore[attr-defined]
        return bus

    return make


@pytest.fixture
def break_store(backend_name: str, tmp_path: Path, redis_prefix: str, pg_schema: str) -> BreakStore:
    """Overwrite what the store keeps of its listeners and deliveries (as an operator's
    mistake would), so that reading it fails in the driver; the driver's base error."""

    async def breaks() -> type[Exception]:
        if backend_name.startswith("redis"):
            from redis.asyncio import Redis
            from redis.exceptions import RedisError

            client = Redis.from_url(REDIS_URL)
            try:
                for key in ("dead", "listeners"):
                    await client.set(f"{redis_prefix}:{key}", "not tidings' data")
            finally:
                await client.aclose()
            return RedisError
        if backend_name.startswith("postgres"):
            import asyncpg

            conn = await asyncpg.connect(POSTGRES_URL)
            try:
                await conn.execute(f"DROP TABLE {pg_schema}.deliveries, {pg_schema}.listeners")
            finally:
                await conn.close()
            error: type[Exception] = asyncpg.PostgresError
            return error
        with sqlite3.connect(tmp_path / "events.db") as db:
            db.execute("DROP TABLE tidings_deliveries")
            db.execute("DROP TABLE tidings_listeners")
        return sqlite3.Error

    return breaks
