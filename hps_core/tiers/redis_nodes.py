"""Redis Cluster nodes for the tier: connection pools, node health, the slot map and the node pipelines.

    _Node          one node: a small blocking pool of redis-py `Connection`s (hiredis parser) and its health
                   (down / backoff doubling from retry_backoff up to max_backoff / one caller probes when due)
    ClusterNodes   every node the tier has met, the slot map (CLUSTER SLOTS) with its background refresh (a
                   thread, rate limited to one per backoff interval, asked for after a failure or an error
                   reply), `health()`, and `execute`: send every node's commands first, then read node by node
                   (the nodes work concurrently without threads; a node that fails or backs off is reported per
                   node, never raised)

The tier (hps_core.tiers.redis_cluster) decides what to send and what a failure means for its keys; this module
never sees keys or rows. The password lives only in the connection factory it is handed (never logged).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from redis.connection import Connection, SSLConnection
from redis.exceptions import AuthenticationError, RedisError, ResponseError

from hps_core.tiers.redis_protocol import _pack_args

# The tier's logger: node and topology messages read as they did before the split.
logger = logging.getLogger("hps_core.tiers.redis_cluster")

NUM_SLOTS = 16384


class RedisClusterTierError(ConnectionError):
    """The cluster cannot be used: unreachable or refusing us at start-up, or a write that a node did not take."""


RedisClusterTierError.__module__ = "hps_core.tiers.redis_cluster"  # where users import it from


# ----------------------------------------------------------------------------------------------- connections


class _TLSConnection(SSLConnection):
    """SSLConnection that verifies the server certificate against `server_name` (HPS's
    tls_server_name_identification) and sends it as SNI, instead of the address it dialled."""

    server_name: str = ""

    def _wrap_socket_with_ssl(self, sock):
        if not self.server_name:
            return super()._wrap_socket_with_ssl(sock)
        # NOTE: redis-py passes `self.host` as server_hostname; it was already used to dial, so swap it for the
        # handshake only (a connection is used by one thread at a time).
        dialled = self.host
        self.host = self.server_name
        try:
            return super()._wrap_socket_with_ssl(sock)
        finally:
            self.host = dialled


_SKIPPED = object()  # a node's commands were not sent: the node is backing off


class _Node:
    """One cluster node: a small blocking pool of connections and its health (down / backoff / probe)."""

    def __init__(self, name: str, host: str, port: int, factory, size: int, backoff_s: float,
                 max_backoff_s: float) -> None:
        self.name, self.host, self.port = name, host, port
        self._factory = factory
        self._free: list[Connection] = []
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._initial_backoff = backoff_s
        self._max_backoff = max_backoff_s
        self.backoff = backoff_s
        self.down_since: float | None = None
        self.retry_at = 0.0
        self.failures = 0
        self.recoveries = 0
        self.last_error = ""

    # -- pool
    def acquire(self, wait_s: float) -> Connection | None:
        """A connected connection, or None when all `size` are busy for `wait_s` (not a node failure).
        Raises redis ConnectionError/TimeoutError/AuthenticationError when connecting fails."""
        if not self._slots.acquire(timeout=wait_s):
            return None
        with self._lock:
            conn = self._free.pop() if self._free else None
        try:
            if conn is None:
                conn = self._factory(host=self.host, port=self.port)
            elif getattr(conn, "_sock", None) is not None:
                # An idle connection the server closed (restart, timeout) reads as EOF: reconnect it now rather
                # than fail the next request on it.
                try:
                    if conn.can_read():
                        conn.disconnect()
                except (RedisError, OSError):
                    conn.disconnect()
            conn.connect()  # no-op when connected
        except BaseException:
            self.release(conn, broken=True)
            raise
        return conn

    def release(self, conn: Connection, broken: bool = False) -> None:
        if broken:
            conn.disconnect()
        with self._lock:
            self._free.append(conn)
        self._slots.release()

    def close(self) -> None:
        with self._lock:
            conns, self._free = self._free, []
        for conn in conns:
            conn.disconnect()

    # -- health
    def may_try(self, now: float) -> bool:
        """Up, or down and due for a probe (the caller that gets True is the probe; others keep skipping)."""
        if self.down_since is None:
            return True
        with self._lock:
            if self.down_since is not None and now < self.retry_at:
                return False
            self.retry_at = now + self.backoff  # claim the probe
            return True

    def succeeded(self) -> None:
        if self.down_since is None:
            return
        with self._lock:
            if self.down_since is None:
                return
            down_for = time.monotonic() - self.down_since
            self.down_since = None
            self.backoff = self._initial_backoff
            self.recoveries += 1
        logger.info("redis_cluster: node %s is answering again after %.1f s", self.name, down_for)

    def failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            first = self.down_since is None
            if first:
                self.down_since = now
                self.backoff = self._initial_backoff
            else:
                self.backoff = min(self.backoff * 2, self._max_backoff)
            self.retry_at = now + self.backoff
            backoff = self.backoff
            idle, self._free = self._free, []
        for conn in idle:  # connections to a failed node are suspect: reconnect them on next use
            conn.disconnect()
        if first:
            logger.warning("redis_cluster: node %s failed (%s); its keys fall through to the next tier, "
                           "retrying in %.2f s", self.name, self.last_error, backoff)
        else:
            logger.debug("redis_cluster: node %s still failing (%s); next try in %.2f s", self.name,
                         self.last_error, backoff)


class ClusterNodes:
    """The cluster as one tier sees it: its nodes, the slot map and its refresh, and the node pipelines.

    Args:
        seeds: [(host, port)] to read the slot map from first.
        factory: factory(host=, port=) -> an unconnected redis-py Connection (holds the credentials).
        pool_size: connections per node (callers beyond that wait up to 4 x timeout_s).
        timeout_s: the connections' timeout (also bounds the pool wait).
        backoff: (retry_backoff_s, max_backoff_s) of a failed node; the slot map is re-read at most once per
            retry_backoff_s.
        user_name: for error messages only.
        on_slots_changed: called with the new slot map (node name per slot) when a refresh finds it changed.
    """

    def __init__(self, seeds: Sequence[tuple[str, int]], factory: Callable[..., Connection], pool_size: int,
                 timeout_s: float, backoff: tuple[float, float], user_name: str,
                 on_slots_changed: Callable[[list[str | None]], None]) -> None:
        self.seeds = list(seeds)
        self._factory = factory  # the only holder of the password
        self.pool_size = pool_size
        self.timeout_s = timeout_s
        self._backoff = backoff
        self.user_name = user_name
        self._on_slots_changed = on_slots_changed
        self.nodes: dict[str, _Node] = {}
        self._nodes_lock = threading.Lock()
        self.slots: list[str | None] = [None] * NUM_SLOTS
        self._topology_lock = threading.Lock()
        self.topology_refreshes = 0
        self._last_refresh = 0.0
        self._refresh_wanted = threading.Event()
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def node(self, host: str, port: int) -> _Node:
        name = f"{host}:{port}"
        node = self.nodes.get(name)
        if node is None:
            with self._nodes_lock:
                node = self.nodes.get(name)
                if node is None:
                    node = _Node(name, host, port, self._factory, self.pool_size, *self._backoff)
                    self.nodes[name] = node
        return node

    def call(self, node: _Node, commands: Sequence[bytes]) -> list[Any]:
        """Run a few small commands on one node now (no backoff check); raises RedisError/OSError on failure;
        error replies come back as ResponseError objects in the list."""
        conn = node.acquire(self.timeout_s * 4)
        if conn is None:
            raise RedisClusterTierError(f"redis_cluster: all {self.pool_size} connections to "
                                        f"{node.name} are busy")
        broken = True
        try:
            conn.send_packed_command(list(commands), check_health=False)
            replies = []
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
            broken = False
            return replies
        finally:
            node.release(conn, broken=broken)

    def read_slots(self, node: _Node) -> list[str | None]:
        """CLUSTER SLOTS from one node -> node name per slot."""
        (reply,) = self.call(node, [_pack_args([b"CLUSTER", b"SLOTS"])])
        if isinstance(reply, ResponseError):
            raise RedisClusterTierError(f"redis_cluster: {node.name} is not usable as a cluster node "
                                        f"(CLUSTER SLOTS: {reply}); is cluster-enabled set?")
        slots: list[str | None] = [None] * NUM_SLOTS
        for entry in reply:
            start, end, primary = int(entry[0]), int(entry[1]), entry[2]
            host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
            host = host or node.host  # a one-node cluster may announce an empty host
            owner = self.node(host, int(primary[1]))
            slots[start : end + 1] = [owner.name] * (end - start + 1)
        return slots

    def startup(self) -> list[str]:
        """Read the slot map from the first seed that answers and PING every primary; returns the primaries.

        Raises RedisClusterTierError when no seed answers, authentication fails, or the nodes are not a cluster; a
        primary that does not answer is marked down (a degraded start).
        """
        errors = []
        slots = None
        for host, port in self.seeds:
            node = self.node(host, port)
            try:
                slots = self.read_slots(node)
                break
            except AuthenticationError as exc:
                raise RedisClusterTierError(
                    f"redis_cluster: authentication failed at {node.name} for user {self.user_name!r} "
                    f"({exc}); check user_name/password and the ACL user on every node"
                ) from None
            except RedisClusterTierError:
                raise
            except (RedisError, OSError) as exc:
                errors.append(f"{node.name}: {type(exc).__name__}: {exc}")
        if slots is None:
            raise RedisClusterTierError(
                f"redis_cluster: cannot use any node of {[f'{h}:{p}' for h, p in self.seeds]} "
                f"(timeout_ms={self.timeout_s * 1000:.0f}): {'; '.join(errors)}"
            )
        self.slots = slots
        uncovered = sum(s is None for s in slots)
        if uncovered:
            logger.warning("redis_cluster: %d of %d slots are not served; keys there are reported missing",
                           uncovered, NUM_SLOTS)
        # Every primary must accept our credentials (ACL users are per node).
        primaries = sorted({s for s in slots if s is not None})
        for name in primaries:
            node = self.nodes[name]
            try:
                (pong,) = self.call(node, [_pack_args([b"PING"])])
                if isinstance(pong, ResponseError):
                    raise RedisClusterTierError(f"redis_cluster: {name} refused PING for user "
                                                f"{self.user_name!r}: {pong}")
            except AuthenticationError as exc:
                raise RedisClusterTierError(
                    f"redis_cluster: authentication failed at {name} for user {self.user_name!r} ({exc}); "
                    f"the ACL user must exist with this password on every node"
                ) from None
            except (RedisError, OSError) as exc:
                node.failed(exc)  # start degraded: this node's keys fall through until it answers
        return primaries

    def request_refresh(self) -> None:
        self._refresh_wanted.set()

    def _refresh_loop(self) -> None:
        """Background: re-read the slot map when a failure asked for it, at most once per backoff interval."""
        while not self._stop.is_set():
            if not self._refresh_wanted.wait(timeout=0.5):
                continue
            wait = self._last_refresh + self._backoff[0] - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                return
            self._refresh_wanted.clear()
            self._last_refresh = time.monotonic()
            try:
                self.refresh_topology()
            except Exception as exc:  # keep the thread alive; the next failure asks again
                logger.debug("redis_cluster: topology refresh failed: %s", exc)

    def refresh_topology(self) -> bool:
        """Re-read CLUSTER SLOTS from the first node that answers (up nodes first); a changed map is handed to
        `on_slots_changed` (the tier re-routes its tables), under the topology lock.

        Returns True when a slot map was read. Called by the background thread after failures; safe to call.
        """
        with self._topology_lock:
            nodes = sorted(self.nodes.values(), key=lambda n: n.down_since is not None)
            seeds = [self.node(h, p) for h, p in self.seeds]
            for node in itertools.chain(nodes, seeds):
                if node.down_since is not None and node.retry_at > time.monotonic():
                    continue
                try:
                    slots = self.read_slots(node)
                except (RedisError, OSError):
                    continue
                changed = slots != self.slots
                self.slots = slots
                self.topology_refreshes += 1
                if changed:
                    logger.info("redis_cluster: slot map changed (read from %s)", node.name)
                    self._on_slots_changed(slots)
                return True
        return False

    def health(self) -> dict[str, dict[str, Any]]:
        """Per node: up, failures, recoveries, seconds down, last error (no secrets)."""
        now = time.monotonic()
        return {
            name: {
                "up": n.down_since is None,
                "down_for_s": 0.0 if n.down_since is None else now - n.down_since,
                "failures": n.failures,
                "recoveries": n.recoveries,
                "last_error": n.last_error,
                "serves_slots": sum(s == name for s in self.slots),
            }
            for name, n in list(self.nodes.items())
        }

    # ------------------------------------------------------------------ pipelines

    def execute(self, batches: dict[str, list[Any]], *, respect_backoff: bool) -> dict[str, Any]:
        """Send every node's commands, then read every node's replies.

        batches: node name -> commands, each with `.parts` (bytes / memoryview pieces of its RESP, sent in order).

        Returns per node: a list of replies (ResponseError objects for error replies), the exception that broke
        the node's pipeline, or _SKIPPED (node backing off, nothing sent). Every connection taken is given back,
        whatever happens (a connection left mid-reply is closed, never reused).
        """
        results: dict[str, Any] = {}
        in_flight: list[tuple[_Node, Connection, list[Any]]] = []
        now = time.monotonic()
        try:
            for name, cmds in batches.items():
                node = self.nodes[name]
                if respect_backoff and not node.may_try(now):
                    results[name] = _SKIPPED
                    continue
                try:
                    conn = node.acquire(self.timeout_s * 4)
                except (RedisError, OSError) as exc:
                    self._node_failed(node, exc, results)
                    continue
                if conn is None:  # every connection busy for long: not the node's fault
                    results[name] = RedisClusterTierError(f"all connections to {name} busy")
                    continue
                in_flight.append((node, conn, cmds))
                try:
                    conn.send_packed_command([part for cmd in cmds for part in cmd.parts], check_health=False)
                except (RedisError, OSError) as exc:
                    in_flight.pop()
                    node.release(conn, broken=True)
                    self._node_failed(node, exc, results)
            while in_flight:
                node, conn, cmds = in_flight[0]
                replies: list[Any] = []
                try:
                    for _ in cmds:
                        try:
                            replies.append(conn.read_response())
                        except ResponseError as exc:  # one command failed; the connection is still in sync
                            replies.append(exc)
                except (RedisError, OSError) as exc:
                    in_flight.pop(0)
                    node.release(conn, broken=True)
                    self._node_failed(node, exc, results)
                    continue
                in_flight.pop(0)
                node.release(conn)
                node.succeeded()
                if any(isinstance(r, ResponseError) for r in replies):
                    # MOVED/ASK/CLUSTERDOWN/TRYAGAIN: our slot map is stale or the cluster is reconfiguring.
                    self.request_refresh()
                results[node.name] = replies
        finally:
            for node, conn, _ in in_flight:  # only on an unexpected exception
                node.release(conn, broken=True)
        return results

    def _node_failed(self, node: _Node, exc: BaseException, results: dict[str, Any]) -> None:
        node.failed(exc)
        self.request_refresh()
        results[node.name] = exc

    # ------------------------------------------------------------------ lifecycle

    def start_refresher(self) -> None:
        """Start the background topology thread (after `startup`)."""
        self._refresher = threading.Thread(target=self._refresh_loop, name="hps-redis-topology", daemon=True)
        self._refresher.start()

    def close(self) -> None:
        """Stop the topology thread and close every connection."""
        self._stop.set()
        self._refresh_wanted.set()
        refresher = self._refresher
        if refresher is not None and refresher is not threading.current_thread():
            refresher.join(timeout=5)
        for node in list(self.nodes.values()):
            node.close()
