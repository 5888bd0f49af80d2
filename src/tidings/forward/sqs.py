"""Forwarding events to an AWS SQS queue in batches of up to ten (aiobotocore)."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from tidings.delivery import Retry
from tidings.errors import ConfigurationError, ForwardError
from tidings.events import Event
from tidings.forward._base import Forwarder, event_json, listener_name
from tidings.forward._batch import Batcher
from tidings.listeners import Listener

__all__ = ["sqs"]

#: SendMessageBatch takes at most ten messages.
MAX_BATCH = 10

DEFAULT_RETRY = Retry(attempts=5, backoff=1.0, factor=2.0, max_backoff=30.0)


def _session(session: Any) -> Any:
    try:
        from aiobotocore.session import get_session
    except ImportError as exc:  # pragma: no cover - the extra is installed in tests
        raise ImportError(
            "the SQS forwarder needs aiobotocore: pip install 'tidings[sqs]'"
        ) from exc
    return session if session is not None else get_session()


@dataclass(slots=True)
class _Connection:
    client: Any
    stack: AsyncExitStack


class SQS(Forwarder[_Connection]):
    """Sends each event's JSON as one SQS message, batching the events of a burst."""

    def __init__(
        self,
        queue_url: str,
        *,
        session: Any,
        client_options: Mapping[str, Any],
        batch_wait_s: float,
        message_group_id: str | None,
    ) -> None:
        super().__init__()
        self.queue_url = queue_url
        self.fifo = queue_url.endswith(".fifo")
        self.session = session
        self.client_options = dict(client_options)
        self.batch_wait_s = batch_wait_s
        self.message_group_id = message_group_id
        # One batcher per loop, apart from the connection: the first events of a burst
        # join a batch at once, while the connection is still opening.
        self._batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Batcher[Event]] = (
            weakref.WeakKeyDictionary()
        )

    async def _open(self) -> _Connection:
        stack = AsyncExitStack()
        client = await stack.enter_async_context(
            self.session.create_client("sqs", **self.client_options)
        )
        return _Connection(client, stack)

    async def _close(self, connection: _Connection) -> None:
        await connection.stack.aclose()

    async def aclose(self) -> None:
        batcher = self._batchers.pop(asyncio.get_running_loop(), None)
        if batcher is not None:
            await batcher.aclose()
        await super().aclose()

    async def send(self, event: Event) -> None:
        loop = asyncio.get_running_loop()
        batcher = self._batchers.get(loop)
        if batcher is None:
            batcher = Batcher(self._send_batch, size=MAX_BATCH, wait_s=self.batch_wait_s)
            self._batchers[loop] = batcher
        await batcher.send(event)

    def _entry(self, index: int, event: Event) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "Id": str(index),
            "MessageBody": event_json(event).decode(),
            "MessageAttributes": {
                "tidings-event": {"DataType": "String", "StringValue": event.name},
                "tidings-event-id": {"DataType": "String", "StringValue": event.id},
            },
        }
        if self.fifo:
            # The event id deduplicates a retried send; one group per event name keeps
            # each name's events in order unless a group is given.
            entry["MessageGroupId"] = self.message_group_id or event.name
            entry["MessageDeduplicationId"] = event.id
        return entry

    async def _send_batch(self, events: list[Event]) -> Sequence[BaseException | None]:
        connection = await self.connection()
        entries = [self._entry(i, event) for i, event in enumerate(events)]
        try:
            response = await connection.client.send_message_batch(
                QueueUrl=self.queue_url, Entries=entries
            )
        except Exception as exc:
            raise ForwardError(
                f"SQS queue {self.queue_url} did not take {len(events)} message(s): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        outcomes: list[BaseException | None] = [None] * len(events)
        for failed in response.get("Failed", ()):
            index = int(failed["Id"])
            outcomes[index] = ForwardError(
                f"SQS queue {self.queue_url} refused event {events[index].id}: "
                f"{failed.get('Code')}: {failed.get('Message', '')}"
            )
        return outcomes


def sqs(
    queue_url: str,
    *names: str | type[Any],
    region: str | None = None,
    endpoint_url: str | None = None,
    session: Any = None,
    client_options: Mapping[str, Any] | None = None,
    batch_wait: float = 0.0,
    message_group_id: str | None = None,
    retry: Retry | int | None = DEFAULT_RETRY,
    name: str | None = None,
    **options: Any,
) -> Listener[..., Any]:
    """A listener that sends each event of ``names`` to an SQS queue as a JSON message.

    Events are sent with ``SendMessageBatch``, up to ten at a time: a batch is what the
    listener's deliveries handed over until the loop's next turn (or ``batch_wait``
    seconds). Each delivery waits for its own message's outcome, so a message SQS
    refuses is retried (and dead-lettered) alone. The body is the event's JSON
    (``{"id", "name", "timestamp", "attempt", "headers", "payload"}``); the message
    attributes ``tidings-event`` and ``tidings-event-id`` carry its name and id. On a
    FIFO queue (``.fifo``), the event id is the deduplication id and the group is
    ``message_group_id`` or the event's name.

    Args:
        queue_url: the queue's URL.
        names: the event names, patterns or typed-event classes to forward.
        region: the AWS region (default: botocore's configuration).
        endpoint_url: another endpoint (a local SQS, say).
        session: an aiobotocore session (default: a new one).
        client_options: more keyword arguments of ``create_client`` (credentials, a
            botocore ``Config``).
        batch_wait: seconds a batch waits for more events after its first one.
        message_group_id: a FIFO queue's message group for every event.
        retry: the listener's retry policy.
        name: the listener's name (default ``sqs(<queue url>)``); keep it stable, a
            durable store tracks deliveries by it.
        options: other listener options (``concurrency``, ``on_dead``...). A
            ``concurrency`` under ten makes batches that small.

    Raises:
        ConfigurationError: no names, or a negative ``batch_wait``.
        ImportError: aiobotocore is missing (``pip install 'tidings[sqs]'``).
    """
    if batch_wait < 0:
        raise ConfigurationError(f"batch_wait must be 0 or more seconds, not {batch_wait!r}")
    client = dict(client_options or {})
    if region is not None:
        client["region_name"] = region
    if endpoint_url is not None:
        client["endpoint_url"] = endpoint_url
    forwarder = SQS(
        queue_url,
        session=_session(session),
        client_options=client,
        batch_wait_s=batch_wait,
        message_group_id=message_group_id,
    )
    return forwarder.listener(
        names, name or listener_name("sqs", queue_url), retry=retry, **options
    )
