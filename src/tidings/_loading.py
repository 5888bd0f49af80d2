"""Finding the bus a command names: ``package.module:bus`` or ``package.module:factory()``."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

from tidings.bus import Bus
from tidings.errors import ConfigurationError

__all__ = ["load_bus"]


def load_bus(target: str) -> Bus:
    """Import ``module:attribute`` (``module:factory()`` calls it) and return the bus.

    Raises:
        ConfigurationError: the module or attribute cannot be found, or is not a Bus.
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigurationError(
            f"{target!r} does not name a bus: write 'package.module:bus' or "
            "'package.module:make_bus()'"
        )
    # Modules of the current directory are importable, as with python -m, but looked for
    # last: a file there never shadows an installed package (redis.py, asyncpg.py).
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigurationError(f"no module named {exc.name!r} (from {target!r})") from exc
        raise
    call = attr.endswith("()")
    name = attr[:-2] if call else attr
    try:
        obj: Any = getattr(module, name)
    except AttributeError as exc:
        raise ConfigurationError(f"module {module_name!r} has no attribute {name!r}") from exc
    if call:
        if isinstance(obj, Bus) or not callable(obj):
            raise ConfigurationError(
                f"{target!r}: {name} is a {type(obj).__name__}, not a function to call: "
                f"write '{module_name}:{name}'"
            )
        try:
            obj = obj()
        except TypeError as exc:
            if exc.__traceback__ is not None and exc.__traceback__.tb_next is None:
                # Raised by the call itself: the factory takes arguments.
                raise ConfigurationError(
                    f"{target!r}: the factory must take no arguments ({exc})"
                ) from exc
            raise
        if inspect.isawaitable(obj):
            raise ConfigurationError(f"{target!r}: the factory must be a plain function")
    if not isinstance(obj, Bus):
        kind = type(obj).__name__
        if call:
            raise ConfigurationError(
                f"{target!r} returned a value of type {kind}, not a tidings Bus"
            )
        if callable(obj) and not isinstance(obj, type):
            raise ConfigurationError(
                f"{target!r} is a function, not a tidings Bus: write '{target}()' to call it "
                "and use the bus it returns"
            )
        raise ConfigurationError(
            f"{target!r} is a value of type {kind}, not a tidings Bus: name a Bus "
            "('package.module:bus') or a function that makes one ('package.module:make_bus()')"
        )
    return obj
