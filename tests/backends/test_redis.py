"""What only Redis can show: groups, leases and reclaim, trimming, a server restart."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import typing
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import msgspec
import pytest
from redis.asyncio import Redis

from tidings import Bus, ConfigurationError, Event, Retry, listener
from tidings.backends.durable import Claimed, Outcomes, Stored
from tidings.backends.redis import RedisBackend
from tidings.codec import MAX_DEPTH
from tidings.errors import BackendError, PublishFailed

from ..faults.servers import RedisServer, free_port, redis_server
from ..services import REDIS_URL, drop_prefix, require_redis, unique_prefix


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    require_redis()
    name = unique_prefix()
    try:
        yield name
    finally:
        await drop_prefix(name)


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


def _url(prefix: str, **options: object) -> str:
    query = "&".join(
        f"{k}={v}" for k, v in {"prefix": prefix, "poll_interval": 0.01, **options}.items()
    )
    return f"{REDIS_URL}?{query}"


async def test_publish_returns_once_the_event_is_in_the_stream(prefix: str, redis: Redis) -> None:
    async with Bus(_url(prefix), consume=False) as bus:
        await bus.publish("x", n=1)
        assert await redis.xlen(f"{prefix}:s:x") == 1


async def test_a_wildcard_listener_finds_streams_made_after_it_started(prefix: str) -> None:
    seen: list[str] = []
    got = asyncio.Event()

    @listener("user.*")
    async def users(event: Event) -> None:
        seen.append(event.name)
        if len(seen) == 2:
            got.set()

    async with Bus(_url(prefix), listeners=[users]):
        # Another process, which knows nothing of the listener, makes two new streams.
        async with Bus(_url(prefix), consume=False) as producer:
            await producer.publish("user.created")
            await producer.publish("user.deleted")
            await producer.publish("order.paid")
        await asyncio.wait_for(got.wait(), 10)
    assert sorted(seen) == ["user.created", "user.deleted"]


async def test_a_running_delivery_is_renewed_not_stolen(prefix: str) -> None:
    runs: list[str] = []

    def make(tag: str) -> Bus:
        @listener("slow")
        async def slow() -> None:
            runs.append(tag)
            await asyncio.sleep(1.0)

        slow.qualname = "tests.slow"
        return Bus(_url(prefix, lease=0.3), listeners=[slow])

    a, b = make("a"), make("b")
    async with a, b:
        await a.publish("slow")
        await a.drain()
        await b.drain()
    assert len(runs) == 1  # four leases long, and the other worker never took it


@pytest.mark.timeout(180)
async def test_200k_events_through_two_listeners_leave_the_stream_trimmed(
    prefix: str, redis: Redis
) -> None:
    events = 200_000
    counts = [0, 0]

    @listener("bulk")
    async def one() -> None:
        counts[0] += 1

    @listener("bulk")
    async def two() -> None:
        counts[1] += 1

    stream = f"{prefix}:s:bulk"
    before = (await redis.info("memory"))["used_memory"]
    backend = RedisBackend(REDIS_URL, prefix=prefix, poll_interval=0.01)
    peak_len = peak_memory = 0
    async with Bus(backend, listeners=[one, two]) as bus:
        for start in range(0, events, 10_000):
            for n in range(start, start + 10_000):
                bus.emit("bulk", n=n)
            await bus.backend._flushed()  # type: ignore[attr-defined]
            length = await redis.xlen(stream)
            if length > peak_len:
                peak_len, peak_memory = length, (await redis.info("memory"))["used_memory"]
        await bus.drain()
        await backend.trim()
        after_len = await redis.xlen(stream)
        stream_bytes = await redis.memory_usage(stream) or 0
    after = (await redis.info("memory"))["used_memory"]
    print(
        f"\n{events} events x 2 listeners: XLEN 0 before, {peak_len} at its peak, {after_len} "
        f"after; used_memory {before / 1e6:.1f} MB before, {peak_memory / 1e6:.1f} MB at the "
        f"peak, {after / 1e6:.1f} MB after (the stream: {stream_bytes} bytes)"
    )
    assert counts == [events, events]
    assert after_len == 0
    # The stream's own memory: the server's total moves with whatever else uses it.
    assert stream_bytes < 100_000


# The private servers (and the server killed mid-stream) live with the fault suite.
_Server = RedisServer


def _private(directory: Path, *options: str, persist: bool = True) -> Iterator[_Server]:
    with redis_server(directory, *options, persistent=persist) as srv:
        yield srv


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    yield from _private(tmp_path)


@pytest.fixture
def bare_server(tmp_path: Path) -> Iterator[_Server]:
    """A private redis-server that keeps nothing on disk."""
    yield from _private(tmp_path, persist=False)


async def test_publish_raises_when_redis_is_unreachable(prefix: str) -> None:
    port = free_port()
    with pytest.raises(BackendError, match="cannot reach Redis"):
        async with Bus(f"redis://127.0.0.1:{port}/0", consume=False):
            pass


def test_urls() -> None:
    backend = Bus(
        "redis://:secret@localhost:6379/2?prefix=app&lease=5&batch=10&max_lost_runs=1"
    ).backend
    assert isinstance(backend, RedisBackend)
    assert backend.prefix == "app"
    assert backend.lease_s == 5.0
    assert backend.batch == 10
    assert backend.max_lost_runs == 1
    assert "secret" not in repr(backend)
    assert backend.url == "redis://:secret@localhost:6379/2"
    with pytest.raises(ConfigurationError, match="prefix"):
        Bus("redis://localhost?prefix=a*b")
    with pytest.raises(ConfigurationError, match="codec must be one of json, msgpack"):
        Bus("redis://localhost?codec=pickle")


async def test_the_client_retries_with_the_asyncio_retry_policy(prefix: str) -> None:
    # redis-py warns (an error under -W error) when given the synchronous one.
    from redis.asyncio.retry import Retry as AsyncRetry

    backend = RedisBackend(REDIS_URL, prefix=prefix)
    async with Bus(backend, consume=False):
        retry = backend._redis.connection_pool.connection_kwargs["retry"]
    assert isinstance(retry, AsyncRetry)


@pytest.mark.parametrize("loss", ["flushall", "restart"])
@pytest.mark.timeout(60)
async def test_events_published_after_redis_lost_its_data_are_delivered(
    bare_server: _Server, loss: str
) -> None:
    seen: list[int] = []
    arrived = {1: asyncio.Event(), 2: asyncio.Event()}

    @listener("job")
    async def job(n: int) -> None:
        seen.append(n)
        arrived[n].set()

    url = f"redis://127.0.0.1:{bare_server.port}/0?poll_interval=0.01&lease=2"
    async with Bus(url, listeners=[job]) as worker, Bus(url, consume=False) as producer:
        await producer.publish("job", n=1)
        await asyncio.wait_for(arrived[1].wait(), 10)
        if loss == "flushall":
            admin = Redis(port=bare_server.port)
            await admin.flushall()
            await admin.aclose()
        else:
            bare_server.kill()
            bare_server.start()
        while True:
            try:
                await producer.publish("job", n=2)
                break
            except BackendError:  # the producer's connection to the old server broke
                continue
        await asyncio.wait_for(arrived[2].wait(), 20)
        await worker.drain()
    assert seen == [1, 2]


async def test_a_worker_past_its_lease_never_renews_or_settles_what_another_took_over(
    prefix: str, redis: Redis
) -> None:
    @listener("x")
    async def on_x() -> None:
        pass

    name = on_x.qualname
    stale = RedisBackend(REDIS_URL, prefix=prefix, consume=False)
    taker = RedisBackend(REDIS_URL, prefix=prefix, consume=False)
    async with Bus(stale, listeners=[on_x]) as a, Bus(taker, listeners=[on_x]):
        await a.publish("x")
        (mine,) = await stale.claim(name, on_x.names, 10, lease_s=30)
        # Frozen past its lease: the other worker takes the delivery over.
        (theirs,) = await taker.claim(name, on_x.names, 10, lease_s=0)
        assert (theirs.record.id, theirs.attempt) == (mine.record.id, 2)

        async def owner() -> bytes:
            (entry,) = await redis.xpending_range(f"{prefix}:s:x", name, "-", "+", 10)
            consumer = entry["consumer"]
            assert isinstance(consumer, bytes)
            return consumer

        assert await stale.renew([mine], 30) == [mine]
        assert await owner() == taker.owner.encode()
        await stale.settle(Outcomes(acks=[mine]))
        await stale.settle(Outcomes(retries=[(mine, 0.0, "")]))
        await stale.settle(Outcomes(burials=[(mine, "Error: stale", "")]))
        await stale.settle(Outcomes(releases=[mine]))
        assert await owner() == taker.owner.encode()
        assert await redis.zcard(f"{prefix}:retry:{name}") == 0
        assert await redis.zcard(f"{prefix}:dead") == 0
        assert await taker.renew([theirs], 30) == []
        await taker.settle(Outcomes(acks=[theirs]))
        assert await redis.xpending_range(f"{prefix}:s:x", name, "-", "+", 10) == []


async def test_an_unreadable_entry_is_a_dead_letter_and_its_batch_mates_run(
    prefix: str, redis: Redis
) -> None:
    seen: list[int] = []

    @listener("x")
    async def on_x(n: int) -> None:
        seen.append(n)

    async with Bus(_url(prefix), listeners=[on_x], consume=False) as producer:
        await producer.publish("x", n=1)
        stream = f"{prefix}:s:x"
        await redis.xadd(stream, {"e": b"\xc1 not msgpack"})
        await redis.xadd(stream, {"e": b"\x91" * 50_000 + b"\xc0"})  # nested 50,000 deep
        await redis.xadd(stream, {"other": b"no event in it"})
        # A well-formed entry whose payload is nested 100,000 deep: read only when run.
        deep = b'{"args":[],"kwargs":{"n":' + b"[" * 100_000 + b"]" * 100_000 + b'},"obj":null}'
        record = Stored("deep", "x", deep, {}, time.time(), 0.0)
        await redis.xadd(stream, {"e": msgspec.msgpack.encode(record)})
        await producer.publish("x", n=2)
    backend = RedisBackend(REDIS_URL, prefix=prefix, consume=False)
    async with Bus(backend, listeners=[on_x]):
        claimed = await backend.claim(on_x.qualname, on_x.names, 10, lease_s=30)
        assert [c.error is None for c in claimed] == [True, False, False, False, True, True]
        assert all("cannot be read" in (c.error or "") for c in claimed[1:4])
        await backend.settle(Outcomes(releases=claimed))
    async with Bus(_url(prefix), listeners=[on_x]) as worker:
        await worker.drain()
        dead = await worker.list_dead_letters()
    assert seen == [1, 2]
    assert len(dead) == 4
    (too_deep,) = [d for d in dead if d.event.id == "deep"]
    assert f"deeper than {MAX_DEPTH} levels" in too_deep.error


async def test_an_entry_carries_its_format_version_and_one_without_is_version_1(
    prefix: str, redis: Redis
) -> None:
    @listener("x")
    async def on_x() -> None:
        pass

    backend = RedisBackend(REDIS_URL, prefix=prefix, consume=False)
    async with Bus(backend, listeners=[on_x]) as bus:
        await bus.publish("x")
        fields = ["old", "x", b"{}", {}, 1.0, 1.0]  # written before entries had a version
        await redis.xadd(f"{prefix}:s:x", {"e": msgspec.msgpack.encode(fields)})
        await redis.xadd(f"{prefix}:s:x", {"e": msgspec.msgpack.encode([*fields[:5], 1.0, 2])})
        claimed = await backend.claim(on_x.qualname, on_x.names, 10, lease_s=30)
        await backend.settle(Outcomes(acks=claimed))
    stored = await redis.xrange(f"{prefix}:s:x", count=1)
    assert stored is not None
    entry = stored[0][1]
    assert entry is not None
    raw = entry[b"e"]
    assert isinstance(raw, bytes)
    assert len(msgspec.msgpack.decode(raw)) == 7  # the version is stored
    assert [(c.record.id, c.record.version) for c in claimed[1:]] == [("old", 1), ("old", 2)]
    assert claimed[0].record.version == 1


def test_a_misspelt_url_option_is_named_at_bus() -> None:
    with pytest.raises(ConfigurationError, match="'lease_S'"):
        Bus("redis://localhost:6379/0?lease_S=1")
    with pytest.raises(ConfigurationError, match="timeout must be more than 0"):
        Bus("redis://localhost:6379/0?timeout=0")
    # redis-py's own parameters still pass through.
    Bus("redis://localhost:6379/0?socket_keepalive=true&health_check_interval=5")


@pytest.mark.timeout(30)
async def test_publish_fails_within_the_timeout_when_redis_stops_answering(
    server: _Server,
) -> None:
    url = f"redis://127.0.0.1:{server.port}/0?timeout=0.5"
    async with Bus(url, consume=False) as bus:
        await bus.publish("x")
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        try:
            began = time.monotonic()
            with pytest.raises(BackendError):
                await bus.publish("x")
            took = time.monotonic() - began
        finally:
            server.proc.send_signal(signal.SIGCONT)
    assert took < 10  # redis-py's 30 s socket timeout, tried 3 times, otherwise


@pytest.mark.parametrize("policy", ["allkeys-lru", "noeviction"])
async def test_a_redis_that_may_evict_keys_is_warned_of(
    tmp_path: Path, policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    for srv in _private(tmp_path, "--maxmemory-policy", policy):
        with caplog.at_level(logging.WARNING, "tidings.backends.redis"):
            async with Bus(f"redis://127.0.0.1:{srv.port}/0", consume=False):
                pass
    warned = [r.getMessage() for r in caplog.records if "maxmemory-policy" in r.getMessage()]
    if policy == "noeviction":
        assert warned == []
    else:
        assert len(warned) == 1
        assert "allkeys-lru" in warned[0]
        assert "noeviction" in warned[0]


async def test_a_trim_pass_touches_only_the_streams_settled_since_the_last(prefix: str) -> None:
    @listener("x")
    async def on_x() -> None:
        pass

    backend = RedisBackend(REDIS_URL, prefix=prefix, poll_interval=0.01)
    trimmed: list[bytes] = []
    trim_keys = backend._trim_keys

    async def record(keys: Sequence[bytes], reap_ms: int) -> int:
        trimmed.extend(keys)
        return await trim_keys(keys, reap_ms)

    async with Bus(backend, listeners=[on_x]) as bus:
        for n in range(300):  # idle names: stored once, never again
            bus.emit(f"idle.{n}")
        await bus.drain()
        await backend._trim_all(time.monotonic())  # the first pass sweeps every stream
        backend._trim_keys = record  # type: ignore[method-assign]
        for _ in range(3):
            bus.emit("x")
            await bus.drain()
            await backend._trim_all(time.monotonic())
    assert f"{prefix}:s:x".encode() in trimmed
    assert set(trimmed) <= {f"{prefix}:s:x".encode(), f"{prefix}:r:{on_x.qualname}".encode()}


async def test_a_forgotten_listener_is_never_made_again(prefix: str, redis: Redis) -> None:
    @listener("x.*")
    async def gone() -> None:
        pass

    @listener("x.*")
    async def kept() -> None:
        pass

    backend = RedisBackend(REDIS_URL, prefix=prefix, poll_interval=0.01)
    async with Bus(backend, listeners=[gone, kept], consume=False) as bus:
        await bus.publish("x.a")
        assert await backend.forget(gone.qualname) is True
        assert await backend.forget(gone.qualname) is False
        await bus.publish("x.b")
    async with Bus(_url(prefix), consume=False) as producer:  # knows no listener
        await producer.publish("x.c")
    for name in ("x.a", "x.b", "x.c"):
        groups = [g["name"] for g in await redis.xinfo_groups(f"{prefix}:s:{name}")]
        assert groups == [kept.qualname.encode()], name
    assert not await redis.exists(f"{prefix}:r:{gone.qualname}")


@pytest.mark.timeout(30)
async def test_an_idle_worker_receives_at_once_what_another_process_publishes(
    prefix: str,
) -> None:
    # poll_interval far beyond the test's timeout: only a read blocked on Redis delivers in time.
    arrived = asyncio.Event()
    names: list[str] = []
    retried = asyncio.Event()

    @listener("job")
    async def job() -> None:
        names.append("job")
        arrived.set()

    @listener("user.*", retry=Retry(attempts=2, backoff=0.2, jitter=0))
    async def users(event: Event) -> None:
        names.append(event.name)
        if event.attempt == 1:
            raise ConnectionError("once")
        retried.set()

    worker = Bus(_url(prefix, poll_interval=60), listeners=[job, users])
    async with worker, Bus(_url(prefix), consume=False) as producer:
        await producer.publish("job")
        await asyncio.wait_for(arrived.wait(), 10)
        await producer.publish("user.created")  # a stream new to the worker
        await asyncio.wait_for(retried.wait(), 10)
    assert names == ["job", "user.created", "user.created"]


@pytest.fixture
def small_server(tmp_path: Path) -> Iterator[_Server]:
    """A private redis-server that takes arguments of 1 MiB at most."""
    yield from _private(tmp_path, "--proto-max-bulk-len", "1mb", persist=False)


@pytest.mark.timeout(60)
async def test_an_event_larger_than_redis_takes_is_dropped_alone(
    small_server: _Server, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[int] = []

    @listener("x")
    async def on_x(n: int, blob: str = "") -> None:
        seen.append(n)

    url = f"redis://127.0.0.1:{small_server.port}/0?poll_interval=0.01"
    async with Bus(url, listeners=[on_x], consume=False) as producer:
        # One batch: the oversized event among good ones and a delayed one.
        producer.emit("x", n=1)
        producer.options(delay=3600).emit("x", n=2)
        producer.emit("x", n=3)
        with pytest.raises(PublishFailed, match="proto-max-bulk-len") as refused:
            await producer.publish("x", n=4, blob="b" * 1_100_000)
        producer.emit("x", n=5)
    async with Bus(url, listeners=[on_x]) as worker:
        await worker.drain()
        assert (await worker.listener_stats())[on_x.qualname].delayed == 1
    async with Redis(port=small_server.port) as client:
        assert await client.zcard("tidings:later") == 1
    assert sorted(seen) == [1, 3, 5]
    bad = str(refused.value).split()[1]
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert [m for m in logged if bad in m and "refused" in m and "dropped" in m]


@pytest.mark.timeout(60)
async def test_an_event_larger_than_a_limit_lowered_since_start_is_dropped_alone(
    small_server: _Server,
) -> None:
    url = f"redis://127.0.0.1:{small_server.port}/0?poll_interval=0.01"
    async with Redis(port=small_server.port) as client:
        await client.config_set("proto-max-bulk-len", str(512 * 1024 * 1024))
        async with Bus(url, consume=False) as producer:
            await client.config_set("proto-max-bulk-len", str(1024 * 1024))
            # Redis answers an error, or drops the connection while the argument is sent
            # (which of the two depends on the sockets' buffers): a refusal either way.
            for size in (1_100_000, 8_000_000):
                with pytest.raises(PublishFailed, match="refused by the redis store"):
                    await producer.publish("x", blob="b" * size)
            await producer.publish("x", n=1)
        assert await client.xlen("tidings:s:x") == 1


def test_renew_is_typed_as_returning_the_deliveries_it_lost() -> None:
    # (Typed Any, a caller's mistake with the result would pass mypy unseen.)
    assert typing.get_type_hints(RedisBackend.renew)["return"] == list[Claimed]
