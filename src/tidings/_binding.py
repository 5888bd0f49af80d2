"""Planning how one listener is called with an event's arguments.

A listener receives only what its signature names: positional arguments in order,
keyword arguments by name, the envelope for a parameter annotated ``Event``, the
typed object for a parameter annotated with its class (or its fields by name), and
everything for ``*args`` / ``**kwargs``. The signature is read once; the mapping for a
given shape of event (number of positional arguments, keyword names, typed class) is
computed once and cached, so a call costs a dictionary lookup.

An integration may inject some parameters itself (FastAPI's ``Depends``): its injector,
a plugin of the package its markers come from (see :mod:`tidings._plugins`), wraps the
function once, at registration, into one that takes only the event's parameters.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import types
from collections.abc import Callable
from typing import Any, Union, get_args, get_origin

from tidings._plugins import INJECTORS, find, register
from tidings.codec import as_stored, converter
from tidings.errors import BindingError, ConfigurationError, PayloadError
from tidings.events import Event

__all__ = ["CallPlan", "Injector", "keyword_caller", "register_injector"]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)

# Sources a recipe draws each argument from.
_ARG, _KW, _ENVELOPE, _OBJ, _FIELD = range(5)

# Annotations any value satisfies: nothing to convert or check.
_ANY: tuple[Any, ...] = (inspect.Parameter.empty, Any, object)

_Source = tuple[int, Any]
# Positional sources, keyword sources, where *args starts (-1: no *args), for a
# **kwargs the parameter names it never takes (None: no **kwargs), and the arguments a
# stored event's values are converted for: (source, parameter name).
_Recipe = tuple[
    tuple[_Source, ...],
    tuple[tuple[str, _Source], ...],
    int,
    frozenset[str] | None,
    tuple[tuple[_Source, str], ...],
]


#: ``injector(fn, signature, qualname)``: ``None`` to leave the function alone, or the
#: function to call instead and its signature (the parameters the event fills).
Injector = Callable[
    [Callable[..., Any], inspect.Signature, str],
    tuple[Callable[..., Any], inspect.Signature] | None,
]


def register_injector(package: str, injector: Injector) -> None:
    """Let ``injector`` wrap listeners whose parameters mention ``package``'s objects
    (instead of the ``tidings.injectors`` entry point named ``package``)."""
    register(INJECTORS, package, injector)


def _packages(sig: inspect.Signature) -> set[str]:
    found: set[str] = set()
    for p in sig.parameters.values():
        ann = p.annotation
        for marker in (p.default, ann, *getattr(ann, "__metadata__", ())):
            owner = marker if isinstance(marker, type) else type(marker)
            found.add(getattr(owner, "__module__", "").partition(".")[0])
    return found


def inject(
    fn: Callable[..., Any], sig: inspect.Signature, qualname: str
) -> tuple[Callable[..., Any], inspect.Signature] | None:
    for package in _packages(sig):
        injector: Injector | None = find(INJECTORS, package)
        if injector is not None:
            injected = injector(fn, sig, qualname)
            if injected is not None:
                return injected
    return None


def signature_of(fn: Callable[..., Any], qualname: str) -> inspect.Signature:
    try:
        return inspect.signature(fn, eval_str=True)
    except (NameError, TypeError, SyntaxError):
        # Some annotation cannot be resolved (a name imported for type checkers only,
        # say): resolve the others one by one; the rest are compared by their text.
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"cannot read the signature of {qualname}: {exc}") from exc
        return _resolve_each(fn, sig)
    except ValueError as exc:
        raise ConfigurationError(f"cannot read the signature of {qualname}: {exc}") from exc


def _resolve_each(fn: Callable[..., Any], sig: inspect.Signature) -> inspect.Signature:
    target: Any = fn
    while isinstance(target, functools.partial):
        target = target.func
    target = inspect.unwrap(target)
    namespace = getattr(target, "__globals__", None)
    if namespace is None:  # a callable object: its __call__'s module
        call = getattr(type(target), "__call__", None)  # noqa: B004
        namespace = getattr(call, "__globals__", {})
    params = []
    for p in sig.parameters.values():
        annotation = p.annotation
        if isinstance(annotation, str):
            # What inspect.signature(eval_str=True) does, one annotation at a time.
            with contextlib.suppress(Exception):
                annotation = eval(annotation, namespace)
        params.append(p.replace(annotation=annotation))
    return sig.replace(parameters=params)


def _optional_of(annotation: Any) -> Any:
    """``X`` for ``X | None`` or ``Optional[X]`` (also as text), else the annotation."""
    if isinstance(annotation, str):
        text = annotation.replace(" ", "")
        if text.startswith("Optional[") and text.endswith("]"):
            return text[len("Optional[") : -1]
        parts = [part for part in text.split("|") if part != "None"]
        return parts[0] if len(parts) == 1 else annotation
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _is_envelope(annotation: Any) -> bool:
    annotation = _optional_of(annotation)
    if annotation is Event:
        return True
    return isinstance(annotation, str) and annotation.rsplit(".", 1)[-1] == "Event"


def _typed_class(annotation: Any) -> type[Any] | None:
    """The class a parameter's annotation names, if a typed event could be one."""
    annotation = _optional_of(annotation)
    if (
        isinstance(annotation, type)
        and annotation is not Event
        and annotation is not object
        and annotation is not Any
    ):
        return annotation
    return None


def _takes_object(annotation: Any, obj: Any) -> bool:
    """Whether a parameter annotated ``annotation`` takes the typed event ``obj``."""
    cls = _typed_class(annotation)
    if cls is not None:
        return isinstance(obj, cls)
    # An annotation that could not be resolved (a class defined in a function, with
    # postponed annotations): compared by name.
    annotation = _optional_of(annotation)
    return isinstance(annotation, str) and annotation.rsplit(".", 1)[-1] == type(obj).__name__


class CallPlan:
    """How to call one function with any event."""

    __slots__ = (
        "_cache",
        "_converters",
        "_named",
        "_params",
        "_var_args",
        "_var_kwargs",
        "fn",
        "qualname",
        "required_names",
        "revivable",
        "simple_names",
        "typed_classes",
    )

    def __init__(self, fn: Callable[..., Any], qualname: str) -> None:
        self.qualname = qualname
        sig = signature_of(fn, qualname)
        injected = inject(fn, sig, qualname)
        if injected is not None:
            fn, sig = injected
        #: What is called: the function, or the injector's wrapper of it.
        self.fn = fn
        params: list[tuple[str, inspect._ParameterKind, Any, bool]] = []
        self._var_args = False
        self._var_kwargs = False
        typed: list[type[Any]] = []
        for p in sig.parameters.values():
            if p.kind is inspect.Parameter.VAR_POSITIONAL:
                self._var_args = True
            elif p.kind is inspect.Parameter.VAR_KEYWORD:
                self._var_kwargs = True
            else:
                ann = p.annotation
                params.append((p.name, p.kind, ann, p.default is not inspect.Parameter.empty))
                cls = _typed_class(ann)
                if cls is not None:
                    typed.append(cls)
        self._params = tuple(params)
        # For a **kwargs: the names it never takes (a named parameter's, but for one
        # that is positional-only).
        self._named = (
            frozenset(
                n for n, kind, _, _ in params if kind is not inspect.Parameter.POSITIONAL_ONLY
            )
            if self._var_kwargs
            else None
        )
        self.typed_classes = tuple(typed)
        # How to convert a stored value back to each annotated parameter's type.
        self._converters: dict[str, Callable[[Any], Any]] = {}
        for name, _, ann, _ in params:
            if any(ann is a for a in _ANY) or isinstance(ann, str) or _is_envelope(ann):
                continue  # (text: an annotation that could not be resolved, unchecked)
            try:
                self._converters[name] = converter(ann)
            except TypeError:
                continue  # not a type msgspec knows (a protocol, say): passed as it is
        #: The parameters (and their annotations) whose values :meth:`revive` converts
        #: and checks when an event comes from a durable backend.
        self.revivable: tuple[tuple[str, Any], ...] = tuple(
            (name, ann) for name, _, ann, _ in params if name in self._converters
        )
        self._cache: dict[tuple[Any, ...], _Recipe] = {}
        # The common case: keyword-only payload whose names are exactly the parameters.
        simple = all(
            kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
            or kind is inspect.Parameter.KEYWORD_ONLY
            for _, kind, _, _ in params
        ) and not any(_is_envelope(ann) for _, _, ann, _ in params)
        #: The parameter names, when a call with exactly these keywords needs no plan.
        self.simple_names: frozenset[str] | None = (
            frozenset(n for n, _, _, _ in params) if simple else None
        )
        #: The parameter names in order, when each may be passed by position and none
        #: has a default, and there is no ``*args`` or ``**kwargs`` that other keywords
        #: would be for (see :func:`keyword_caller`).
        self.required_names: tuple[str, ...] | None = (
            tuple(n for n, _, _, _ in params)
            if simple
            and not (self._var_args or self._var_kwargs)
            and all(
                kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and not has_default
                for _, kind, _, has_default in params
            )
            else None
        )

    def call(self, event: Event) -> Any:
        """Call the function with what it names of ``event``; returns what it returns.

        Raises:
            BindingError: the event lacks a required parameter.
        """
        kwargs = event.kwargs
        if (
            self.simple_names is not None
            and not event.args
            and event.obj is None
            and kwargs.keys() == self.simple_names
        ):
            return self.fn(**kwargs)
        key = (len(event.args), *kwargs, type(event.obj))
        recipe = self._cache.get(key)
        if recipe is None:
            recipe = self._cache[key] = self._plan(event)
        pos_src, kw_src, rest_from, named, _ = recipe
        args = [_take(event, s) for s in pos_src]
        if rest_from >= 0:
            args.extend(event.args[rest_from:])
        kw = {name: _take(event, s) for name, s in kw_src}
        if named is not None:
            # **kwargs: the keywords no named parameter takes.
            for k, v in kwargs.items():
                if k not in named:
                    kw[k] = v
        return self.fn(*args, **kw)

    def check(self, event: Event) -> None:
        """Raise ``BindingError`` if ``event`` cannot satisfy the function's signature, or
        if a value would not fit its parameter's annotation once read back from a store
        (what :meth:`revive` would refuse)."""
        for (kind, ref), name in self._recipe(event)[4]:
            value = event.args[ref] if kind == _ARG else event.kwargs[ref]
            try:
                stored = as_stored(value)
            except PayloadError:
                continue  # a payload error, if the bus serializes: not one of binding
            try:
                self._converters[name](stored)
            except Exception as exc:
                raise self._unfit(event, name, value, exc) from exc

    def check_values(self, event: Event) -> None:
        """Like :meth:`check`, but only whether each value fits its parameter's annotation
        once read back from a store; an event that cannot satisfy the signature is let
        through (its call fails alike on every backend).

        Raises:
            BindingError: a value would not fit its parameter's annotation.
        """
        if not self.revivable:
            return
        try:
            self._recipe(event)
        except BindingError:
            return
        self.check(event)

    def revive(self, event: Event) -> None:
        """Convert, in ``event`` (read back from a store), each argument a parameter
        takes to the type the parameter is annotated with, strictly (see
        :func:`tidings.codec.converter`). Where a value changes, the event gets new
        ``args`` or ``kwargs``: the ones it had, shared with other listeners, are left
        as they are.

        Raises:
            BindingError: a value does not fit its parameter's annotation (the message
                names the listener, the parameter and the value), or the event lacks a
                required parameter.
        """
        checks = self._recipe(event)[4]
        if not checks:
            return
        # Copied only when a value changes: most arrive as their type already, and a
        # worker revives every delivery.
        args: list[Any] | None = None
        kwargs: dict[str, Any] | None = None
        for (kind, ref), name in checks:
            value = event.args[ref] if kind == _ARG else event.kwargs[ref]
            try:
                converted = self._converters[name](value)
            except Exception as exc:
                raise self._unfit(event, name, value, exc) from exc
            if converted is value:
                continue
            if kind == _ARG:
                if args is None:
                    args = list(event.args)
                args[ref] = converted
            else:
                if kwargs is None:
                    kwargs = dict(event.kwargs)
                kwargs[ref] = converted
        if args is not None:
            event.args = tuple(args)
        if kwargs is not None:
            event.kwargs = kwargs

    def _recipe(self, event: Event) -> _Recipe:
        key = (len(event.args), *event.kwargs, type(event.obj))
        recipe = self._cache.get(key)
        if recipe is None:
            recipe = self._cache[key] = self._plan(event)
        return recipe

    def _unfit(self, event: Event, name: str, value: Any, exc: Exception) -> BindingError:
        annotation = next(ann for n, _, ann, _ in self._params if n == name)
        return BindingError(
            f"listener {self.qualname} cannot be called for event {event.name!r}: "
            f"its parameter {name!r} takes {_type_name(annotation)}, "
            f"not {_short(value)} ({exc})"
        )

    def _plan(self, event: Event) -> _Recipe:
        pos: list[_Source] = []
        kw: list[tuple[str, _Source]] = []
        checks: list[tuple[_Source, str]] = []
        next_arg = 0
        positional_open = True
        obj = event.obj
        for name, kind, ann, has_default in self._params:
            source: _Source | None = None
            if _is_envelope(ann):
                source = (_ENVELOPE, None)
            elif obj is not None and _takes_object(ann, obj):
                source = (_OBJ, None)
            elif kind in _POSITIONAL and positional_open and next_arg < len(event.args):
                source = (_ARG, next_arg)
                next_arg += 1
            elif kind is not inspect.Parameter.POSITIONAL_ONLY and name in event.kwargs:
                source = (_KW, name)
            elif obj is not None and hasattr(obj, name):
                source = (_FIELD, name)
            elif obj is not None and _optional_of(ann) in (Any, object):
                source = (_OBJ, None)  # no field of its name: the object itself
            if source is None:
                if has_default:
                    positional_open = False
                    continue
                raise BindingError(
                    f"listener {self.qualname} cannot be called for event {event.name!r}: "
                    f"its parameter {name!r} is required, and the event has "
                    f"{_describe(event)}"
                )
            if name in self._converters and source[0] in (_ARG, _KW):
                checks.append((source, name))
            if kind in _POSITIONAL and positional_open:
                pos.append(source)
            elif kind is inspect.Parameter.POSITIONAL_ONLY:
                raise BindingError(
                    f"listener {self.qualname} cannot be called for event {event.name!r}: "
                    f"positional-only parameter {name!r} follows one left to its default"
                )
            else:
                kw.append((name, source))
        rest_from = next_arg if self._var_args and positional_open else -1
        return tuple(pos), tuple(kw), rest_from, self._named, tuple(checks)


def keyword_caller(
    fn: Callable[..., Any], names: tuple[str, ...] | None
) -> Callable[[dict[str, Any]], Any]:
    """A function calling ``fn`` with a payload's keywords: ``caller(kwargs)``.

    With ``names`` (all of ``fn``'s parameters, each passable by position) the values
    are taken from the dict and passed by position: keywords ``fn`` does not name are
    left out, a missing one raises ``KeyError``. That costs a fraction of
    ``fn(**kwargs)``, which copies the dict and unpacks it again. Without ``names``,
    ``fn(**kwargs)``: a ``TypeError`` unless the keywords fit the parameters.
    """
    if names is None:
        return lambda kw: fn(**kw)
    if not names:
        return lambda kw: fn()
    if len(names) == 1:
        (a,) = names
        return lambda kw: fn(kw[a])
    if len(names) == 2:
        a, b = names
        return lambda kw: fn(kw[a], kw[b])
    if len(names) == 3:
        a, b, c = names
        return lambda kw: fn(kw[a], kw[b], kw[c])
    take = operator.itemgetter(*names)
    return lambda kw: fn(*take(kw))


def _take(event: Event, source: _Source) -> Any:
    kind, ref = source
    if kind == _ARG:
        return event.args[ref]
    if kind == _KW:
        return event.kwargs[ref]
    if kind == _ENVELOPE:
        return event
    if kind == _OBJ:
        return event.obj
    return getattr(event.obj, ref)


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and not get_args(annotation):
        return annotation.__qualname__
    return repr(annotation).replace("typing.", "")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _describe(event: Event) -> str:
    parts = []
    if event.obj is not None:
        parts.append(f"a {type(event.obj).__qualname__} object")
    if event.args:
        parts.append(f"{len(event.args)} positional argument(s)")
    parts.append(f"keyword arguments {sorted(event.kwargs)}" if event.kwargs else "no keywords")
    return ", ".join(parts)
