"""Listeners, registries and the resolution of event names to listeners.

``@listener("user.created")`` wraps a function in a :class:`Listener` that stays
callable as before. A :class:`Registry` groups listeners like a router; the bus holds
one at its root. Resolving a name to its subscriptions walks the patterns once and is
cached until a registry changes, so wildcards cost nothing per emit.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from enum import Enum
from typing import Any, Generic, Literal, ParamSpec, TypeVar, overload

from tidings import _processes
from tidings._batching import NO_DEADLINE, Batching
from tidings._binding import CallPlan
from tidings._patterns import matches, validate_name
from tidings._units import count, positive_seconds_or_none
from tidings.delivery import NO_RETRY, Retry, retry_policy
from tidings.errors import ConfigurationError, EmitError
from tidings.events import Event, check_event_name, event_name_of

__all__ = [
    "ErrorHook",
    "Listener",
    "Registry",
    "Subscription",
    "SuccessHook",
    "listener",
]

P = ParamSpec("P")
R = TypeVar("R")

#: ``on_error`` / ``on_dead`` hooks: ``hook(event, listener, error)``, sync or async.
ErrorHook = Callable[[Event, "Listener[..., Any]", BaseException], Any]
#: ``on_success`` hooks: ``hook(event, listener)``, sync or async.
SuccessHook = Callable[[Event, "Listener[..., Any]"], Any]


def _pattern(name: str, qualname: str) -> str:
    """``name`` if some event name could match it (no whitespace or control
    characters, at most 255 bytes), else a ``ConfigurationError``."""
    try:
        return check_event_name(name, pattern=True)
    except EmitError as exc:
        raise ConfigurationError(f"listener {qualname}: {exc}; no event could match it") from exc


def _listener_name(name: object) -> str:
    """``name`` if a listener may be known by it (a non-empty string without whitespace
    or control characters, at most 255 bytes, as an event name), else a
    ``ConfigurationError``."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigurationError(f"a listener's name must be a non-empty string, not {name!r}")
    try:
        return check_event_name(name, pattern=True)
    except EmitError as exc:
        why = str(exc).removeprefix("event name ")
        raise ConfigurationError(f"listener name {why}; a store could not keep it") from exc


def _is_async_callable(fn: Any) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or (
        callable(fn) and inspect.iscoroutinefunction(getattr(fn, "__call__", None))  # noqa: B004
    )


def _qualname(fn: Any) -> str:
    target = fn.func if isinstance(fn, functools.partial) else fn
    module = getattr(target, "__module__", None) or type(target).__module__
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}.{name}"


def hooks_of(value: Any, what: str) -> tuple[Any, ...]:
    """``value`` as a tuple of hooks: ``None``, one callable, or an iterable of them.

    Raises:
        ConfigurationError: anything else, or an iterable holding a non-callable.
    """
    if value is None:
        return ()
    if callable(value):
        return (value,)
    try:
        hooks = tuple(value)
    except TypeError:
        hooks = (value,)
    for hook in hooks:
        if not callable(hook):
            raise ConfigurationError(
                f"{what} must be a function or a list of functions, not {value!r}"
            )
    return hooks


def flag(value: Any, what: str) -> bool:
    """``value`` if it is a bool, else a ``ConfigurationError``."""
    if not isinstance(value, bool):
        raise ConfigurationError(f"{what} must be True or False, not {value!r}")
    return value


class Listener(Generic[P, R]):
    """A function subscribed to event names, with its delivery options.

    Calling a listener calls the function: decorated functions stay unit-testable.
    """

    def __init__(
        self,
        fn: Callable[P, R],
        names: Sequence[str],
        *,
        retry: Retry | int | None = None,
        timeout: float | timedelta | None = None,
        concurrency: int | None = None,
        once: bool = False,
        inline: bool = False,
        on_error: ErrorHook | Iterable[ErrorHook] | None = None,
        on_success: SuccessHook | Iterable[SuccessHook] | None = None,
        on_dead: ErrorHook | Iterable[ErrorHook] | None = None,
        typed: Sequence[type[Any]] = (),
        executor: Literal["thread", "process"] = "thread",
        batch: int | None = None,
        batch_wait: float | timedelta | None = None,
        name: str | None = None,
    ) -> None:
        if not callable(fn):
            raise ConfigurationError(f"a listener must be callable, not {fn!r}")
        # First, so that what the function (or callable object) carries as attributes
        # never stands in for the listener's own options.
        functools.update_wrapper(self, fn)
        self.fn = fn
        if name is not None:
            name = _listener_name(name)
        #: What the listener is known by (in a durable store, stats and dead letters):
        #: ``name=``, or its function's module and qualified name.
        self.qualname = _qualname(fn) if name is None else name
        self.names = tuple(_pattern(validate_name(n), self.qualname) for n in names)
        if not self.names:
            raise ConfigurationError(f"listener {self.qualname} subscribes to no event name")
        of = f"of listener {self.qualname}"
        self.retry = retry_policy(retry, f"retry {of}")
        self.timeout = positive_seconds_or_none(timeout, f"timeout {of}")
        self.concurrency = None if concurrency is None else count(concurrency, f"concurrency {of}")
        self.once = flag(once, f"once {of}")
        self.inline = flag(inline, f"inline {of}")
        self.on_error: tuple[ErrorHook, ...] = hooks_of(on_error, f"on_error {of}")
        self.on_success: tuple[SuccessHook, ...] = hooks_of(on_success, f"on_success {of}")
        self.on_dead: tuple[ErrorHook, ...] = hooks_of(on_dead, f"on_dead {of}")
        #: A batch listener's batching (its function takes a list of events), else None.
        self.batching = self._batching(batch, batch_wait, executor, typed)
        if self.batching is not None:
            # Each delivery waits for its batch, once: the batch's call is what the
            # listener's retry policy and timeout apply to.
            self.retry, self.timeout = NO_RETRY, NO_DEADLINE
            self.concurrency = self.batching.concurrency
            if self.batching.element is not None:
                typed = (*typed, self.batching.element)
        self.plan = CallPlan(fn if self.batching is None else self.batching.deliver, self.qualname)
        #: Where a sync listener runs: ``"thread"`` (the bus's thread pool) or
        #: ``"process"`` (a pool of worker processes, see :mod:`tidings._processes`).
        self.executor = executor
        if executor == "process":
            _processes.check(
                fn,
                self.qualname,
                is_async=_is_async_callable(fn),
                inline=inline,
                injected=self.plan.fn is not fn,
            )
            self.plan.fn = _processes.InProcess(fn, self.qualname)
        elif executor != "thread":
            raise ConfigurationError(
                f"executor of listener {self.qualname} must be 'thread' or 'process', "
                f"not {executor!r}"
            )
        # The plan may call a wrapper (injected dependencies), which is async.
        self.is_async = _is_async_callable(self.plan.fn)
        if inline and self.timeout is not None and not self.is_async:
            raise ConfigurationError(
                f"listener {self.qualname} runs inline, on the event loop, where nothing "
                "can interrupt it: a timeout cannot apply (run it in a thread instead)"
            )
        # Typed-event classes this listener ties to a name: subscribed by class, or
        # annotated on a parameter.
        types: dict[str, type[Any]] = {}
        for cls in (*typed, *self.plan.typed_classes):
            name = event_name_of(cls)
            if name is not None:
                types[name] = cls
        self.types = types

    def _batching(
        self,
        batch: int | None,
        batch_wait: float | timedelta | None,
        executor: str,
        typed: Sequence[type[Any]],
    ) -> Batching | None:
        if batch is None:
            if batch_wait is not None:
                raise ConfigurationError(
                    f"listener {self.qualname} has a batch_wait but no batch: give "
                    "batch=<most events in one call> too"
                )
            return None
        if self.once or executor == "process":
            what = "once=True" if self.once else 'executor="process"'
            raise ConfigurationError(f"listener {self.qualname} cannot take batches with {what}")
        return Batching(
            self.fn,
            self.qualname,
            size=batch,
            wait_s=1.0 if batch_wait is None else batch_wait,
            retry=self.retry,
            timeout=self.timeout,
            concurrency=self.concurrency,
            inline=self.inline,
            typed=typed,
        )

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Listener {self.qualname} on {', '.join(self.names)}>"


@overload
def listener(
    *names: str | Enum | type[Any],
    retry: Retry | int | None = ...,
    timeout: float | timedelta | None = ...,
    concurrency: int | None = ...,
    once: bool = ...,
    inline: bool = ...,
    on_error: ErrorHook | Iterable[ErrorHook] | None = ...,
    on_success: SuccessHook | Iterable[SuccessHook] | None = ...,
    on_dead: ErrorHook | Iterable[ErrorHook] | None = ...,
    executor: Literal["thread", "process"] = ...,
    batch: int | None = ...,
    batch_wait: float | timedelta | None = ...,
    name: str | None = ...,
) -> Callable[[Callable[P, R]], Listener[P, R]]: ...
@overload
def listener(
    *names: str | Enum | type[Any], **options: Any
) -> Callable[[Callable[P, R]], Listener[P, R]]: ...
def listener(
    *names: str | Enum | type[Any], **options: Any
) -> Callable[[Callable[P, R]], Listener[P, R]]:
    """Subscribe a sync or async function to event names, patterns or typed-event classes.

    Options: ``retry`` (a :class:`Retry` or a number of attempts), ``timeout`` (seconds or
    ``timedelta``, per attempt), ``concurrency`` (deliveries of this listener running at
    once; 1 keeps them in order), ``once`` (unsubscribe after the first event),
    ``inline`` (run a sync function on the event loop instead of a thread),
    ``executor="process"`` (run a sync function in a pool of worker processes: for
    CPU-bound work; it must be defined at the top level of a module),
    ``on_error`` / ``on_success`` / ``on_dead`` hooks, and ``batch`` (the function takes
    a list of up to that many events, see below) with ``batch_wait`` (seconds or
    ``timedelta`` a batch waits for more events after its first; default 1), and
    ``name`` (what the listener is known by in a durable store, stats and dead
    letters; default its module and qualified name: name apart the functions a factory
    makes, which share one).

    A batch listener's parameter annotated ``list[Event]`` (or not annotated) gets the
    envelopes, ``list[SomeTypedEvent]`` the typed objects. Its ``retry`` and ``timeout``
    apply to each call with a batch (the bus's defaults do not); when the last attempt
    fails, each event of the batch is a dead letter with that error. Its
    ``concurrency`` counts events in flight, in batches: at least ``batch`` (the
    default), twice that lets one batch fill while another is called.

    Raises:
        ConfigurationError: no names, an invalid pattern, a class with no event name,
            an empty ``name``, or batch options out of range (``concurrency`` under
            ``batch``, say).
    """
    str_names, typed = split_names(names)

    def decorate(fn: Callable[P, R]) -> Listener[P, R]:
        if isinstance(fn, Listener):
            raise ConfigurationError(
                f"{fn.qualname} is already a listener: pass every name to one @listener(...)"
            )
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise ConfigurationError(
                f"listener {_qualname(fn)}: no option {', '.join(unknown)} (the options are "
                f"{', '.join(sorted(_OPTIONS))})"
            )
        return Listener(fn, str_names, typed=typed, **options)

    return decorate


#: The keyword options of ``@listener(...)``.
_OPTIONS = frozenset(inspect.signature(Listener).parameters) - {"fn", "names", "typed"}


def split_names(names: Iterable[str | Enum | type[Any]]) -> tuple[list[str], list[type[Any]]]:
    str_names: list[str] = []
    typed: list[type[Any]] = []
    for n in names:
        if isinstance(n, type):
            event_name = event_name_of(n)
            if event_name is None:
                raise ConfigurationError(
                    f"{n.__qualname__} has no event name: give it __event_name__ = '...' "
                    "or call tidings.register_event(cls, name)"
                )
            str_names.append(event_name)
            typed.append(n)
        elif isinstance(n, str):
            str_names.append(n)
        elif isinstance(n, Enum) and isinstance(n.value, str):
            str_names.append(n.value)  # a plain Enum member names what its value names
        else:
            raise ConfigurationError(
                f"an event name is a string (or an Enum member whose value is one), not {n!r}"
            )
    return str_names, typed


class Subscription:
    """One listener subscribed in one registry; ``unsubscribe()`` removes it."""

    __slots__ = ("delivered", "failed", "has_success_hooks", "listener", "registry")

    def __init__(self, listener: Listener[..., Any], registry: Registry) -> None:
        self.listener = listener
        self.registry = registry
        self.delivered = 0
        self.failed = 0
        #: Whether the listener or its registries have ``on_success`` hooks (kept
        #: current by the registries, read on every delivery).
        self.has_success_hooks = bool(listener.on_success)

    def unsubscribe(self) -> None:
        """Remove this listener from its registry (no error if already removed)."""
        self.registry._remove(self)

    def hooks(self, kind: str) -> tuple[Any, ...]:
        """The listener's hooks of ``kind`` then its registries', innermost first (a
        registry included in several places: the hooks of every one that includes it)."""
        out: list[Any] = list(getattr(self.listener, kind))
        for registry in self.registry._lineage():
            out.extend(getattr(registry, kind))
        return tuple(out)

    def __repr__(self) -> str:
        return f"<Subscription {self.listener.qualname}>"


class Registry:
    """A group of listeners, included into a bus (or another registry) like a router.

    Args:
        listeners: listeners to subscribe now.
        max_listeners: the most listeners one name or pattern may have in this registry.
        on_error, on_success, on_dead: hooks for every listener in this registry.
    """

    #: The most event names whose resolution is kept; past it the oldest are resolved
    #: again when next emitted (a true LRU would cost a write on every emit).
    max_routes = 10_000

    def __init__(
        self,
        listeners: Iterable[Listener[..., Any]] = (),
        *,
        max_listeners: int | None = None,
        on_error: ErrorHook | Iterable[ErrorHook] | None = None,
        on_success: SuccessHook | Iterable[SuccessHook] | None = None,
        on_dead: ErrorHook | Iterable[ErrorHook] | None = None,
    ) -> None:
        self.max_listeners = max_listeners
        self.on_error: tuple[ErrorHook, ...] = hooks_of(on_error, "a registry's on_error")
        self.on_success: tuple[SuccessHook, ...] = hooks_of(on_success, "a registry's on_success")
        self.on_dead: tuple[ErrorHook, ...] = hooks_of(on_dead, "a registry's on_dead")
        self._subs: list[Subscription] = []
        self._children: list[Registry] = []
        #: Where this registry is included (a registry may be shared by several buses).
        self._parents: list[Registry] = []
        self._cache: dict[str, tuple[Subscription, ...]] = {}
        #: The resolved names emit may route without further checks: the same as the
        #: cache, but kept empty while a ``once`` listener needs each emit to take it.
        self.routes: dict[str, tuple[Subscription, ...]] = {}
        self._types: dict[str, type[Any]] = {}
        self._lock = threading.RLock()
        self._checks: list[Callable[[list[Listener[..., Any]]], None]] = []
        self._watchers: list[Callable[[], None]] = []
        #: Whether any listener here or below is ``once`` (so emit checks for it).
        self.has_once = False
        for item in listeners:
            self.add(item)

    # -- building -------------------------------------------------------------------

    def add(self, item: Listener[..., Any]) -> Subscription:
        """Subscribe a listener made with ``@listener``; returns its subscription.

        Raises:
            ConfigurationError: not a listener, over ``max_listeners``, a typed-event
                name already bound to another class, or refused by a bus the registry is
                in (a durable one refuses a second listener of one name).
        """
        if not isinstance(item, Listener):
            raise ConfigurationError(
                f"{item!r} is not a listener: decorate it with @listener('event.name') "
                "or use registry.subscribe(fn, 'event.name')"
            )
        with self._lock:
            self._vet([item])
            self._check_types(item.types, item.qualname)
            if self.max_listeners is not None:
                for name in item.names:
                    count = sum(1 for s in self._subs if name in s.listener.names)
                    if count >= self.max_listeners:
                        raise ConfigurationError(
                            f"{name!r} already has {count} listener(s), the registry's "
                            f"max_listeners; cannot add {item.qualname}"
                        )
            sub = Subscription(item, self)
            self._subs.append(sub)
            self._invalidate()
            return sub

    def listener(
        self, *names: str | Enum | type[Any], **options: Any
    ) -> Callable[[Callable[P, R]], Listener[P, R]]:
        """Like :func:`tidings.listener`, and subscribe the result in this registry."""
        make = listener(*names, **options)

        def decorate(fn: Callable[P, R]) -> Listener[P, R]:
            item = make(fn)
            self.add(item)
            return item

        return decorate

    def subscribe(
        self, fn: Callable[..., Any], /, *names: str | Enum | type[Any], **options: Any
    ) -> Subscription:
        """Subscribe ``fn`` at runtime: ``subscribe(listener)`` or ``subscribe(fn,
        "user.created", retry=3)`` (the function first, then names, then the options of
        ``@listener``). Returns a handle whose ``unsubscribe()`` undoes it.

        Raises:
            ConfigurationError: ``fn`` is not callable (names come after it), or is a
                listener already and names or options are given too (its own are used:
                subscribe ``fn.fn`` to give others), or as :meth:`add` raises.
        """
        if isinstance(fn, str) or not callable(fn):
            raise ConfigurationError(
                f"subscribe() takes the function first, then the names "
                f"(subscribe(fn, 'event.name')), not {fn!r} first"
            )
        if isinstance(fn, Listener):
            if names or options:
                raise ConfigurationError(
                    f"{fn.qualname} is a listener of {', '.join(map(repr, fn.names))} "
                    "already, with its own options: subscribe it without names or options, "
                    "or subscribe its function (listener.fn) with these"
                )
            return self.add(fn)
        return self.add(listener(*names, **options)(fn))

    def include(self, registry: Registry) -> None:
        """Route this registry's events to ``registry``'s listeners too.

        One registry may be included in several buses (or registries): its listeners,
        and later changes to them, are shared by all of them.

        Raises:
            ConfigurationError: the registry is already included here, includes this
                one, a typed event name would be bound to two classes, or a bus this
                one is in refuses its listeners (as :meth:`add` says).
        """
        with self._lock:
            if registry in self._children:
                raise ConfigurationError("this registry is already included here")
            if registry is self or registry in self._lineage():
                raise ConfigurationError("a registry cannot include itself, even through others")
            self._vet([sub.listener for sub in registry.subscriptions()])
            self._check_types(registry._all_types(), "an included registry")
            registry._parents.append(self)
            self._children.append(registry)
            self._invalidate()

    def check_additions(self, check: Callable[[list[Listener[..., Any]]], None]) -> None:
        """Call ``check`` with the listeners a change would add here (or in a registry
        included here) before it adds them; what it raises refuses the change."""
        with self._lock:
            self._checks.append(check)

    def stop_checking(self, check: Callable[[list[Listener[..., Any]]], None]) -> None:
        """Stop calling ``check`` (see :meth:`check_additions`)."""
        with self._lock:
            if check in self._checks:
                self._checks.remove(check)

    def watch(self, watcher: Callable[[], None]) -> None:
        """Call ``watcher`` after each change to the listeners here (or in a registry
        included here), on the thread that made it; it must only take note."""
        with self._lock:
            self._watchers.append(watcher)

    def unwatch(self, watcher: Callable[[], None]) -> None:
        """Stop calling ``watcher`` (see :meth:`watch`)."""
        with self._lock:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

    def _vet(self, listeners: list[Listener[..., Any]]) -> None:
        if listeners:
            for registry in self._lineage():
                for check in registry._checks:
                    check(listeners)

    def _lineage(self) -> list[Registry]:
        """This registry and every registry that includes it, innermost first."""
        out: list[Registry] = [self]
        for registry in out:  # grows as it goes: breadth first
            for parent in registry._parents:
                if parent not in out:
                    out.append(parent)
        return out

    def _check_types(self, types: dict[str, type[Any]], owner: str) -> None:
        for root in self._lineage():
            if root._parents:
                continue
            known = root._all_types()
            for name, cls in types.items():
                other = known.get(name)
                if other is not None and other is not cls:
                    raise ConfigurationError(
                        f"event {name!r} is bound to two classes: {other.__qualname__} and "
                        f"{cls.__qualname__} (from {owner})"
                    )
        self._types.update(types)

    def _all_types(self) -> dict[str, type[Any]]:
        out = dict(self._types)
        for child in self._children:
            out.update(child._all_types())
        return out

    def _remove(self, sub: Subscription) -> bool:
        return self.take(sub) is not None

    def take(self, sub: Subscription) -> int | None:
        """Remove ``sub``; where it was, or ``None`` if it was not here (any more)."""
        with self._lock:
            try:
                index = self._subs.index(sub)
            except ValueError:
                return None
            del self._subs[index]
            self._invalidate()
            return index

    def put_back(self, sub: Subscription, index: int) -> None:
        """Subscribe ``sub`` again where :meth:`take` took it from."""
        with self._lock:
            self._subs.insert(index, sub)
            self._invalidate()

    def _invalidate(self) -> None:
        for registry in self._lineage():
            # Cleared in place: the bus holds references.
            registry._cache.clear()
            registry.routes.clear()
            subs = registry.subscriptions()
            registry.has_once = any(s.listener.once for s in subs)
            for sub in subs:
                sub.has_success_hooks = bool(sub.hooks("on_success"))
            for watcher in registry._watchers:
                watcher()

    # -- reading --------------------------------------------------------------------

    def resolve(self, name: str) -> tuple[Subscription, ...]:
        """The subscriptions an event called ``name`` reaches, in subscription order.

        Raises:
            EmitError: ``name`` is no event name (see :func:`tidings.events.check_event_name`).
        """
        found = self._cache.get(name)
        if found is None:
            # Checked here, once per name: what is cached may be emitted without a check.
            check_event_name(name)
            with self._lock:
                found = tuple(self._walk(name))
                cache = self._cache
                if len(cache) >= self.max_routes:
                    # Bounded, so that endless distinct names never grow memory.
                    oldest = next(iter(cache))
                    del cache[oldest]
                    self.routes.pop(oldest, None)
                cache[name] = found
                if not self.has_once:
                    self.routes[name] = found
        return found

    def _walk(self, name: str) -> Iterable[Subscription]:
        for sub in self._subs:
            if any(matches(p, name) for p in sub.listener.names):
                yield sub
        for child in self._children:
            yield from child._walk(name)

    def subscriptions(self) -> list[Subscription]:
        """Every subscription in this registry and those it includes."""
        out = list(self._subs)
        for child in self._children:
            out.extend(child.subscriptions())
        return out

    def event_class(self, name: str) -> type[Any] | None:
        """The typed-event class bound to ``name`` here, if any."""
        return self._all_types().get(name)

    def __len__(self) -> int:
        return len(self.subscriptions())
