"""Redis Streams: ``Bus("redis://localhost:6379/0")``.

Keys, all under one prefix (``tidings`` unless ``?prefix=`` says otherwise):

- ``{prefix}:s:{name}``: a stream per event name. Each listener reads it through a
  consumer group of its own (the listener's qualified name), so every listener gets
  every event (fan-out) and acknowledges it on its own. An entry has one field, ``e``:
  the event (id, name, payload, headers, times) as a msgpack array; a retry adds ``a``,
  the attempts made before it.
- ``{prefix}:r:{listener}``: the listener's own stream of retries and replayed dead
  letters, read through the same group.
- ``{prefix}:retry:{listener}`` and ``{prefix}:later``: sorted sets (by due time) of
  retries and of delayed events; a Lua script moves the due ones into their stream
  atomically. Each waiting item is a hash ``{prefix}:i:{uuid}``.
- ``{prefix}:dead``: dead letters by time of death, each a hash ``{prefix}:x:...``.
- ``{prefix}:streams`` and ``{prefix}:listeners``: the event names stored and the
  listeners joined (with their patterns), so a producer creates the groups of a new
  stream before its first entry, and wildcard listeners find streams made later.

A delivery is an entry in a group's pending list, leased to the process that read it.
Running deliveries are renewed with ``XCLAIM ... JUSTID`` (which resets their idle time
without counting a delivery); entries idle for longer than the lease belonged to a
process that died, and any consumer takes them over with ``XAUTOCLAIM``, no lock. The
entry's delivery count is the attempt number (plus the attempts of earlier entries of
the same delivery, for retries). Entries every group has acknowledged are trimmed
(``XTRIM MINID`` at the oldest position any group still needs), so streams stay small.

Written for Redis 7.0. Redis 8.2's ``XACKDEL`` would acknowledge and delete in one
command (no trimming pass), and ``XREADGROUP ... CLAIM`` would take over idle entries
in the read itself (no separate ``XAUTOCLAIM``).

Needs ``pip install 'tidings[redis]'`` (redis-py).
"""

from __future__ import annotations

import struct
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec

from tidings._patterns import matches
from tidings.backends.base import DeadLetter, redact, split_options
from tidings.backends.durable import (
    Claimed,
    DurableBackend,
    ListenerStats,
    Outcomes,
    Stored,
    dead_letter,
)
from tidings.errors import BackendError, ConfigurationError

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

__all__ = ["RedisBackend"]

# Due items (retries, delayed events) move from a sorted set into their stream.
_MOVE = """
local items = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, item in ipairs(items) do
  local h = redis.call('HGETALL', item)
  local target
  local fields = {}
  for i = 1, #h, 2 do
    if h[i] == '_k' then
      target = h[i + 1]
    else
      fields[#fields + 1] = h[i]
      fields[#fields + 1] = h[i + 1]
    end
  end
  if target then
    redis.call('XADD', target, '*', unpack(fields))
  end
  redis.call('DEL', item)
  redis.call('ZREM', KEYS[1], item)
end
return #items
"""

# Dead letters go back to their listener's stream with fresh attempts.
_REPLAY = """
local n = 0
for _, key in ipairs(ARGV) do
  local h = redis.call('HGETALL', key)
  if #h > 0 then
    local target
    local fields = {}
    for i = 1, #h, 2 do
      local f = h[i]
      if f == '_k' then
        target = h[i + 1]
      elseif f == 'e' then
        fields[#fields + 1] = f
        fields[#fields + 1] = h[i + 1]
      end
    end
    redis.call('XADD', target, '*', unpack(fields))
    n = n + 1
  end
  redis.call('DEL', key)
  redis.call('ZREM', KEYS[1], key)
end
return n
"""

# Trim each stream below the oldest entry a group still needs: its oldest pending
# entry, or the one after the last it read. A stream no group reads is emptied.
# ARGV[1] > 0: also forget consumers idle that many ms with nothing pending.
_TRIM = """
local function parse(id)
  local ms, seq = string.match(id, '(%d+)-(%d+)')
  return tonumber(ms), tonumber(seq)
end
local function less(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end
local reap = tonumber(ARGV[1])
local total = 0
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    local minid = nil
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
      local name, pending, last
      for i = 1, #g, 2 do
        if g[i] == 'name' then name = g[i + 1]
        elseif g[i] == 'pending' then pending = g[i + 1]
        elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
      end
      local pos
      if pending > 0 then
        pos = redis.call('XPENDING', key, name)[2]
      else
        local ms, seq = string.match(last, '(%d+)-(%d+)')
        pos = ms .. '-' .. string.format('%d', tonumber(seq) + 1)
      end
      if minid == nil or less(pos, minid) then minid = pos end
      if reap > 0 then
        for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', key, name)) do
          local cname, cpending, cidle
          for i = 1, #c, 2 do
            if c[i] == 'name' then cname = c[i + 1]
            elseif c[i] == 'pending' then cpending = c[i + 1]
            elseif c[i] == 'idle' then cidle = c[i + 1] end
          end
          if cpending == 0 and cidle > reap then
            redis.call('XGROUP', 'DELCONSUMER', key, name, cname)
          end
        end
      end
    end
    if minid == nil then
      total = total + redis.call('XTRIM', key, 'MAXLEN', 0)
    else
      total = total + redis.call('XTRIM', key, 'MINID', minid)
    end
  end
end
return total
"""


# Add a batch of entries in one command. ARGV[1] packs, per entry, the index of its
# stream in KEYS and the entry (see _Entry) behind its length: one argument for the
# batch, not one per entry, spares the client most of its work.
_STORE = """
local blob = ARGV[1]
local pos = 1
local n = 0
while pos <= #blob do
  local k, entry
  k, entry, pos = struct.unpack('>HIc0', blob, pos)
  redis.call('XADD', KEYS[k], '*', 'e', entry)
  n = n + 1
end
return n
"""

# Acknowledge the entries ARGV[2] lists (separated by spaces) for group ARGV[1].
_ACK = """
local ids = {}
local n = 0
for id in string.gmatch(ARGV[2], '%S+') do
  ids[#ids + 1] = id
  if #ids == 1000 then
    n = n + redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
    ids = {}
  end
end
if #ids > 0 then
  n = n + redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
end
return n
"""

_pack_head = struct.Struct(">HI").pack


# A stream entry's one field: the Stored event as a msgpack array.
_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder(Stored).decode


# An idle consumer's entries are looked for this often, as a share of the lease.
_RECLAIM_SHARE = 0.25
# Each claim asks how many event names there are, and looks for new streams when that
# changes; and also this often, whatever it says.
_DISCOVER_S = 10.0
# Acknowledged entries are trimmed this often (per process).
_TRIM_S = 1.0
# Consumers idle this long with nothing pending are forgotten.
_REAP_MS = 3_600_000
_REAP_S = 60.0
# Released entries are marked idle this long, so the next claim takes them at once.
_RELEASED_IDLE_MS = 10 * 365 * 86_400_000
# Options of ours in the URL's query; the rest go to redis-py.
_FLOAT_OPTIONS = ("lease_s", "poll_s")
_INT_OPTIONS = ("batch", "concurrency", "max_lost_runs")
_STR_OPTIONS = ("codec", "prefix")


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
    turn: int = 0


class RedisBackend(DurableBackend):
    """Deliveries in Redis Streams (see the module docstring).

    Args:
        url: a redis-py URL (``redis://``, ``rediss://`` or ``unix://``).
        prefix: the start of every key this backend uses.
        **options: see :class:`~tidings.backends.durable.DurableBackend`.
    """

    scheme: ClassVar[str] = "redis"

    def __init__(
        self, url: str = "redis://localhost:6379/0", *, prefix: str = "tidings", **options: Any
    ) -> None:
        super().__init__(**options)
        if not prefix or any(c in prefix for c in " *?[]"):
            raise ConfigurationError(
                f"a Redis key prefix needs no spaces or glob characters: {prefix!r}"
            )
        self.url = url
        self.prefix = prefix
        # redis-py's replies are typed as unions of every reply shape: typed loosely.
        self._redis: Any = None
        self._replay: AsyncScript | None = None
        self._trim: AsyncScript | None = None
        self._readers: dict[str, _Reader] = {}
        self._ready: set[str] = set()  # names whose groups this process made sure of
        self._trimmed = float("-inf")
        self._reaped = float("-inf")
        self._k_streams = f"{prefix}:streams"
        self._k_listeners = f"{prefix}:listeners"
        self._k_later = f"{prefix}:later"
        self._k_dead = f"{prefix}:dead"

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisBackend:
        """``redis://[:password@]host[:port][/db]``; the query may set ``prefix``,
        ``lease_s``, ``poll_s``, ``batch``, ``concurrency``, ``max_lost_runs`` and ``codec``; other
        parameters are redis-py's."""
        rest, ours = split_options(url, floats=_FLOAT_OPTIONS, ints=_INT_OPTIONS, strs=_STR_OPTIONS)
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
        except ImportError as exc:  # pragma: no cover - the extra is installed in tests
            raise ImportError(
                "the Redis backend needs redis-py: pip install 'tidings[redis]'"
            ) from exc
        redis = Redis.from_url(
            self.url,
            protocol=2,
            socket_connect_timeout=5,
            socket_timeout=30,
            health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
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

    async def disconnect(self) -> None:
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
        keys: dict[str, int] = {}
        parts: list[bytes] = []
        for r in records:
            if r.due > now:
                item = self._item()
                pipe.hset(item, mapping={"_k": self._stream(r.name), **self._fields(r)})
                pipe.zadd(self._k_later, {item: r.due})
                continue
            index = keys.get(r.name)
            if index is None:
                if len(keys) == 65535:
                    self._queue_store(pipe, keys, parts)
                    keys, parts = {}, []
                index = keys[r.name] = len(keys) + 1
            entry = _pack(r)
            parts += (_pack_head(index, len(entry)), entry)
        if parts:
            self._queue_store(pipe, keys, parts)
        for reply in await pipe.execute(raise_on_error=False):
            if isinstance(reply, Exception):
                raise reply

    def _queue_store(self, pipe: Any, keys: dict[str, int], parts: list[bytes]) -> None:
        # EVAL, not EVALSHA: a restarted server has forgotten its scripts, and the
        # script's text is small beside a batch.
        streams = [self._stream(name) for name in keys]
        pipe.eval(_STORE, len(streams), *streams, b"".join(parts))

    async def _prepare(self, names: set[str]) -> None:
        """Make the groups of every joined listener on the streams of ``names`` before
        their first entry, so a listener misses nothing stored after it joined."""
        redis = self._r()
        await redis.sadd(self._k_streams, *names)
        joined = await redis.hgetall(self._k_listeners)
        pipe = redis.pipeline(transaction=False)
        for raw_listener, raw_patterns in joined.items():
            patterns = raw_patterns.decode().split()
            for name in names:
                if any(matches(p, name) for p in patterns):
                    pipe.xgroup_create(
                        self._stream(name), raw_listener.decode(), id="0", mkstream=True
                    )
        _raise_unless_busy(await pipe.execute(raise_on_error=False))
        self._ready |= names
        for reader in self._readers.values():
            reader.discovered = float("-inf")

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

    async def claim_tick(self, schedule: str, tick: float) -> bool:
        key = f"{self.prefix}:tick:{schedule}:{tick!r}"
        return bool(await self._r().set(key, b"1", nx=True, ex=86_400))

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
        redis = self._r()
        reader = self._reader(listener, names)
        now = time.monotonic()
        if now - reader.discovered >= _DISCOVER_S:
            reader.discovered = now
            await self._discover(reader)
        claimed: list[Claimed] = []
        limit_asked = limit
        if now - reader.reclaimed >= max(lease_s * _RECLAIM_SHARE, self.poll_s):
            reader.reclaimed = now
            claimed = await self._reclaim(reader, limit, lease_s)
            limit -= len(claimed)
        if now - self._trimmed >= _TRIM_S:
            self._trimmed = now
            await self._trim_all(now)
        pipe = redis.pipeline(transaction=False)
        pipe.scard(self._k_streams)
        group, owner = reader.group, self.owner
        reads = 0
        if now - reader.moved >= self.poll_s:
            reader.moved = now
            wall = time.time()
            # EVAL rather than EVALSHA: a restarted server has forgotten its scripts.
            pipe.eval(_MOVE, 1, self._retries(listener), wall, 1000)
            pipe.eval(_MOVE, 1, self._k_later, wall, 1000)
            if limit > 0:
                # Retries and replays, now and then; their stream is mostly empty.
                pipe.execute_command(
                    "XREADGROUP", "GROUP", group, owner, "COUNT", limit, "STREAMS", reader.own, ">"
                )
                reads += 1
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
            reads += 1
        replies = await pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, Exception):
                await self._recover(reply, reader)
        if replies[0] != reader.names_seen:
            reader.discovered = float("-inf")  # a new event name: look at the next claim
        for reply in replies[len(replies) - reads :]:
            for key, entries in reply or ():
                for entry_id, flat in entries:
                    if len(flat) == 2:  # a first delivery: the entry, alone
                        record = _unpack(flat[1])
                        claimed.append(Claimed(listener, 1, record, (key, entry_id, 0)))
                    elif flat:
                        it = iter(flat)
                        fields = dict(zip(it, it, strict=True))
                        claimed.append(self._claimed(listener, key, entry_id, fields, 1))
        if len(claimed) > limit_asked:
            # Retries and new entries came together, more than there is room for: hand
            # the rest back at once (uncounted), for the next claim to take over.
            extra = claimed[limit_asked:]
            del claimed[limit_asked:]
            await self.settle(Outcomes(releases=extra))
        return claimed

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
        base = int(fields.get(b"a", 0))
        return Claimed(listener, base + count, _unpack(fields[b"e"]), (key, entry_id, base))

    async def _reclaim(self, reader: _Reader, limit: int, lease_s: float) -> list[Claimed]:
        """Take over entries whose lease expired (their process died)."""
        redis = self._r()
        idle_ms = int(lease_s * 1000)
        out: list[Claimed] = []
        for key in (reader.own, *reader.streams):
            if len(out) >= limit:
                break
            reply = await redis.xautoclaim(
                key, reader.group, self.owner, idle_ms, start_id="0-0", count=limit - len(out)
            )
            entries = [(eid, fields) for eid, fields in reply[1] if fields]
            if not entries:
                continue
            # XAUTOCLAIM counted a delivery; XPENDING tells how many there were.
            pending = await redis.xpending_range(
                key,
                reader.group,
                min=entries[0][0],
                max=entries[-1][0],
                count=len(entries) * 2 + 10,
                consumername=self.owner,
            )
            counts = {p["message_id"]: p["times_delivered"] for p in pending}
            for eid, fields in entries:
                out.append(self._claimed(reader.group, key, eid, fields, counts.get(eid, 1)))
        return out

    async def _trim_all(self, now: float) -> None:
        reap = 0
        if now - self._reaped >= _REAP_S:
            self._reaped = now
            reap = _REAP_MS
        await self.trim(reap_ms=reap)

    async def trim(self, *, reap_ms: int = 0) -> int:
        """Trim every stream of what all its groups have acknowledged; how many entries.
        With ``reap_ms``, also forget consumers idle that long with nothing pending."""
        redis = self._r()
        names = [n.decode() for n in await redis.smembers(self._k_streams)]
        keys: list[bytes | str] = [self._stream(n) for n in names]
        keys += [self._own(lst.decode()) for lst in await redis.hkeys(self._k_listeners)]
        total = 0
        for start in range(0, len(keys), 100):
            total += int(await self._trim(keys=keys[start : start + 100], args=[reap_ms]))  # type: ignore[misc]
        return total

    async def settle(self, outcomes: Outcomes) -> None:
        redis = self._r()
        now = time.time()
        pipe = redis.pipeline(transaction=True)
        acks: dict[tuple[bytes, str], list[bytes]] = {}
        for c in outcomes.acks:
            acks.setdefault((c.ref[0], c.listener), []).append(c.ref[1])
        for c, delay, _ in outcomes.retries:
            item = self._item()
            pipe.hset(
                item, mapping={"_k": self._own(c.listener), **self._fields(c.record, c.attempt)}
            )
            pipe.zadd(self._retries(c.listener), {item: now + delay})
            acks.setdefault((c.ref[0], c.listener), []).append(c.ref[1])
        for c, error, tb in outcomes.burials:
            key = self._dead_key(c.listener, c.record.id)
            fields = self._fields(c.record)
            fields.update(
                _k=self._own(c.listener), error=error, tb=tb, at=repr(now), attempts=c.attempt
            )
            pipe.hset(key, mapping=fields)
            pipe.zadd(self._k_dead, {key: now})
            acks.setdefault((c.ref[0], c.listener), []).append(c.ref[1])
        for (stream, group), ids in acks.items():
            if len(ids) < 16:
                pipe.xack(stream, group, *ids)
            else:
                # One argument for the lot: cheaper to send than an argument per id.
                pipe.eval(_ACK, 1, stream, group, b" ".join(ids))
        for c in outcomes.releases:
            stream, entry_id, base = c.ref
            # Hand it back untried: the delivery is not counted, and it is idle at once.
            pipe.xclaim(
                stream,
                c.listener,
                self.owner,
                0,
                [entry_id],
                idle=_RELEASED_IDLE_MS,
                retrycount=max(c.attempt - base - 1, 0),
                justid=True,
            )
        await pipe.execute()
        if outcomes.releases:
            for reader in self._readers.values():
                reader.reclaimed = float("-inf")

    async def renew(self, claimed: Sequence[Claimed], lease_s: float) -> None:
        by_key: dict[tuple[bytes, str], list[bytes]] = {}
        for c in claimed:
            by_key.setdefault((c.ref[0], c.listener), []).append(c.ref[1])
        pipe = self._r().pipeline(transaction=False)
        for (key, group), ids in by_key.items():
            pipe.xclaim(key, group, self.owner, 0, ids, justid=True)
        await pipe.execute()

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

    async def list_dead(self, listener: str | None, limit: int) -> list[DeadLetter]:
        keys = (await self._dead_keys(None, listener))[:limit]
        pipe = self._r().pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        out = []
        for key, h in zip(keys, await pipe.execute(), strict=True):
            if not h:
                continue
            out.append(
                dead_letter(
                    _unpack(h[b"e"]),
                    self._dead_of(key)[0],
                    int(h[b"attempts"]),
                    h[b"error"].decode(),
                    h[b"tb"].decode(),
                    float(h[b"at"]),
                )
            )
        return out

    async def replay_dead(self, ids: Sequence[str] | None, listener: str | None) -> int:
        keys = await self._dead_keys(ids, listener)
        count = 0
        for start in range(0, len(keys), 500):
            count += int(await self._replay(keys=[self._k_dead], args=keys[start : start + 500]))  # type: ignore[misc]
        for consumer in self._consumers:
            consumer.wake.set()
        return count

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

    async def listener_stats(self) -> dict[str, ListenerStats]:
        redis = self._r()
        now = time.time()
        joined = {
            k.decode(): v.decode().split()
            for k, v in (await redis.hgetall(self._k_listeners)).items()
        }
        names = sorted(n.decode() for n in await redis.smembers(self._k_streams))
        out = {lst: ListenerStats() for lst in sorted(joined)}
        keys_of = {
            lst: [self._own(lst)]
            + [self._stream(n) for n in names if any(matches(p, n) for p in pats)]
            for lst, pats in joined.items()
        }
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
                if lag is None:
                    lag = len(await redis.xrange(key, min=f"({last}", count=100_000))
                s.pending += int(lag)
                if lag:
                    first = await redis.xrange(key, min=f"({last}", count=1)
                    if first:
                        oldest = _earliest(oldest, first[0][0])
                if g["pending"]:
                    expired = await redis.xpending_range(
                        key, lst, min="-", max="+", count=100_000, idle=lease_ms
                    )
                    s.pending += len(expired)
                    s.in_flight += int(g["pending"]) - len(expired)
                    summary = await redis.xpending(key, lst)
                    oldest = _earliest(oldest, summary["min"])
            s.retrying = int(await redis.zcard(self._retries(lst)))
            if oldest is not None:
                s.oldest_age_s = max(0.0, now - oldest)
        later = await redis.zrange(self._k_later, 0, -1, withscores=True)
        if later:
            pipe = redis.pipeline(transaction=False)
            for item, _ in later:
                pipe.hget(item, "e")
            for raw in await pipe.execute():
                if raw is None:
                    continue
                name = _unpack(raw).name
                for lst, pats in joined.items():
                    if any(matches(p, name) for p in pats):
                        out[lst].delayed += 1
        for dead_key in await self._dead_keys(None, None):
            lst = self._dead_of(dead_key)[0]
            out.setdefault(lst, ListenerStats()).dead += 1
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


def _as_sent(response: Any, **kwargs: Any) -> Any:
    return response


def _raise_unless_busy(replies: list[Any]) -> None:
    """Group creation replies: a group that exists already is fine."""
    for reply in replies:
        if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
            raise BackendError(f"Redis refused to create a consumer group: {reply}")
