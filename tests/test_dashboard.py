"""The web dashboard: its API over ASGI, and its pages in headless Chromium against real
SQLite and Redis stores (screenshots in ``$TIDINGS_SCREENSHOTS``, else the test's
temporary directory)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn

from tidings import Bus, Retry, listener
from tidings.dashboard import Access, Request, app

from . import cli_app
from .conftest import Counter
from .services import (
    POSTGRES_URL,
    REDIS_URL,
    drop_prefix,
    drop_schema,
    require_postgres,
    require_redis,
    unique_prefix,
    unique_schema,
)

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ACT = {"x-tidings-dashboard": "1"}


class Shop:
    """What the shop's listeners did, and the orders they fail for."""

    def __init__(self) -> None:
        self.shipped = Counter()
        self.fail_for: set[int] = set()


_shop = Shop()


@listener("order.paid")
async def ship(order_id: int) -> None:
    if order_id in _shop.fail_for:
        raise ValueError(f"no stock for order {order_id}")
    _shop.shipped.add(order_id)


@listener("order.*", retry=Retry(attempts=1))
def audit(order_id: int) -> None:
    pass


@pytest.fixture
def shop() -> Shop:
    global _shop
    _shop = Shop()
    return _shop


async def publish_later(bus: Bus, delay_s: float, name: str, **payload: Any) -> None:
    """Publish ``name`` to be delivered in ``delay_s`` seconds."""
    await bus.options(delay=delay_s).publish(name, **payload)


def _client(dashboard: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=dashboard), base_url="http://t")


# -- the API, on the memory backend ---------------------------------------------------------


async def test_overview_lists_listeners_with_their_counts(shop: Shop) -> None:
    bus = Bus(listeners=[ship, audit])
    dashboard = app(bus)
    async with bus, _client(dashboard) as client:
        for n in range(3):
            bus.emit("order.paid", order_id=n)
        await bus.drain()
        body = (await client.get("/api/overview")).json()
    rows = {row["name"]: row for row in body["listeners"]}
    assert rows[ship.qualname]["delivered"] == 3
    assert rows[ship.qualname]["events"] == ["order.paid"]
    assert rows[audit.qualname]["events"] == ["order.*"]
    assert body["can_act"] is False
    assert body["backend"] == "MemoryBackend"


async def test_the_page_and_its_static_files_are_served() -> None:
    bus = Bus()
    async with bus, _client(app(bus)) as client:
        page = await client.get("/")
        script = await client.get("/static/app.js")
        missing = await client.get("/static/../_app.py")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert 'src="static/app.js"' in page.text  # relative: works wherever it is mounted
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert missing.status_code == 404


async def test_read_only_by_default_refuses_actions(shop: Shop) -> None:
    shop.fail_for.add(1)
    bus = Bus(listeners=[ship])
    async with bus, _client(app(bus)) as client:
        bus.emit("order.paid", order_id=1)
        await bus.drain()
        refused = await client.post("/api/dead/purge", json={"filter": {}}, headers=ACT)
        assert refused.status_code == 403
        assert "read only" in refused.json()["error"]
        assert len(await bus.list_dead_letters()) == 1


async def test_an_auth_hook_decides_who_sees_and_who_acts(shop: Shop) -> None:
    shop.fail_for.update({1, 2})
    bus = Bus(listeners=[ship])
    seen: list[Request] = []

    async def auth(request: Request) -> Access:
        seen.append(request)
        user = request.headers.get("x-user")
        return "act" if user == "admin" else "see" if user == "viewer" else None

    async with bus, _client(app(bus, auth=auth)) as client:
        bus.emit("order.paid", order_id=1)
        bus.emit("order.paid", order_id=2)
        await bus.drain()
        assert (await client.get("/api/overview")).status_code == 403
        viewer = {"x-user": "viewer", **ACT}
        assert (await client.get("/api/dead", headers=viewer)).json()["total"] == 2
        assert (await client.post("/api/dead/purge", json={}, headers=viewer)).status_code == 403
        admin = {"x-user": "admin"}
        # Without the page's own header, a cross-site form cannot act.
        assert (await client.post("/api/dead/purge", json={}, headers=admin)).status_code == 403
        purged = await client.post(
            "/api/dead/purge", json={"filter": {"error": "order 1"}}, headers={**admin, **ACT}
        )
        assert purged.json() == {"count": 1}
    assert seen[0].path == "/api/overview"
    assert [d.event.kwargs for d in await bus.list_dead_letters()] == [{"order_id": 2}]


async def test_dead_letters_search_by_every_field(shop: Shop) -> None:
    shop.fail_for.update({1, 2, 3})
    bus = Bus(listeners=[ship])
    async with bus, _client(app(bus)) as client:
        for n in (1, 2, 3):
            bus.emit("order.paid", order_id=n)
        await bus.drain()
        letters = await bus.list_dead_letters()
        second = letters[1]

        async def total(**query: Any) -> int:
            response = await client.get("/api/dead", params=query)
            assert response.status_code == 200, response.text
            count: int = response.json()["total"]
            return count

        assert await total() == 3
        assert await total(event_id=second.event.id[:8]) == 1
        assert await total(name="ORDER.PA") == 3
        assert await total(name="refund") == 0
        assert await total(listener=ship.qualname) == 3
        assert await total(listener="nobody") == 0
        assert await total(error="order 3") == 1
        assert await total(since=second.failed_at) == 2
        assert await total(until=second.failed_at) == 2
        assert (await client.get("/api/dead", params={"since": "yesterday"})).status_code == 400
        shown = (await client.get("/api/dead", params={"error": "order 2"})).json()["letters"][0]
    assert shown["payload"]["kwargs"] == {"order_id": 2}
    assert shown["attempts"] == 1
    assert "ValueError: no stock for order 2" in shown["traceback"]


async def test_replay_a_selection_delivers_it_again(shop: Shop) -> None:
    shop.fail_for.update({1, 2})
    bus = Bus(listeners=[ship])
    async with bus, _client(app(bus, auth=lambda r: "act")) as client:
        bus.emit("order.paid", order_id=1)
        bus.emit("order.paid", order_id=2)
        await bus.drain()
        first = (await bus.list_dead_letters())[0]
        shop.fail_for.clear()
        replayed = await client.post(
            "/api/dead/replay",
            json={"letters": [{"event_id": first.event.id, "listener": first.listener}]},
            headers=ACT,
        )
        assert replayed.json() == {"count": 1}
        await bus.drain()
    assert shop.shipped.calls == [1]
    assert [d.event.kwargs for d in await bus.list_dead_letters()] == [{"order_id": 2}]


async def test_listener_page_shows_recent_failures_with_tracebacks(shop: Shop) -> None:
    shop.fail_for.add(7)
    bus = Bus(listeners=[ship])
    dashboard = app(bus)  # before the bus starts: it sees this process's failures
    async with bus, _client(dashboard) as client:
        bus.emit("order.paid", order_id=7)
        await bus.drain()
        body = (await client.get("/api/listener", params={"name": ship.qualname})).json()
        missing = await client.get("/api/listener", params={"name": "nobody"})
    assert body["failures"][0]["error"] == "ValueError: no stock for order 7"
    assert "raise ValueError" in body["failures"][0]["traceback"]
    assert body["dead_letters"][0]["event_id"] == body["failures"][0]["event_id"]
    assert missing.status_code == 404


async def test_schedules_show_their_last_and_next_ticks() -> None:
    bus = Bus()
    bus.schedule("*/5 * * * *", "report.due", kind="daily")
    async with bus, _client(app(bus)) as client:
        body = (await client.get("/api/schedules")).json()
    (entry,) = body["schedules"]
    assert entry["cron"] == "*/5 * * * *"
    assert entry["event"] == "report.due"
    assert entry["next"] - entry["last"] == 300
    assert entry["payload"]["kwargs"] == {"kind": "daily"}


async def test_delayed_counts_what_waits_for_later(tmp_path: Path, shop: Shop) -> None:
    bus = Bus(f"sqlite:///{tmp_path}/events.db", listeners=[ship], consume=False)
    async with bus, _client(app(bus)) as client:
        await publish_later(bus, 600, "order.paid", order_id=1)
        body = (await client.get("/api/delayed")).json()
    assert body["listeners"][ship.qualname]["delayed"] == 1


async def test_metrics_are_served_beside_the_pages(shop: Shop) -> None:
    bus = Bus(listeners=[ship])
    dashboard = app(bus)
    async with bus, _client(dashboard) as client:
        bus.emit("order.paid", order_id=1)
        await bus.drain()
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert f'tidings_deliveries_total{{listener="{ship.qualname}",outcome="ok"}} 1.0' in (
        response.text
    )


def _starlette_site(dashboard: Any) -> Any:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    return Starlette(routes=[Mount("/tidings", app=dashboard)])


def _litestar_site(dashboard: Any) -> Any:
    from litestar import Litestar, asgi
    from litestar.types import Receive, Scope, Send

    @asgi("/tidings", is_mount=True, copy_scope=True)
    async def mounted(scope: Scope, receive: Receive, send: Send) -> None:
        await dashboard(scope, receive, send)

    return Litestar(route_handlers=[mounted])


@pytest.mark.parametrize("site", [_starlette_site, _litestar_site])
async def test_mounted_under_a_prefix(site: Any) -> None:
    bus = Bus()
    async with bus, _client(site(app(bus))) as client:
        bare = await client.get("/tidings")
        page = await client.get("/tidings/")
        script = await client.get("/tidings/static/app.js")
        api = await client.get("/tidings/api/overview")
    assert bare.status_code == 307
    assert bare.headers["location"].endswith("/tidings/")
    assert page.status_code == 200
    assert script.status_code == 200
    assert api.json()["bus"] == "memory://"


def test_the_wheel_ships_the_static_files(tmp_path: Path) -> None:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    subprocess.run(
        [uv, "build", "--wheel", "--out-dir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("index.html", "app.js", "app.css"):
        assert f"tidings/dashboard/static/{name}" in names


@pytest.fixture(params=["memory", "sqlite", "redis", "postgres"])
async def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A store of the test's own on each backend."""
    if request.param == "memory":
        yield "memory://"
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/events.db?poll_interval=0.01"
    elif request.param == "redis":
        require_redis()
        prefix = unique_prefix()
        try:
            yield f"{REDIS_URL}?prefix={prefix}&poll_interval=0.01"
        finally:
            await drop_prefix(prefix)
    else:
        require_postgres()
        schema = unique_schema()
        try:
            yield f"{POSTGRES_URL}?schema={schema}&poll_interval=0.01"
        finally:
            await drop_schema(schema)


async def test_every_backend_shows_searches_replays_and_purges(any_url: str, shop: Shop) -> None:
    shop.fail_for.update({1, 2, 3})
    bus = Bus(any_url, listeners=[ship])
    async with bus, _client(app(bus, auth=lambda r: "act")) as client:
        for n in (1, 2, 3, 4):
            await bus.publish("order.paid", order_id=n)
        await bus.drain()
        rows = (await client.get("/api/overview")).json()["listeners"]
        assert [(r["name"], r["dead"], r["delivered"]) for r in rows] == [(ship.qualname, 3, 1)]
        if any_url.startswith(("sqlite", "postgres")):  # stores that say when a worker claimed
            assert rows[0]["last_seen"] is not None
        found = (await client.get("/api/dead", params={"error": "order 2"})).json()
        assert [d["payload"]["kwargs"] for d in found["letters"]] == [{"order_id": 2}]
        shop.fail_for.clear()
        replayed = await client.post(
            "/api/dead/replay", json={"filter": {"error": "order 2"}}, headers=ACT
        )
        assert replayed.json() == {"count": 1}
        await shop.shipped.wait_for(2)
        letters = (await client.get("/api/dead")).json()["letters"]
        purged = await client.post(
            "/api/dead/purge",
            json={
                "letters": [{"event_id": d["event_id"], "listener": d["listener"]} for d in letters]
            },
            headers=ACT,
        )
        assert purged.json() == {"count": 2}
        assert (await client.get("/api/dead")).json()["total"] == 0
        await publish_later(bus, 600, "order.paid", order_id=5)
        await publish_later(bus, 60, "order.paid", order_id=6)
        await publish_later(bus, 7200, "order.paid", order_id=7)  # not within the hour
        delayed = (await client.get("/api/delayed", params={"within_s": 3600})).json()
    assert sorted(shop.shipped.calls, key=str) == [2, 4]
    if bus.backend.durable:
        assert delayed["listeners"][ship.qualname]["delayed"] == 3
        assert [e["name"] for e in delayed["events"]] == ["order.paid", "order.paid"]
        assert 50 < delayed["events"][0]["due"] - time.time() <= 60  # the soonest first
    else:  # in process: counted, not listed
        assert delayed["events"] is None
        assert delayed["listeners"]["(this process)"]["delayed"] == 3


async def test_a_bus_running_on_another_threads_loop(shop: Shop) -> None:
    # As `with Bus(...)` runs one, or an app that serves the dashboard on a loop of its own.
    require_redis()
    prefix = unique_prefix()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()

    async def there(work: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, loop))

    shop.fail_for.add(1)
    bus = Bus(f"{REDIS_URL}?prefix={prefix}&poll_interval=0.01", listeners=[ship])
    try:
        await there(bus.start())
        await there(bus.publish("order.paid", order_id=1))
        await there(bus.drain())
        async with _client(app(bus, auth=lambda r: "act")) as client:
            rows = (await client.get("/api/overview")).json()["listeners"]
            purged = await client.post("/api/dead/purge", json={"filter": {}}, headers=ACT)
        assert rows[0]["dead"] == 1
        assert purged.json() == {"count": 1}
    finally:
        await there(bus.aclose())
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join)
        loop.close()
        await drop_prefix(prefix)


@pytest.fixture(params=["sqlite", "redis", "postgres"])
async def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A durable store of the test's own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/events.db?poll_interval=0.01"
    elif request.param == "redis":
        require_redis()
        prefix = unique_prefix()
        try:
            yield f"{REDIS_URL}?prefix={prefix}&poll_interval=0.01"
        finally:
            await drop_prefix(prefix)
    else:
        require_postgres()
        schema = unique_schema()
        try:
            yield f"{POSTGRES_URL}?schema={schema}&poll_interval=0.01"
        finally:
            await drop_schema(schema)


@listener("order.paid", retry=Retry(attempts=2, backoff=0))
async def charge_twice(order_id: int) -> None:
    if order_id < 0:
        raise ValueError(f"card refused for order {order_id}")


async def test_a_viewer_reads_deliveries_and_failures_from_the_store(durable_url: str) -> None:
    # A dashboard (and stats, and /metrics) on a bus that runs nothing: what the worker
    # delivered and failed is counted by the store, not by the viewer's process.
    from prometheus_client.parser import text_string_to_metric_families

    from tidings.dashboard._data import Sampler, overview

    viewer = Bus(durable_url, listeners=[charge_twice], consume=False)
    page = app(viewer)  # before the bus starts: it serves /metrics too
    name = charge_twice.qualname
    async with viewer, _client(page) as client:
        before = (await client.get("/api/overview")).json()
        assert before["counted"] is True
        assert before["listeners"][0]["delivered"] == 0
        async with Bus(durable_url, listeners=[charge_twice]) as worker:
            for n in (1, 2, 3, -1):
                await viewer.publish("order.paid", order_id=n)
            await worker.drain()
            # Read while the worker still runs.
            stats = (await viewer.listener_stats())[name]
            assert (stats.delivered, stats.failed, stats.dead) == (3, 2, 1)
            after = (await client.get("/api/overview")).json()
            row = next(r for r in after["listeners"] if r["name"] == name)
            assert (row["delivered"], row["failed"], row["dead"]) == (3, 2, 1)
            body = (await client.get("/metrics")).text
        samples = {
            (s.name, s.labels.get("listener")): s.value
            for family in text_string_to_metric_families(body)
            for s in family.samples
        }
        assert samples["tidings_listener_delivered_total", name] == 3
        assert samples["tidings_listener_failed_total", name] == 2
        # The charts' rates come from those counts, sampled a second apart.
        sampler = Sampler(viewer)
        snapshots = await overview(viewer, sampler)
        sampler.samples.clear()
        sampler.sample([*snapshots], now=100.0)
        for snap in snapshots:
            snap.delivered += 10
        sampler.sample([*snapshots], now=102.0)
        assert sampler.rates(name)[0][1:3] == [5.0, 0.0]


def test_charts_sample_this_process_and_the_store() -> None:
    from tidings.dashboard._data import Sampler, Snapshot

    sampler = Sampler(Bus())
    sampler.sample([Snapshot("a", [], delivered=10, failed=1, pending=5, dead=1)], now=100.0)
    sampler.sample([Snapshot("a", [], delivered=11, failed=1, pending=9, dead=2)], now=100.5)
    sampler.sample([Snapshot("a", [], delivered=30, failed=5, pending=3, dead=4)], now=102.0)
    # The second came too soon; rates are per second between the samples kept.
    assert sampler.rates("a") == [[102.0, 10.0, 2.0, 3, 1.5]]
    assert sampler.rates("b") == [[102.0, 0.0, 0.0, 0, 0.0]]


# -- in a real browser ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(params=["sqlite", "redis"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A store of the test's own: an SQLite file, or a key prefix on the machine's Redis."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/events.db?poll_interval=0.01"
        return
    require_redis()
    prefix = unique_prefix()
    try:
        yield f"{REDIS_URL}?prefix={prefix}&poll_interval=0.01"
    finally:
        await drop_prefix(prefix)


@pytest.fixture
def chromium() -> str:
    """Debian's Chromium: missing, the browser tests skip (fail under CI)."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{CHROMIUM} is missing; CI needs it", pytrace=False)
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    return CHROMIUM


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("TIDINGS_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def _serve(dashboard: Any) -> tuple[uvicorn.Server, asyncio.Task[None], str]:
    port = _free_port()
    config = uvicorn.Config(dashboard, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)  # uvicorn says it is up only through this flag
    return server, task, f"http://127.0.0.1:{port}/"


@pytest.mark.timeout(120)
async def test_in_chromium(store_url: str, screenshots: Path, shop: Shop, chromium: str) -> None:
    from playwright.async_api import async_playwright, expect

    bus = Bus(store_url, listeners=[ship, audit])
    bus.schedule("*/5 * * * *", "report.due")
    kind = "sqlite" if store_url.startswith("sqlite") else "redis"
    dashboard = app(bus, auth=lambda request: "act")
    server, task, base = await _serve(dashboard)  # its lifespan starts the bus
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1360, "height": 720})
                await page.goto(base)
                ship_row = page.locator(f'tr[data-listener="{ship.qualname}"]')
                await expect(ship_row).to_be_visible()
                await expect(ship_row.locator('[data-col="delivered"]')).to_have_text("0")

                # Counts change as events flow: a few at each of the page's refreshes.
                delivered = ship_row.locator('[data-col="delivered"]')
                for round_ in range(1, 5):
                    for n in range(3):
                        await bus.publish("order.paid", order_id=round_ * 10 + n)
                    await shop.shipped.wait_for(3 * round_)
                    await expect(delivered).to_have_text(str(3 * round_))
                shop.fail_for.update({100, 101, 102, 103})
                for n in (100, 101, 102, 103):
                    await bus.publish("order.paid", order_id=n)
                await bus.drain()
                await expect(ship_row.locator('[data-col="dead"]')).to_have_text("4")
                await page.screenshot(path=str(screenshots / f"overview-{kind}.png"))

                # Open a dead letter: payload, headers, traceback.
                await page.goto(base + "#/dead?error=order%20100")
                await expect(page.locator("#dead-total")).to_have_text("1 dead letter matches")
                await page.locator("tr.letter").first.click()
                detail = page.locator("tr.detail")
                await expect(detail).to_contain_text("ValueError: no stock for order 100")
                await expect(detail).to_contain_text('"order_id": 100')
                await page.screenshot(path=str(screenshots / f"dead-letter-{kind}.png"))

                # Replay it, fixed, and see it delivered.
                shop.fail_for.discard(100)
                await page.locator("[data-replay-one]").click()
                await expect(page.locator("#confirm-text")).to_have_text(
                    "Replay 1 dead letter? Each is delivered again with fresh attempts."
                )
                await page.locator("#confirm-ok").click()
                await expect(page.locator("#dead-none")).to_be_visible()
                await shop.shipped.wait_for(13)
                assert 100 in shop.shipped.calls

                # Purge the rest that match, after a confirmation that counts them.
                await page.goto(base + "#/dead?name=order.paid")
                await expect(page.locator("#dead-total")).to_have_text("3 dead letters match")
                await page.locator("#purge-all").click()
                await expect(page.locator("#confirm-text")).to_have_text(
                    "Purge 3 dead letters matching this search? They are deleted for good."
                )
                await page.screenshot(path=str(screenshots / f"purge-confirm-{kind}.png"))
                await page.locator("#confirm-ok").click()
                await expect(page.locator("#dead-none")).to_be_visible()
                await expect(page.locator("#toast")).to_have_text("Purged 3 dead letters")
                assert await bus.list_dead_letters() == []

                await page.goto(base + f"#/listener/{ship.qualname}")
                await expect(page.locator("#failures")).to_contain_text("no stock for order 103")
                # A traceback opened stays open while the page refreshes.
                opened = page.locator("#failures details").first
                await opened.locator("summary").click()
                for _ in range(2):
                    async with page.expect_response(lambda r: "api/listener" in r.url):
                        pass
                await expect(opened).to_have_attribute("open", "")
                await expect(opened).to_contain_text("raise ValueError")
                await page.screenshot(path=str(screenshots / f"listener-{kind}.png"))

                # Schedules, and deliveries waiting for later.
                await page.goto(base + "#/schedules")
                await expect(page.locator("#schedules")).to_contain_text("*/5 * * * *")
                await expect(page.locator("#schedules")).to_contain_text("report.due")
                await publish_later(bus, 600, "order.paid", order_id=999)
                await page.goto(base + "#/delayed")
                delayed_row = page.locator("#delayed tr", has_text=ship.qualname)
                await expect(delayed_row.locator("td").nth(1)).to_have_text("1")
                await expect(page.locator("#delayed-events")).to_contain_text("order.paid")
                await expect(page.locator("#delayed-events")).to_contain_text("(in 9.")
                await page.screenshot(path=str(screenshots / f"delayed-{kind}.png"))
            finally:
                await browser.close()
    finally:
        server.should_exit = True
        await task
    assert not bus.started  # the app's lifespan started it, and closed it


@pytest.mark.timeout(60)
async def test_tidings_dashboard_serves_a_bus_read_only(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/events.db"
    async with Bus(url, listeners=[cli_app.charge], consume=False) as bus:
        await bus.publish("order.paid", order_id=1)
    port = _free_port()
    env = {**os.environ, "TIDINGS_TEST_URL": url, "PYTHONPATH": str(ROOT)}
    proc = _start_dashboard(env, port)
    try:
        assert proc.stderr is not None
        said = await asyncio.to_thread(proc.stderr.readline)
        assert f"on http://127.0.0.1:{port}/ (read only)".encode() in said
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            overview = await _first_answer(client, "/api/overview")
            refused = await client.post("/api/dead/purge", json={}, headers=ACT)
        rows = {row["name"]: row for row in overview["listeners"]}
        assert rows[cli_app.charge.qualname]["pending"] == 1  # a viewer: it runs nothing
        # It runs nothing, but the store counts what the workers do.
        assert overview["counted"] is True
        assert rows[cli_app.charge.qualname]["delivered"] == 0
        assert refused.status_code == 403
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.to_thread(proc.wait, 30)
        if proc.stderr is not None:
            proc.stderr.close()
    assert proc.returncode == 0


async def _first_answer(client: httpx.AsyncClient, path: str) -> Any:
    for _ in range(500):  # the server is another process: ask until it listens
        try:
            response = await client.get(path)
        except httpx.ConnectError:
            await asyncio.sleep(0.02)
            continue
        return response.json()
    raise AssertionError(f"nothing answered {path}")


def _start_dashboard(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tidings.cli",
            "dashboard",
            "tests.cli_app:make_bus()",
            "--port",
            str(port),
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


# -- the terminal's live table (tidings stats --watch) ----------------------------------


def test_stats_watch_refreshes_a_live_table(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tidings.cli import app as cli

    url = f"sqlite:///{tmp_path}/events.db"

    async def publish() -> None:
        async with Bus(url, listeners=[cli_app.charge], consume=False) as bus:
            await bus.publish("order.paid", order_id=1)

    asyncio.run(publish())
    runner = CliRunner(env={"COLUMNS": "250", "TIDINGS_TEST_URL": url})
    result = runner.invoke(
        cli,
        ["stats", "tests.cli_app:make_bus()", "--watch", "--refreshes", "3", "--interval", "0.01"],
    )
    assert result.exit_code == 0, result.output
    assert "backlog/s" in result.output
    # Out of a terminal, each reading is a table of its own: the last has rates.
    rows = [line for line in result.output.splitlines() if cli_app.charge.qualname in line]
    assert len(rows) == 3
    # pending 1; the backlog did not move between refreshes
    assert rows[-1].split("│")[2].strip() == "1"
    assert rows[-1].split("│")[9].strip() == "+0.0"


def test_watch_rates_are_per_second_between_readings() -> None:
    from tidings.backends.durable import ListenerStats
    from tidings.dashboard.live import Watch

    watch = Watch("sqlite:///x.db")
    watch.add({"a": ListenerStats(pending=10, dead=1)}, at=100.0)
    assert watch.rates("a") is None
    watch.add({"a": ListenerStats(pending=4, retrying=2, dead=5)}, at=102.0)
    assert watch.rates("a") == (-2.0, 2.0)
    assert watch.rates("b") is None
    assert watch.flow("a") is None  # a store that does not count deliveries
    watch.add({"a": ListenerStats(delivered=10, failed=1)}, at=200.0)
    watch.add({"a": ListenerStats(delivered=30, failed=5)}, at=204.0)
    assert watch.flow("a") == (5.0, 1.0)
