"""Which subscriptions an event reaches, and what is checked on its way there: the
resolved routes, payload schemas, strict checks, ``once`` listeners and emit hooks; and
:class:`Checks`, the bus's methods that say and set what is checked."""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeVar, overload

from tidings._plugins import schema_validator
from tidings.codec import check_serializable
from tidings.errors import ConfigurationError, NoListenersError, PayloadError
from tidings.events import Event, event_name_of

if TYPE_CHECKING:
    from tidings.listeners import Registry, Subscription

__all__ = ["Checks", "EventHook", "Router", "Taken"]

logger = logging.getLogger("tidings.bus")

M = TypeVar("M")

#: Told of each event (an emit hook), or of each one dropped after that (a drop hook).
EventHook = Callable[[Event], None]
#: The ``once`` subscriptions an emit took, with where they were in their registries.
Taken = list[tuple["Subscription", int]]


class Router:
    """Routes a bus's events to its registry's subscriptions.

    Args:
        registry: the bus's listeners.
        strict: refuse an event nobody listens to, and one a listener cannot take.
        check_serializable: refuse a payload a durable backend could not store.
        changed: called when what routing sees of each event changes (a hook or a
            schema added or removed), so the bus can take its flat path again or not.
    """

    def __init__(
        self,
        registry: Registry,
        *,
        strict: bool,
        check_serializable: bool,
        changed: Callable[[], None],
    ) -> None:
        self.registry = registry
        self.strict = strict
        self.check_serializable = check_serializable
        #: Told of every event that passed the checks, before it is queued.
        self.emit_hooks: list[EventHook] = []
        #: Told of each event the ASGI middleware dropped after the emit hooks saw it.
        self.drop_hooks: list[EventHook] = []
        # Payload checks by event name (see Bus.schema); while empty, never looked at.
        self._schemas: dict[str, EventHook] = {}
        self._typed_ok: dict[type[Any], str] = {}
        self._changed = changed

    @property
    def sees_each_event(self) -> bool:
        """Whether something needs to see each event (so no emit may skip routing)."""
        return bool(self.strict or self.check_serializable or self.emit_hooks or self._schemas)

    def add_schema(self, name: str, validate: EventHook) -> None:
        """Check the payload of every ``name`` event with ``validate`` (it raises)."""
        self._schemas[name] = validate
        self._changed()

    def add_emit_hook(self, hook: EventHook) -> None:
        """Tell ``hook`` of every event emitted from now on."""
        self.emit_hooks.append(hook)
        self._changed()

    def remove_emit_hook(self, hook: EventHook) -> None:
        """Stop telling ``hook`` of events."""
        self.emit_hooks.remove(hook)
        self._changed()

    def typed(self, obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Event:
        """The event of what ``emit`` was given in place of a name: a typed event, or a
        ``str`` subclass or an ``Enum`` member naming one.

        Raises:
            ConfigurationError: no event, or one bound to another class.
            PayloadError: a typed event with extra arguments.
        """
        if isinstance(obj, str):
            # A str subclass (a StrEnum member, say) names the event its value names.
            return Event(str.__str__(obj), args, kwargs)
        if isinstance(obj, Enum) and isinstance(obj.value, str):
            # A plain Enum member names the event its value names, as a StrEnum does.
            return Event(obj.value, args, kwargs)
        cls = type(obj)
        name = self._typed_ok.get(cls)
        if name is None:
            name = event_name_of(cls)
            if name is None:
                raise ConfigurationError(
                    f"emit() takes an event name or a typed event, not {obj!r}: give "
                    f"{cls.__qualname__} __event_name__ = '...' or call "
                    "tidings.register_event(cls, name)"
                )
            bound = self.registry.event_class(name)
            if bound is None:
                # Bound by no listener: the first class emitted under the name is.
                bound = next((c for c, n in self._typed_ok.items() if n == name), None)
            if bound is not None and bound is not cls:
                raise ConfigurationError(
                    f"event {name!r} is bound to {bound.__qualname__}, not {cls.__qualname__}"
                )
            self._typed_ok[cls] = name
        if args or kwargs:
            raise PayloadError(
                f"a typed event ({cls.__qualname__}) is emitted alone: its fields are the "
                f"payload, not extra arguments {args or ''}{kwargs or ''}"
            )
        return Event(name, (), {}, obj=obj)

    def route(
        self, event: Event, *, durable: bool, serialize: bool
    ) -> tuple[tuple[Subscription, ...], Taken] | None:
        """The subscriptions ``event`` reaches and the ``once`` ones it took; ``None`` when
        it reaches none (and is not stored either). ``serialize``: check here that the
        payload serializes (the backend does not, at once).

        Raises:
            EmitError, NoListenersError, BindingError, PayloadError: what ``emit`` raises.
        """
        if self._schemas:
            validate = self._schemas.get(event.name)
            if validate is not None:
                validate(event)
        registry = self.registry
        subs = registry.resolve(event.name)
        if not subs and self.strict and not durable:
            raise NoListenersError(f"no listener subscribes to event {event.name!r}")
        if serialize:
            check_serializable(event)
        if self.strict:
            for sub in subs:
                sub.listener.plan.check(event)
        elif self.check_serializable and not durable:
            # A durable backend refuses at delivery (a dead letter) a value that does not
            # fit its parameter's annotation: refused here at emit, as a test would want.
            for sub in subs:
                sub.listener.plan.check_values(event)
        for hook in self.emit_hooks:
            hook(event)
        taken: Taken = []
        if registry.has_once:
            subs = self._take_once(subs, taken)  # last: an emit refused above takes none
        if not subs and not durable:
            logger.debug("no listener for event %r; ignored", event.name)
            return None
        return subs, taken

    @staticmethod
    def _take_once(subs: tuple[Subscription, ...], taken: Taken) -> tuple[Subscription, ...]:
        out: list[Subscription] = []
        for sub in subs:
            if sub.listener.once:
                index = sub.registry.take(sub)
                if index is None:
                    continue  # another emit took it first
                taken.append((sub, index))
            out.append(sub)
        return tuple(out)

    @staticmethod
    def put_back(taken: Taken) -> None:
        """Subscribe again the ``once`` listeners an emit took and could not queue for
        (or whose held events were dropped)."""
        for sub, index in reversed(taken):
            sub.registry.put_back(sub, index)


class Checks:
    """What a bus checks of each event at emit (:class:`~tidings.Bus` inherits it)."""

    # What the bus holds, set by its __init__.
    router: Router

    @property
    def strict(self) -> bool:
        """Whether an event nobody listens to, or one a listener cannot take, is refused."""
        return self.router.strict

    @property
    def check_serializable(self) -> bool:
        """Whether a payload a durable backend could not store is refused at emit."""
        return self.router.check_serializable

    @overload
    def schema(self, name: str, model: M, /) -> M: ...
    @overload
    def schema(self, name: str, /) -> Callable[[M], M]: ...
    def schema(self, name: str, model: Any = None, /) -> Any:
        """Validate the keyword payload of every ``name`` event with a pydantic model, at
        emit and publish (needs ``tidings[pydantic]``; see :mod:`tidings.contrib.pydantic`).

        ``bus.schema("user.created", UserCreated)``, or ``@bus.schema("user.created")``
        on the model class. The payload is the keyword arguments, or one positional
        dict. A payload that does not validate raises
        ``tidings.contrib.pydantic.SchemaError`` (a ``PayloadError`` whose ``__cause__``
        is pydantic's ``ValidationError``); nothing is queued.

        Raises:
            ConfigurationError: not a pydantic model class, a pattern for ``name``, or no
                event name (a bare ``@bus.schema`` on the class).
        """
        if not isinstance(name, str):
            shown = getattr(name, "__name__", repr(name))
            raise ConfigurationError(
                f"schema() takes the event name first: @bus.schema('event.name') on "
                f"{shown}, or bus.schema('event.name', {shown})"
            )

        def register(model: M) -> M:
            self.router.add_schema(name, schema_validator(name, model))
            return model

        return register if model is None else register(model)
