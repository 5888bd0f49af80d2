"""tidings.forward.webhook against a plain HTTP server on a loopback port."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tidings import Bus, ConfigurationError, Event, ForwardError, Registry, Retry, forward
from tidings.forward.webhook import sign

SECRET = "s3cret"


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """Answers each POST with the next status of ``statuses`` (then 200), keeps them all."""

    statuses: list[int] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    port: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/orders"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: many requests on one connection
                head = await reader.readuntil(b"\r\n\r\n")
                line, *lines = head.decode().split("\r\n")
                headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in lines if h)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append(Request(line.split(" ")[1], headers, body))
                self.arrived.set()
                status = self.statuses.pop(0) if self.statuses else 200
                text = b"nope" if status >= 300 else b""
                writer.write(
                    f"HTTP/1.1 {status} X\r\ncontent-length: {len(text)}\r\n\r\n".encode() + text
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    server = await asyncio.start_server(found.handle, "127.0.0.1", 0)
    found.port = server.sockets[0].getsockname()[1]
    async with server:
        yield found
        server.close()


async def test_each_event_is_posted_as_signed_json(receiver: Receiver) -> None:
    hook = forward.webhook(receiver.url, "order.*", secret=SECRET, headers={"X-Team": "shop"})
    async with Bus(listeners=[hook]) as bus:
        await bus.publish("order.paid", 41, order_id=7, total="12.50")
        await bus.publish("user.created", name="Ada")  # not forwarded
        await bus.drain()
    (request,) = receiver.requests
    assert request.path == "/hooks/orders"
    sent = json.loads(request.body)
    assert sent["name"] == "order.paid"
    assert sent["payload"] == {
        "args": [41],
        "kwargs": {"order_id": 7, "total": "12.50"},
        "obj": None,
    }
    assert sent["attempt"] == 1
    assert request.headers["tidings-event"] == "order.paid"
    assert request.headers["tidings-event-id"] == sent["id"]
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-team"] == "shop"
    assert abs(int(request.headers["tidings-timestamp"]) - time.time()) < 60
    assert forward.verify_signature(SECRET, request.body, request.headers)
    assert not forward.verify_signature("other", request.body, request.headers)
    assert not forward.verify_signature(SECRET, request.body + b" ", request.headers)
    late = time.time() + 301
    assert not forward.verify_signature(SECRET, request.body, request.headers, now=late)


async def test_a_failing_status_retries_by_the_listeners_policy(receiver: Receiver) -> None:
    receiver.statuses = [503, 500]
    hook = forward.webhook(
        receiver.url, "order.paid", secret=SECRET, retry=Retry(attempts=3, backoff=0)
    )
    async with Bus(listeners=[hook]) as bus:
        await bus.publish("order.paid", order_id=7)
        await bus.drain()
        assert bus.dead_letters() == []
    assert [json.loads(r.body)["attempt"] for r in receiver.requests] == [1, 2, 3]
    assert len({json.loads(r.body)["id"] for r in receiver.requests}) == 1


async def test_an_event_the_webhook_keeps_refusing_is_a_dead_letter(receiver: Receiver) -> None:
    receiver.statuses = [500, 500]
    hook = forward.webhook(
        receiver.url, "order.paid", secret=None, retry=Retry(attempts=2, backoff=0)
    )
    assert (
        hook.qualname == f"tidings.forward.webhook(http://127.0.0.1:{receiver.port}/hooks/orders)"
    )
    async with Bus(listeners=[hook]) as bus:
        await bus.publish("order.paid", order_id=7)
        await bus.drain()
        (dead,) = bus.dead_letters()
    assert dead.listener == hook.qualname
    assert dead.error.startswith("ForwardError: webhook(http://127.0.0.1:")
    assert "answered 500 to event" in dead.error
    assert "tidings-signature" not in receiver.requests[0].headers


async def test_an_unreachable_webhook_fails_the_delivery_with_a_forward_error() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    failures: list[BaseException] = []
    hook = forward.webhook(
        f"http://127.0.0.1:{port}/x?token=hidden",
        "order.paid",
        secret=SECRET,
        retry=1,
        on_dead=lambda event, lst, exc: failures.append(exc),
    )
    assert "token" not in hook.qualname
    async with Bus(listeners=[hook]) as bus:
        await bus.publish("order.paid", order_id=7)
        await bus.drain()
    (error,) = failures
    assert isinstance(error, ForwardError)
    assert "could not be reached" in str(error)


async def test_a_webhook_in_a_registry_and_its_client_closes_with_the_bus(
    receiver: Receiver,
) -> None:
    hook = forward.webhook(receiver.url, "order.paid", secret=SECRET, name="billing")
    assert hook.qualname == "tidings.forward.billing"
    registry = Registry([hook])
    bus = Bus()
    bus.include(registry)
    async with bus:
        await bus.publish("order.paid", order_id=1)
        await bus.drain()
        client = hook.forwarder._connections[asyncio.get_running_loop()]  # type: ignore[attr-defined]
    assert client.is_closed
    assert len(receiver.requests) == 1


def test_bad_webhook_urls_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="must start with http:// or https://"):
        forward.webhook("ftp://example.com", "x", secret=SECRET)


def test_a_webhook_timeout_of_no_time_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="webhook timeout must be more than 0 seconds"):
        forward.webhook("https://example.com", "x", secret=SECRET, timeout=0)


def test_the_signature_covers_timestamp_and_body() -> None:
    assert sign(SECRET, "1", b"{}") != sign(SECRET, "2", b"{}")
    assert sign(SECRET, "1", b"{}").startswith("sha256=")
    assert not forward.verify_signature(SECRET, b"{}", {"Tidings-Timestamp": "soon"})
    assert Event("x").name == "x"


async def test_a_webhook_forwards_from_a_durable_store(receiver: Receiver, tmp_path: Path) -> None:
    receiver.statuses = [500]
    hook = forward.webhook(
        receiver.url, "order.*", secret=SECRET, retry=Retry(attempts=2, backoff=0)
    )
    async with Bus(
        f"sqlite:///{tmp_path / 'hooks.db'}?poll_interval=0.01", listeners=[hook]
    ) as bus:
        for n in range(5):
            await bus.publish("order.paid", order_id=n)
        await bus.drain()
        assert await bus.list_dead_letters() == []
    bodies = [json.loads(r.body) for r in receiver.requests]
    assert len(bodies) == 6  # one attempt answered 500, and was made again
    assert sorted({b["payload"]["kwargs"]["order_id"] for b in bodies}) == [0, 1, 2, 3, 4]
    assert all(forward.verify_signature(SECRET, r.body, r.headers) for r in receiver.requests)
