"""FastAPI and Starlette: ``Depends`` in listeners, and a lifespan that runs the bus.

A listener may declare FastAPI dependencies beside its event arguments::

    @listener("user.created")
    async def send_welcome(email: str, mailer: Mailer = Depends(get_mailer)) -> None: ...

They are resolved by FastAPI's own machinery for every delivery: sub-dependencies, the
per-call cache (``use_cache``), ``yield`` dependencies (torn down once the listener
returned, or seeing its exception) and the app's ``dependency_overrides``. The app is
known once :func:`lifespan` (or :func:`bind`) ties it to the bus. An event is not a
request: a listener or dependency that asks for the ``Request``, a ``WebSocket``, the
``Response``, ``BackgroundTasks`` or a required query, header, cookie, path or body
parameter is a :class:`~tidings.ConfigurationError` when the listener is made.

Nothing needs importing for that: tidings loads this module the first time a listener's
signature mentions FastAPI.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

try:
    from fastapi import params
    from fastapi.dependencies.models import Dependant
    from fastapi.dependencies.utils import get_dependant, solve_dependencies
    from starlette.background import BackgroundTasks
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import HTTPConnection, Request
    from starlette.responses import Response
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "tidings.contrib.fastapi needs FastAPI: pip install 'tidings[fastapi]'"
    ) from exc

from tidings.errors import ConfigurationError, ListenerError

if TYPE_CHECKING:
    from tidings.bus import Bus

__all__ = ["bind", "inject", "lifespan", "unbind"]

# Parameters only a request can fill, by the name used in messages.
_REQUEST_ONLY: tuple[tuple[type[Any], str], ...] = (
    (HTTPConnection, "the request (Request, WebSocket or HTTPConnection)"),
    (Response, "the Response"),
    (BackgroundTasks, "BackgroundTasks"),
)
_REQUEST_PARAMS = (
    ("request_param_name", "the Request"),
    ("websocket_param_name", "a WebSocket"),
    ("http_connection_param_name", "the HTTPConnection"),
    ("response_param_name", "the Response"),
    ("background_tasks_param_name", "BackgroundTasks"),
)
_REQUEST_FIELDS = ("path_params", "query_params", "header_params", "cookie_params", "body_params")

# Apps bound to a bus, most recent last: listeners subscribed after the binding use the
# newest one's overrides.
_bound: list[Any] = []


def _depends(param: inspect.Parameter) -> bool:
    if isinstance(param.default, params.Depends):
        return True
    return any(isinstance(m, params.Depends) for m in getattr(param.annotation, "__metadata__", ()))


def _request_only(annotation: Any) -> str | None:
    target = getattr(annotation, "__origin__", annotation)
    if isinstance(target, type):
        for cls, what in _REQUEST_ONLY:
            if issubclass(target, cls):
                return what
    return None


def _name(call: Any) -> str:
    return getattr(call, "__qualname__", None) or repr(call)


def _check(dependant: Dependant, qualname: str) -> None:
    """Raise ``ConfigurationError`` if a dependency needs what only a request has."""
    for sub in dependant.dependencies:
        where = f"listener {qualname}: its dependency {_name(sub.call)}"
        for attr, what in _REQUEST_PARAMS:
            if getattr(sub, attr, None):
                raise ConfigurationError(
                    f"{where} asks for {what} (parameter {getattr(sub, attr)!r}), and an "
                    "event has none: pass what it needs in the event instead"
                )
        for kind in _REQUEST_FIELDS:
            for field in getattr(sub, kind, ()):
                if field.field_info.is_required():
                    raise ConfigurationError(
                        f"{where} needs the {kind.removesuffix('_params')} parameter "
                        f"{field.name!r}, which only a request has: give it a default or "
                        "pass it in the event instead"
                    )
        _check(sub, qualname)


class _Injected:
    """A listener whose FastAPI dependencies are resolved for every delivery."""

    def __init__(
        self,
        fn: Callable[..., Any],
        signature: inspect.Signature,
        event_signature: inspect.Signature,
        dependant: Dependant,
    ) -> None:
        self.fn = fn
        self.signature = signature
        self.event_signature = event_signature
        self.dependant = dependant
        self.is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
        )
        #: Whose ``dependency_overrides`` apply (set by :func:`bind`).
        self.app: Any = None

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if asyncio.current_task() is None:
            # Started eagerly outside a task; FastAPI's resolution needs one (cancel
            # scopes, threads), so let the runner move this call into its task first.
            await asyncio.sleep(0)
        app = self.app if self.app is not None else (_bound[-1] if _bound else None)
        async with AsyncExitStack() as stack:
            # FastAPI keeps the exit stacks of yield dependencies in the request scope;
            # both of this delivery's are this stack, closed when the listener returned.
            scope: dict[str, Any] = {
                "type": "http",
                "method": "POST",
                "path": "/",
                "headers": [],
                "query_string": b"",
                "app": app,
                "fastapi_inner_astack": stack,
                "fastapi_function_astack": stack,
                "fastapi_astack": stack,
            }
            solved = await solve_dependencies(
                request=Request(scope),
                dependant=self.dependant,
                dependency_overrides_provider=app,
                async_exit_stack=stack,
                embed_body_fields=False,
            )
            if solved.errors:
                raise ListenerError(
                    f"the dependencies of {_name(self.fn)} failed validation: {solved.errors}"
                )
            given = self.event_signature.bind(*args, **kwargs).arguments
            given.update(solved.values)
            ordered = {n: given[n] for n in self.signature.parameters if n in given}
            call = inspect.BoundArguments(self.signature, ordered)
            if self.is_async:
                return await self.fn(*call.args, **call.kwargs)
            return await run_in_threadpool(self.fn, *call.args, **call.kwargs)


def inject(
    fn: Callable[..., Any], signature: inspect.Signature, qualname: str
) -> tuple[Callable[..., Any], inspect.Signature] | None:
    """The listener ``fn`` with its FastAPI dependencies solved per delivery, and the
    parameters the event fills; ``None`` when it declares none (the
    ``tidings.injectors`` plugin of ``fastapi`` and ``starlette``).

    Raises:
        ConfigurationError: a parameter only a request can fill, or dependencies
            FastAPI cannot read.
    """
    injected: list[inspect.Parameter] = []
    kept: list[inspect.Parameter] = []
    for param in signature.parameters.values():
        if _depends(param):
            injected.append(param)
            continue
        what = _request_only(param.annotation)
        if what is not None:
            raise ConfigurationError(
                f"listener {qualname} asks for {what} (parameter {param.name!r}), and an "
                "event has none: pass what it needs in the event instead"
            )
        kept.append(param)
    if not injected:
        return None

    def dependencies() -> None:
        """Stands for the listener's dependency parameters, for FastAPI to read."""

    # FastAPI reads the signature (annotations already resolved) and, through
    # __wrapped__, the listener's module for any annotation left as text.
    dependencies.__signature__ = inspect.Signature(injected)  # type: ignore[attr-defined]
    dependencies.__wrapped__ = fn  # type: ignore[attr-defined]
    try:
        dependant = get_dependant(path="", call=dependencies)
    except Exception as exc:
        raise ConfigurationError(
            f"listener {qualname}: FastAPI cannot read its dependencies: {exc}"
        ) from exc
    _check(dependant, qualname)
    event_signature = signature.replace(parameters=kept)
    return _Injected(fn, signature, event_signature, dependant), event_signature


def bind(bus: Bus, app: Any) -> None:
    """Resolve the dependencies of ``bus``'s listeners with ``app``'s overrides.

    ``app`` is anything with ``dependency_overrides`` (a FastAPI app); listeners
    subscribed later use the most recently bound app. :func:`lifespan` calls this.
    """
    for sub in bus.registry.subscriptions():
        fn = sub.listener.plan.fn
        if isinstance(fn, _Injected):
            fn.app = app
    _bound.append(app)


def unbind(bus: Bus, app: Any) -> None:
    """Undo :func:`bind` (the app stopped)."""
    for sub in bus.registry.subscriptions():
        fn = sub.listener.plan.fn
        if isinstance(fn, _Injected) and fn.app is app:
            fn.app = None
    if app in _bound:
        _bound.remove(app)


def lifespan(
    bus: Bus,
    inner: Callable[[Any], AbstractAsyncContextManager[Mapping[str, Any] | None]] | None = None,
) -> Callable[[Any], AbstractAsyncContextManager[Mapping[str, Any]]]:
    """A lifespan that starts ``bus`` with the app and drains it when the app stops.

    ``FastAPI(lifespan=lifespan(bus))`` or ``Starlette(lifespan=lifespan(bus))``. The
    bus is in the lifespan state as ``bus`` (``request.state.bus``). ``inner``, the
    app's own lifespan, runs inside it, so its startup and shutdown may emit.
    """

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[Mapping[str, Any]]:
        bind(bus, app)
        try:
            async with bus:
                if inner is None:
                    yield {"bus": bus}
                else:
                    async with inner(app) as state:
                        yield {"bus": bus, **(state or {})}
        finally:
            unbind(bus, app)

    return run
