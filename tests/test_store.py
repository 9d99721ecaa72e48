"""The Redis behaviour store against real redis-server processes (faults injected for real)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from service.contracts import Event, StoreUnavailable
from service.processes import NotReady, wait_until
from service.store.behavior import BehaviorStore, StoreConfig
from service.store.embedded_redis import RedisServer


def _store(server: RedisServer, **overrides: object) -> BehaviorStore:
    config = StoreConfig(**{"cap": 5, "read_timeout_s": 0.05, **overrides})  # type: ignore[arg-type]
    return BehaviorStore.from_url(server.url, config)


def _events(user: str, n: int, start: int = 0, ids: bool = True) -> list[Event]:
    return [
        Event(user, f"i{k}", f"c{k % 3}", ts=1000.0 + k, event_id=f"e{k}" if ids else None)
        for k in range(start, start + n)
    ]


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_history_is_oldest_first_and_recent_reads_the_newest(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = _store(redis_server)
        # Sent out of time order within one request: stored in timestamp order.
        events = _events("u1", 3)
        result = await store.ingest([events[2], events[0], events[1]])
        assert (result.accepted, result.duplicates) == (3, 0)
        history = await store.history("u1")
        assert [h.item_id for h in history] == ["i0", "i1", "i2"]
        assert [h.ts for h in history] == [1000.0, 1001.0, 1002.0]
        recent = await store.recent(["u1", "nobody"], limit=2)
        assert recent["u1"] == [("i1", "c1"), ("i2", "c2")]
        assert recent["nobody"] == []
        await store.close()

    _run(scenario())


def test_duplicate_event_ids_are_stored_once(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = _store(redis_server)
        first = await store.ingest(_events("u1", 2))
        again = await store.ingest(_events("u1", 3))  # e0, e1 repeated, e2 new
        same_call = await store.ingest([Event("u1", "i9", "c0", 2000.0, "e9")] * 2)
        assert (first.accepted, first.duplicates) == (2, 0)
        assert (again.accepted, again.duplicates) == (1, 2)
        assert (same_call.accepted, same_call.duplicates) == (1, 1)
        assert [h.item_id for h in await store.history("u1")] == ["i0", "i1", "i2", "i9"]
        await store.close()

    _run(scenario())


def test_concurrent_duplicates_are_stored_once(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = _store(redis_server, max_connections=16)
        event = Event("u7", "i1", "c1", 1000.0, "same-event")
        results = await asyncio.gather(*(store.ingest([event]) for _ in range(30)))
        assert sum(r.accepted for r in results) == 1
        assert sum(r.duplicates for r in results) == 29
        assert len(await store.history("u7")) == 1
        await store.close()

    _run(scenario())


def test_events_without_id_are_not_deduplicated(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = _store(redis_server)
        await store.ingest(_events("u1", 2, ids=False))
        result = await store.ingest(_events("u1", 2, ids=False))
        assert (result.accepted, result.duplicates) == (2, 0)
        assert len(await store.history("u1")) == 4
        await store.close()

    _run(scenario())


def test_cap_keeps_the_most_recent_events(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = _store(redis_server, cap=5, dedup_cap=8)
        await store.ingest(_events("u1", 7))
        await store.ingest(_events("u1", 4, start=7))
        client = redis.Redis.from_url(redis_server.url)
        assert client.llen(store.seq_key("u1")) == 5
        assert client.zcard(store.seen_key("u1")) == 8
        assert [h.item_id for h in await store.history("u1")] == [f"i{k}" for k in range(6, 11)]
        client.close()
        await store.close()

    _run(scenario())


def test_ttl_is_set_on_both_keys_and_expires_them(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = _store(redis_server, ttl_s=1)
        await store.ingest(_events("u1", 2))
        client = redis.Redis.from_url(redis_server.url)
        for key in (store.seq_key("u1"), store.seen_key("u1")):
            assert 0 < client.pttl(key) <= 1000
        time.sleep(1.3)
        assert client.exists(store.seq_key("u1"), store.seen_key("u1")) == 0
        assert await store.history("u1") == []
        client.close()
        await store.close()

    _run(scenario())


def test_keys_carry_the_user_as_a_cluster_hash_tag(redis_server: RedisServer) -> None:
    store = _store(redis_server)
    assert store.seq_key("u42") == "v1:seq:{u:u42}"
    # Redis Cluster hashes only the text inside the first {...}: both keys land on one slot.
    assert key_slot(store.seq_key("u42").encode()) == key_slot(b"u:u42")
    assert key_slot(store.seen_key("u42").encode()) == key_slot(b"u:u42")


def test_store_works_on_a_redis_cluster(tmp_path: Path) -> None:
    """A real one-node cluster: multi-key scripts across slots would fail with CROSSSLOT."""
    args = ("--cluster-enabled", "yes", "--cluster-config-file", str(tmp_path / "nodes.conf"))
    with RedisServer(extra_args=args) as server:
        admin = redis.Redis.from_url(server.url)
        admin.execute_command("CLUSTER ADDSLOTS", *range(16384))
        wait_until(lambda: admin.cluster("info")["cluster_state"] == "ok", 10, what="the cluster")
        admin.close()

        async def scenario() -> None:
            config = StoreConfig(cap=5, read_timeout_s=0.5)
            store = BehaviorStore.from_url(server.url, config, cluster=True)
            result = await store.ingest(_events("a", 2) + _events("b", 2) + _events("a", 1))
            assert (result.accepted, result.duplicates) == (4, 1)
            recent = await store.recent(["a", "b", "c"], limit=5)
            assert [item for item, _ in recent["a"]] == ["i0", "i1"]
            assert [item for item, _ in recent["b"]] == ["i0", "i1"]
            await store.erase("a")
            assert await store.history("a") == []
            await store.close()

        _run(scenario())


def test_erase_removes_history_and_dedup_state(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = _store(redis_server)
        await store.ingest(_events("u1", 3))
        await store.erase("u1")
        assert await store.history("u1") == []
        client = redis.Redis.from_url(redis_server.url)
        assert client.exists(store.seq_key("u1"), store.seen_key("u1")) == 0
        client.close()
        assert (await store.ingest(_events("u1", 1))).accepted == 1
        await store.close()

    _run(scenario())


def test_malformed_stored_entries_are_dropped(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = _store(redis_server)
        await store.ingest(_events("u1", 1))
        client = redis.Redis.from_url(redis_server.url)
        client.lpush(store.seq_key("u1"), "garbage", "a|b|not-a-number", "x y|c|1.0")
        client.close()
        assert [h.item_id for h in await store.history("u1")] == ["i0"]
        assert [item for item, _ in (await store.recent(["u1"], 10))["u1"]] == ["i0"]
        await store.close()

    _run(scenario())


def test_refused_write_leaves_nothing_behind(redis_server: RedisServer) -> None:
    """Out of memory (noeviction): the script fails before its first write: no dedup marker."""

    async def scenario() -> None:
        store = _store(redis_server)
        client = redis.Redis.from_url(redis_server.url)
        client.config_set("maxmemory", "1")
        with pytest.raises(StoreUnavailable):
            await store.ingest(_events("u1", 2))
        assert client.exists(store.seq_key("u1"), store.seen_key("u1")) == 0
        client.config_set("maxmemory", "0")
        # The retry is not mistaken for a duplicate.
        assert (await store.ingest(_events("u1", 2))).accepted == 2
        client.close()
        await store.close()

    _run(scenario())


def test_hung_redis_fails_fast_then_recovers(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = _store(redis_server, read_timeout_s=0.03, breaker_failures=100)
        await store.ingest(_events("u1", 2) + _events("u2", 3, start=10))
        assert len((await store.recent(["u1"], 10))["u1"]) == 2
        os.kill(redis_server.pid, signal.SIGSTOP)
        try:
            start = time.perf_counter()
            with pytest.raises(StoreUnavailable):
                await store.recent(["u1"], 10)
            assert time.perf_counter() - start < 0.3  # the 30 ms budget, plus a loaded box
        finally:
            os.kill(redis_server.pid, signal.SIGCONT)
        # The late answer to the abandoned read must not be taken for the next one's (the
        # connection it was sent on is dropped): u2's read gets u2's items.
        assert (await store.recent(["u2"], 10))["u2"] == [
            ("i10", "c1"),
            ("i11", "c2"),
            ("i12", "c0"),
        ]
        await store.close()

    _run(scenario())


def test_circuit_breaker_skips_redis_then_closes_again(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = _store(redis_server, read_timeout_s=0.03, breaker_failures=2, breaker_reset_s=0.3)
        await store.ingest(_events("u1", 1))
        client = redis.Redis.from_url(redis_server.url)
        client.execute_command("CLIENT", "PAUSE", "400")  # every client, reads included (6.2)
        for _ in range(2):
            with pytest.raises(StoreUnavailable):
                await store.recent(["u1"], 10)
        assert store.breaker.state == "open"
        start = time.perf_counter()
        with pytest.raises(StoreUnavailable, match="breaker"):
            await store.recent(["u1"], 10)
        assert time.perf_counter() - start < 0.01  # skipped: no Redis call at all
        client.close()
        await asyncio.sleep(0.45)  # the pause is over and the breaker's 0.3 s have passed
        assert len((await store.recent(["u1"], 10))["u1"]) == 1  # half-open trial succeeds
        assert store.breaker.state == "closed"
        await store.close()

    _run(scenario())


def test_stopped_server_gives_store_unavailable(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = _store(redis_server)
        redis_server.stop()
        with pytest.raises(StoreUnavailable):
            await store.ingest(_events("u1", 1))
        with pytest.raises(StoreUnavailable):
            await store.recent(["u1"], 5)
        assert not await store.ping()
        await store.close()

    _run(scenario())


def test_embedded_redis_does_not_outlive_its_parent() -> None:
    """`ctr serve` killed with SIGKILL cannot clean up; the embedded server must still stop."""
    import subprocess
    import sys

    code = (
        "import time; from service.store.embedded_redis import RedisServer; "
        "s = RedisServer().start(); print(s.pid, flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    with contextlib.suppress(NotReady):
        wait_until(lambda: not _running(child), 5)
    assert not _running(child)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie has exited, it only awaits reaping
