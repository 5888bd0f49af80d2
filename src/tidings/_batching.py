"""Batches of deliveries: each delivery hands its item over and waits for its batch.

A :class:`Batcher` gathers what its callers hand over into batches of at most ``size``,
sent once full or ``wait_s`` after their first item; each caller waits for its own
item's outcome. The SQS forwarder sends its messages with one, and a batch listener
(``@listener(..., batch=100, batch_wait=1.0)``) is called with one: :class:`Batching`
makes each of its deliveries an item of the listener's open batch, calls the listener
with the batch under the listener's retry policy and timeout, and settles every
delivery of the batch with the batch's outcome. Backends see ordinary deliveries, so a
batch listener runs on every backend unchanged, and a durable one acknowledges (or
buries) each event of a batch once the batch's call is over.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import re
import types
import weakref
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any, Generic, TypeVar, get_args, get_origin

from tidings._binding import inject, signature_of
from tidings._units import seconds
from tidings.delivery import NO_RETRY, Retry
from tidings.errors import BindingError, ConfigurationError
from tidings.events import Event, event_name_of

__all__ = ["NO_DEADLINE", "Batcher", "Batching"]

logger = logging.getLogger("tidings.batching")

T = TypeVar("T")

#: Sends a batch; returns one outcome per item, ``None`` for sent, else the error.
SendBatch = Callable[[list[T]], Awaitable[Sequence[BaseException | None]]]

#: The timeout of one delivery of a batch listener, which waits for its batch and the
#: batch's retries: the listener's own timeout is the batch call's. (Finite: event loops
#: such as uvloop refuse an infinite delay.)
NO_DEADLINE = 10 * 365 * 86400.0

# An outcome as the waiting caller gets it: the error and its traceback as it was
# raised, so that each caller re-raising one shared error starts from that traceback.
_Outcome = tuple[BaseException, types.TracebackType | None] | None


def _same(exc: BaseException) -> BaseException:
    return exc


class Batcher(Generic[T]):
    """Groups the items handed to :meth:`send` into batches of at most ``size``.

    A batch goes out once it is full, or ``wait_s`` after its first item (0: at the
    loop's next turn, which gathers what a burst of deliveries handed over). Each caller
    waits for its own item; one cancelled before its batch went leaves the batch.

    Args:
        send_batch: sends a batch, returns one outcome per item (``None``: done).
        size: the most items in one batch.
        wait_s: seconds a batch waits for more items after its first one.
        failure: the error each item gets when ``send_batch`` raises (default: what it
            raised).
    """

    def __init__(
        self,
        send_batch: SendBatch[T],
        *,
        size: int,
        wait_s: float,
        failure: Callable[[Exception], BaseException] = _same,
    ) -> None:
        self._send_batch = send_batch
        self.size = size
        self.wait_s = wait_s
        self._failure = failure
        self._items: list[tuple[T, asyncio.Future[_Outcome]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()

    async def send(self, item: T) -> None:
        """Queue ``item`` for the next batch and wait until that batch has gone.

        Raises:
            BaseException: the error of this item, or of its whole batch.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[_Outcome] = loop.create_future()
        entry = (item, done)
        self._items.append(entry)
        if len(self._items) >= self.size:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.wait_s, self._flush)
        try:
            outcome = await done
        except asyncio.CancelledError:
            self._leave(entry)
            raise
        if outcome is not None:
            error, traceback = outcome
            raise error.with_traceback(traceback)

    def _leave(self, entry: tuple[T, asyncio.Future[_Outcome]]) -> None:
        """Take a cancelled caller's item out of the open batch, if it is still there:
        its delivery will run again, so the batch must not carry it too."""
        items = [e for e in self._items if e is not entry]
        if len(items) != len(self._items):
            self._items = items
            if not items and self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._items:
            batch, self._items = self._items[: self.size], self._items[self.size :]
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[T, asyncio.Future[_Outcome]]]) -> None:
        try:
            outcomes: Sequence[BaseException | None] = await self._send_batch(
                [item for item, _ in batch]
            )
        except Exception as exc:
            outcomes = [self._failure(exc) for _ in batch]
        except BaseException:
            for _, done in batch:
                done.cancel()
            raise
        for (_, done), outcome in zip(batch, outcomes, strict=True):
            if done.done():  # its caller was cancelled meanwhile
                continue
            done.set_result(None if outcome is None else (outcome, outcome.__traceback__))

    async def aclose(self) -> None:
        """Send what waits and wait for the batches under way."""
        self._flush()
        while self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)


def _element(fn: Callable[..., Any], qualname: str, typed: Sequence[type[Any]]) -> type[Any] | None:
    """What each item of the batch a listener takes is: ``None`` for events (``Event``
    envelopes), else the typed-event class its parameter's ``list[...]`` names (an
    annotation left as text, naming a class defined in a function, is matched by name
    with the classes in ``typed``, those the listener subscribes to).

    Raises:
        ConfigurationError: the function does not take one list of either.
    """
    sig = signature_of(fn, qualname)
    if inject(fn, sig, qualname) is not None:
        raise ConfigurationError(
            f"batch listener {qualname} takes injected parameters (Depends), which are "
            "resolved for one event: resolve them inside the function, for the batch"
        )
    required = [
        p
        for p in sig.parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    if len(required) != 1 or required[0].kind is inspect.Parameter.KEYWORD_ONLY:
        raise ConfigurationError(
            f"batch listener {qualname} must take one positional parameter, the list of "
            f"events (events: list[Event], or list[SomeTypedEvent]); it takes "
            f"{len(required)} required parameter(s)"
        )
    annotation = required[0].annotation
    if isinstance(annotation, str):
        match = re.fullmatch(
            r"\s*(?:\w+\.)*(?:list|List|Sequence)\[\s*([\w.]+)\s*\]\s*", annotation
        )
        name = match.group(1).rsplit(".", 1)[-1] if match else None
        if name in ("Event", "Any"):
            return None
        for cls in typed:
            if cls.__name__ == name:
                return cls
    if annotation in (inspect.Parameter.empty, list, Any, Sequence):
        return None
    if get_origin(annotation) in (list, Sequence) and len(get_args(annotation)) == 1:
        (item,) = get_args(annotation)
        if item is Event or item is Any:
            return None
        if isinstance(item, type) and event_name_of(item) is not None:
            return item
    raise ConfigurationError(
        f"batch listener {qualname} takes its batch as {annotation!r}: annotate it "
        "list[Event] (the envelopes) or list[SomeTypedEvent] (a class with __event_name__ "
        "or registered with tidings.register_event)"
    )


def _wait_seconds(value: float | timedelta, qualname: str) -> float:
    what = f"batch_wait of listener {qualname}"
    result = seconds(value, what)
    if result < 0:
        raise ConfigurationError(f"{what} must be 0 or more seconds, not {value!r}")
    return result


class Batching:
    """How a batch listener's deliveries make batches, and how a batch is called.

    Each delivery of the listener runs :meth:`deliver`: its event joins the listener's
    open batch (one per event loop) and the delivery waits. A batch is called once it
    holds ``size`` events or ``wait_s`` after its first one, with ``retry`` and
    ``timeout`` applied to that call; when it returns every delivery of the batch
    succeeds, and when its last attempt fails every delivery fails with that error
    (each a dead letter). The deliveries themselves are tried once: their batch is what
    is retried.

    Args:
        fn: the listener's function, taking the list of events (or typed objects).
        qualname: the listener's qualified name, for messages.
        size: the most events in one batch.
        wait_s: seconds (or a ``timedelta``) a batch waits for more after its first.
        retry: the policy of a batch's call (``None``: tried once).
        timeout: seconds each attempt of a batch's call may take (``None``: no limit).
        concurrency: the listener's ``concurrency`` (events in flight at once, in
            batches; ``None`` makes it ``size``).
        inline: call a sync function on the event loop instead of in a thread.
        typed: the typed-event classes the listener subscribes to.

    Raises:
        ConfigurationError: an option out of range, or a function that does not take
            one list of events.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        qualname: str,
        *,
        size: int,
        wait_s: float | timedelta,
        retry: Retry | None,
        timeout: float | None,
        concurrency: int | None,
        inline: bool,
        typed: Sequence[type[Any]] = (),
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigurationError(
                f"batch of listener {qualname} must be a number of events, at least 1, not {size!r}"
            )
        if concurrency is not None and concurrency < size:
            raise ConfigurationError(
                f"listener {qualname} takes batches of {size} events, so {size} of its "
                f"deliveries must be able to wait at once: its concurrency ({concurrency}) "
                f"must be at least {size} (or left out: it is then {size})"
            )
        self.fn = fn
        self.qualname = qualname
        self.size = size
        self.wait_s = _wait_seconds(wait_s, qualname)
        self.retry = retry or NO_RETRY
        self.timeout = timeout
        #: Events in flight at once, in batches: the listener's ``concurrency``.
        self.concurrency = concurrency or size
        self.inline = inline
        #: ``None``: the listener gets ``Event`` envelopes; else the typed-event class
        #: whose objects it gets.
        self.element = _element(fn, qualname, typed)
        self.is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004
        )
        if inline and timeout is not None and not self.is_async:
            raise ConfigurationError(
                f"listener {qualname} runs inline, on the event loop, where nothing can "
                "interrupt it: a timeout cannot apply (run it in a thread instead)"
            )
        self._batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Batcher[Event]] = (
            weakref.WeakKeyDictionary()
        )

    async def deliver(self, event: Event) -> None:
        """Run one delivery: add ``event`` to the open batch and wait for the batch.

        Raises:
            BindingError: the listener takes typed objects and this event is not one.
            BaseException: the error of the batch's last attempt.
        """
        element = self.element
        if element is not None and not isinstance(event.obj, element):
            raise BindingError(
                f"listener {self.qualname} takes batches of {element.__qualname__}, and "
                f"event {event.name!r} ({event.id}) is not one: it has "
                f"{type(event.obj).__qualname__ if event.obj is not None else 'no object'}"
            )
        loop = asyncio.get_running_loop()
        batcher = self._batchers.get(loop)
        if batcher is None:
            batcher = self._batchers[loop] = Batcher(self._call, size=self.size, wait_s=self.wait_s)
        await batcher.send(event)

    async def _call(self, events: list[Event]) -> list[BaseException | None]:
        """Call the listener with ``events`` under its retry policy; the outcome of each."""
        retry = self.retry
        batch = events
        for attempt in range(1, retry.attempts + 1):
            try:
                await self._call_once(batch)
            except Exception as exc:
                if attempt == retry.attempts or not isinstance(exc, retry.on):
                    # Each delivery of the batch fails with it: a dead letter apiece,
                    # whose traceback says how often the batch was tried.
                    exc.add_note(
                        f"(the batch of {len(events)} event(s) to {self.qualname} failed "
                        f"on its attempt {attempt}/{retry.attempts})"
                    )
                    return [exc] * len(events)
                delay = retry.delay_for(attempt)
                logger.warning(
                    "batch of %d event(s) to %s failed on attempt %d/%d: %s: %s; retrying in %.3fs",
                    len(events),
                    self.qualname,
                    attempt,
                    retry.attempts,
                    type(exc).__qualname__,
                    exc,
                    delay,
                    exc_info=exc if logger.isEnabledFor(logging.DEBUG) else None,
                )
                await asyncio.sleep(delay)
                # The listener sees which attempt of each event this is.
                batch = [event.for_attempt(event.attempt + 1) for event in batch]
            else:
                break
        return [None] * len(events)

    async def _call_once(self, events: list[Event]) -> None:
        items: list[Any] = events if self.element is None else [e.obj for e in events]
        timeout = self.timeout
        deadline = asyncio.timeout(timeout)
        running: asyncio.Future[Any] | None = None
        try:
            if self.is_async or self.inline:
                result = self.fn(items)
                if inspect.isawaitable(result):
                    async with deadline:
                        await result
                return
            # The thread cannot be stopped: its end is awaited even after a timeout, so
            # that a batch is never retried while its last attempt still runs.
            ctx = contextvars.copy_context()
            running = asyncio.get_running_loop().run_in_executor(None, ctx.run, self.fn, items)
            async with deadline:
                result = await asyncio.shield(running)
                if inspect.isawaitable(result):
                    await result
        except TimeoutError as exc:
            if not deadline.expired():
                raise
            if running is not None:
                await asyncio.wait([running])
            error = TimeoutError(
                f"listener {self.qualname} timed out after {timeout}s on a batch of "
                f"{len(events)} event(s)"
            )
            raise error from exc
