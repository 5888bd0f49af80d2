"""What every backend promises, run once per backend through the public API."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import datetime as dt
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Any, cast

import msgspec
import pydantic
import pytest
from typer.testing import CliRunner, Result

from tidings import (
    BackendError,
    Bus,
    ConfigurationError,
    EmitError,
    Event,
    Listener,
    PayloadError,
    PublishFailed,
    Registry,
    Retry,
    listener,
)
from tidings.backends.durable import Claimed, DurableBackend, Outcomes, Stored
from tidings.cli import app as cli
from tidings.codec import MAX_DEPTH, encode_payload

from .. import poison_app
from .conftest import BreakStore, BusFactory

FAST = Retry(attempts=3, backoff=0.001, jitter=0)


class Plan(Enum):
    FREE = "free"
    PRO = "pro"


@dataclasses.dataclass
class Address:
    city: str
    zip: str


@dataclasses.dataclass
class OrderPaid:
    __event_name__ = "order.paid"
    order_id: int
    amount: Decimal
    paid_at: dt.datetime


class UserCreated(msgspec.Struct):
    __event_name__ = "user.created"
    user_id: uuid.UUID
    email: str


class Invoice(pydantic.BaseModel):
    __event_name__ = "invoice.sent"
    number: str
    total: float


async def test_every_listener_gets_every_event_once(make_bus: BusFactory) -> None:
    a: list[int] = []
    b: list[int] = []

    @listener("tick")
    async def first(n: int) -> None:
        a.append(n)

    @listener("tick")
    def second(n: int) -> None:
        b.append(n)

    async with make_bus(listeners=[first, second]) as bus:
        for n in range(200):
            bus.emit("tick", n=n)
        await bus.drain()
    assert sorted(a) == list(range(200))
    assert sorted(b) == list(range(200))


async def test_what_other_threads_handed_over_is_never_dropped(make_bus: BusFactory) -> None:
    # Events emitted on other threads wait for the loop in an inbox, where they count
    # against max_pending. When the loop's own emits fill the queue before it takes
    # them, they wait for room: emit() accepted them, so they must not be lost.
    got: list[int] = []

    @listener("x")
    async def on_x(n: int) -> None:
        got.append(n)

    def emits() -> None:
        for n in range(2):
            bus.emit("x", n=n)

    async with make_bus(listeners=[on_x], max_pending=3) as bus:
        thread = threading.Thread(target=emits)
        thread.start()
        thread.join()  # blocks the loop: the thread's events wait in the inbox
        for n in range(10, 13):
            bus.emit("x", n=n)  # the loop's own fill the queue
        await bus.drain()
    assert sorted(got) == [0, 1, 10, 11, 12]


async def test_a_retrying_listener_never_reruns_the_others(make_bus: BusFactory) -> None:
    healthy: list[int] = []
    attempts: list[int] = []

    @listener("x")
    async def ok(n: int) -> None:
        healthy.append(n)

    @listener("x", retry=FAST)
    async def flaky(n: int, event: Event) -> None:
        attempts.append(event.attempt)
        if event.attempt < 3:
            raise ConnectionError("later")

    async with make_bus(listeners=[ok, flaky]) as bus:
        bus.emit("x", n=1)
        await bus.drain()
        assert await bus.list_dead_letters() == []
    assert healthy == [1]
    assert attempts == [1, 2, 3]


async def test_dead_letters_keep_the_last_error_and_can_be_replayed_and_purged(
    make_bus: BusFactory,
) -> None:
    fail = True
    runs: list[int] = []

    @listener("job", retry=Retry(attempts=2, backoff=0, jitter=0))
    async def job(n: int) -> None:
        runs.append(n)
        if fail:
            raise ValueError(f"job {n} failed")

    async with make_bus(listeners=[job]) as bus:
        for n in range(3):
            bus.emit("job", n=n)
        await bus.drain()
        dead = await bus.list_dead_letters()
        assert sorted(d.event.kwargs["n"] for d in dead) == [0, 1, 2]
        letter = next(d for d in dead if d.event.kwargs["n"] == 0)
        assert letter.error == "ValueError: job 0 failed"
        assert "Traceback" in letter.traceback
        assert letter.attempts == 2
        assert letter.listener == job.qualname
        assert len(await bus.list_dead_letters(listener=job.qualname, limit=2)) == 2
        assert await bus.list_dead_letters(listener="nobody") == []

        fail = False
        runs.clear()
        assert await bus.replay_dead_letters(ids=[letter.event.id]) == 1
        await bus.drain()
        assert runs == [0]
        assert len(await bus.list_dead_letters()) == 2
        assert await bus.purge_dead_letters(listener=job.qualname) == 2
        assert await bus.list_dead_letters() == []


async def test_delay_and_at_deliver_later(make_bus: BusFactory) -> None:
    got = asyncio.Event()
    when: list[float] = []

    @listener("later")
    async def later(n: int) -> None:
        when.append(asyncio.get_running_loop().time())
        if len(when) == 2:
            got.set()

    async with make_bus(listeners=[later]) as bus:
        start = asyncio.get_running_loop().time()
        bus.options(delay=0.2).emit("later", n=1)
        await bus.options(at=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=0.2)).publish(
            "later", n=2
        )
        await asyncio.wait_for(got.wait(), 10)
    assert min(when) - start >= 0.15


async def test_typed_events_and_annotated_values_survive_the_round_trip(
    make_bus: BusFactory,
) -> None:
    seen: list[object] = []

    @listener(OrderPaid)
    async def paid(order: OrderPaid) -> None:
        seen.append(order)

    @listener(UserCreated)
    def created(user: UserCreated) -> None:
        seen.append(user)

    @listener(Invoice)
    async def invoiced(invoice: Invoice) -> None:
        seen.append(invoice)

    @listener("profile.updated")
    async def profile(
        when: dt.datetime, day: dt.date, plan: Plan, address: Address, tags: list[str]
    ) -> None:
        seen.append((when, day, plan, address, tags))

    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    uid = uuid.uuid4()
    async with make_bus(listeners=[paid, created, invoiced, profile]) as bus:
        bus.emit(OrderPaid(order_id=7, amount=Decimal("12.50"), paid_at=now))
        bus.emit(UserCreated(user_id=uid, email="a@example.com"))
        bus.emit(Invoice(number="F-1", total=9.5))
        bus.emit(
            "profile.updated",
            when=now,
            day=now.date(),
            plan=Plan.PRO,
            address=Address(city="Lyon", zip="69001"),
            tags=["a", "b"],
        )
        await bus.drain()
    assert OrderPaid(order_id=7, amount=Decimal("12.50"), paid_at=now) in seen
    assert UserCreated(user_id=uid, email="a@example.com") in seen
    assert Invoice(number="F-1", total=9.5) in seen
    assert (now, now.date(), Plan.PRO, Address(city="Lyon", zip="69001"), ["a", "b"]) in seen


async def test_unserializable_payloads_are_rejected_at_emit(make_bus: BusFactory) -> None:
    seen: list[object] = []

    @listener("x")
    async def on_x(value: object) -> None:
        seen.append(value)

    async with make_bus(listeners=[on_x]) as bus:
        with pytest.raises(PayloadError, match=r"argument 'value'\['inner'\] of type object"):
            bus.emit("x", value={"inner": object()})
        with pytest.raises(PayloadError):
            await bus.publish("x", value=lambda: 1)
        bus.emit("x", value="fine")
        await bus.drain()
    assert seen == ["fine"]


async def test_concurrency_one_keeps_order(make_bus: BusFactory) -> None:
    seen: list[int] = []

    @listener("seq", concurrency=1)
    async def ordered(n: int) -> None:
        await asyncio.sleep(0)
        seen.append(n)

    async with make_bus(listeners=[ordered]) as bus:
        for n in range(100):
            bus.emit("seq", n=n)
        await bus.drain()
    assert seen == list(range(100))


async def test_leaving_async_with_delivers_what_was_emitted(make_bus: BusFactory) -> None:
    seen: list[int] = []

    @listener("x")
    async def on_x(n: int) -> None:
        await asyncio.sleep(0)
        seen.append(n)

    async with make_bus(listeners=[on_x]) as bus:
        for n in range(50):
            bus.emit("x", n=n)
    assert sorted(seen) == list(range(50))


async def test_patterns_route_the_same_way(make_bus: BusFactory) -> None:
    seen: list[str] = []

    @listener("user.*")
    async def users(event: Event) -> None:
        seen.append("users:" + event.name)

    @listener("**")
    async def everything(event: Event) -> None:
        seen.append("all:" + event.name)

    async with make_bus(listeners=[users, everything]) as bus:
        bus.emit("user.created")
        bus.emit("user.created.email")
        bus.emit("order_paid")
        await bus.drain()
    assert sorted(seen) == [
        "all:order_paid",
        "all:user.created",
        "all:user.created.email",
        "users:user.created",
    ]


async def test_timeouts_are_per_attempt(make_bus: BusFactory) -> None:
    attempts: list[int] = []

    @listener("x", timeout=0.02, retry=Retry(attempts=2, backoff=0, jitter=0))
    async def hangs(event: Event) -> None:
        attempts.append(event.attempt)
        await asyncio.sleep(10)

    async with make_bus(listeners=[hangs]) as bus:
        bus.emit("x")
        await bus.drain()
        (dead,) = await bus.list_dead_letters()
    assert attempts == [1, 2]
    assert "timed out" in dead.error


async def test_a_delivery_whose_worker_keeps_dying_becomes_a_dead_letter(
    make_bus: BusFactory, backend_name: str
) -> None:
    if backend_name == "memory":
        pytest.skip("in process, no delivery outlives its worker")
    runs: list[str] = []
    dead: list[str] = []

    @listener("job")
    async def survives(event: Event) -> None:
        runs.append("survives")

    @listener("job")
    async def crashes(event: Event) -> None:
        runs.append("crashes")

    async with make_bus(listeners=[survives, crashes], consume=False) as producer:
        await producer.publish("job")
        store = cast(DurableBackend, producer.backend)
        # Workers that claim and die: their leases are neither renewed nor released.
        # With no retry, a delivery may start 1 + max_lost_runs times.
        most = 1 + store.max_lost_runs
        for start in range(1, most + 1):
            wanted = [crashes] if start == most else [survives, crashes]
            for fn in wanted:
                (claimed,) = await store.claim(fn.qualname, fn.names, 10, lease_s=0.01)
                assert claimed.attempt == start
            await asyncio.sleep(0.02)  # the leases expire

    worker = make_bus(
        listeners=[survives, crashes], on_dead=lambda event, fn, exc: dead.append(str(exc))
    )
    if backend_name.startswith("redis"):
        # Redis reclaims what has been idle for the reclaiming worker's lease (the
        # others, what the dying workers leased): a short one, renewed until each
        # outcome is written, so a slow store does not hand a delivery back to it.
        cast(DurableBackend, worker.backend).lease_s = 0.1
    async with worker as bus:
        await bus.drain()
        (letter,) = await bus.list_dead_letters()
    assert runs == ["survives"]
    assert letter.listener == crashes.qualname
    assert letter.error.startswith("DeliveryLost: event ")
    assert f"was started {most} times for {crashes.qualname}" in letter.error
    assert dead == [letter.error.removeprefix("DeliveryLost: ")]


async def test_keywords_named_like_options_are_payload(make_bus: BusFactory) -> None:
    seen: list[dict[str, object]] = []
    got = asyncio.Event()

    @listener("cache.invalidated")
    async def invalidated(key: str, delay: int, at: str, headers: dict[str, str]) -> None:
        seen.append({"key": key, "delay": delay, "at": at, "headers": headers})
        got.set()

    async with make_bus(listeners=[invalidated]) as bus:
        bus.emit("cache.invalidated", key="k1", delay=3600, at="noon", headers={"h": "v"})
        await asyncio.wait_for(got.wait(), 10)
    assert seen == [{"key": "k1", "delay": 3600, "at": "noon", "headers": {"h": "v"}}]


@pytest.mark.parametrize("delay", [float("nan"), float("inf"), -float("inf")])
async def test_a_delay_that_is_not_finite_is_refused(make_bus: BusFactory, delay: float) -> None:
    @listener("x")
    async def on_x() -> None:
        pass

    async with make_bus(listeners=[on_x]) as bus:
        with pytest.raises(EmitError, match="finite"):
            bus.options(delay=delay).emit("x")
        with pytest.raises(EmitError, match="finite"):
            await bus.options(delay=delay).publish("x")


async def test_a_bad_event_name_is_refused_at_emit(make_bus: BusFactory) -> None:
    @listener("**")
    async def everything() -> None:
        pass

    async with make_bus(listeners=[everything]) as bus:
        for bad in ("", "user created", "user.*", "a\ud800", "x" * 256):
            with pytest.raises(EmitError, match="event name"):
                bus.emit(bad)
            with pytest.raises(EmitError, match="event name"):
                await bus.publish(bad)


def _durable(backend_name: str) -> None:
    if backend_name == "memory":
        pytest.skip("in process, nothing is stored")


async def test_an_event_the_store_refuses_is_dropped_alone_and_later_events_go_on(
    make_bus: BusFactory, backend_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    _durable(backend_name)
    got: list[int] = []

    @listener("x")
    async def on_x(n: int) -> None:
        got.append(n)

    async with make_bus(listeners=[on_x]) as bus:
        store = cast(DurableBackend, bus.backend)
        ctx = contextvars.copy_context()
        # A name no store can encode (a lone surrogate), put past the bus's checks.
        bad = Event("x\ud800", (), {"n": -1})
        for n in range(5):
            bus.emit("x", n=n)
        store.put(bad, (), ctx)
        for n in range(5, 10):
            bus.emit("x", n=n)
        refused = Event("x\udfff", (), {"n": -2})
        with pytest.raises(PublishFailed, match=f"event {refused.id} was refused"):
            await store.put_wait(refused, (), ctx)
        await bus.drain()
    assert sorted(got) == list(range(10))
    dropped = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(f"event {bad.id} " in m and "refused" in m for m in dropped)
    assert not any("retrying until it answers" in m for m in dropped)  # not an outage


async def test_entries_that_cannot_be_read_are_dead_letters_and_the_rest_runs(
    make_bus: BusFactory, backend_name: str
) -> None:
    _durable(backend_name)
    got: list[int] = []

    @listener("x")
    async def on_x(n: int) -> None:
        got.append(n)

    deep = b'{"args":[],"kwargs":{"n":' + b"[" * 2000 + b"]" * 2000 + b'},"obj":null}'
    async with make_bus(listeners=[on_x], consume=False) as producer:
        store = cast(DurableBackend, producer.backend)
        for n in range(3):
            await producer.publish("x", n=n)
        now = time.time()
        good = encode_payload(Event("x", (), {"n": 99}))
        # Written straight into the store, as another process (or a newer tidings) might.
        await store.store(
            [
                Stored("garbage", "x", b"\xc1 not a payload", {}, now, now),
                Stored("deep", "x", deep, {}, now, now),
                Stored("newer", "x", good, {}, now, now, version=2),
            ]
        )
        for n in range(3, 6):
            await producer.publish("x", n=n)
    async with make_bus(listeners=[on_x]) as worker:
        await worker.drain()
        dead = {d.event.id: d for d in await worker.list_dead_letters()}
    assert sorted(got) == list(range(6))
    assert set(dead) == {"garbage", "deep", "newer"}
    assert "cannot be decoded" in dead["garbage"].error
    assert f"deeper than {MAX_DEPTH} levels" in dead["deep"].error
    assert "stored by a newer tidings" in dead["newer"].error
    assert "upgrade this worker" in dead["newer"].error


async def test_payloads_nested_too_deeply_are_refused_at_emit(make_bus: BusFactory) -> None:
    value: object = 1
    for _ in range(MAX_DEPTH):
        value = [value]
    async with make_bus() as bus:
        with pytest.raises(PayloadError, match=f"deeper than {MAX_DEPTH} levels"):
            bus.emit("x", value=value)
        for _ in range(10_000):
            value = [value]
        with pytest.raises(PayloadError, match=f"deeper than {MAX_DEPTH} levels"):
            bus.emit("x", value=value)
        bus.emit("x", value=[[1]] * 3000)  # many containers, none deep


async def test_a_worker_that_lost_a_lease_neither_settles_nor_renews_it(
    make_bus: BusFactory, backend_name: str
) -> None:
    _durable(backend_name)

    @listener("x", retry=Retry(attempts=10))
    async def on_x() -> None:
        pass

    async with (
        make_bus(listeners=[on_x], consume=False) as a,
        make_bus(listeners=[on_x], consume=False) as b,
    ):
        first = cast(DurableBackend, a.backend)
        second = cast(DurableBackend, b.backend)
        await a.publish("x")
        (stale,) = await first.claim(on_x.qualname, on_x.names, 10, lease_s=0.05)
        await asyncio.sleep(0.1)  # the first worker is frozen past its lease
        # (Redis reclaims what has been idle for the reclaiming worker's lease.)
        (taken,) = await second.claim(on_x.qualname, on_x.names, 10, lease_s=0.05)
        assert taken.attempt == 2
        assert await second.renew([taken], 30) == []
        assert await first.renew([stale], 30) == [stale]
        await first.settle(Outcomes(retries=[(stale, 0.0, "")]))
        await first.settle(Outcomes(burials=[(stale, "stale", "")]))
        await first.settle(Outcomes(acks=[stale], releases=[stale]))
        # Still the second worker's: nobody else can take it, and it is not settled.
        assert await first.claim(on_x.qualname, on_x.names, 10, lease_s=30) == []
        assert (await b.listener_stats())[on_x.qualname].in_flight == 1
        await second.settle(Outcomes(acks=[taken]))
        stats = (await b.listener_stats())[on_x.qualname]
        assert (stats.in_flight, stats.pending, stats.dead) == (0, 0, 0)


async def test_a_lost_delivery_runs_while_its_process_holds_nothing_else(
    make_bus: BusFactory, backend_name: str
) -> None:
    # A delivery whose worker died running it may be what killed that worker. It runs
    # once this process holds no other delivery and claims none: if it kills this
    # process too, no other delivery is counted a run it never had.
    _durable(backend_name)
    claiming = 0
    at_lost_runs: list[tuple[int, int, int]] = []

    async def note(event: Event) -> None:
        stats = await worker.listener_stats()
        at_lost_runs.append((event.attempt, claiming, sum(s.in_flight for s in stats.values())))

    @listener("job")
    async def first(event: Event) -> None:
        await note(event)

    @listener("job")
    async def second(event: Event) -> None:
        await note(event)

    async with make_bus(listeners=[first, second], consume=False) as producer:
        for n in range(3):
            await producer.publish("job", n=n)
        dying = cast(DurableBackend, producer.backend)
        for fn in (first, second):
            assert len(await dying.claim(fn.qualname, fn.names, 10, lease_s=0.01)) == 3
    worker = make_bus(listeners=[first, second])
    store = cast(DurableBackend, worker.backend)
    store.lease_s = 0.5
    # The dying worker's leases expire (Redis: idle for as long as the worker's lease).
    await asyncio.sleep(0.5)
    claim = store.claim

    async def counted_claim(
        listener: str, names: Sequence[str], limit: int, lease_s: float
    ) -> list[Claimed]:
        nonlocal claiming
        claiming += 1
        try:
            return await claim(listener, names, limit, lease_s)
        finally:
            claiming -= 1

    store.claim = counted_claim  # type: ignore[method-assign]
    async with worker:
        await worker.drain()
        stats = await worker.listener_stats()
    # Each started once more (the dying worker's run counted), one at a time.
    assert at_lost_runs == [(2, 0, 1)] * 6
    assert all(s.dead == s.pending == s.in_flight == 0 for s in stats.values())


async def test_lost_deliveries_handed_back_stay_lost_and_uncounted(
    make_bus: BusFactory, backend_name: str
) -> None:
    _durable(backend_name)

    @listener("x")
    async def on_x() -> None:
        pass

    async with make_bus(listeners=[on_x], consume=False) as bus:
        store = cast(DurableBackend, bus.backend)
        await bus.publish("x")
        (fresh,) = await store.claim(on_x.qualname, on_x.names, 10, lease_s=0.05)
        assert (fresh.attempt, fresh.lost) == (1, False)
        await store.settle(Outcomes(releases=[fresh]))
        # Handed back untried: neither counted, nor taken for lost.
        (again,) = await store.claim(on_x.qualname, on_x.names, 10, lease_s=0.05)
        assert (again.attempt, again.lost) == (1, False)
        await asyncio.sleep(0.1)  # its worker dies: the lease expires
        (lost,) = await store.claim(on_x.qualname, on_x.names, 10, lease_s=0.05)
        assert (lost.attempt, lost.lost) == (2, True)
        await store.settle(Outcomes(releases=[lost]))
        # Handed back uncounted, and still lost: whoever takes it runs it alone.
        (kept,) = await store.claim(on_x.qualname, on_x.names, 10, lease_s=0.05)
        assert (kept.attempt, kept.lost) == (2, True)


async def test_a_delivery_claimed_again_while_it_runs_counts_no_attempt(
    make_bus: BusFactory, backend_name: str
) -> None:
    # Its lease ran out while it ran (the store did not answer the renewals), and its
    # own process took it over: not run twice, and not counted twice either.
    _durable(backend_name)
    attempts: list[int] = []
    running = asyncio.Event()
    finish = asyncio.Event()

    @listener("x", retry=Retry(attempts=3, backoff=0, jitter=0))
    async def slow(event: Event) -> None:
        attempts.append(event.attempt)
        if event.attempt == 1:
            running.set()
            await finish.wait()
            raise ConnectionError("later")

    bus = make_bus(listeners=[slow])
    store = cast(DurableBackend, bus.backend)
    store.lease_s = 0.2
    renew, claim = store.renew, store.claim
    answers = asyncio.Event()
    claimed_again = asyncio.Event()

    async def unanswered_renew(claimed: Sequence[Claimed], lease_s: float) -> list[Claimed] | None:
        await answers.wait()
        return await renew(claimed, lease_s)

    async def watched_claim(
        listener: str, names: Sequence[str], limit: int, lease_s: float
    ) -> list[Claimed]:
        out = await claim(listener, names, limit, lease_s)
        if out and running.is_set():
            claimed_again.set()
        return out

    store.renew = unanswered_renew  # type: ignore[method-assign]
    store.claim = watched_claim  # type: ignore[method-assign]
    async with bus:
        bus.emit("x")
        await asyncio.wait_for(claimed_again.wait(), 10)
        answers.set()
        finish.set()
        await bus.drain()
        assert await bus.list_dead_letters() == []
    assert attempts == [1, 2]


async def test_a_timed_out_sync_listener_is_retried_once_its_thread_returned(
    make_bus: BusFactory,
) -> None:
    state = {"first running": False}
    overlapped: list[bool] = []
    release = threading.Event()

    @listener("x", timeout=0.05, retry=Retry(attempts=2, backoff=0, jitter=0))
    def slow(event: Event) -> None:
        if event.attempt == 1:
            state["first running"] = True
            release.wait(0.5)  # outlives its timeout
            state["first running"] = False
        else:
            overlapped.append(state["first running"])
            release.set()

    async with make_bus(listeners=[slow]) as bus:
        bus.emit("x")
        await bus.drain()
    assert overlapped == [False]


async def test_a_sync_listener_still_running_after_close_keeps_its_delivery(
    make_bus: BusFactory, backend_name: str
) -> None:
    # A thread cannot be stopped: a bus closed while its sync listener runs holds that
    # delivery's lease until the thread returns, then writes its outcome. No worker,
    # of this process or another, takes it to run it again meanwhile.
    _durable(backend_name)
    lease_s = 1.0
    attempts: list[int] = []
    gate = threading.Event()
    loop = asyncio.get_running_loop()
    started = asyncio.Event()

    @listener("x")
    def blocked(event: Event) -> None:
        attempts.append(event.attempt)
        loop.call_soon_threadsafe(started.set)
        gate.wait(30)

    first = make_bus(listeners=[blocked])
    store = cast(DurableBackend, first.backend)
    store.lease_s = lease_s
    disconnect = store.disconnect
    disconnected = asyncio.Event()

    async def watched_disconnect() -> None:
        await disconnect()
        disconnected.set()

    store.disconnect = watched_disconnect  # type: ignore[method-assign]
    try:
        await first.start()
        first.emit("x")
        await started.wait()
        await first.aclose(timeout=0)  # returns at once: its thread runs on
        async with make_bus(listeners=[blocked], consume=False) as second:
            other = cast(DurableBackend, second.backend)
            await asyncio.sleep(1.5 * lease_s)  # past the lease, were it left to expire
            # (Redis reclaims what has been idle for the claiming worker's lease.)
            taken = await other.claim(blocked.qualname, blocked.names, 10, lease_s=lease_s)
            gate.set()
            await disconnected.wait()  # the thread returned and its outcome was written
            stats = (await second.listener_stats())[blocked.qualname]
    finally:
        gate.set()
    assert [c.attempt for c in taken] == []
    assert (stats.pending, stats.in_flight, stats.dead) == (0, 0, 0)
    assert attempts == [1]


async def test_put_wait_with_a_delay_delivers_later(make_bus: BusFactory) -> None:
    got = asyncio.Event()

    @listener("later")
    async def later() -> None:
        got.set()

    async with make_bus(listeners=[later]) as bus:
        subs = bus.registry.resolve("later")
        await bus.backend.put_wait(Event("later"), subs, contextvars.copy_context(), 0.01)
        await asyncio.wait_for(got.wait(), 10)


async def test_publish_with_a_delay_returns_once_stored(
    make_bus: BusFactory, backend_name: str
) -> None:
    _durable(backend_name)

    @listener("later")
    async def later() -> None:
        pass

    async with make_bus(listeners=[later], consume=False) as bus:
        store = cast(DurableBackend, bus.backend)
        event = Event("later")
        await store.put_wait(event, (), contextvars.copy_context(), delay_s=60)
        stats = (await bus.listener_stats())[later.qualname]
        assert stats.delayed == 1
        with pytest.raises(PublishFailed, match="refused"):
            await store.put_wait(Event("later\ud800"), (), contextvars.copy_context(), 60)


@pytest.mark.timeout(120)
async def test_a_listener_that_kills_its_process_takes_no_batch_mate_with_it(
    make_bus: BusFactory, backend_name: str, tmp_path: Path
) -> None:
    _durable(backend_name)
    out = tmp_path / "delivered.txt"
    url = make_bus().url + "&lease=0.3&max_lost_runs=2&poll_interval=0.01"
    env = {**os.environ, "TIDINGS_TEST_URL": url, "TIDINGS_TEST_OUT": str(out)}
    os.environ["TIDINGS_TEST_URL"] = url
    try:
        async with poison_app.make_bus(consume=False) as producer:
            for n in range(10):
                await producer.publish("job", n=n)
    finally:
        del os.environ["TIDINGS_TEST_URL"]
    codes: list[int] = []
    root = Path(__file__).parents[2]
    work = "import asyncio, tests.poison_app as app; asyncio.run(app.work())"
    while not codes or codes[-1] != 0:
        assert len(codes) < 8, codes
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", work, env=env, cwd=root)
        codes.append(await proc.wait())
    # Started with its batch-mates once, then alone until it ran out of lost runs.
    assert codes == [3, 3, 3, 0]
    delivered = {int(line) for line in out.read_text().split()}
    assert delivered == set(range(10)) - {poison_app.POISON}
    async with make_bus(listeners=[poison_app.job], consume=False) as bus:
        (letter,) = await bus.list_dead_letters()
    assert letter.event.kwargs == {"n": poison_app.POISON}
    assert letter.error.startswith("DeliveryLost: ")


async def test_what_a_thread_emits_is_stored_as_it_was_emitted(
    make_bus: BusFactory, backend_name: str
) -> None:
    if backend_name == "memory":
        pytest.skip("in process, a payload is handed over by reference")
    seen: list[dict[str, object]] = []
    got = asyncio.Event()

    @listener("order.paid")
    async def paid(order: dict[str, object], when: dt.datetime) -> None:
        seen.append({**order, "when": when})
        if len(seen) == 3:
            got.set()

    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    async with make_bus(listeners=[paid]) as bus:
        orders: list[dict[str, object]] = [{"id": n} for n in range(2)]

        def emit_then_change() -> None:
            for order in orders:
                bus.emit("order.paid", order=order, when=now)
                order["id"] = object()  # changed, and no longer serializable
            bus.options(delay=0.01).emit("order.paid", order={"id": 9}, when=now)

        # The loop takes the thread's events only once the thread has changed them.
        thread = threading.Thread(target=emit_then_change)
        thread.start()
        thread.join()
        await asyncio.wait_for(got.wait(), 10)
    assert sorted(seen, key=lambda o: cast(int, o["id"])) == [
        {"id": 0, "when": now},
        {"id": 1, "when": now},
        {"id": 9, "when": now},
    ]


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "concurrency=2"])
async def test_a_listener_runs_in_a_task_of_its_own_from_its_first_step(
    make_bus: BusFactory, gated: bool
) -> None:
    # asyncio.timeout, anyio's scopes and HTTP clients ask for the current task at once;
    # one that expires must cancel the listener's own task, never the one that started it.
    got: list[int] = []
    in_task: list[bool] = []

    @listener("x", retry=Retry(attempts=1), concurrency=2 if gated else None)
    async def on_x(n: int) -> None:
        in_task.append(asyncio.current_task() is not None)
        async with asyncio.timeout(0.05):
            await asyncio.sleep(30 if n == 0 else 0)
        got.append(n)

    async with make_bus(listeners=[on_x]) as bus:
        bus.emit("x", n=0)
        await bus.drain()  # the first timed out in its own task: its consumer goes on
        bus.emit("x", n=1)
        bus.emit("x", n=2)
        await asyncio.wait_for(bus.drain(), 30)
        dead = await bus.list_dead_letters()
    assert sorted(got) == [1, 2]
    assert in_task == [True] * 3
    assert [letter.error for letter in dead] == ["TimeoutError: "]


# -- what a durable store keeps across processes and workers -----------------------------


async def test_events_stored_before_any_worker_ran_reach_it(
    make_bus: BusFactory, backend_name: str
) -> None:
    _durable(backend_name)
    seen: list[int] = []

    @listener("user.created")
    async def welcome(n: int) -> None:
        seen.append(n)

    async with make_bus(listeners=[welcome], consume=False) as producer:
        for n in range(100):
            producer.emit("user.created", n=n)
        await producer.publish("user.created", n=100)
    assert seen == []
    async with make_bus(listeners=[welcome]) as worker:
        await worker.drain()
    assert sorted(seen) == list(range(101))


async def test_a_listener_added_later_receives_new_events_only(
    make_bus: BusFactory, backend_name: str
) -> None:
    _durable(backend_name)
    first: list[int] = []
    later: list[int] = []

    @listener("x")
    async def old(n: int) -> None:
        first.append(n)

    @listener("x")
    async def new(n: int) -> None:
        later.append(n)

    async with make_bus(listeners=[old]) as bus:
        bus.emit("x", n=1)
        await bus.drain()
    async with make_bus(listeners=[old, new]) as bus:
        bus.emit("x", n=2)
        await bus.drain()
    assert first == [1, 2]
    assert later == [2]


def _made(tag: str, seen: list[str], **options: object) -> Listener[..., Any]:
    """A listener as a factory makes them: each has the same qualified name."""

    @listener("x", **options)
    async def record() -> None:
        seen.append(tag)

    return record


async def test_listeners_of_one_name_are_refused_on_a_store_and_name_tells_them_apart(
    make_bus: BusFactory, backend_name: str
) -> None:
    seen: list[str] = []
    a, b = _made("a", seen), _made("b", seen)
    if backend_name != "memory":
        named = r"two listeners are named .*_made\.<locals>\.record.*name="
        with pytest.raises(ConfigurationError, match=named):
            async with make_bus(listeners=[a, b]):
                pass
        with pytest.raises(ConfigurationError, match="subscribed twice"):
            async with make_bus(listeners=[a, a]):
                pass
        b = _made("b", seen, name="record-b")
    async with make_bus(listeners=[a, b]) as bus:
        bus.emit("x")
        await bus.drain()
    assert sorted(seen) == ["a", "b"]


async def test_a_once_listener_runs_once_in_process_and_is_refused_on_a_store(
    make_bus: BusFactory, backend_name: str
) -> None:
    seen: list[int] = []

    @listener("x", once=True)
    async def first(n: int) -> None:
        seen.append(n)

    if backend_name != "memory":
        with pytest.raises(ConfigurationError, match=r"once=True.*in-process bus"):
            async with make_bus(listeners=[first]):
                pass
        async with make_bus() as bus:
            with pytest.raises(ConfigurationError, match="once=True"):
                bus.subscribe(first)
        return
    async with make_bus(listeners=[first]) as bus:
        bus.emit("x", n=1)
        bus.emit("x", n=2)
        await bus.drain()
    assert seen == [1]


async def test_listeners_subscribed_once_started_join_and_run(
    make_bus: BusFactory, backend_name: str
) -> None:
    seen: list[tuple[str, int]] = []

    @listener("x")
    async def first(n: int) -> None:
        seen.append(("first", n))

    def later(n: int) -> None:
        seen.append(("later", n))

    def included(n: int) -> None:
        seen.append(("included", n))

    def nested(n: int) -> None:
        seen.append(("nested", n))

    registry = Registry()
    bus = make_bus(listeners=[first])
    bus.include(registry)
    async with bus:
        handle = bus.subscribe(later, "x")
        bus.emit("x", n=1)
        await bus.publish("x", n=2)
        bus.include(Registry([listener("x")(included)]))
        registry.subscribe(nested, "x")
        await bus.publish("x", n=3)
        await bus.drain()
        handle.unsubscribe()
        await bus.publish("x", n=4)
        await bus.drain()
        if backend_name != "memory":
            # Its consumer stopped; its deliveries stay, as for a listener run nowhere.
            stats = await bus.listener_stats()
            assert stats[listener("x")(later).qualname].pending == 1
            with pytest.raises(ConfigurationError, match="subscribed twice"):
                bus.subscribe(first)
    assert sorted(seen) == sorted(
        [("first", n) for n in (1, 2, 3, 4)]
        + [("later", n) for n in (1, 2, 3)]
        + [("included", n) for n in (3, 4)]
        + [("nested", n) for n in (3, 4)]
    )


async def test_two_workers_share_the_work_and_never_run_a_delivery_twice(
    make_bus: BusFactory, backend_name: str
) -> None:
    _durable(backend_name)
    seen: list[tuple[str, int]] = []

    def make(tag: str) -> Bus:
        @listener("job")
        async def job(n: int) -> None:
            await asyncio.sleep(0.01)  # long enough that one worker cannot take all
            seen.append((tag, n))

        # Both buses run "the same" listener: one qualified name, one delivery per event.
        job.qualname = "tests.job"
        return make_bus(listeners=[job])

    a, b = make("a"), make("b")
    async with a, b:
        for n in range(300):
            (a if n % 2 else b).emit("job", n=n)
        await a.drain()
        await b.drain()
    assert sorted(n for _, n in seen) == list(range(300))
    assert {tag for tag, _ in seen} == {"a", "b"}


async def test_expired_leases_are_reclaimed_one_per_claim_with_the_next_attempt(
    make_bus: BusFactory, backend_name: str
) -> None:
    _durable(backend_name)
    attempts: list[int] = []

    @listener("x", retry=Retry(attempts=5))
    async def on_x(event: Event) -> None:
        attempts.append(event.attempt)

    async with (
        make_bus(listeners=[on_x], consume=False) as producer,
        make_bus(listeners=[on_x], consume=False) as other,
    ):
        dying, taking = cast(DurableBackend, producer.backend), cast(DurableBackend, other.backend)
        for n in range(4):
            await producer.publish("x", n=n)
        # A worker that claims and dies: its leases are neither renewed nor released.
        first = await dying.claim(on_x.qualname, on_x.names, 10, lease_s=0.05)
        assert [(c.attempt, c.lost) for c in first] == [(1, False)] * 4
        await asyncio.sleep(0.2)  # its leases expire (Redis: idle for the taker's lease)
        taken = []
        for _ in range(3):
            (claimed,) = await taking.claim(on_x.qualname, on_x.names, 10, lease_s=0.2)
            assert (claimed.attempt, claimed.lost) == (2, True)
            taken.append(claimed)
        assert [c.record.id for c in taken] == [c.record.id for c in first[:3]]
        await taking.settle(Outcomes(acks=taken))
    # The last one is run by a worker, as its next attempt.
    worker = make_bus(listeners=[on_x])
    cast(DurableBackend, worker.backend).lease_s = 0.2
    async with worker:
        await worker.drain()
    assert attempts == [2]


async def test_the_attempt_count_survives_a_restart(
    make_bus: BusFactory, backend_name: str
) -> None:
    _durable(backend_name)
    attempts: list[int] = []
    first = asyncio.Event()

    @listener("x", retry=Retry(attempts=3, backoff=0.05, jitter=0))
    async def flaky(event: Event) -> None:
        attempts.append(event.attempt)
        first.set()
        raise ConnectionError("down")

    bus = make_bus(listeners=[flaky])
    await bus.start()
    bus.emit("x")
    await first.wait()
    await bus.aclose(timeout=0)  # stops before the retry is due
    assert attempts == [1]
    async with make_bus(listeners=[flaky]) as bus:
        await bus.drain()
        (dead,) = await bus.list_dead_letters()
    assert attempts == [1, 2, 3]
    assert dead.attempts == 3


async def test_a_worker_stopping_hands_back_what_it_did_not_run(
    make_bus: BusFactory, backend_name: str
) -> None:
    _durable(backend_name)
    started = asyncio.Event()
    runs: list[int] = []

    @listener("slow", concurrency=1)
    async def slow(n: int) -> None:
        runs.append(n)
        started.set()
        await asyncio.sleep(0.05)

    worker = make_bus(listeners=[slow])
    cast(DurableBackend, worker.backend).drain_on_close = False
    await worker.start()
    for n in range(10):
        worker.emit("slow", n=n)
    await started.wait()
    await worker.aclose(timeout=5)  # finishes the running one, claims no more
    assert runs == [0]
    async with make_bus(listeners=[slow]) as bus:
        stats = await bus.listener_stats()
        assert (stats[slow.qualname].pending, stats[slow.qualname].in_flight) == (9, 0)
        await bus.drain()
    assert runs == list(range(10))  # nothing lost, nothing repeated


async def test_stats_count_what_waits(make_bus: BusFactory, backend_name: str) -> None:
    _durable(backend_name)

    @listener("x")
    async def on_x() -> None:
        pass

    async with make_bus(listeners=[on_x], consume=False) as bus:
        for _ in range(5):
            bus.emit("x")
        bus.options(delay=60).emit("x")
        await bus.drain()
        stats = (await bus.listener_stats())[on_x.qualname]
    assert (stats.pending, stats.delayed, stats.in_flight, stats.retrying) == (5, 1, 0, 0)
    assert stats.oldest_age_s is not None


async def test_the_oldest_age_is_that_of_deliveries_due_and_waiting(
    make_bus: BusFactory, backend_name: str
) -> None:
    _durable(backend_name)

    @listener("x")
    async def on_x() -> None:
        pass

    async with make_bus(listeners=[on_x], consume=False) as bus:
        store = cast(DurableBackend, bus.backend)
        bus.options(delay=60).emit("x")
        await bus.publish("x")
        # A claim leases the due one and turns the delayed one into a delivery too.
        (running,) = await store.claim(on_x.qualname, on_x.names, 10, lease_s=30)
        stats = (await bus.listener_stats())[on_x.qualname]
        assert (stats.pending, stats.in_flight, stats.delayed) == (0, 1, 1)
        assert stats.oldest_age_s is None  # neither the delayed one nor the running one
        await bus.publish("x")
        stats = (await bus.listener_stats())[on_x.qualname]
        assert (stats.pending, stats.in_flight, stats.delayed) == (1, 1, 1)
        assert stats.oldest_age_s is not None
        assert stats.oldest_age_s < 30
        await store.settle(Outcomes(acks=[running]))


async def test_forgotten_listeners_get_no_more_deliveries(
    make_bus: BusFactory, backend_name: str
) -> None:
    _durable(backend_name)

    @listener("x")
    async def kept() -> None:
        pass

    @listener("x")
    async def removed() -> None:
        pass

    async with make_bus(listeners=[kept, removed], consume=False):
        pass  # both joined
    async with make_bus(listeners=[kept]) as bus:
        bus.emit("x")
        await bus.drain()
        assert (await bus.listener_stats())[removed.qualname].pending == 1
        assert await bus.forget_listener(removed.qualname) is True
        assert await bus.forget_listener(removed.qualname) is False
        bus.emit("x")
        await bus.drain()
        stats = await bus.listener_stats()
        assert await cast(DurableBackend, bus.backend).joined() == {kept.qualname: ["x"]}
    assert removed.qualname not in stats
    last_seen = stats[kept.qualname].last_seen
    assert last_seen is not None
    assert abs(time.time() - last_seen) < 60


async def test_an_event_stored_for_no_listener_is_warned_of(
    make_bus: BusFactory, backend_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    _durable(backend_name)

    @listener("user.*")
    async def users() -> None:
        pass

    async with make_bus(listeners=[users], consume=False) as bus:
        store = cast(DurableBackend, bus.backend)
        assert await store.joined() == {users.qualname: ["user.*"]}
        with caplog.at_level(logging.WARNING, "tidings.backends.durable"):
            await bus.publish("user.created")
            await bus.publish("usr.created")  # a typo: nobody takes it
            assert store._listening_task is not None
            await store._listening_task
    warned = [r.getMessage() for r in caplog.records if "for no listener" in r.getMessage()]
    assert len(warned) == 1
    assert "'usr.created' was stored for no listener" in warned[0]


async def test_tidings_emit_says_when_no_listener_takes_the_event(
    make_bus: BusFactory, backend_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _durable(backend_name)
    monkeypatch.setenv("TIDINGS_TEST_URL", make_bus().url)
    runner = CliRunner(env={"COLUMNS": "250"})
    target = "tests.cli_app:make_bus()"

    def emit(*args: str) -> Result:
        return runner.invoke(cli, ["emit", target, *args])

    # (The command runs its own event loop: in a thread of its own.)
    result = await asyncio.to_thread(emit, "order.paid", "--json", '{"order_id": 1}')
    assert result.exit_code == 0, result.output
    assert "emitted 'order.paid': stored for 2 listeners" in result.output
    result = await asyncio.to_thread(emit, "usr.created")
    assert result.exit_code == 1
    assert "'usr.created' was not emitted: no listener joined on the store" in result.output
    assert "emitted 'usr.created'" not in result.output
    result = await asyncio.to_thread(emit, "usr.created", "--allow-none")
    assert result.exit_code == 0, result.output
    assert "emitted 'usr.created': stored for no listener" in result.output


async def test_storage_errors_reach_the_caller_as_backend_errors(
    make_bus: BusFactory, backend_name: str, break_store: BreakStore
) -> None:
    _durable(backend_name)
    async with make_bus(consume=False) as bus:
        store = cast(DurableBackend, bus.backend)
        driver_error = await break_store()
        for call in (
            bus.list_dead_letters(),
            bus.replay_dead_letters(),
            bus.purge_dead_letters(),
            bus.listener_stats(),
            bus.forget_listener("x"),
            store.join("x", ["x"]),
        ):
            with pytest.raises(BackendError) as info:
                await call
            assert isinstance(info.value.__cause__, driver_error)
