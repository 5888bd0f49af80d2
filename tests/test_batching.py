"""Batch listeners' options, their batch calls' timeouts and retries, and the batcher;
tests/backends/test_batching.py runs them on every backend."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tidings import Bus, ConfigurationError, Event, Retry, listener
from tidings._batching import Batcher
from tidings.cli import app

FAST = Retry(attempts=2, backoff=0.001, jitter=0)


@dataclasses.dataclass
class PageViewed:
    __event_name__ = "page.viewed"
    path: str


async def _events(events: list[Event]) -> None:
    pass


async def _two(events: list[Event], other: int) -> None:
    pass


async def _ints(numbers: list[int]) -> None:
    pass


def _sync(events: list[Event]) -> None:
    pass


@pytest.mark.parametrize(
    ("fn", "options", "message"),
    [
        (_events, {"batch": 0}, "batch of listener .* at least 1, not 0"),
        (_events, {"batch": True}, "must be a number of events"),
        (_events, {"batch_wait": 1.0}, "has a batch_wait but no batch"),
        (_events, {"batch": 10, "batch_wait": -1}, "batch_wait .* 0 or more seconds"),
        (_events, {"batch": 10, "batch_wait": float("nan")}, "batch_wait .* seconds"),
        (_events, {"batch": 10, "batch_wait": "1"}, "batch_wait .* seconds"),
        (_events, {"batch": 10, "concurrency": 5}, r"concurrency \(5\) must be at least 10"),
        (_events, {"batch": 10, "once": True}, "cannot take batches with once=True"),
        (_sync, {"batch": 10, "executor": "process"}, 'with executor="process"'),
        (_sync, {"batch": 10, "inline": True, "timeout": 1}, "a timeout cannot apply"),
        (_two, {"batch": 10}, "must take one positional parameter"),
        (_ints, {"batch": 10}, r"annotate it list\[Event\]"),
    ],
)
def test_batch_options_out_of_range_are_refused_at_registration(
    fn: Callable[..., Any], options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        listener("page.viewed", **options)(fn)


def test_a_batch_listener_takes_no_injected_parameters() -> None:
    from fastapi import Depends

    def connection() -> object:
        return object()

    def handle(events: list[Event], db: object = Depends(connection)) -> None:
        pass

    with pytest.raises(ConfigurationError, match=r"injected parameters \(Depends\)"):
        listener("page.viewed", batch=10)(handle)


def test_a_batch_listener_lets_a_batch_be_in_flight_and_stays_callable() -> None:
    @listener("page.viewed", batch=50)
    def views(events: list[Event]) -> int:
        return len(events)

    assert views.concurrency == 50  # a whole batch of deliveries may wait at once
    assert views.batching is not None
    assert views.batching.wait_s == 1.0
    assert listener("x", batch=5, batch_wait=timedelta(milliseconds=20))(_events).batching
    assert views([Event("page.viewed"), Event("page.viewed")]) == 2


def test_a_batch_annotated_as_text_finds_its_class_among_the_subscribed_ones() -> None:
    @dataclasses.dataclass
    class Local:
        __event_name__ = "local.happened"

    def handle(items: list[Local]) -> None:  # text: Local is not a module-level name
        pass

    made = listener(Local, batch=5)(handle)
    assert made.batching is not None
    assert made.batching.element is Local


async def test_the_bus_timeout_does_not_cut_a_delivery_waiting_for_its_batch() -> None:
    batches: list[int] = []

    @listener("page.viewed", batch=10, batch_wait=0.2)
    async def views(events: list[Event]) -> None:
        batches.append(len(events))

    async with Bus(listeners=[views], timeout=0.01) as bus:
        bus.emit("page.viewed", path="/")
        await bus.drain()
        assert bus.dead_letters() == []
    assert batches == [1]


async def test_the_listener_timeout_applies_to_each_call_with_a_batch() -> None:
    calls: list[int] = []
    hang = asyncio.Event()

    @listener("page.viewed", batch=2, batch_wait=3600, timeout=0.05, retry=FAST)
    async def views(events: list[Event]) -> None:
        calls.append(events[0].attempt)
        if len(calls) == 1:
            await hang.wait()  # never set: the first call times out

    async with Bus(listeners=[views]) as bus:
        bus.emit("page.viewed", path="/a")
        bus.emit("page.viewed", path="/b")
        await bus.drain()
        assert bus.dead_letters() == []
    assert calls == [1, 2]


async def test_a_timed_out_sync_batch_is_retried_once_its_thread_returned() -> None:
    running = threading.Lock()
    overlapped: list[bool] = []
    release = threading.Event()

    @listener("page.viewed", batch=1, timeout=0.05, retry=FAST)
    def views(events: list[Event]) -> None:
        overlapped.append(not running.acquire(blocking=False))
        try:
            if len(overlapped) == 1:
                release.wait(0.5)  # past the timeout, then returns
        finally:
            running.release()

    async with Bus(listeners=[views]) as bus:
        bus.emit("page.viewed", path="/")
        await bus.drain()
        dead = bus.dead_letters()
    assert overlapped == [False, False]
    assert dead == []


async def test_an_event_a_typed_batch_cannot_take_is_a_dead_letter_alone() -> None:
    batches: list[list[PageViewed]] = []

    @listener("page.*", batch=2, batch_wait=0.05)
    async def views(items: list[PageViewed]) -> None:
        batches.append(items)

    async with Bus(listeners=[views]) as bus:
        bus.emit(PageViewed("/a"))
        bus.emit("page.left", path="/b")  # no object: cannot be one of the batch
        await bus.drain()
        dead = bus.dead_letters()
    assert batches == [[PageViewed("/a")]]
    assert [letter.event.name for letter in dead] == ["page.left"]
    assert dead[0].error.startswith("BindingError: listener")


async def test_a_batch_that_is_not_retryable_fails_at_its_first_attempt() -> None:
    calls: list[int] = []

    @listener("page.viewed", batch=2, batch_wait=3600, retry=Retry(attempts=3, on=(OSError,)))
    async def views(events: list[Event]) -> None:
        calls.append(len(events))
        raise ValueError("not worth retrying")

    async with Bus(listeners=[views]) as bus:
        bus.emit("page.viewed", path="/a")
        bus.emit("page.viewed", path="/b")
        await bus.drain()
        dead = bus.dead_letters()
    assert calls == [2]
    assert [letter.error for letter in dead] == ["ValueError: not worth retrying"] * 2


async def test_an_inline_sync_batch_runs_on_the_event_loop() -> None:
    threads: list[int] = []

    @listener("page.viewed", batch=3, inline=True)
    def views(events: list[Event]) -> None:
        threads.append(threading.get_ident())

    async with Bus(listeners=[views]) as bus:
        for path in "abc":
            bus.emit("page.viewed", path=path)
        await bus.drain()
    assert threads == [threading.get_ident()]


async def test_a_caller_cancelled_before_its_batch_went_leaves_the_batch() -> None:
    batches: list[list[int]] = []

    async def send(items: list[int]) -> Sequence[BaseException | None]:
        batches.append(items)
        return [None] * len(items)

    batcher: Batcher[int] = Batcher(send, size=10, wait_s=3600)
    first = asyncio.ensure_future(batcher.send(1))
    second = asyncio.ensure_future(batcher.send(2))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    await batcher.aclose()
    await second
    assert batches == [[2]]


async def test_one_shared_error_is_raised_to_each_caller_from_its_own_traceback() -> None:
    async def send(items: list[int]) -> Sequence[BaseException | None]:
        try:
            raise ValueError("whole batch")
        except ValueError as exc:
            return [exc] * len(items)

    batcher: Batcher[int] = Batcher(send, size=3, wait_s=0)
    outcomes = await asyncio.gather(*(batcher.send(i) for i in range(3)), return_exceptions=True)
    assert outcomes[0] is outcomes[2]
    error = outcomes[0]
    assert isinstance(error, ValueError)
    # Reset at each raise: the traceback holds one caller's frames, not every caller's.
    frames = 0
    tb = error.__traceback__
    while tb is not None:
        frames += 1
        tb = tb.tb_next
    assert frames <= 3


def test_the_readme_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Batch listeners", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None
    exec(compile(match.group(1), "README.md", "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.splitlines() == [
        "stored 100 views",
        "stored 100 views",
        "stored 50 views",
    ]


@listener("page.viewed", batch=20, batch_wait=0.5, retry=Retry(attempts=4), timeout=7)
def _stored_views(events: list[Event]) -> None:
    pass


def cli_bus() -> Bus:
    """The bus ``tidings listeners`` reads below."""
    return Bus(listeners=[_stored_views], retry=2, timeout=1)


def test_the_listeners_command_shows_a_batch_listeners_own_policy() -> None:
    runner = CliRunner(env={"COLUMNS": "250"})
    result = runner.invoke(app, ["listeners", "tests.test_batching:cli_bus()", "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert (row["async"], row["attempts"], row["timeout_s"]) == (False, 4, 7)
    assert (row["batch"], row["concurrency"]) == (20, 20)
    result = runner.invoke(app, ["listeners", "tests.test_batching:cli_bus()"])
    assert "sync, batches of 20 within 0.5s" in result.output
