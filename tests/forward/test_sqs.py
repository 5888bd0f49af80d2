"""tidings.forward.sqs against moto's SQS server, started on a free loopback port."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import AioSession, get_session

from tidings import Bus, Retry, forward

from .conftest import CREDENTIALS


class Batches:
    """Records the size of every SendMessageBatch call a session's clients make."""

    def __init__(self, session: AioSession) -> None:
        self.sizes: list[int] = []
        session.register("before-parameter-build.sqs.SendMessageBatch", self._before)

    def _before(self, params: dict[str, Any], **kwargs: Any) -> None:
        self.sizes.append(len(params["Entries"]))


@pytest.fixture
async def client(endpoint: str) -> AsyncIterator[Any]:
    async with get_session().create_client("sqs", endpoint_url=endpoint, **CREDENTIALS) as c:
        yield c


async def _queue(client: Any, fifo: bool = False) -> str:
    name = f"tidings-{uuid.uuid4().hex[:12]}" + (".fifo" if fifo else "")
    attributes = {"FifoQueue": "true"} if fifo else {}
    created = await client.create_queue(QueueName=name, Attributes=attributes)
    url: str = created["QueueUrl"]
    return url


async def _receive(client: Any, url: str, count: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    while len(messages) < count:
        got = await client.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, MessageAttributeNames=["All"]
        )
        messages.extend(got.get("Messages", []))
    return messages


def _sqs(endpoint: str, url: str, session: AioSession, **options: Any) -> Any:
    return forward.sqs(
        url,
        "order.*",
        endpoint_url=endpoint,
        session=session,
        client_options={k: v for k, v in CREDENTIALS.items() if k != "region_name"},
        region="us-east-1",
        **options,
    )


async def test_events_go_to_sqs_in_batches_of_at_most_ten(endpoint: str, client: Any) -> None:
    url = await _queue(client)
    session = get_session()
    batches = Batches(session)
    async with Bus(listeners=[_sqs(endpoint, url, session)]) as bus:
        for n in range(25):
            bus.emit("order.paid", order_id=n)
        bus.emit("user.created", name="Ada")  # not forwarded
        await bus.drain()
        assert bus.dead_letters() == []
    assert sum(batches.sizes) == 25
    assert max(batches.sizes) == 10
    assert len(batches.sizes) == 3
    messages = await _receive(client, url, 25)
    bodies = [json.loads(m["Body"]) for m in messages]
    assert sorted(b["payload"]["kwargs"]["order_id"] for b in bodies) == list(range(25))
    first = messages[0]["MessageAttributes"]
    assert first["tidings-event"]["StringValue"] == "order.paid"
    assert first["tidings-event-id"]["StringValue"] in {b["id"] for b in bodies}


async def test_a_fifo_queue_gets_the_event_id_as_deduplication_id(
    endpoint: str, client: Any
) -> None:
    url = await _queue(client, fifo=True)
    async with Bus(listeners=[_sqs(endpoint, url, get_session())]) as bus:
        for n in range(3):
            await bus.publish("order.paid", order_id=n)
        await bus.drain()
    got = await client.receive_message(QueueUrl=url, MaxNumberOfMessages=10, AttributeNames=["All"])
    messages = got["Messages"]
    assert [json.loads(m["Body"])["payload"]["kwargs"]["order_id"] for m in messages] == [0, 1, 2]
    for m in messages:
        assert m["Attributes"]["MessageGroupId"] == "order.paid"
        assert m["Attributes"]["MessageDeduplicationId"] == json.loads(m["Body"])["id"]


async def test_a_queue_that_refuses_makes_dead_letters_after_the_retries(
    endpoint: str,
) -> None:
    url = f"{endpoint}/123456789012/no-such-queue-{uuid.uuid4().hex[:8]}"
    session = get_session()
    batches = Batches(session)
    hook = _sqs(endpoint, url, session, retry=Retry(attempts=2, backoff=0))
    async with Bus(listeners=[hook]) as bus:
        for n in range(3):
            bus.emit("order.paid", order_id=n)
        await bus.drain()
        dead = bus.dead_letters()
    assert len(dead) == 3
    assert all(d.attempts == 2 for d in dead)
    assert dead[0].error.startswith(f"ForwardError: SQS queue {url} did not take")
    assert sum(batches.sizes) == 6


async def test_a_durable_store_forwards_to_sqs_in_batches(
    endpoint: str, client: Any, tmp_path: Path
) -> None:
    url = await _queue(client)
    session = get_session()
    batches = Batches(session)
    hook = _sqs(endpoint, url, session)
    async with Bus(f"sqlite:///{tmp_path / 'sqs.db'}?poll_interval=0.01", listeners=[hook]) as bus:
        for n in range(30):
            bus.emit("order.paid", order_id=n)
        await bus.drain()
        assert await bus.list_dead_letters() == []
    assert sum(batches.sizes) == 30
    assert max(batches.sizes) <= 10
    assert len(batches.sizes) < 30  # the store's claimed deliveries share calls
    messages = await _receive(client, url, 30)
    assert sorted(json.loads(m["Body"])["payload"]["kwargs"]["order_id"] for m in messages) == list(
        range(30)
    )
