"""Plugins: what tidings knows of other packages' objects, found by entry point.

A package that teaches tidings about its objects declares an entry point in one of
these groups, named after the top-level package whose objects it handles:

- ``tidings.injectors``: ``injector(fn, signature, qualname)`` wraps listeners whose
  parameters mention that package's objects (FastAPI's ``Depends``); see
  :data:`tidings._binding.Injector`.
- ``tidings.schemas``: ``validator(name, model)`` is the check run at emit for events
  whose schema is a model class of that package (pydantic's ``BaseModel``).

The core never imports a plugin: it loads the entry point the first time it meets an
object of that package. :func:`register` adds one in code instead (a plugin that is not
packaged, or a test).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tidings.errors import ConfigurationError

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

    from tidings.events import Event

__all__ = ["INJECTORS", "SCHEMAS", "find", "register", "schema_validator"]

INJECTORS = "tidings.injectors"
SCHEMAS = "tidings.schemas"

_loaded: dict[tuple[str, str], Any] = {}
_declared: dict[str, dict[str, EntryPoint]] = {}


def register(group: str, package: str, plugin: Any) -> None:
    """Use ``plugin`` for ``package``'s objects in ``group``, before any entry point."""
    _loaded[group, package] = plugin


def find(group: str, package: str) -> Any | None:
    """The plugin of ``group`` for the top-level package ``package``, or ``None``: none
    is declared, or its module cannot be imported (its extra is not installed)."""
    key = (group, package)
    if key in _loaded:
        return _loaded[key]
    declared = _declared.get(group)
    if declared is None:
        # Read once per group: scanning the installed distributions takes milliseconds,
        # and importing importlib.metadata tens of them (not paid by ``import tidings``).
        from importlib.metadata import entry_points

        declared = _declared[group] = {ep.name: ep for ep in entry_points(group=group)}
    plugin = None
    if package in declared:
        try:
            plugin = declared[package].load()
        except ImportError:
            plugin = None
    _loaded[key] = plugin
    return plugin


def schema_validator(name: str, model: Any) -> Callable[[Event], None]:
    """The check the bus runs at emit for events called ``name`` whose schema is
    ``model``, made by the schema plugin of the package ``model`` comes from.

    Raises:
        ConfigurationError: no plugin takes ``model``, or the plugin refuses it.
    """
    for klass in getattr(model, "__mro__", ()):
        make = find(SCHEMAS, getattr(klass, "__module__", "").partition(".")[0])
        if make is not None:
            validator: Callable[[Event], None] = make(name, model)
            return validator
    raise ConfigurationError(
        f"the schema of event {name!r} must be a pydantic model class "
        f"(pip install 'tidings[pydantic]'), not {model!r}"
    )
