from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import pytest

import tidings
from tidings import _plugins
from tidings._plugins import INJECTORS, SCHEMAS, find, register, schema_validator
from tidings.errors import ConfigurationError

SRC = Path(tidings.__file__).parent


def test_the_fastapi_injector_is_found_by_its_entry_point() -> None:
    from tidings.contrib.fastapi import inject

    assert find(INJECTORS, "fastapi") is inject
    assert find(INJECTORS, "starlette") is inject


def test_the_pydantic_schema_plugin_is_found_by_its_entry_point() -> None:
    from tidings.contrib.pydantic import validator

    assert find(SCHEMAS, "pydantic") is validator


def test_a_package_without_a_plugin_has_none() -> None:
    assert find(INJECTORS, "collections") is None


def test_a_plugin_registered_in_code_comes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_plugins, "_loaded", {})

    def injector(
        fn: Any, signature: inspect.Signature, qualname: str
    ) -> tuple[Any, inspect.Signature] | None:
        return None

    register(INJECTORS, "fastapi", injector)
    assert find(INJECTORS, "fastapi") is injector


def test_a_schema_no_plugin_takes_is_refused_by_name() -> None:
    class Plain:
        pass

    with pytest.raises(ConfigurationError, match=r"schema of event 'a\.b' must be a pydantic"):
        schema_validator("a.b", Plain)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_core_never_imports_a_plugin() -> None:
    core = [p for p in SRC.rglob("*.py") if "contrib" not in p.relative_to(SRC).parts]
    importing = {
        str(path.relative_to(SRC)): sorted(m for m in _imports(path) if "contrib" in m)
        for path in core
    }
    assert {path: mods for path, mods in importing.items() if mods} == {}
