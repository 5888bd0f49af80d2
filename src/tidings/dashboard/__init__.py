"""A web dashboard of a bus: its listeners' figures live, their failures, dead letters
to search, replay and purge, cron schedules and delayed deliveries.

``tidings.dashboard.app(bus)`` is a plain ASGI app (no dependency): mount it in a
FastAPI, Starlette or Litestar app (``app.mount("/tidings", dashboard.app(bus))``), or
serve it alone with ``tidings dashboard APP``. Every figure except the rates is read
from the store, so it is the same for every worker and survives restarts; on the memory
backend it shows the process it runs in. The rates (deliveries/s, failures/s) are those
of the listeners running in the dashboard's own process.

It is read only unless an ``auth`` hook allows actions: the hook receives each
:class:`Request` and returns ``"act"`` (see, replay and purge), ``"see"`` (read only) or
``None`` / ``False`` (403); it may be async. The app also serves ``/metrics`` for
Prometheus when ``tidings[prometheus]`` is installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tidings.dashboard._app import Access, Auth, Dashboard, Request

if TYPE_CHECKING:
    from tidings.bus import Bus

__all__ = ["Access", "Auth", "Dashboard", "Request", "app"]


def app(bus: Bus, *, auth: Auth | None = None, metrics: bool = True) -> Dashboard:
    """The dashboard of ``bus`` as an ASGI app.

    Args:
        bus: the bus to show. Made before the bus starts, the app also counts the
            failures this process sees (for the listener pages) and instruments the bus
            for ``/metrics``; served alone, the app starts and closes the bus in its
            lifespan if nothing else did.
        auth: who may see and who may act (see the module's docstring); without it,
            everyone who reaches the app may see, and nobody may act.
        metrics: serve ``/metrics`` (needs ``tidings[prometheus]``).
    """
    return Dashboard(bus, auth=auth, metrics=metrics)
