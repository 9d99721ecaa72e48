"""The behaviour store: one capped, most-recent-first list of events per user in Redis.

Keys (the user id is a Redis Cluster hash tag, so a user's keys share one slot and the ingest
script may touch both; different users spread over slots):

* `<prefix>:seq:{u:<user_id>}`  LIST of `item|category|ts`, newest at index 0, at most `cap`.
* `<prefix>:seen:{u:<user_id>}` ZSET of recent event ids scored by event ts (deduplication),
  at most `dedup_cap` members.

Both carry a TTL that every write refreshes. Ingestion runs one Lua script per user, so the
dedup check, the push, the trim and the expiry are applied together or not at all: an event is
never marked as seen without being stored. Events of one request are pushed in timestamp order;
across requests the list keeps arrival order.

Redis is a soft dependency of scoring (`recent`: a short timeout, no retries, a circuit breaker,
callers fall back to an empty history) and a hard one of ingestion and the admin reads
(`ingest`, `history`, `erase`: a longer timeout, errors surface as `StoreUnavailable`). The
store treats what it reads as untrusted and drops malformed entries.
"""

from __future__ import annotations

import asyncio
import re
from collections import defaultdict
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from service.contracts import Event, HistoryItem, IngestResult, StoreUnavailable
from service.store.breaker import CircuitBreaker

_T = TypeVar("_T")
_SEP = "|"
# Ids are validated at the API; the same pattern guards what is read back from Redis.
_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
# A whole stored entry, `item|category|ts` with ts as `repr(float)` of a non-negative time: one
# match per entry on the scoring path (splitting and two id matches cost 4x as much).
_ENTRY = re.compile(
    r"([A-Za-z0-9_.:-]{1,64})\|([A-Za-z0-9_.:-]{1,64})\|(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)"
)

# KEYS[1] seq list, KEYS[2] seen zset; ARGV: cap, ttl, dedup_cap, then triples
# (event_id or "", entry, ts). Reads come before the first write, so a refused write (OOM)
# leaves nothing behind.
_INGEST_LUA = """
local cap, ttl, dcap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local accepted, dups = 0, 0
for i = 4, #ARGV, 3 do
  local id = ARGV[i]
  if id ~= "" and redis.call('ZSCORE', KEYS[2], id) then
    dups = dups + 1
  else
    redis.call('LPUSH', KEYS[1], ARGV[i + 1])
    if id ~= "" then redis.call('ZADD', KEYS[2], ARGV[i + 2], id) end
    accepted = accepted + 1
  end
end
if accepted > 0 then
  redis.call('LTRIM', KEYS[1], 0, cap - 1)
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(dcap + 1))
end
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
return {accepted, dups}
"""


@dataclass(frozen=True)
class StoreConfig:
    key_prefix: str = "v1"
    cap: int = 200
    ttl_s: int = 30 * 86400
    dedup_cap: int = 1000
    read_timeout_s: float = 0.03
    write_timeout_s: float = 0.5
    max_connections: int = 64
    breaker_failures: int = 5
    breaker_reset_s: float = 5.0


RedisClient = aioredis.Redis | RedisCluster


def connect(url: str, timeout_s: float, max_connections: int, cluster: bool) -> RedisClient:
    """A client that never blocks past `timeout_s` and never retries on its own.

    redis-py's defaults (5 s socket timeout, 10 retries) would hold a request for a minute
    against a hung server; the caller decides about retries instead. The asyncio client takes
    the asyncio `Retry` (redis-py 8 converts a synchronous one, with a warning).
    """
    common: dict[str, Any] = {
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": True,
        "health_check_interval": 30,
    }
    if cluster:  # the cluster client also talks to nodes outside our calls (slot discovery)
        return RedisCluster.from_url(
            url, max_connections=max_connections, socket_timeout=timeout_s, **common
        )
    # No socket timeout on one server: every call is bounded as a whole by
    # `BehaviorStore._bounded`, and with one redis-py writes each command in a task of its own
    # (`asyncio.wait_for`), a loop round trip more per history read.
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout_s, **common
    )
    return aioredis.Redis(connection_pool=pool)


class BehaviorStore:
    """Per-user behaviour sequences; see the module docstring for keys and semantics."""

    def __init__(self, reader: RedisClient, writer: RedisClient, config: StoreConfig) -> None:
        self._reader = reader
        self._writer = writer
        self.config = config
        self.breaker = CircuitBreaker(config.breaker_failures, config.breaker_reset_s)

    @classmethod
    def from_url(cls, url: str, config: StoreConfig, cluster: bool = False) -> BehaviorStore:
        # Two clients: the scoring path's sockets time out in tens of ms, ingestion's later.
        reader = connect(url, config.read_timeout_s, config.max_connections, cluster)
        writer = connect(url, config.write_timeout_s, config.max_connections, cluster)
        return cls(reader, writer, config)

    def seq_key(self, user_id: str) -> str:
        return f"{self.config.key_prefix}:seq:{{u:{user_id}}}"

    def seen_key(self, user_id: str) -> str:
        return f"{self.config.key_prefix}:seen:{{u:{user_id}}}"

    async def recent(self, user_ids: Sequence[str], limit: int) -> dict[str, list[tuple[str, str]]]:
        """Up to `limit` most recent (item, category) pairs per user, oldest first: one round
        trip (pipelined for several users).

        Raises StoreUnavailable at once while the breaker is open, or after the read budget.
        """
        users = list(dict.fromkeys(user_ids))
        if not users or limit <= 0:
            return {u: [] for u in users}
        if not self.breaker.allow():
            raise StoreUnavailable("circuit breaker open")
        try:
            raw = await self._bounded(self._lrange_all(users, limit), self.config.read_timeout_s)
        except StoreUnavailable:
            self.breaker.record_failure()
            raise
        except BaseException:  # cancelled by the caller: neither a success nor a failure
            self.breaker.release()
            raise
        self.breaker.record_success()
        return {u: _pairs(entries)[::-1] for u, entries in zip(users, raw, strict=True)}

    async def ingest(self, events: Sequence[Event]) -> IngestResult:
        """Stores events idempotently (per event_id): one script call per user, one round trip."""
        by_user: dict[str, list[Event]] = defaultdict(list)
        for event in events:
            by_user[event.user_id].append(event)
        pipe = self._writer.pipeline(transaction=False)
        for user, user_events in by_user.items():
            args: list[Any] = [self.config.cap, self.config.ttl_s, self.config.dedup_cap]
            for e in sorted(user_events, key=lambda e: e.ts):
                args += [e.event_id or "", _encode(e), repr(float(e.ts))]
            pipe.eval(_INGEST_LUA, 2, self.seq_key(user), self.seen_key(user), *args)
        results = await self._bounded(pipe.execute(), self.config.write_timeout_s)
        return IngestResult(
            accepted=sum(int(r[0]) for r in results), duplicates=sum(int(r[1]) for r in results)
        )

    async def history(self, user_id: str) -> list[HistoryItem]:
        """The stored sequence, oldest first (admin read; errors are not swallowed)."""
        entries = await self._bounded(
            self._writer.lrange(self.seq_key(user_id), 0, self.config.cap - 1),
            self.config.write_timeout_s,
        )
        return _parse(entries)[::-1]

    async def erase(self, user_id: str) -> None:
        """Deletes everything stored about the user (both keys share the user's slot)."""
        await self._bounded(
            self._writer.delete(self.seq_key(user_id), self.seen_key(user_id)),
            self.config.write_timeout_s,
        )

    async def append_stream(self, key: str, fields: dict[str, str], maxlen: int) -> None:
        """XADD with an approximate MAXLEN cap (Redis trims whole nodes: cheap, never below
        `maxlen`). For analysis records such as the shadow pairs; errors surface."""
        await self._bounded(
            self._writer.xadd(key, fields, maxlen=maxlen, approximate=True),  # type: ignore[arg-type]
            self.config.write_timeout_s,
        )

    async def ping(self) -> bool:
        try:
            return bool(await self._bounded(self._writer.ping(), self.config.write_timeout_s))
        except StoreUnavailable:
            return False

    async def close(self) -> None:
        for client in (self._reader, self._writer):
            await client.aclose()

    async def _lrange_all(self, users: list[str], limit: int) -> list[Any]:
        if len(users) == 1:  # a pipeline of one command only adds its own bookkeeping
            return [await self._reader.lrange(self.seq_key(users[0]), 0, limit - 1)]
        pipe = self._reader.pipeline(transaction=False)
        for user in users:
            pipe.lrange(self.seq_key(user), 0, limit - 1)
        return list(await pipe.execute())

    @staticmethod
    async def _bounded(call: Awaitable[_T], timeout_s: float) -> _T:
        """Runs one Redis call under an outer deadline; every failure becomes StoreUnavailable."""
        try:
            # asyncio.timeout, not wait_for: wait_for (Python 3.11) wraps the call in a task of
            # its own, a loop round trip more per read (`ctr bench overhead`'s history stage).
            async with asyncio.timeout(timeout_s):
                return await call
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            raise StoreUnavailable(type(exc).__name__) from exc


def _encode(event: Event) -> str:
    for value in (event.item_id, event.category_id):
        if not _ID.match(value):
            raise ValueError(f"invalid id {value!r}")
    return f"{event.item_id}{_SEP}{event.category_id}{_SEP}{float(event.ts)!r}"


def _parse(entries: Sequence[str | bytes]) -> list[HistoryItem]:
    """Decodes stored entries in the order given, dropping any that do not parse."""
    return [
        HistoryItem(match[1], match[2], float(match[3]))
        for match in map(_ENTRY.fullmatch, map(_text, entries))
        if match is not None
    ]


def _pairs(entries: Sequence[str | bytes]) -> list[tuple[str, str]]:
    """`_parse` without the timestamps (what scoring needs), in the order given."""
    return [
        (match[1], match[2])
        for match in map(_ENTRY.fullmatch, map(_text, entries))
        if match is not None
    ]


def _text(entry: str | bytes) -> str:
    return entry.decode(errors="replace") if isinstance(entry, bytes) else entry
