"""examples/forwarding.py: the README's forwarders, end to end on local services."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from pathlib import Path

import uvicorn
from aiobotocore.session import get_session

from examples.forwarding import partner_app, shop_bus
from tidings import Bus, Event, listener

from .conftest import CREDENTIALS


async def test_orders_reach_the_partner_the_queue_and_the_store(
    endpoint: str, tmp_path: Path
) -> None:
    secret = "partner-secret"
    partner = partner_app(secret)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(partner, log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    store_url = f"sqlite:///{tmp_path / 'shop.db'}?poll_interval=0.01"
    stored: list[Event] = []

    @listener("order.**")
    def record(event: Event) -> None:
        stored.append(event)

    try:
        async with get_session().create_client("sqs", endpoint_url=endpoint, **CREDENTIALS) as sqs:
            queue_url = (await sqs.create_queue(QueueName=f"shop-orders-{uuid.uuid4().hex[:8]}"))[
                "QueueUrl"
            ]
            async with Bus(store_url, listeners=[record]) as workers:
                bus = shop_bus(
                    webhook_url=f"http://127.0.0.1:{port}/hooks/orders",
                    secret=secret,
                    queue_url=queue_url,
                    store_url=store_url,
                    endpoint_url=endpoint,
                    client_options=CREDENTIALS,
                )
                async with bus:
                    await bus.publish("order.paid", order_id=1)
                    await bus.publish("order.shipped", order_id=1)
                    await bus.drain()
                    assert bus.dead_letters() == []
                await workers.drain()
            got = await sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10)
    finally:
        server.should_exit = True
        await serving
        sock.close()
    assert [json.loads(b)["name"] for b in partner.state.orders] == ["order.paid", "order.shipped"]
    assert [json.loads(m["Body"])["name"] for m in got["Messages"]] == ["order.paid"]
    assert sorted(e.name for e in stored) == ["order.paid", "order.shipped"]


async def test_the_partner_refuses_an_unsigned_request() -> None:
    import httpx

    partner = partner_app("partner-secret")
    transport = httpx.ASGITransport(app=partner)
    async with httpx.AsyncClient(transport=transport, base_url="http://partner") as client:
        response = await client.post("/hooks/orders", content=b"{}")
    assert response.status_code == 401
    assert partner.state.orders == []
