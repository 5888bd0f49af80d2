"""Backends the contract suite runs against."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tidings import Bus

BusFactory = Callable[..., Bus]


@pytest.fixture(params=["memory", "sqlite", "sqlite-msgpack"])
def backend_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def make_bus(backend_name: str, tmp_path: Path) -> BusFactory:
    """Make buses on one store: the same file for sqlite, fresh memory otherwise."""

    def make(**options: Any) -> Bus:
        if backend_name == "memory":
            options.setdefault("check_serializable", True)
            options.pop("consume", None)
            return Bus(**options)
        codec = "msgpack" if backend_name.endswith("msgpack") else "json"
        options.setdefault("backend", f"sqlite:///{tmp_path / 'events.db'}?codec={codec}")
        bus = Bus(**options)
        bus.backend.poll_s = 0.01  # type: ignore[attr-defined]
        return bus

    return make
