"""What closing a bus does once its backend has stopped: say which events were not
delivered, and close what listeners hold open."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tidings.listeners import Registry

__all__ = ["close_listeners", "report_undelivered"]

logger = logging.getLogger("tidings.bus")

# An error naming undelivered events names at most this many.
_MAX_IDS_LOGGED = 100


def report_undelivered(ids: list[str], limit_s: float) -> None:
    """Log once, by event id, what a bus closed without delivering (after ``limit_s``
    seconds of draining)."""
    if not ids:
        return
    shown = ", ".join(ids[:_MAX_IDS_LOGGED])
    more = len(ids) - _MAX_IDS_LOGGED
    logger.error(
        "bus closed with %d undelivered event(s) after %.3gs: %s%s",
        len(ids),
        limit_s,
        shown,
        f" and {more} more (all ids at debug level)" if more > 0 else "",
    )
    if more > 0:
        logger.debug("undelivered event ids: %s", ", ".join(ids))


async def close_listeners(registry: Registry) -> None:
    """Close what listeners hold open once their deliveries are over: a listener
    function with an async ``aclose`` (a forwarder's connections) is closed here."""
    for sub in registry.subscriptions():
        close = getattr(sub.listener.fn, "aclose", None)
        if close is None:
            continue
        try:
            await close()
        except Exception:
            logger.exception("closing listener %s raised", sub.listener.qualname)
