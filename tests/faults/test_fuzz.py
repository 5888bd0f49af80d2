"""Fuzzed names, headers, delays and payloads: each emit (or publish) is either refused
at once with a clear error, or stored and delivered intact. Never stored and then stuck,
dropped or changed on the way.

The default run tries a few examples per store; ``pytest -m slow`` tries 10,000.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tidings import Bus, ConfigurationError, EmitError, Event, PayloadError, listener

from .stores import DurableStore

# What a refusal at emit may raise (EmitError and PayloadError are ValueErrors too).
REFUSED = (EmitError, PayloadError, ValueError, ConfigurationError)
# How long an accepted event may take to arrive (its delay is at most 0.2s).
ARRIVAL_S = 5.0

# Any text, lone surrogates and control characters included.
_any_char = st.characters(min_codepoint=0, max_codepoint=0x10FFFF)
_any_text = st.text(_any_char, max_size=40)

_valid_names = st.from_regex(r"[a-z][a-z0-9_]{0,12}(\.[a-z0-9_-]{1,12}){0,3}", fullmatch=True)
names = st.one_of(
    _valid_names,
    _valid_names,  # twice: half the examples get past the name
    st.from_regex(r"[^\s*]{1,20}", fullmatch=True),
    _any_text,
    st.text(st.sampled_from("ab.*_ \t"), max_size=8),
    st.text(_any_char, min_size=200, max_size=300),  # around the 255-byte bound
)

headers = st.dictionaries(_any_text, _any_text, max_size=4)

delays = st.one_of(
    st.floats(max_value=0.2),  # negative (now), small, and -inf
    st.sampled_from([math.nan, math.inf, -math.inf, -1e308]),
    st.timedeltas(max_value=timedelta(seconds=0.2)),
    st.integers(max_value=0),
    st.sampled_from(["5", b"5", None, True, [1]]),
)

# JSON values: what survives a round trip when it is stored at all.
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # nan and infinities too: JSON cannot keep them, so emit refuses them
    | _any_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(_any_text, children, max_size=4)
    ),
    max_leaves=20,
)

# Keyword names, the former option names among them: keywords are payload, always.
keywords = st.one_of(
    st.sampled_from(["delay", "at", "key", "headers", "connection", "session", "n"]),
    _any_text,
)


@dataclass(slots=True)
class Example:
    """One fuzzed emit."""

    name: str
    args: list[Any]
    kwargs: dict[str, Any]
    headers: dict[str, str] | None
    delay: Any
    has_delay: bool
    publish: bool


examples = st.builds(
    Example,
    name=names,
    args=st.lists(values, max_size=3),
    kwargs=st.dictionaries(keywords, values, max_size=4),
    headers=st.none() | headers,
    delay=delays,
    has_delay=st.booleans(),
    publish=st.booleans(),
)


class RoundTrip:
    """Emits examples on a started bus and checks what its catch-all listener gets."""

    def __init__(self, store: DurableStore) -> None:
        self.arrived: dict[str, asyncio.Future[Event]] = {}
        self.accepted = 0
        self.refused = 0

        @listener("**")
        async def sink(event: Event) -> None:
            marker = event.args[0] if event.args else None
            fut = self._future(marker) if isinstance(marker, str) else None
            if fut is not None and not fut.done():
                fut.set_result(event)

        # Strict: a name the catch-all listener does not match is an error at emit, not
        # an event silently dropped.
        self.bus = Bus(store.url(poll_interval=0.01, lease=5), listeners=[sink], strict=True)

    def _future(self, marker: str) -> asyncio.Future[Event]:
        fut = self.arrived.get(marker)
        if fut is None:
            fut = self.arrived[marker] = asyncio.get_running_loop().create_future()
        return fut

    async def check(self, ex: Example) -> None:
        """Emit ``ex``; it is refused, or it arrives equal to what was emitted."""
        marker = uuid.uuid4().hex
        options: dict[str, Any] = {}
        if ex.headers is not None:
            options["headers"] = ex.headers
        if ex.has_delay:
            options["delay"] = ex.delay
        arrival = self._future(marker)
        try:
            sender = self.bus.options(**options)
            if ex.publish:
                await sender.publish(ex.name, marker, *ex.args, **ex.kwargs)
            else:
                sender.emit(ex.name, marker, *ex.args, **ex.kwargs)
        except REFUSED:
            self.refused += 1
            del self.arrived[marker]
            return
        self.accepted += 1
        try:
            event = await asyncio.wait_for(arrival, ARRIVAL_S)
        except TimeoutError:
            raise AssertionError(f"accepted, and not delivered in {ARRIVAL_S}s: {ex!r}") from None
        finally:
            del self.arrived[marker]
        assert event.name == ex.name
        assert list(event.args) == [marker, *ex.args]
        assert event.kwargs == ex.kwargs
        sent = ex.headers or {}
        assert {k: event.headers.get(k) for k in sent} == sent


async def _fuzz(store: DurableStore, count: int, *, derandomize: bool) -> None:
    trip = RoundTrip(store)
    loop = asyncio.get_running_loop()

    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        derandomize=derandomize,
        # No shrinking: after a failure the store may be stuck, and every smaller example
        # would fail too, slowly. The first failing example is reported as it came.
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(examples)
    def one(ex: Example) -> None:
        # Hypothesis runs in a thread; each example runs on the bus's loop.
        asyncio.run_coroutine_threadsafe(trip.check(ex), loop).result(ARRIVAL_S + 30)

    await trip.bus.start()
    try:
        await asyncio.to_thread(one)
        await asyncio.wait_for(trip.bus.drain(), 30)
        stats = await trip.bus.listener_stats()
    finally:
        await trip.bus.aclose(timeout=5)
    print(f"\n{store.kind}: {trip.accepted} accepted and delivered intact, {trip.refused} refused")
    # Nothing accepted is left behind: nothing waits, nothing died.
    for lst, s in stats.items():
        assert (s.pending, s.in_flight, s.retrying, s.delayed, s.dead) == (0, 0, 0, 0, 0), lst


@pytest.mark.timeout(120)
async def test_fuzzed_emits_are_refused_or_delivered_intact(store: DurableStore) -> None:
    await _fuzz(store, 50, derandomize=True)


@pytest.mark.slow
@pytest.mark.timeout(3600)
async def test_ten_thousand_fuzzed_emits_are_refused_or_delivered_intact(
    store: DurableStore,
) -> None:
    await _fuzz(store, 10_000, derandomize=False)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
async def test_a_non_finite_float_in_a_payload_is_refused_or_arrives_as_it_was(
    store: DurableStore, value: float
) -> None:
    # The fuzzing above may or may not draw them: each is tried here, by name.
    trip = RoundTrip(store)
    await trip.bus.start()
    try:
        marker = uuid.uuid4().hex
        arrival = trip._future(marker)
        try:
            await trip.bus.publish("payload.float", marker, v=value)
        except PayloadError:
            return
        event = await asyncio.wait_for(arrival, ARRIVAL_S)
    finally:
        await trip.bus.aclose(timeout=5)
    got = event.kwargs["v"]
    assert isinstance(got, float)
    assert got == value or (math.isnan(value) and math.isnan(got))
