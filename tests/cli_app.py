"""An app for the CLI tests: ``tests.cli_app:make_bus()`` builds a fresh bus each time."""

from __future__ import annotations

import os

from tidings import Bus, Retry, listener


@listener("order.paid", retry=Retry(attempts=2, backoff=0), timeout=5)
async def charge(order_id: int) -> None:
    if order_id < 0:
        raise ValueError(f"order {order_id} cannot be charged")


@listener("order.*", concurrency=1)
def audit(order_id: int) -> None:
    pass


def make_bus() -> Bus:
    return Bus(os.environ["TIDINGS_TEST_URL"], listeners=[charge, audit])


not_a_bus = 42
