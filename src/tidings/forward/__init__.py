"""Forwarders: listeners that send events out of the bus, made with one call.

- :func:`webhook`: POST each event's JSON to a URL, signed with HMAC-SHA256 (httpx,
  ``pip install 'tidings[webhook]'``); :func:`verify_signature` checks it on arrival.
- :func:`bridge`: publish each event on another tidings bus (another backend).
- :func:`sqs`: send each event to an AWS SQS queue, ten at a time with
  ``SendMessageBatch`` (aiobotocore, ``pip install 'tidings[sqs]'``).

Each returns a :class:`~tidings.Listener`, so it goes wherever listeners go
(``Bus(listeners=[...])``, a ``Registry``) and has a listener's retries, timeouts
and dead letters: a destination that refuses an event fails the delivery with a
:class:`~tidings.ForwardError`. A forwarder's connections close with the bus.
"""

from tidings.forward.bridge import bridge
from tidings.forward.sqs import sqs
from tidings.forward.webhook import verify_signature, webhook

__all__ = ["bridge", "sqs", "verify_signature", "webhook"]
