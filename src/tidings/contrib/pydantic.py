"""Payload schemas: a pydantic model that every event of one name must match at emit.

``bus.schema("user.created", UserCreated)`` (or ``@bus.schema("user.created")`` on the
model class) makes ``emit`` and ``publish`` validate that name's payload against the
model: its keyword arguments, or one positional dict (``emit("user.created", data)``).
A payload that does not validate raises :class:`SchemaError` (a
:class:`~tidings.PayloadError`) naming the event, with pydantic's errors in
``.errors``; nothing is queued. ``SchemaError`` is not a ``pydantic.ValidationError``
(pydantic does not allow subclasses of it): the ``ValidationError`` is its
``__cause__``, so ``except SchemaError as exc: exc.__cause__`` reaches it. Listeners
receive the validated values: coerced, with the model's defaults filled in, by field
name (a positional dict becomes keyword arguments).

Typed events (a pydantic model emitted as one object) need no schema: pydantic
validates them when they are made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    from pydantic import BaseModel, ValidationError
    from pydantic_core import ErrorDetails
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "tidings.contrib.pydantic needs pydantic: pip install 'tidings[pydantic]'"
    ) from exc

from tidings._patterns import is_pattern, validate_name
from tidings.errors import ConfigurationError, PayloadError
from tidings.events import Event

__all__ = ["SchemaError", "validator"]

# How many of pydantic's errors the message spells out.
_SHOWN = 5


class SchemaError(PayloadError):
    """An event's payload does not match the schema of its name; nothing was queued.

    Attributes:
        event: the event name.
        model: the schema (a pydantic model class).
        errors: pydantic's errors (``ValidationError.errors()``), also the ``__cause__``.
    """

    def __init__(
        self, message: str, *, event: str, model: type[Any], errors: list[ErrorDetails]
    ) -> None:
        super().__init__(message)
        self.event = event
        self.model = model
        self.errors = errors


def _summary(errors: list[ErrorDetails]) -> str:
    parts = [
        f"{'.'.join(str(p) for p in e['loc']) or 'payload'}: {e['msg']}" for e in errors[:_SHOWN]
    ]
    if len(errors) > _SHOWN:
        parts.append(f"and {len(errors) - _SHOWN} more")
    return "; ".join(parts)


def validator(name: str, model: Any) -> Callable[[Event], None]:
    """The check the bus runs at emit for events called ``name``.

    It validates the keyword arguments with ``model`` and replaces them with the
    validated values.

    Raises:
        ConfigurationError: ``model`` is not a pydantic model class, or ``name`` is a
            pattern rather than one event name.
    """
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise ConfigurationError(
            f"the schema of event {name!r} must be a pydantic model class, not {model!r}"
        )
    if is_pattern(validate_name(name)):
        raise ConfigurationError(f"a schema is for one event name, not the pattern {name!r}")
    title = model.__name__

    def validate(event: Event) -> None:
        if event.obj is not None:
            return  # a typed event was validated when it was made
        payload = event.kwargs
        if event.args:
            if len(event.args) == 1 and not payload and isinstance(event.args[0], dict):
                payload = event.args[0]  # one dict: the natural payload of a schema
            else:
                raise SchemaError(
                    f"event {name!r} has a schema ({title}): pass its payload as keyword "
                    f"arguments or one dict, not {len(event.args)} positional argument(s)",
                    event=name,
                    model=model,
                    errors=[],
                )
        try:
            valid = model.model_validate(payload)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            raise SchemaError(
                f"event {name!r} does not match its schema {title}: {_summary(errors)}",
                event=name,
                model=model,
                errors=errors,
            ) from exc
        event.args = ()
        event.kwargs = dict(valid)

    return validate
