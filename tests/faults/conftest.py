"""The one fixture every fault scenario runs on: each durable backend in turn."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from .stores import STORES, DurableStore


@pytest.fixture(params=sorted(STORES))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[DurableStore]:
    """A durable store of this test's own (a file, a key prefix, a schema), deleted after."""
    durable = STORES[request.param](tmp_path)
    await durable.setup()
    try:
        yield durable
    finally:
        await durable.teardown()
