"""The dashboard as a plain ASGI app: a JSON API over the bus, and the static page."""

from __future__ import annotations

import asyncio
import inspect
import logging
import mimetypes
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl

import msgspec

from tidings.dashboard import _data
from tidings.errors import ConfigurationError, TidingsError

if TYPE_CHECKING:
    from tidings.bus import Bus

__all__ = ["Access", "Auth", "Dashboard", "Request"]

logger = logging.getLogger("tidings.dashboard")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: What a request may do: ``"act"`` (see, replay, purge), ``"see"`` (read only), or
#: nothing (``None`` or ``False``: 403). ``True`` means ``"see"``.
Access = Literal["act", "see"] | bool | None
#: The auth hook: receives the request, returns (or resolves to) its :data:`Access`.
Auth = Callable[["Request"], "Access | Awaitable[Access]"]

# The header a page's actions carry: a cross-site form cannot set it, so a page elsewhere
# cannot make a signed-in browser replay or purge.
ACTION_HEADER = "x-tidings-dashboard"
_MAX_BODY = 1 << 20
_STATIC = resources.files("tidings.dashboard") / "static"
_CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}


@dataclass(frozen=True, slots=True)
class Request:
    """What the auth hook is shown of a request."""

    method: str
    #: The path inside the dashboard (``/api/overview``), without where it is mounted.
    path: str
    headers: dict[str, str]
    query: dict[str, str]
    client: tuple[str, int] | None
    #: The ASGI scope, for what the fields above leave out (a session, a user).
    scope: Scope = field(repr=False)


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Dashboard:
    """The dashboard of ``bus`` as an ASGI app (see :func:`tidings.dashboard.app`)."""

    def __init__(self, bus: Bus, *, auth: Auth | None = None, metrics: bool = True) -> None:
        self.bus = bus
        self.auth = auth
        self.sampler = _data.Sampler(bus)
        self.metrics: Any = None
        if metrics:
            self.metrics = _metrics_for(bus)
        # Whether this app started the bus (in its lifespan), and so closes it.
        self._started_bus = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1000})  # none here: it polls
            return
        if scope["type"] != "http":
            return
        path = scope.get("path", "/")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        if len(path) > 1:
            path = path.rstrip("/")  # Litestar's mounts add one
        raw = scope.get("raw_path") or b""
        if path == "/" and raw and not raw.endswith(b"/"):
            path = ""  # the page's relative links need the slash: redirect
        try:
            await self._handle(scope, path, receive, send)
        except _HTTPError as exc:
            await _send_json(send, {"error": str(exc)}, exc.status)
        except (TidingsError, ValueError) as exc:
            await _send_json(send, {"error": str(exc)}, 400)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    if not self.bus.started:
                        await self.bus.start()
                        self._started_bus = True
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._started_bus:
                    await self.bus.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _access(self, scope: Scope, path: str) -> Literal["act", "see"] | None:
        if self.auth is None:
            return "see"  # read only, unless a hook allows actions
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        request = Request(
            method=scope.get("method", "GET"),
            path=path,
            headers=headers,
            query=dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"))),
            client=tuple(scope["client"]) if scope.get("client") else None,
            scope=scope,
        )
        granted = self.auth(request)
        if inspect.isawaitable(granted):
            granted = await granted
        if granted == "act":
            return "act"
        if granted is True or granted == "see":
            return "see"
        return None

    async def _handle(self, scope: Scope, path: str, receive: Receive, send: Send) -> None:
        method = scope.get("method", "GET")
        if path == "":
            # Relative links need the trailing slash.
            raw = scope.get("raw_path") or b""
            location = (raw.decode("latin-1") if raw else scope.get("root_path", "")) + "/"
            await _send(send, 307, b"", [(b"location", location.encode("latin-1"))])
            return
        access = await self._access(scope, path)
        if access is None:
            raise _HTTPError(403, "not allowed to see this dashboard")
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        if method in ("GET", "HEAD"):
            if path == "/" or path == "/index.html":
                await _send_static(send, "index.html")
            elif path.startswith("/static/"):
                await _send_static(send, path[len("/static/") :])
            elif path == "/metrics":
                await self._send_metrics(send)
            elif path.startswith("/api/"):
                await _send_json(send, await self._get(path[len("/api/") :], query, access))
            else:
                raise _HTTPError(404, f"no page {path}")
            return
        if method != "POST" or not path.startswith("/api/"):
            raise _HTTPError(405, f"{method} {path} is not allowed")
        if access != "act":
            raise _HTTPError(403, "this dashboard is read only: the auth hook allows no actions")
        headers = dict(scope.get("headers", []))
        if headers.get(ACTION_HEADER.encode()) != b"1":
            raise _HTTPError(403, f"actions need the {ACTION_HEADER} header")
        body = await _read_body(receive)
        try:
            payload = msgspec.json.decode(body) if body else {}
        except msgspec.DecodeError as exc:
            raise _HTTPError(400, f"the body is not JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise _HTTPError(400, "the body must be a JSON object")
        await _send_json(send, await self._post(path[len("/api/") :], payload))

    async def _get(self, path: str, query: dict[str, str], access: str) -> Any:
        bus = self.bus
        if path == "overview":
            listeners = await _data.overview(bus, self.sampler)
            return {
                "bus": bus.url,
                "backend": type(bus.backend).__name__,
                "durable": bus.backend.durable,
                "can_act": access == "act",
                "counted": all(s.counted for s in listeners),
                "listeners": [{**s.json(), "rates": self.sampler.rates(s.name)} for s in listeners],
            }
        if path == "listener":
            name = query.get("name", "")
            where = _data.DeadFilter(listener=name)
            letters = await _data.search_dead(bus, where)
            snapshots = {s.name: s for s in await _data.overview(bus, self.sampler)}
            snap = snapshots.get(name)
            if snap is None:
                raise _HTTPError(404, f"no listener {name!r}")
            return {
                **snap.json(),
                "rates": self.sampler.rates(name),
                "dead_letters": [_data.letter_json(d) for d in letters[:20]],
                "failures": [f for f in self.sampler.failures if f["listener"] == name][:20],
                "sees_failures": self.sampler.sees_failures,
                "can_act": access == "act",
            }
        if path == "dead":
            where = _data.DeadFilter.from_mapping(query)
            letters = await _data.search_dead(bus, where)
            limit = max(1, min(int(query.get("limit", "100")), 1000))
            return {
                "total": len(letters),
                "letters": [_data.letter_json(d) for d in letters[:limit]],
                "can_act": access == "act",
            }
        if path == "schedules":
            return {"schedules": _data.schedules(bus)}
        if path == "delayed":
            return await _data.delayed(bus, float(query.get("within_s", "3600")))
        raise _HTTPError(404, f"no API /{path}")

    async def _post(self, path: str, payload: dict[str, Any]) -> Any:
        if path not in ("dead/replay", "dead/purge"):
            raise _HTTPError(404, f"no action /{path}")
        if "letters" in payload:
            raw = payload["letters"]
            if not isinstance(raw, list) or not all(
                isinstance(x, dict) and isinstance(x.get("event_id"), str) for x in raw
            ):
                raise _HTTPError(400, "letters must be a list of {event_id, listener}")
            pairs = [(x["event_id"], str(x.get("listener", ""))) for x in raw]
        else:
            where = _data.DeadFilter.from_mapping(payload.get("filter") or {})
            pairs = [(d.event.id, d.listener) for d in await _data.search_dead(self.bus, where)]
        count = 0
        act = self.bus.replay_dead_letters if path == "dead/replay" else self.bus.purge_dead_letters
        for listener, ids in _data.by_listener(pairs).items():
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                count += await _data.on_bus_loop(
                    self.bus, act(ids=chunk, listener=listener or None)
                )
        logger.info("dashboard: %s of %d dead letter(s)", path.split("/")[1], count)
        return {"count": count}

    async def _send_metrics(self, send: Send) -> None:
        if self.metrics is None:
            raise _HTTPError(
                404,
                "no metrics: pip install 'tidings[prometheus]', and make the app before "
                "the bus starts (or instrument the bus with tidings.metrics.instrument)",
            )
        from tidings.metrics import CONTENT_TYPE

        body = await self.metrics.scrape()
        await _send(send, 200, body, [(b"content-type", CONTENT_TYPE.encode())])


def _metrics_for(bus: Bus) -> Any:
    """The bus's metrics: those it has, or new ones if it has not started yet."""
    try:
        from tidings.metrics import instrument, metrics_of
    except ImportError:
        return None
    existing = metrics_of(bus)
    if existing is not None or bus.started:
        return existing
    try:
        return instrument(bus)
    except ConfigurationError:  # pragma: no cover - checked above
        return None


async def _read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += bytes(message.get("body", b""))
        if len(body) > _MAX_BODY:
            raise _HTTPError(413, "the body is too large")
        if not message.get("more_body", False):
            return body


async def _send(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = list(headers or [])
    headers.append((b"content-length", str(len(body)).encode()))
    headers.append((b"cache-control", b"no-store"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_json(send: Send, value: Any, status: int = 200) -> None:
    await _send(send, status, msgspec.json.encode(value), [(b"content-type", b"application/json")])


async def _send_static(send: Send, name: str) -> None:
    if "/" in name or name.startswith(".") or not name:
        raise _HTTPError(404, f"no file {name!r}")
    resource = _STATIC / name
    if not resource.is_file():
        raise _HTTPError(404, f"no file {name!r}")
    body = await asyncio.to_thread(resource.read_bytes)
    suffix = name[name.rfind(".") :]
    content_type = _CONTENT_TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "text/plain"
    if content_type.startswith("text/"):
        content_type += "; charset=utf-8"
    await _send(send, 200, body, [(b"content-type", content_type.encode())])
