"""Forwarders: a shop's order events go to a partner's webhook, to an SQS queue and into
a SQLite store for the shop's workers, each with its own retries and dead letters.

The partner's side is here too: a Starlette app that checks each request's signature.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tidings import Bus, forward


def shop_bus(*, webhook_url: str, secret: str, queue_url: str, store_url: str, **sqs: Any) -> Bus:
    """The shop's in-process bus, forwarding order events three ways."""
    return Bus(
        listeners=[
            forward.webhook(webhook_url, "order.*", secret=secret),
            forward.sqs(queue_url, "order.paid", **sqs),  # e.g. region="eu-west-1"
            forward.bridge(store_url, "order.**"),
        ]
    )


def partner_app(secret: str) -> Starlette:
    """The partner's webhook receiver: refuses a request it cannot verify."""
    app = Starlette()
    app.state.orders = []

    async def hook(request: Request) -> Response:
        body = await request.body()
        if not forward.verify_signature(secret, body, request.headers):
            return Response(status_code=401)
        app.state.orders.append(body)
        return Response(status_code=204)

    app.router.routes.append(Route("/hooks/orders", hook, methods=["POST"]))
    return app
