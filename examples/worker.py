"""A durable bus shared by a web process (producer) and a worker.

uv run tidings worker examples.worker:bus          # runs the listeners
uv run tidings emit examples.worker:bus user.created --json '{"email": "a@b.c"}'
uv run tidings emit examples.worker:bus user.created --json '{"email": "a@b.c"}' --delay 60
uv run tidings stats examples.worker:bus
"""

from __future__ import annotations

import os

from tidings import Bus, Event, Retry, listener


@listener("user.created", retry=Retry(attempts=5, backoff=1))
async def send_welcome(email: str) -> None:
    print(f"welcome mail to {email}")


@listener("user.*")
def audit(event: Event) -> None:
    print(f"audit: {event.name} {event.kwargs} attempt {event.attempt}")


bus = Bus(
    os.environ.get("TIDINGS_URL", "sqlite:///tidings-example.db"), listeners=[send_welcome, audit]
)


async def sign_up(email: str) -> None:
    """What a web process does: the payload as keywords, options apart."""
    await bus.publish("user.created", email=email)
    await bus.options(delay=3600, headers={"source": "sign-up"}).publish(
        "user.reminder", email=email
    )
