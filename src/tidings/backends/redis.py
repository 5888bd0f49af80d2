"""Redis Streams: ``Bus("redis://localhost:6379/0")``.

Keys, all under one prefix (``tidings`` unless ``?prefix=`` says otherwise):

- ``{prefix}:s:{name}``: a stream per event name. Each listener reads it through a
  consumer group of its own (the listener's qualified name), so every listener gets
  every event (fan-out) and acknowledges it on its own. An entry has one field, ``e``:
  the event (id, name, payload, headers, times, format version) as a msgpack array; a
  retry adds ``a``, the attempts made before it.
- ``{prefix}:r:{listener}``: the listener's own stream of retries and replayed dead
  letters, read through the same group.
- ``{prefix}:retry:{listener}`` and ``{prefix}:later``: sorted sets (by due time) of
  retries and of delayed events; a Lua script moves the due ones into their stream
  atomically. Each waiting item is a hash ``{prefix}:i:{uuid}``.
- ``{prefix}:dead``: dead letters by time of death, each a hash ``{prefix}:x:...``.
- ``{prefix}:streams`` and ``{prefix}:listeners``: the event names stored and the
  listeners joined (with their patterns), so a producer creates the groups of a new
  stream before its first entry, and wildcard listeners find streams made later;
  ``{prefix}:seen``: when each listener last claimed; ``{prefix}:delivered`` and
  ``{prefix}:failed``: each listener's attempts that returned and that failed, counted
  by the script that settles them; ``{prefix}:alive``: a marker
  whose absence tells a producer that the server lost its data (its groups are made
  again with the next entry).

An idle consumer blocks on ``XREADGROUP ... BLOCK`` over its streams, on a connection
of its own; a producer that makes a stream, or stores an event due earlier than any
other waiting, adds a wake-up entry (field ``w``) to each listener's own stream.

A delivery is an entry in a group's pending list, leased to the process that read it.
Running deliveries are renewed with ``XCLAIM ... JUSTID`` (which resets their idle time
without counting a delivery), and settled, only while this consumer still owns them
(a script checks ``XPENDING`` first); entries idle for longer than the lease belonged to a
process that died, and any consumer takes them over (``XPENDING ... IDLE``, then
``XCLAIM``), no lock, one per claim and marked lost: the engine runs it alone, as it may
be what killed that process. The entry's delivery count is the attempt number (plus the
attempts of earlier entries of the same delivery, for retries); an entry handed back
untried is made idle at once with its count restored (``XCLAIM ... RETRYCOUNT``), so it
is taken over as lost only if it had been delivered before. Entries every group has
acknowledged are trimmed (``XTRIM MINID`` at the oldest position any group still needs),
so streams stay small; a pass trims the streams this process settled entries of, and all
of them now and then.

Written for Redis 7.0. Redis 8.2's ``XACKDEL`` would acknowledge and delete in one
command (no trimming pass), and ``XREADGROUP ... CLAIM`` would take over idle entries
in the read itself (no separate claim of idle entries).

Needs ``pip install 'tidings[redis]'`` (redis-py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import struct
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from importlib import resources
from typing import TYPE_CHECKING, Any, ClassVar, ParamSpec, TypeVar
from urllib.parse import parse_qsl, urlsplit

import msgspec

from tidings._patterns import matches
from tidings._units import positive_seconds
from tidings.backends._options import redact, split_options
from tidings.backends.base import DeadLetter
from tidings.backends.durable import (
    Claimed,
    DurableBackend,
    ListenerStats,
    Outcomes,
    Stored,
    dead_letter,
)
from tidings.errors import BackendError, ConfigurationError
from tidings.events import Event

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

__all__ = ["RedisBackend"]

logger = logging.getLogger("tidings.backends.redis")


def _lua(name: str) -> str:
    return (resources.files("tidings.backends") / "redis_lua" / f"{name}.lua").read_text()


_MOVE = _lua("move")
_REPLAY = _lua("replay")
_TRIM = _lua("trim")
_STORE = _lua("store")
_SETTLE = _lua("settle")
_RENEW = _lua("renew")

_pack_head = struct.Struct(">HI").pack
_pack_len = struct.Struct(">I").pack


def _strings(values: Sequence[bytes | str | int | float]) -> bytes:
    """Values as the scripts read them: each a string behind its length."""
    out: list[bytes] = []
    for value in values:
        raw = value if isinstance(value, bytes) else str(value).encode()
        out += (_pack_len(len(raw)), raw)
    return b"".join(out)


# A stream entry's one field: the Stored event as a msgpack array.
_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder(Stored).decode


# An idle consumer's entries are looked for this often, as a share of the lease.
_RECLAIM_SHARE = 0.25
# Each claim asks how many event names there are, and looks for new streams when that
# changes; and also this often, whatever it says.
_DISCOVER_S = 10.0
# Streams this process settled entries of are trimmed this often; every stream, and
# idle consumers forgotten, this often.
_TRIM_S = 1.0
_SWEEP_S = 60.0
# Consumers idle this long with nothing pending are forgotten.
_REAP_MS = 3_600_000
# Due retries and delayed events are looked for at least this often (a producer wakes
# readers up for one due sooner than that, and sooner than the rest).
_MOVE_S = 1.0
# The longest a consumer blocks in one read.
_BLOCK_S = 1.0
# A listener's last claim is written at most this often.
_SEEN_S = 1.0
# Redis's largest argument unless its configuration says otherwise (proto-max-bulk-len),
# and the smallest it can be configured to.
_MAX_BULK = 512 * 1024 * 1024
_MIN_BULK = 1024 * 1024
# Options of ours in the URL's query; the rest go to redis-py.
_FLOAT_OPTIONS = ("lease", "poll_interval", "stale_after", "timeout")
_INT_OPTIONS = ("batch", "concurrency", "max_lost_runs")
_STR_OPTIONS = ("codec", "prefix")

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _translated(
    method: Callable[_P, Coroutine[Any, Any, _T]],
) -> Callable[_P, Coroutine[Any, Any, _T]]:
    """Re-raise the driver's errors of a storage call as :class:`BackendError`."""

    @functools.wraps(method)
    async def call(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await method(*args, **kwargs)
        except BackendError:
            raise
        except Exception as exc:
            if isinstance(exc, OSError) or type(exc).__module__.startswith("redis"):
                raise BackendError(f"Redis failed in {method.__name__}: {exc}") from exc
            raise

    return call


class ArgumentTooLarge(ValueError):
    """A batch whose packed entries make an argument larger than Redis takes."""


@dataclass(slots=True)
class _Reader:
    """What one listener reads: its streams, and when it last did the periodic work."""

    group: str
    patterns: tuple[str, ...]
    own: bytes
    streams: list[bytes] = field(default_factory=list)
    discovered: float = float("-inf")
    names_seen: int = -1
    reclaimed: float = float("-inf")
    moved: float = float("-inf")
    seen: float = float("-inf")
    next_due: float = 0.0  # epoch seconds of the next retry or delayed event, as last seen
    turn: int = 0
    caught_up: bool = False  # the last blocked read returned less than it could
    blocker: Any = None  # the connection blocking reads wait on
    blocker_id: int = 0


class RedisBackend(DurableBackend):
    """Deliveries in Redis Streams (see the module docstring).

    Args:
        url: a redis-py URL (``redis://``, ``rediss://`` or ``unix://``).
        prefix: the start of every key this backend uses.
        timeout: how long one command may wait for Redis before it fails (a paused or
            unreachable server makes ``publish`` raise after about this long).
        **options: see :class:`~tidings.backends.durable.DurableBackend`.

    Raises:
        ConfigurationError: a bad prefix or timeout.
    """

    scheme: ClassVar[str] = "redis"

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        prefix: str = "tidings",
        timeout: float | timedelta = 5.0,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if not prefix or any(c in prefix for c in " *?[]"):
            raise ConfigurationError(
                f"a Redis key prefix needs no spaces or glob characters: {prefix!r}"
            )
        timeout_s = positive_seconds(timeout, "timeout")
        self.url = url
        self.prefix = prefix
        self.timeout_s = timeout_s
        # redis-py's replies are typed as unions of every reply shape: typed loosely.
        self._redis: Any = None
        self._replay: AsyncScript | None = None
        self._trim: AsyncScript | None = None
        self._settle: AsyncScript | None = None
        self._renew: AsyncScript | None = None
        self._readers: dict[str, _Reader] = {}
        self._ready: set[str] = set()  # names whose groups this process made sure of
        self._joined: dict[str, list[str]] = {}  # listener: patterns, as last read
        self._groups_of: dict[str, list[str]] = {}  # name: the groups its stream has
        self._dirty: set[bytes] = set()  # streams with entries settled since the last trim
        self._trimmed = float("-inf")
        self._swept = float("-inf")
        self._k_streams = f"{prefix}:streams"
        self._k_listeners = f"{prefix}:listeners"
        self._k_later = f"{prefix}:later"
        self._k_dead = f"{prefix}:dead"
        self._k_seen = f"{prefix}:seen"
        self._k_delivered = f"{prefix}:delivered"
        self._k_failed = f"{prefix}:failed"
        self._k_alive = f"{prefix}:alive"
        self._max_bulk = _MAX_BULK  # the server's proto-max-bulk-len, as last read

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisBackend:
        """``redis://[:password@]host[:port][/db]``; the query may set ``prefix``,
        ``lease``, ``poll_interval``, ``timeout``, ``batch``, ``concurrency``,
        ``max_lost_runs``, ``stale_after`` and ``codec`` (durations in seconds); other
        parameters are redis-py's.

        Raises:
            ConfigurationError: a parameter neither tidings nor redis-py takes.
        """
        rest, ours = split_options(url, floats=_FLOAT_OPTIONS, ints=_INT_OPTIONS, strs=_STR_OPTIONS)
        _check_driver_options(rest)
        return cls(rest, **options, **ours)

    def __repr__(self) -> str:
        return f"RedisBackend({redact(self.url)!r}, prefix={self.prefix!r})"

    # -- keys ---------------------------------------------------------------------

    def _stream(self, name: str) -> bytes:
        return f"{self.prefix}:s:{name}".encode()

    def _own(self, listener: str) -> bytes:
        return f"{self.prefix}:r:{listener}".encode()

    def _retries(self, listener: str) -> str:
        return f"{self.prefix}:retry:{listener}"

    def _item(self) -> str:
        return f"{self.prefix}:i:{uuid.uuid4().hex}"

    def _dead_key(self, listener: str, event_id: str) -> str:
        return f"{self.prefix}:x:{listener}\x1f{event_id}"

    def _dead_of(self, key: str) -> tuple[str, str]:
        listener, _, event_id = key[len(self.prefix) + 3 :].partition("\x1f")
        return listener, event_id

    # -- connection ---------------------------------------------------------------

    async def connect(self) -> None:
        try:
            from redis.asyncio import Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import ExponentialBackoff
            from redis.exceptions import ConnectionError as RedisConnectionError
        except ImportError as exc:  # pragma: no cover - the extra is installed in tests
            raise ImportError(
                "the Redis backend needs redis-py: pip install 'tidings[redis]'"
            ) from exc
        redis = Redis.from_url(
            self.url,
            protocol=2,
            socket_connect_timeout=self.timeout_s,
            socket_timeout=self.timeout_s,
            health_check_interval=30,
            # A lost connection is tried again (a restarted server); a timeout is not, so
            # a server that stopped answering fails a command after timeout_s.
            retry=Retry(
                ExponentialBackoff(cap=0.5, base=0.05), 2, supported_errors=(RedisConnectionError,)
            ),
        )
        try:
            await redis.ping()
        except Exception as exc:
            await redis.aclose()
            raise BackendError(f"cannot reach Redis at {redact(self.url)}: {exc}") from exc
        self._redis = redis
        # Stream entries arrive as Redis sends them (flat field lists): parsed in claim,
        # without redis-py building a dict per entry.
        redis.set_response_callback("XREADGROUP", _as_sent)
        self._replay = redis.register_script(_REPLAY)
        self._trim = redis.register_script(_TRIM)
        self._settle = redis.register_script(_SETTLE)
        self._renew = redis.register_script(_RENEW)
        await self._check_eviction()
        await self._read_max_bulk()

    async def _check_eviction(self) -> None:
        """Warn when Redis may evict keys: an evicted stream loses its events."""
        try:
            reply = await self._redis.config_get("maxmemory-policy")
        except Exception:  # CONFIG is often disabled on managed servers: nothing to say
            return
        policy = {_text(k): _text(v) for k, v in reply.items()}.get("maxmemory-policy")
        if policy is not None and policy != "noeviction":
            logger.warning(
                "Redis at %s runs with maxmemory-policy %s: when it fills up it evicts keys, "
                "and events with them; set maxmemory-policy noeviction",
                redact(self.url),
                policy,
            )

    async def _read_max_bulk(self) -> int:
        """Read how large one argument may be (``proto-max-bulk-len``): a larger one makes
        Redis drop the connection, which would look like an outage."""
        with contextlib.suppress(Exception):  # CONFIG disabled: Redis's default it is
            reply = await self._redis.config_get("proto-max-bulk-len")
            value = {_text(k): _text(v) for k, v in reply.items()}.get("proto-max-bulk-len")
            if value is not None:
                self._max_bulk = int(value)
        return self._max_bulk

    def refuses(self, exc: BaseException) -> bool:
        # A batch too large for one argument is split (and an event too large alone is
        # dropped); so is what Redis or redis-py refuse to take as a value.
        if isinstance(exc, ArgumentTooLarge):
            return True
        from redis.exceptions import DataError, ResponseError

        if isinstance(exc, DataError):
            return True
        if isinstance(exc, ResponseError):
            message = str(exc)
            return any(
                part in message for part in ("invalid bulk length", "exceeds maximum allowed size")
            )
        return super().refuses(exc)

    async def disconnect(self) -> None:
        for reader in self._readers.values():
            await self._drop_blocker(reader)
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    def _r(self) -> Any:
        if self._redis is None:
            raise BackendError("the Redis backend is not connected (start the bus first)")
        return self._redis

    # -- producing ----------------------------------------------------------------

    @staticmethod
    def _fields(record: Stored, attempts: int = 0) -> dict[str, Any]:
        fields: dict[str, Any] = {"e": _pack(record)}
        if attempts:
            fields["a"] = attempts
        return fields

    async def store(self, records: Sequence[Stored]) -> None:
        redis = self._r()
        new = {r.name for r in records} - self._ready
        if new:
            await self._prepare(new)
        now = time.time()
        pipe = redis.pipeline(transaction=False)
        index_of: dict[str, int] = {}
        parts: list[bytes] = []
        later: list[tuple[str, int, str, bytes]] = []
        biggest = 0
        for r in records:
            index = index_of.get(r.name)
            if index is None:
                if len(index_of) == 65535:
                    biggest = max(biggest, self._queue_store(pipe, index_of, parts, later))
                    index_of, parts, later = {}, [], []
                index = index_of[r.name] = len(index_of) + 1
            entry = _pack(r)
            if r.due > now:
                later.append((self._item(), index, repr(r.due), entry))
            else:
                parts += (_pack_head(index, len(entry)), entry)
        if index_of:
            biggest = max(biggest, self._queue_store(pipe, index_of, parts, later))
        try:
            replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            # Redis drops the connection on an argument larger than it takes: a limit
            # lowered since it was read is not an outage either.
            if biggest > _MIN_BULK and biggest > await self._read_max_bulk():
                raise self._too_large(biggest) from exc
            raise
        lost = False
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
            lost = lost or reply == 1
        if lost and self._joined:
            # The server lost its data (or this store is new): what this process knows of
            # the joined listeners is written back, for the streams made from now on.
            await redis.hset(
                self._k_listeners,
                mapping={lst: " ".join(pats) for lst, pats in self._joined.items()},
            )

    def _queue_store(
        self,
        pipe: Any,
        index_of: dict[str, int],
        parts: list[bytes],
        later: list[tuple[str, int, str, bytes]],
    ) -> int:
        """Queue the script storing a batch on ``pipe``; its largest argument's size.

        Raises:
            ArgumentTooLarge: an argument is larger than Redis takes (then nothing is queued).
        """
        # EVAL, not EVALSHA: a restarted server has forgotten its scripts, and the
        # script's text is small beside a batch.
        streams = [self._stream(name) for name in index_of]
        spec: list[str | int] = []
        for name in index_of:
            groups = self._groups_of.get(name, [])
            spec += (name, len(groups), *groups)
        now, waiting = b"".join(parts), _strings([v for item in later for v in item])
        biggest = max(len(now), len(waiting))
        if biggest > self._max_bulk:
            raise self._too_large(biggest)
        pipe.eval(
            _STORE,
            3 + len(streams),
            self._k_alive,
            self._k_streams,
            self._k_later,
            *streams,
            now,
            _strings(spec),
            f"{self.prefix}:r:",
            waiting,
            repr(time.time() + _MOVE_S),
        )
        return biggest

    def _too_large(self, size: int) -> ArgumentTooLarge:
        return ArgumentTooLarge(
            f"the events take {size} bytes in one Redis argument, more than the server's "
            f"proto-max-bulk-len ({self._max_bulk} bytes)"
        )

    async def _prepare(self, names: set[str]) -> None:
        """Make the groups of every joined listener on the streams of ``names`` before
        their first entry, so a listener misses nothing stored after it joined."""
        redis = self._r()
        await redis.sadd(self._k_streams, *names)
        joined = await redis.hgetall(self._k_listeners)
        self._joined = {k.decode(): v.decode().split() for k, v in joined.items()}
        pipe = redis.pipeline(transaction=False)
        made: list[str] = []
        for listener, patterns in self._joined.items():
            for name in names:
                if any(matches(p, name) for p in patterns):
                    pipe.xgroup_create(self._stream(name), listener, id="0", mkstream=True)
                    made.append(listener)
        replies = await pipe.execute(raise_on_error=False)
        _raise_unless_busy(replies)
        woken = {lst for lst, reply in zip(made, replies, strict=True) if reply is True}
        if woken:
            # A new stream: its listeners' blocked readers do not read it yet.
            pipe = redis.pipeline(transaction=False)
            for lst in woken:
                pipe.xadd(self._own(lst), {"w": "1"})
            await pipe.execute()
        self._ready |= names
        self._group_names()
        for reader in self._readers.values():
            reader.discovered = float("-inf")

    def _group_names(self) -> None:
        """Which groups the stream of each name this process stored has, as known here."""
        self._groups_of = {
            name: [lst for lst, pats in self._joined.items() if any(matches(p, name) for p in pats)]
            for name in self._ready
        }

    @_translated
    async def join(self, listener: str, names: Sequence[str]) -> None:
        redis = self._r()
        await redis.hset(self._k_listeners, listener, " ".join(names))
        existing = [n.decode() for n in await redis.smembers(self._k_streams)]
        pipe = redis.pipeline(transaction=False)
        pipe.xgroup_create(self._own(listener), listener, id="0", mkstream=True)
        for name in existing:
            if any(matches(p, name) for p in names):
                pipe.xgroup_create(self._stream(name), listener, id="$", mkstream=True)
        _raise_unless_busy(await pipe.execute(raise_on_error=False))
        self._joined[listener] = list(names)
        self._group_names()

    @_translated
    async def joined(self) -> dict[str, list[str]]:
        raw = await self._r().hgetall(self._k_listeners)
        return {k.decode(): v.decode().split() for k, v in raw.items()}

    async def claim_tick(self, schedule: str, tick: float) -> bool:
        key = f"{self.prefix}:tick:{schedule}:{tick!r}"
        return bool(await self._r().set(key, b"1", nx=True, ex=86_400))

    @_translated
    async def forget(self, listener: str) -> bool:
        """Drop ``listener`` from this store: its groups (and their pending entries), its
        retries and its entry among the joined listeners; whether it had joined.
        Its dead letters stay until purged."""
        redis = self._r()
        raw = await redis.hget(self._k_listeners, listener)
        patterns = raw.decode().split() if raw is not None else []
        names = [n.decode() for n in await redis.smembers(self._k_streams)]
        items = await redis.zrange(self._retries(listener), 0, -1)
        pipe = redis.pipeline(transaction=True)
        pipe.hdel(self._k_listeners, listener)
        pipe.hdel(self._k_seen, listener)
        pipe.hdel(self._k_delivered, listener)
        pipe.hdel(self._k_failed, listener)
        for name in names:
            if any(matches(p, name) for p in patterns):
                pipe.xgroup_destroy(self._stream(name), listener)
        pipe.delete(self._own(listener), self._retries(listener), *items)
        replies = await pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, Exception) and "NOGROUP" not in str(reply):
                raise reply
        self._joined.pop(listener, None)
        self._group_names()
        reader = self._readers.pop(listener, None)
        if reader is not None:
            await self._drop_blocker(reader)
        return raw is not None

    # -- consuming ----------------------------------------------------------------

    def _reader(self, listener: str, names: Sequence[str]) -> _Reader:
        reader = self._readers.get(listener)
        if reader is None:
            reader = _Reader(group=listener, patterns=tuple(names), own=self._own(listener))
            self._readers[listener] = reader
        return reader

    async def _discover(self, reader: _Reader) -> None:
        redis = self._r()
        names = sorted(n.decode() for n in await redis.smembers(self._k_streams))
        reader.names_seen = len(names)
        streams = [self._stream(n) for n in names if any(matches(p, n) for p in reader.patterns)]
        known = set(reader.streams)
        added = [s for s in streams if s not in known]
        if added:
            # Normally the producer made them; a stream it raced with starts from now.
            pipe = redis.pipeline(transaction=False)
            for key in added:
                pipe.xgroup_create(key, reader.group, id="$", mkstream=True)
            _raise_unless_busy(await pipe.execute(raise_on_error=False))
        reader.streams = streams

    async def claim(
        self, listener: str, names: Sequence[str], limit: int, lease_s: float
    ) -> list[Claimed]:
        reader = self._reader(listener, names)
        # A consumer of this process blocks on Redis until something comes or it is
        # woken (a drain, a stop, room again); a bare call returns at once.
        consumer = next(
            (c for c in self._consumers if getattr(c, "listener_id", None) == listener), None
        )
        while True:
            if reader.caught_up and consumer is not None:
                # The last blocked read left nothing behind: block again at once (the
                # read returns at once if something came meanwhile), one round trip less.
                reader.caught_up = False
                claimed = []
            else:
                claimed = await self._claim_now(reader, limit, lease_s)
            if claimed or consumer is None or consumer.wake.is_set() or self._stopping:
                return claimed
            if self._drain_waits(consumer):
                return claimed  # a drain waits to hear that this consumer is idle
            claimed = await self._block(reader, consumer, limit, lease_s)
            reader.caught_up = 0 < len(claimed) < limit
            if claimed or consumer.wake.is_set() or self._stopping:
                return claimed

    def _drain_waits(self, consumer: Any) -> bool:
        """Whether a drain waits for ``consumer`` to come back from a claim with nothing."""
        gen = getattr(self, "_drain_gen", 0)
        return bool(gen) and getattr(consumer, "idle_gen", gen) < gen

    async def _claim_now(self, reader: _Reader, limit: int, lease_s: float) -> list[Claimed]:
        redis = self._r()
        listener = reader.group
        now = time.monotonic()
        if now - reader.discovered >= _DISCOVER_S:
            reader.discovered = now
            await self._discover(reader)
        claimed: list[Claimed] = []
        limit_asked = limit
        if limit > 0 and now - reader.reclaimed >= max(lease_s * _RECLAIM_SHARE, self.poll_s):
            reader.reclaimed = now
            lost = await self._reclaim(reader, lease_s)
            if lost is not None:
                # Handed out alone; the next claim looks for another at once.
                claimed = [lost]
                limit = 0
                reader.reclaimed = float("-inf")
        if self._trim_due(now) <= 0:
            await self._trim_all(now)
        pipe = redis.pipeline(transaction=False)
        pipe.scard(self._k_streams)
        first = 1
        if now - reader.seen >= _SEEN_S:
            reader.seen = now
            pipe.hset(self._k_seen, listener, repr(time.time()))
            first += 1
        group, owner = reader.group, self.owner
        moves = 0
        wall = time.time()
        if wall >= reader.next_due or now - reader.moved >= _MOVE_S:
            reader.moved = now
            # EVAL rather than EVALSHA: a restarted server has forgotten its scripts.
            pipe.eval(_MOVE, 1, self._retries(listener), wall, 1000)
            pipe.eval(_MOVE, 1, self._k_later, wall, 1000)
            moves = 2
            if limit > 0:
                # Retries and replays, now and then; their stream is mostly empty.
                pipe.execute_command(
                    "XREADGROUP", "GROUP", group, owner, "COUNT", limit, "STREAMS", reader.own, ">"
                )
        streams = reader.streams
        if limit > 0 and streams:
            if len(streams) <= limit:
                count, chosen = limit // len(streams), streams
            else:
                # Fewer deliveries wanted than streams: take turns.
                start = reader.turn % len(streams)
                count, chosen = 1, (streams[start:] + streams[:start])[:limit]
                reader.turn += limit
            pipe.execute_command(
                "XREADGROUP",
                "GROUP",
                group,
                owner,
                "COUNT",
                count,
                "STREAMS",
                *chosen,
                *(b">",) * len(chosen),
            )
        replies = await pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, Exception):
                await self._recover(reply, reader)
        if replies[0] != reader.names_seen:
            reader.discovered = float("-inf")  # a new event name: look at the next claim
        if moves:
            reader.next_due = min(
                (float(r[1]) for r in replies[first : first + moves] if r[1]),
                default=float("inf"),
            )
        wakes: list[bytes] = []
        for reply in replies[first + moves :]:
            self._read(listener, reply, claimed, wakes)
        await self._woken(reader, wakes)
        return await self._within(claimed, limit_asked)

    def _read(self, listener: str, reply: Any, claimed: list[Claimed], wakes: list[bytes]) -> None:
        """Add the deliveries of an ``XREADGROUP`` reply to ``claimed``, and the ids of its
        wake-up entries to ``wakes``."""
        for key, entries in reply or ():
            for entry_id, flat in entries:
                if len(flat) == 2 and flat[0] == b"e":  # a first delivery: the entry, alone
                    try:
                        record = _unpack(flat[1])
                    except Exception as exc:
                        claimed.append(self._unreadable(listener, key, entry_id, 1, 0, exc))
                        continue
                    claimed.append(Claimed(listener, 1, record, (key, entry_id, 0)))
                elif flat:
                    it = iter(flat)
                    fields = dict(zip(it, it, strict=False))
                    if b"w" in fields:
                        wakes.append(entry_id)
                    else:
                        claimed.append(self._claimed(listener, key, entry_id, fields, 1))

    async def _woken(self, reader: _Reader, wakes: list[bytes]) -> None:
        """Acknowledge wake-up entries, and look for new streams and due items at once."""
        if wakes:
            await self._r().xack(reader.own, reader.group, *wakes)
            reader.discovered = float("-inf")
            reader.next_due = 0.0

    async def _within(self, claimed: list[Claimed], limit: int) -> list[Claimed]:
        if len(claimed) > limit:
            # Retries and new entries came together, more than there is room for: hand
            # the rest back at once (uncounted), for the next claim to take over.
            extra = claimed[limit:]
            del claimed[limit:]
            await self.settle(Outcomes(releases=extra))
        return claimed

    def _trim_due(self, now: float) -> float:
        """Seconds until the next trim pass."""
        if self._dirty:
            return min(self._trimmed + _TRIM_S, self._swept + _SWEEP_S) - now
        return self._swept + _SWEEP_S - now

    async def _block(
        self, reader: _Reader, consumer: Any, limit: int, lease_s: float
    ) -> list[Claimed]:
        """Wait on Redis for new entries of ``reader``, until the next periodic work is due,
        or ``consumer`` is woken to stop or to say it is idle to a drain."""
        now = time.monotonic()
        wait_s = min(
            _BLOCK_S,
            reader.reclaimed + max(lease_s * _RECLAIM_SHARE, self.poll_s) - now,
            reader.discovered + _DISCOVER_S - now,
            reader.moved + _MOVE_S - now,
            reader.next_due - time.time(),
            self._trim_due(now),
        )
        if wait_s < 0.001 or limit <= 0:
            return []
        client = await self._blocker(reader)
        keys = [reader.own, *reader.streams]
        read = asyncio.ensure_future(
            client.execute_command(
                "XREADGROUP",
                "GROUP",
                reader.group,
                self.owner,
                "COUNT",
                limit,
                "BLOCK",
                max(1, int(wait_s * 1000)),
                "STREAMS",
                *keys,
                *(b">",) * len(keys),
            )
        )
        wake = consumer.wake
        try:
            while not read.done():
                woken = asyncio.ensure_future(wake.wait())
                try:
                    await asyncio.wait((read, woken), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    woken.cancel()
                if read.done():
                    break
                if self._stopping or self._paused or self._drain_waits(consumer):
                    break
                # Woken for room, or for events this process stored: the read sees those
                # in Redis, and ending it early would only delay the next event.
                wake.clear()
            while not read.done():
                # Stopping or draining: end the read early (it returns what it has,
                # nothing is lost). Again until it ends: the unblock may come first.
                await self._r().client_unblock(reader.blocker_id)
                await asyncio.wait((read,), timeout=0.01)
        except BaseException:
            read.cancel()
            await self._drop_blocker(reader)
            raise
        try:
            reply = read.result()
        except Exception as exc:
            await self._drop_blocker(reader)
            await self._recover(exc, reader)
        claimed: list[Claimed] = []
        wakes: list[bytes] = []
        self._read(reader.group, reply, claimed, wakes)
        await self._woken(reader, wakes)
        return await self._within(claimed, limit)

    async def _blocker(self, reader: _Reader) -> Any:
        """The connection ``reader`` blocks on: its own, so acks and publishes never wait
        behind a blocked read."""
        if reader.blocker is None:
            from redis.asyncio import Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            client = Redis.from_url(
                self.url,
                protocol=2,
                single_connection_client=True,
                socket_connect_timeout=self.timeout_s,
                socket_timeout=_BLOCK_S + self.timeout_s,
                retry=Retry(NoBackoff(), 0),
            )
            client.set_response_callback("XREADGROUP", _as_sent)
            try:
                reader.blocker_id = int(await client.client_id())
            except BaseException:
                await client.aclose()
                raise
            reader.blocker = client
        return reader.blocker

    async def _drop_blocker(self, reader: _Reader) -> None:
        client, reader.blocker = reader.blocker, None
        if client is not None:
            with contextlib.suppress(Exception):  # a broken connection: nothing to close
                await client.aclose()

    async def _recover(self, error: Exception, reader: _Reader) -> None:
        """Answer a failed read: remake the groups a server that lost its data no longer
        has; then fail this claim (it is retried)."""
        if "NOGROUP" in str(error):
            await self.join(reader.group, reader.patterns)
            reader.streams = []
            reader.discovered = float("-inf")
            self._ready.clear()
        raise error

    def _claimed(
        self, listener: str, key: bytes, entry_id: bytes, fields: dict[bytes, bytes], count: int
    ) -> Claimed:
        base = 0
        try:
            base = int(fields.get(b"a", 0))
            return Claimed(listener, base + count, _unpack(fields[b"e"]), (key, entry_id, base))
        except Exception as exc:
            return self._unreadable(listener, key, entry_id, base + count, base, exc)

    @staticmethod
    def _unreadable(
        listener: str, key: bytes, entry_id: bytes, attempt: int, base: int, exc: Exception
    ) -> Claimed:
        """A delivery of an entry that cannot be read: the engine buries it at once."""
        ident = entry_id.decode(errors="replace")
        return Claimed(
            listener,
            attempt,
            Stored(ident, "", b"", {}, 0.0, 0.0),
            (key, entry_id, base),
            error=(
                f"entry {ident} of {key.decode(errors='replace')} cannot be read: "
                f"{type(exc).__qualname__}: {exc}"
            ),
        )

    async def _reclaim(self, reader: _Reader, lease_s: float) -> Claimed | None:
        """Take over one entry whose lease expired (its process died, maybe running it),
        marked ``lost``: the engine runs it alone, so a listener that kills its process
        takes no batch-mate with it."""
        redis = self._r()
        idle_ms = int(lease_s * 1000)
        for key in (reader.own, *reader.streams):
            tried: set[bytes] = set()
            while True:
                # The oldest idle entry, found by the server however long the pending
                # list; then taken over, only if still idle (no other consumer took it).
                idle = await redis.xpending_range(
                    key, reader.group, min="-", max="+", count=1, idle=idle_ms
                )
                if not idle or idle[0]["message_id"] in tried:
                    break
                eid = idle[0]["message_id"]
                tried.add(eid)
                taken = await redis.xclaim(key, reader.group, self.owner, idle_ms, [eid])
                if not taken or not taken[0][1]:
                    continue  # taken by another, or trimmed meanwhile
                fields = taken[0][1]
                if b"w" in fields:
                    await redis.xack(key, reader.group, eid)
                    continue
                # XCLAIM counted one more delivery than XPENDING told.
                count = int(idle[0]["times_delivered"]) + 1
                claimed = self._claimed(reader.group, key, eid, fields, count)
                # Lost, unless this entry was never delivered: handed back untried.
                claimed.lost = count > 1
                return claimed
        return None

    async def _trim_all(self, now: float) -> None:
        self._trimmed = now
        if now - self._swept >= _SWEEP_S:
            self._swept = now
            self._dirty.clear()
            await self.trim(reap_ms=_REAP_MS)
        elif self._dirty:
            keys, self._dirty = list(self._dirty), set()
            await self._trim_keys(keys, 0)

    async def trim(self, *, reap_ms: int = 0) -> int:
        """Trim every stream of what all its groups have acknowledged; how many entries.
        With ``reap_ms``, also forget consumers idle that long with nothing pending."""
        redis = self._r()
        names = [n.decode() for n in await redis.smembers(self._k_streams)]
        keys: list[bytes] = [self._stream(n) for n in names]
        keys += [self._own(lst.decode()) for lst in await redis.hkeys(self._k_listeners)]
        return await self._trim_keys(keys, reap_ms)

    async def _trim_keys(self, keys: Sequence[bytes], reap_ms: int) -> int:
        total = 0
        for start in range(0, len(keys), 100):
            total += int(await self._trim(keys=keys[start : start + 100], args=[reap_ms]))  # type: ignore[misc]
        return total

    async def settle(self, outcomes: Outcomes) -> None:
        if not outcomes:
            return
        now = time.time()
        ops: dict[tuple[bytes, str], list[tuple[Any, ...]]] = {}

        def add(c: Claimed, *op: Any) -> None:
            ops.setdefault((c.ref[0], c.listener), []).append(op)

        for c in outcomes.uncounted:
            # First: a release of the same entry in this batch leaves it idle.
            add(c, 4, c.ref[1], max(c.attempt - c.ref[2] - 1, 0))
        for c in outcomes.acks:
            add(c, 0, c.ref[1])
        for c, delay, _ in outcomes.retries:
            own = self._own(c.listener)
            add(
                c,
                1,
                c.ref[1],
                self._item(),
                own,
                _pack(c.record),
                c.attempt,
                repr(now + delay),
                self._retries(c.listener),
            )
        for c, error, tb in outcomes.burials:
            dead = self._dead_key(c.listener, c.record.id)
            add(c, 2, c.ref[1], dead, self._own(c.listener), _pack(c.record), error, tb, c.attempt)
        for c in outcomes.releases:
            # Hand it back untried: the delivery is not counted, and it is idle at once.
            add(c, 3, c.ref[1], max(c.attempt - c.ref[2] - 1, 0))
        spec: list[Any] = []
        for (stream, group), group_ops in ops.items():
            ids = sorted((op[1] for op in group_ops), key=_order)
            spec += (stream, group, ids[0], ids[-1], len(group_ops))
            for op in group_ops:
                spec += op
            if any(op[0] < 3 for op in group_ops):
                self._dirty.add(stream)
        stale = await self._settle(  # type: ignore[misc]
            keys=[self._k_dead, self._k_delivered, self._k_failed],
            args=[self.owner, repr(now), _strings(spec), repr(now + _MOVE_S)],
        )
        if stale:
            logger.warning(
                "%d outcome(s) not written: another worker took the deliveries over after "
                "this one's lease expired (%s)",
                len(stale) // 2,
                ", ".join(_text(i) for i in stale[1::2]),
            )
        if outcomes.releases:
            for reader in self._readers.values():
                reader.reclaimed = float("-inf")

    async def renew(self, claimed: Sequence[Claimed], lease_s: float) -> list[Claimed]:
        """Extend the leases of ``claimed``; those this consumer no longer owns (another
        took them over) are left alone and returned."""
        by_key: dict[tuple[bytes, str], list[bytes]] = {}
        for c in claimed:
            by_key.setdefault((c.ref[0], c.listener), []).append(c.ref[1])
        spec: list[bytes | str | int] = []
        for (key, group), ids in by_key.items():
            ids.sort(key=_order)
            spec += (key, group, ids[0], ids[-1], len(ids), *ids)
        stale = await self._renew(args=[self.owner, _strings(spec)])  # type: ignore[misc]
        lost = {(stale[i], stale[i + 1]) for i in range(0, len(stale), 2)}
        return [c for c in claimed if (c.ref[0], c.ref[1]) in lost]

    # -- dead letters ---------------------------------------------------------------

    async def _dead_keys(self, ids: Sequence[str] | None, listener: str | None) -> list[str]:
        keys = [k.decode() for k in await self._r().zrange(self._k_dead, 0, -1)]
        wanted = set(ids) if ids is not None else None
        out = []
        for key in keys:
            lst, event_id = self._dead_of(key)
            if listener is not None and lst != listener:
                continue
            if wanted is not None and event_id not in wanted:
                continue
            out.append(key)
        return out

    @_translated
    async def list_dead(self, listener: str | None, limit: int) -> list[DeadLetter]:
        keys = (await self._dead_keys(None, listener))[:limit]
        pipe = self._r().pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        out = []
        for key, h in zip(keys, await pipe.execute(), strict=True):
            if not h:
                continue
            out.append(_dead_letter(h, self._dead_of(key)))
        return out

    @_translated
    async def replay_dead(self, ids: Sequence[str] | None, listener: str | None) -> int:
        keys = await self._dead_keys(ids, listener)
        count = 0
        for start in range(0, len(keys), 500):
            count += int(await self._replay(keys=[self._k_dead], args=keys[start : start + 500]))  # type: ignore[misc]
        for consumer in self._consumers:
            consumer.wake.set()
        return count

    @_translated
    async def purge_dead(self, ids: Sequence[str] | None, listener: str | None) -> int:
        keys = await self._dead_keys(ids, listener)
        redis = self._r()
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            pipe = redis.pipeline(transaction=True)
            pipe.delete(*chunk)
            pipe.zrem(self._k_dead, *chunk)
            await pipe.execute()
        return len(keys)

    # -- inspecting -----------------------------------------------------------------

    @_translated
    async def listener_stats(self) -> dict[str, ListenerStats]:
        redis = self._r()
        now = time.time()
        joined = {
            k.decode(): v.decode().split()
            for k, v in (await redis.hgetall(self._k_listeners)).items()
        }
        seen = {k.decode(): float(v) for k, v in (await redis.hgetall(self._k_seen)).items()}
        delivered = {
            k.decode(): int(v) for k, v in (await redis.hgetall(self._k_delivered)).items()
        }
        failed = {k.decode(): int(v) for k, v in (await redis.hgetall(self._k_failed)).items()}
        names = sorted(n.decode() for n in await redis.smembers(self._k_streams))
        out = {
            lst: ListenerStats(
                last_seen=seen.get(lst), delivered=delivered.get(lst, 0), failed=failed.get(lst, 0)
            )
            for lst in sorted(joined)
        }
        keys_of = {
            lst: [self._own(lst)]
            + [self._stream(n) for n in names if any(matches(p, n) for p in pats)]
            for lst, pats in joined.items()
        }
        # Waiting items first, streams after: an item moved into its stream meanwhile is
        # then counted in one or the other, never in neither.
        for lst in joined:
            out[lst].retrying = int(await redis.zcard(self._retries(lst)))
        later = await redis.zrange(self._k_later, 0, -1, withscores=True)
        if later:
            pipe = redis.pipeline(transaction=False)
            for item, _ in later:
                pipe.hget(item, "e")
            for raw in await pipe.execute():
                if raw is None:
                    continue
                try:
                    name = _unpack(raw).name
                except Exception:  # unreadable: it is dead-lettered when it comes due
                    continue
                for lst, pats in joined.items():
                    if any(matches(p, name) for p in pats):
                        out[lst].delayed += 1
        all_keys = sorted({k for keys in keys_of.values() for k in keys})
        pipe = redis.pipeline(transaction=False)
        for key in all_keys:
            pipe.xinfo_groups(key)
        groups_of: dict[bytes, dict[str, dict[str, Any]]] = {}
        for key, reply in zip(all_keys, await pipe.execute(raise_on_error=False), strict=True):
            if isinstance(reply, Exception):
                continue
            groups_of[key] = {_text(g["name"]): g for g in reply}
        lease_ms = int(self.lease_s * 1000)
        for lst, keys in keys_of.items():
            s = out[lst]
            oldest: float | None = None
            for key in keys:
                g = groups_of.get(key, {}).get(lst)
                if g is None:
                    continue
                last = _text(g["last-delivered-id"])
                lag = g.get("lag")
                if lag is None or (lag and key == keys[0]):
                    # Counted one by one: the listener's own stream holds wake-ups too.
                    unread = await redis.xrange(key, min=f"({last}", count=100_000)
                    unread = [(eid, f) for eid, f in unread if b"w" not in f]
                    lag = len(unread)
                    first = unread[:1]
                elif lag:
                    first = await redis.xrange(key, min=f"({last}", count=1)
                s.pending += int(lag)
                if lag and first:
                    oldest = _earliest(oldest, first[0][0])
                if g["pending"]:
                    expired = await redis.xpending_range(
                        key, lst, min="-", max="+", count=100_000, idle=lease_ms
                    )
                    s.pending += len(expired)
                    s.in_flight += int(g["pending"]) - len(expired)
                    # Pending again once its lease expired; a running one is not waiting.
                    if expired:
                        oldest = _earliest(oldest, expired[0]["message_id"])
            if oldest is not None:
                s.oldest_age_s = max(0.0, now - oldest)
        for dead_key in await self._dead_keys(None, None):
            lst = self._dead_of(dead_key)[0]
            out.setdefault(lst, ListenerStats()).dead += 1
        return out

    async def list_delayed(self, within_s: float, limit: int) -> list[dict[str, Any]]:
        """Events stored for later and due within ``within_s`` seconds, soonest first
        (``event_id``, ``name``, ``created``, ``due``)."""
        redis = self._r()
        now = time.time()
        items = await redis.zrangebyscore(
            self._k_later, now, now + within_s, start=0, num=limit, withscores=True
        )
        pipe = redis.pipeline(transaction=False)
        for item, _due in items:
            pipe.hget(item, "e")
        out = []
        for (_item, due), packed in zip(items, await pipe.execute(), strict=True):
            if packed is not None:  # else moved into its stream meanwhile
                record = _unpack(packed)
                out.append(
                    {
                        "event_id": record.id,
                        "name": record.name,
                        "created": record.created,
                        "due": due,
                    }
                )
        return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _order(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq)


def _earliest(current: float | None, entry_id: Any) -> float | None:
    if entry_id is None:
        return current
    at = _order(entry_id if isinstance(entry_id, bytes) else str(entry_id).encode())[0] / 1000
    return at if current is None else min(current, at)


def _dead_letter(h: dict[bytes, bytes], of: tuple[str, str]) -> DeadLetter:
    """A dead letter from its hash; one whose event cannot be read still shows, empty."""
    listener, event_id = of
    attempts = int(h.get(b"attempts", 0))
    error = h.get(b"error", b"").decode(errors="replace")
    tb = h.get(b"tb", b"").decode(errors="replace")
    at = float(h.get(b"at", 0.0))
    try:
        return dead_letter(_unpack(h[b"e"]), listener, attempts, error, tb, at)
    except Exception:
        event = Event("", (), {}, _id=event_id, attempt=attempts)
        return DeadLetter(event, listener, error, tb, attempts, at)


def _check_driver_options(url: str) -> None:
    """Refuse a URL parameter that redis-py does not take either (a misspelt option of
    ours would otherwise fail only at start, with redis-py's message).

    Raises:
        ConfigurationError: naming the parameter.
    """
    keys = [key for key, _ in parse_qsl(urlsplit(url).query, keep_blank_values=True)]
    if not keys:
        return
    try:
        from redis.asyncio import connection
    except ImportError:  # pragma: no cover - connect says what to install
        return
    taken = set(connection.URL_QUERY_ARGUMENT_PARSERS)
    for cls in (
        connection.AbstractConnection,
        connection.Connection,
        connection.SSLConnection,
        connection.UnixDomainSocketConnection,
        connection.ConnectionPool,
    ):
        taken.update(inspect.signature(cls.__init__).parameters)
    taken -= {"self", "args", "kwargs"}
    for key in keys:
        if key not in taken:
            ours = ", ".join(sorted((*_FLOAT_OPTIONS, *_INT_OPTIONS, *_STR_OPTIONS)))
            raise ConfigurationError(
                f"unknown option {key!r} in the Redis URL {redact(url)!r}: tidings takes "
                f"{ours}; the rest must be redis-py's connection parameters"
            )


def _as_sent(response: Any, **kwargs: Any) -> Any:
    return response


def _raise_unless_busy(replies: list[Any]) -> None:
    """Group creation replies: a group that exists already is fine."""
    for reply in replies:
        if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
            raise BackendError(f"Redis refused to create a consumer group: {reply}")
