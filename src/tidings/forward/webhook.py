"""Forwarding events to an HTTP webhook, signed with HMAC-SHA256 (httpx)."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from tidings._units import positive_seconds
from tidings.delivery import Retry
from tidings.errors import ConfigurationError, ForwardError
from tidings.events import Event
from tidings.forward._base import Forwarder, event_json, listener_name
from tidings.listeners import Listener

if TYPE_CHECKING:
    import httpx

__all__ = ["SIGNATURE_HEADER", "TIMESTAMP_HEADER", "verify_signature", "webhook"]

#: ``sha256=`` and the hex HMAC-SHA256, keyed with the secret, of ``{timestamp}.{body}``.
SIGNATURE_HEADER = "Tidings-Signature"
#: When the request was signed, in whole seconds since the epoch.
TIMESTAMP_HEADER = "Tidings-Timestamp"

#: Webhooks are often briefly down: five attempts over about a minute by default.
DEFAULT_RETRY = Retry(attempts=5, backoff=2.0, factor=2.0, max_backoff=60.0)


def _httpx() -> Any:
    try:
        import httpx
    except ImportError as exc:  # pragma: no cover - the extra is installed in tests
        raise ImportError(
            "the webhook forwarder needs httpx: pip install 'tidings[webhook]'"
        ) from exc
    return httpx


def sign(secret: str | bytes, timestamp: str, body: bytes) -> str:
    """The signature header's value for ``body`` sent at ``timestamp``."""
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify_signature(
    secret: str | bytes,
    body: bytes,
    headers: Mapping[str, str],
    *,
    tolerance_s: float = 300.0,
    now: float | None = None,
) -> bool:
    """Whether a request a webhook forwarder sent is authentic and recent: for the
    receiving side. ``headers`` may be any mapping (matched without regard to case).

    Args:
        secret: the secret the forwarder was given.
        body: the request's body, as received (bytes, not re-encoded JSON).
        tolerance_s: how old (or how far ahead) the timestamp may be.
        now: the current time, in seconds since the epoch (default: now).
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    timestamp = lowered.get(TIMESTAMP_HEADER.lower(), "")
    signature = lowered.get(SIGNATURE_HEADER.lower(), "")
    try:
        age = abs((time.time() if now is None else now) - int(timestamp))
    except ValueError:
        return False
    return age <= tolerance_s and hmac.compare_digest(sign(secret, timestamp, body), signature)


class Webhook(Forwarder["httpx.AsyncClient"]):
    """POSTs each event's JSON to a URL; a status other than 2xx is a ``ForwardError``."""

    def __init__(
        self,
        url: str,
        *,
        secret: str | bytes | None,
        headers: Mapping[str, str],
        timeout_s: float,
    ) -> None:
        super().__init__()
        self.url = url
        self._secret = secret
        self.headers = dict(headers)
        self.timeout_s = timeout_s
        self._where = listener_name("webhook", url)

    async def _open(self) -> httpx.AsyncClient:
        client: httpx.AsyncClient = _httpx().AsyncClient(timeout=self.timeout_s)
        return client

    async def _close(self, connection: httpx.AsyncClient) -> None:
        await connection.aclose()

    async def send(self, event: Event) -> None:
        body = event_json(event)
        timestamp = str(int(time.time()))
        headers = {
            **self.headers,
            "Content-Type": "application/json",
            "Tidings-Event": event.name,
            "Tidings-Event-Id": event.id,
            "Tidings-Attempt": str(event.attempt),
            TIMESTAMP_HEADER: timestamp,
        }
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = sign(self._secret, timestamp, body)
        client = await self.connection()
        httpx = _httpx()
        try:
            response = await client.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise ForwardError(
                f"{self._where} could not be reached for event {event.id}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not 200 <= response.status_code < 300:
            raise ForwardError(
                f"{self._where} answered {response.status_code} to event {event.id} "
                f"({event.name}): {response.text[:200]}"
            )


def webhook(
    url: str,
    *names: str | type[Any],
    secret: str | bytes | None,
    headers: Mapping[str, str] | None = None,
    timeout: float | timedelta = 10.0,
    retry: Retry | int | None = DEFAULT_RETRY,
    name: str | None = None,
    **options: Any,
) -> Listener[..., Any]:
    """A listener that POSTs each event of ``names`` to ``url`` as JSON.

    The body is ``{"id", "name", "timestamp", "attempt", "headers", "payload"}``; the
    request carries ``Tidings-Event``, ``Tidings-Event-Id``, ``Tidings-Attempt``,
    ``Tidings-Timestamp`` and, with a secret, ``Tidings-Signature`` (check it with
    :func:`verify_signature`). A status other than 2xx, or no answer, fails the delivery,
    which is retried by ``retry`` (five attempts over about a minute by default) and
    then kept as a dead letter.

    Args:
        url: where to POST.
        names: the event names, patterns or typed-event classes to forward.
        secret: the shared secret to sign with; ``None`` sends unsigned requests
            (it must be given, so an unsigned webhook is a choice).
        headers: extra headers for every request (an ``Authorization``, say).
        timeout: seconds (or a ``timedelta``) for each request.
        retry: the listener's retry policy.
        name: the listener's name (default ``webhook(<url without query>)``); keep it
            stable, a durable store tracks deliveries by it.
        options: other listener options (``concurrency``, ``on_dead``...).

    Raises:
        ConfigurationError: a URL that is not http(s), or no names.
        ImportError: httpx is missing (``pip install 'tidings[webhook]'``).
    """
    if not url.startswith(("http://", "https://")):
        raise ConfigurationError(f"a webhook URL must start with http:// or https://: {url!r}")
    _httpx()
    timeout_s = positive_seconds(timeout, "webhook timeout")
    forwarder = Webhook(url, secret=secret, headers=headers or {}, timeout_s=timeout_s)
    return forwarder.listener(names, name or listener_name("webhook", url), retry=retry, **options)
