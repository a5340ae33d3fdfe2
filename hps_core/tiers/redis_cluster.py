"""Redis Cluster tier: embedding rows in a Redis Cluster, with HPS's data layout, that survives losing a node.

Layout (HPS's RedisCluster backend - HugeCTR/src/hps/redis_backend.cpp - kept; the meta and storage records are ours):
    table tag T, key k  ->  partition p = rrxmrrxmsx_0(uint64(k)) % num_partitions
    hash    "hps_et{T/p<p>}v"      field = the 8 raw little-endian bytes of k, value = the stored row's raw bytes
    hash    "hps_et{T/p<p>}t"      field = same, value = LRU time (ms since the epoch) or LFU count, as decimal text
    string  "hps_et{T/p0}storage"  the table's storage name (hps_core.storage), written once by its first creator
    string  "hps_et{T/p0}loaded"   identity of the table files it holds completely (loaded_from / mark_loaded)
The `{...}` hash tag puts both hashes of a partition in one cluster slot, so a batch becomes one HMGET / HSET /
HDEL per (partition, chunk of at most `max_batch_size` keys), grouped per node.

A value is one stored row (hps_core.storage) as its bytes, `bytes_per_row(storage, dim)` of them:
    float32              dim x 4 bytes of float32, little-endian: HPS's own layout, which HPS reads and writes
    float16 / bfloat16   dim x 2 bytes
    int8                 dim int8 codes, then the row's float32 scale and bias (dim + 8 bytes)
    fp8_e4m3             dim float8_e4m3fn codes, then the row's float32 scale (dim + 4 bytes)
The cluster is shared and outlives servers, so the storage is recorded with the table: a server (or a restart)
asking for the tag with another storage is refused before it writes anything, as is one whose dim does not match
the size of the rows held. A table without a storage record (written by HPS, or before records existed) is float32.
Rows are moved as bytes and never re-encoded: a fetch returns exactly the rows an insert or load wrote.

Data path of one fetch:
    keys -> partition of each key (vectorised hash) -> stable sort by partition
         -> per node: every command of that node packed (RESP, built with numpy, no per-key Python)
         -> send to every node first, then read node by node (the nodes work concurrently: one node's reply is
            computed while another's is parsed; no threads, so no GIL contention on 2 cores)
         -> hiredis parses each reply; one bytes join + np.frombuffer per command -> rows scattered to the output
            as one fixed-size byte record each (numpy has no bfloat16 / fp8; the tensor is viewed as the
            storage's dtype at the end, which costs nothing).

Faults: every socket read/write/connect is bounded by `timeout_ms`. When a node cannot be reached or does not
answer in time, its keys are reported not found and counted (`errors`), the node is marked down and a topology
refresh is requested (background thread, rate limited). While a node is down its keys are not sent at all (counted
in `errors` and `keys_skipped`); one caller probes it again once per backoff interval (doubling from
`retry_backoff_ms` up to `max_backoff_ms`), so a dead node costs at most one bounded timeout per interval, and a
restarted node is used again without any action. A node that answers with an error (CLUSTERDOWN, MOVED, ASK...)
is not marked down: its keys are counted missing and the topology is re-read. Writes (insert/erase/load/size) are not lookups: they raise
`RedisClusterTierError` naming the node when a node cannot be written (after writing what they could).

LRU/LFU metadata (the `t` hashes) is written only when overflow handling is on (a finite `overflow_margin`) with
policy evict_oldest / evict_least_used: HPS updates it on every fetch, which doubles the writes for nothing when
nothing is ever evicted. When it is on, a fetch costs a second pipelined round trip for its hits.

No secret is logged or reported: the password is handed only to redis-py's connections (never to a log
line, an exception message, `repr`, `stats()` or `health()`).

NOTE: redis-py's `RedisCluster` client is not used on the data path: its per-node pools raise instead of waiting
when all connections are busy, its retries/backoff make a dead node cost several timeouts per call, and its
connections cannot check the server certificate against HPS's `tls_server_name_identification`. This module uses
redis-py `Connection`s (hiredis parser) to each node, `redis.crc.key_slot` for slots and `CLUSTER SLOTS` for the
topology.

Modules (this one is the tier; the two below are package-internal):
    hps_core.tiers.redis_cluster    RedisClusterTier: the layout (partition_of, hash names, storage / load
                                    records), fetch / insert / erase / size / overflow / load, stats
    hps_core.tiers.redis_nodes      nodes: connection pools, health and backoff, the slot map and its background
                                    refresh, health(), the send-all-then-read node pipelines; RedisClusterTierError
    hps_core.tiers.redis_protocol   RESP packing with numpy (_pack_args, _header, _bulk_rows, _key_bytes, _records)
The hand-written pipelines are measured against redis-py's own `RedisCluster.pipeline()` doing the same HMGETs on
this layout (benchmarks/bench_redis_cluster.py, results in benchmarks/results/redis_cluster_cpu.md): on a 2-core
machine the fetch did 1.16x-1.6x the keys/s at the median batch (dim 64/128, batches of 1,024/26,624) and redis-py
used 1.35x-1.8x the client CPU, mostly its per-argument command packing (the tier builds RESP with numpy).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import operator
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from redis.backoff import NoBackoff
from redis.connection import Connection
from redis.crc import key_slot
from redis.exceptions import RedisError, ResponseError
from redis.retry import Retry
from redis.utils import HIREDIS_AVAILABLE

from hps_core.config import MAX_INT64, OVERFLOW_POLICIES
from hps_core.storage import bytes_per_row, row_dtype, storage_name, stored_width, to_stored
from hps_core.tiers.base import (Tier, TierStats, check_int, check_storage, check_storage_match, check_table_files,
                                 check_values)
from hps_core.tiers.redis_nodes import _SKIPPED, ClusterNodes, RedisClusterTierError, _Node, _TLSConnection
from hps_core.tiers.redis_protocol import _KEY_BYTES, _bulk_rows, _header, _key_bytes, _pack_args, _records

logger = logging.getLogger(__name__)

__all__ = ["RedisClusterTier", "RedisClusterTierError", "RedisTierStats", "partition_of"]

# LFU counting of many fields in one call (HINCRBY takes one field).
_LFU_SCRIPT = b"for i = 1, #ARGV do redis.call('HINCRBY', KEYS[1], ARGV[i], 1) end return #ARGV"


@dataclasses.dataclass
class RedisTierStats(TierStats):
    """TierStats plus what the Redis tier adds (all per table tag).

    `errors` counts keys a fetch reported missing because their node could not answer; `keys_skipped` is the part
    of them that was not even sent because the node was backing off.
    """

    keys_skipped: int = 0
    failed_requests: int = 0  # node pipelines that failed (connection error, timeout, error reply)
    keys_not_written: int = 0  # keys of insert/erase calls that a node did not take (the call raised)


# ---------------------------------------------------------------------------------------------- partitioning

_M1 = np.uint64(0xA24BAED4963EE407)
_M2 = np.uint64(0x9FB21C651E98DF25)


def _rotr(v: np.ndarray, r: int) -> np.ndarray:
    return (v >> np.uint64(r)) | (v << np.uint64(64 - r))


def partition_of(keys: np.ndarray, num_partitions: int) -> np.ndarray:
    """Partition of each key: rrxmrrxmsx_0(uint64(key)) % num_partitions (HPS's key -> partition rule).

    Args:
        keys: int64 (n,) numpy array, CPU.
        num_partitions: > 0.
    Returns:
        int64 (n,) in [0, num_partitions).

    Example:
        >>> partition_of(np.array([0, 1, 2], np.int64), 8).shape
        (3,)
    """
    v = np.ascontiguousarray(keys, dtype=np.int64).view(np.uint64)
    # uint64 array arithmetic wraps modulo 2^64, which is what the mixer needs.
    v = v ^ _rotr(v, 25) ^ _rotr(v, 50)
    v = v * _M1
    v = v ^ _rotr(v, 24) ^ _rotr(v, 49)
    v = v * _M2
    v = v ^ (v >> np.uint64(28))
    return (v % np.uint64(num_partitions)).astype(np.int64)


@dataclasses.dataclass
class _Table:
    tag: str
    dim: int
    storage: str  # hps_core.storage name: the values are rows stored this way
    row_bytes: int  # bytes_per_row(storage, dim): the size of every value
    hkeys: list[bytes]  # value hash per partition
    tkeys: list[bytes]  # meta hash per partition
    routes: list[str | None]  # node name per partition (None: slot not served)
    storage_key: bytes  # the storage record (partition 0's slot)
    # The cluster's storage record is known to equal `storage`; False while its node could not be asked (a start
    # with that node down): writes then ask again before writing, so no rows go in under another storage.
    recorded: bool = False
    stats: RedisTierStats = dataclasses.field(default_factory=RedisTierStats)


@dataclasses.dataclass
class _Cmd:
    """One command of a node pipeline: its RESP bytes and, for bulk ones, the sorted-key range it covers."""

    parts: list[Any]  # bytes / memoryview pieces, sent in order
    table: _Table | None = None
    part: int = -1
    lo: int = 0
    hi: int = 0
    kind: str = ""  # "v" value command, "m" meta command, "" other


# ------------------------------------------------------------------------------------------------------- tier


def _check_positive_int(value: Any, name: str) -> int:
    """check_int, naming the field as the config does (redis_cluster.<field>)."""
    return check_int(value, f"redis_cluster.{name}", 1)


def _parse_addresses(address: Any) -> list[tuple[str, int]]:
    """HPS "host[:port],host[:port]" string or a list of "host[:port]" -> [(host, port)] (default port 6379)."""
    if isinstance(address, str):
        items = [a.strip() for a in address.split(",") if a.strip()]
    elif isinstance(address, Sequence):
        items = list(address)
    else:
        raise TypeError(f"redis_cluster.address must be a 'host[:port],...' string or a list of them, "
                        f"got {type(address).__name__}")
    if not items:
        raise ValueError("redis_cluster.address is empty: at least one 'host[:port]' is required")
    out = []
    for j, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(f"redis_cluster.address[{j}] must be a 'host[:port]' string, got {item!r}")
        host, sep, port = item.strip().rpartition(":")
        if not sep:
            host, port = item.strip(), "6379"
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"redis_cluster.address[{j}] = {item!r}: expected 'host' or 'host:port' with a port "
                             f"in [1, 65535]")
        out.append((host.strip("[]"), int(port)))
    return out


class RedisClusterTier(Tier):
    """Embedding rows in a Redis Cluster (HPS layout); keys whose node is down are reported not found.

    Args:
        address: seed nodes, ["host:port", ...] or HPS's "host:port,host:port" (port defaults to 6379).
        user_name / password: Redis ACL user ("default" + "" = no AUTH).
        num_partitions: hashes per table; fix it for the life of the data (it decides where keys live).
        num_node_connections: connections per node (concurrent callers beyond that wait); <= num_partitions.
        max_batch_size: most keys in one Redis command.
        overflow_margin: most keys per partition (>= 2^63-1: no limit). Above it, a partition is pruned to
            `overflow_margin * overflow_resolution_target` keys by `overflow_policy`.
        overflow_policy: evict_random | evict_least_used (LFU) | evict_oldest (LRU) (HPS aliases accepted).
        enable_tls, tls_*: TLS with a CA bundle, a client certificate + key (empty string: none), and the name the
            server certificate must carry (SNI; empty: the dialled host).
        timeout_ms: bound on every connect / read / write to a node.
        retry_backoff_ms / max_backoff_ms: how long a failed node is left alone before one call probes it again
            (doubling up to the max).
        cache_missed_embeddings: HPS's flag, kept for the engine (copy rows found below into this tier).

    Raises (at construction):
        ValueError / TypeError: a bad argument (named). FileNotFoundError: a configured TLS file is missing.
        RedisClusterTierError: no seed node answers, authentication fails, or the nodes are not a cluster.

    Example:
        >>> tier = RedisClusterTier(["127.0.0.1:7000"], num_partitions=8)
        >>> tier.create_table("hps_et.m.t0", 16)
        >>> tier.insert("hps_et.m.t0", torch.tensor([1, 2]), torch.ones(2, 16))
        2
        >>> values, found = tier.fetch("hps_et.m.t0", torch.tensor([1, 3]))   # float32 (2, 16), bool (2,)
        >>> tier.create_table("hps_et.m.t1", 16, storage="int8")   # values: int8 (n, 24), 16 codes + scale, bias
        >>> tier.insert("hps_et.m.t1", torch.tensor([1]), hps_core.storage.encode_rows(torch.ones(1, 16), "int8"))
        1
    """

    name = "redis_cluster"
    # The cluster outlives this process: the engine does not reload a table the cluster already holds in full.
    persistent = True
    shared = True

    def __init__(
        self,
        address: Sequence[str] | str = ("127.0.0.1:7000",),
        *,
        user_name: str = "default",
        password: str = "",
        num_partitions: int = 8,
        num_node_connections: int = 5,
        max_batch_size: int = 65536,
        overflow_margin: int = MAX_INT64,
        overflow_policy: str = "evict_random",
        overflow_resolution_target: float = 0.8,
        enable_tls: bool = False,
        tls_ca_certificate: str = "cacertbundle.crt",
        tls_client_certificate: str = "client_cert.pem",
        tls_client_key: str = "client_key.pem",
        tls_server_name_identification: str = "redis.localhost",
        timeout_ms: int = 500,
        retry_backoff_ms: int = 250,
        max_backoff_ms: int = 2000,
        cache_missed_embeddings: bool = False,
    ) -> None:
        super().__init__()
        self._closed = True  # until construction succeeds, close() has nothing to do
        self._seeds = _parse_addresses(address)
        if not isinstance(user_name, str) or not user_name:
            raise ValueError(f"redis_cluster.user_name must be a non-empty string, got {user_name!r}")
        if not isinstance(password, str):
            raise TypeError(f"redis_cluster.password must be a string, got {type(password).__name__}")
        self.num_partitions = _check_positive_int(num_partitions, "num_partitions")
        self.num_node_connections = _check_positive_int(num_node_connections, "num_node_connections")
        if self.num_node_connections > self.num_partitions:
            raise ValueError(f"redis_cluster.num_node_connections = {num_node_connections} must be <= "
                             f"num_partitions = {num_partitions} (HPS rule)")
        self.max_batch_size = _check_positive_int(max_batch_size, "max_batch_size")
        self.timeout_s = _check_positive_int(timeout_ms, "timeout_ms") / 1000.0
        retry_backoff_s = _check_positive_int(retry_backoff_ms, "retry_backoff_ms") / 1000.0
        max_backoff_s = max(_check_positive_int(max_backoff_ms, "max_backoff_ms") / 1000.0, retry_backoff_s)
        self.overflow_margin = _check_positive_int(overflow_margin, "overflow_margin")
        if overflow_policy not in OVERFLOW_POLICIES:
            raise ValueError(f"redis_cluster.overflow_policy = {overflow_policy!r}; allowed: "
                             f"{sorted(OVERFLOW_POLICIES)}")
        self.overflow_policy = OVERFLOW_POLICIES[overflow_policy]
        if isinstance(overflow_resolution_target, bool) or not isinstance(overflow_resolution_target, (int, float)) \
                or not 0.0 < float(overflow_resolution_target) < 1.0:
            raise ValueError(f"redis_cluster.overflow_resolution_target must be in (0, 1), got "
                             f"{overflow_resolution_target!r}")
        self.overflow_resolution_target = float(overflow_resolution_target)
        self.overflow_enabled = self.overflow_margin < MAX_INT64
        # LRU/LFU meta is kept only when it can matter (see the module docstring).
        self.keeps_meta = self.overflow_enabled and self.overflow_policy != "evict_random"
        self.cache_missed_embeddings = bool(cache_missed_embeddings)
        self.user_name = user_name
        self.enable_tls = bool(enable_tls)

        conn_kwargs: dict[str, Any] = dict(
            username=None if (user_name == "default" and not password) else user_name,
            password=password or None,
            socket_timeout=self.timeout_s,
            socket_connect_timeout=self.timeout_s,
            socket_keepalive=True,
            retry=Retry(NoBackoff(), 0),  # one bounded attempt; failure handling is ours
            socket_read_size=1 << 20,
            client_name="hps_core",
            protocol=2,  # RESP2 replies (flat arrays) whatever redis-py's default is
        )
        conn_class: type[Connection] = Connection
        if self.enable_tls:
            for field_name, path, required in (
                ("tls_ca_certificate", tls_ca_certificate, True),
                ("tls_client_certificate", tls_client_certificate, False),
                ("tls_client_key", tls_client_key, False),
            ):
                if required and not path:
                    raise ValueError(f"redis_cluster.{field_name} is required when enable_tls is true")
                if path and not os.path.isfile(path):
                    raise FileNotFoundError(f"redis_cluster.{field_name} = {path!r}: no such file")
            if bool(tls_client_certificate) != bool(tls_client_key):
                raise ValueError("redis_cluster.tls_client_certificate and tls_client_key must be given together")
            conn_class = type("_TLSConnectionSNI", (_TLSConnection,),
                              {"server_name": tls_server_name_identification or ""})
            conn_kwargs.update(
                ssl_ca_certs=tls_ca_certificate,
                ssl_certfile=tls_client_certificate or None,
                ssl_keyfile=tls_client_key or None,
                ssl_cert_reqs="required",
                ssl_check_hostname=True,
            )

        def factory(host: str, port: int) -> Connection:
            return conn_class(host=host, port=port, **conn_kwargs)

        self._tables_lock = threading.Lock()
        # Nodes, slot map and pipelines; the connection factory (the only holder of the password) lives there.
        self._cluster = ClusterNodes(self._seeds, factory, self.num_node_connections, self.timeout_s,
                                     (retry_backoff_s, max_backoff_s), user_name, self._reroute)
        self._closed = False
        try:
            primaries = self._cluster.startup()
        except BaseException:
            self.close()
            raise
        logger.info("redis_cluster: %d primaries %s, %d partitions per table, tls=%s, hiredis=%s",
                    len(primaries), primaries, self.num_partitions, self.enable_tls, HIREDIS_AVAILABLE)
        self._cluster.start_refresher()

    @classmethod
    def from_config(cls, cfg: Any) -> "RedisClusterTier":
        """Build from a `hps_core.config.RedisClusterTierConfig` (or a mapping with the same field names).

        Example:
            >>> RedisClusterTier.from_config(config.tiers.redis_cluster)
        """
        get = cfg.get if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
        fields = ("address", "user_name", "password", "num_partitions", "num_node_connections", "max_batch_size",
                  "overflow_margin", "overflow_policy", "overflow_resolution_target", "enable_tls",
                  "tls_ca_certificate", "tls_client_certificate", "tls_client_key",
                  "tls_server_name_identification", "timeout_ms", "cache_missed_embeddings",
                  "retry_backoff_ms", "max_backoff_ms")
        kwargs = {k: get(k) for k in fields if get(k) is not None}
        if "address" in kwargs and not isinstance(kwargs["address"], str):
            kwargs["address"] = list(kwargs["address"])  # an omegaconf ListConfig -> list
        return cls(**kwargs)

    def __repr__(self) -> str:
        return (f"RedisClusterTier(address={[f'{h}:{p}' for h, p in self._seeds]}, user_name={self.user_name!r}, "
                f"num_partitions={self.num_partitions}, tls={self.enable_tls})")

    # ------------------------------------------------------------------ topology (hps_core.tiers.redis_nodes)

    @property
    def _nodes(self) -> dict[str, _Node]:
        return self._cluster.nodes

    @property
    def _slots(self) -> list[str | None]:
        return self._cluster.slots

    @property
    def topology_refreshes(self) -> int:
        """Slot maps read since start (background refreshes after failures, and refresh_topology calls)."""
        return self._cluster.topology_refreshes

    def _reroute(self, slots: list[str | None]) -> None:
        """The slot map changed: re-route every table's partitions (called under the topology lock)."""
        with self._tables_lock:
            for table in self._tables.values():
                table.routes = [slots[key_slot(h)] for h in table.hkeys]

    def refresh_topology(self) -> bool:
        """Re-read CLUSTER SLOTS from the first node that answers (up nodes first) and re-route every table.

        Returns True when a slot map was read. Called by the background thread after failures; safe to call.
        """
        return self._cluster.refresh_topology()

    def health(self) -> dict[str, dict[str, Any]]:
        """Per node: up, failures, recoveries, seconds down, last error, slots served (no secrets)."""
        return self._cluster.health()

    # ------------------------------------------------------------------ tables / inputs

    def create_table(self, tag: str, dim: int, storage: str = "float32") -> None:
        """Declare a table whose values are rows of `dim` kept as `storage` (a hps_core.storage name).

        The cluster records a table's storage when it is first created (a table it holds without a record - HPS's,
        or written before records existed - is float32). Raises ValueError, having written nothing, on a dim or
        storage different from an earlier call, from the cluster's record, or (dim) from the size of a sample of
        the rows the cluster holds. Nodes that cannot be asked are skipped (a degraded start); when the record's
        node is one of them, the first write asks again before writing.
        """
        self._check_open()
        if not isinstance(tag, str) or not tag or "{" in tag or "}" in tag:
            raise ValueError(f"redis_cluster: table tag must be a non-empty string without braces, got {tag!r}")
        dim = _check_positive_int(dim, "dim")
        storage = check_storage(storage, dim, tag)
        with self._tables_lock:
            existing = self._tables.get(tag)
        if existing is not None:
            self._check_same(existing, dim, storage)
            return
        hkeys = [f"hps_et{{{tag}/p{p}}}v".encode() for p in range(self.num_partitions)]
        tkeys = [f"hps_et{{{tag}/p{p}}}t".encode() for p in range(self.num_partitions)]
        table = _Table(tag, dim, storage, bytes_per_row(storage, dim), hkeys, tkeys,
                       [self._slots[key_slot(h)] for h in hkeys], f"hps_et{{{tag}/p0}}storage".encode())
        self._check_stored(table, writing=False)
        with self._tables_lock:
            kept = self._tables.setdefault(tag, table)
        if kept is not table:  # another thread declared it meanwhile
            self._check_same(kept, dim, storage)

    def _check_same(self, table: _Table, dim: int, storage: str) -> None:
        if table.dim != dim:
            raise ValueError(f"redis_cluster: table {table.tag!r} was created with dim {table.dim}, got {dim}")
        check_storage_match(table.tag, self._where, table.storage, storage)

    def _check_stored(self, table: _Table, writing: bool) -> None:
        """Check `table` against what the cluster holds, and record its storage there when there is no record yet.

        One pipelined round asks for the storage record and one row of every partition (HRANDFIELD ... WITHVALUES:
        its size tells the dim). Raises ValueError, before anything is written, when the record names another
        storage, when there is no record but there are rows (a float32 table) and another storage is asked for, or
        when a sampled row is not bytes_per_row(storage, dim) bytes. Sets `table.recorded` once the cluster's record
        is known to name `table.storage`. A record node that cannot be asked leaves it False: logged at create_table
        (a degraded start goes on), RedisClusterTierError for a write (`writing`: nodes backing off are asked too),
        which must not put rows in under a storage the cluster may record otherwise.
        """
        record_node = table.routes[0]
        batches: dict[str, list[_Cmd]] = {}
        if record_node is not None:
            batches[record_node] = [_Cmd([_pack_args([b"GET", table.storage_key])], table, 0, kind="s")]
        for p, node in enumerate(table.routes):
            if node is not None:
                cmd = _pack_args([b"HRANDFIELD", table.hkeys[p], b"1", b"WITHVALUES"])
                batches.setdefault(node, []).append(_Cmd([cmd], table, p))
        record_known, record = False, None
        samples: list[tuple[int, bytes]] = []
        for name, result in self._cluster.execute(batches, respect_backoff=not writing).items():
            if not isinstance(result, list):
                continue  # node down: nothing to check there now
            for cmd, reply in zip(batches[name], result):
                if cmd.kind == "s":
                    if not isinstance(reply, ResponseError):
                        record_known, record = True, reply
                    continue
                if not isinstance(reply, list) or not reply:
                    continue  # empty partition (or an error reply: nothing to learn)
                # [field, value], or [[field, value]] from servers that pair WITHVALUES replies
                samples.append((cmd.part, reply[0][1] if isinstance(reply[0], list) else reply[1]))
        if record is not None:
            have = self._record_name(table, record)
        elif record_known and samples:
            have = "float32"  # rows but no record: HPS's layout (or a table written before records existed)
        else:
            have = None  # a new table, or the record could not be read
        if have is not None:
            check_storage_match(table.tag, self._where, have, table.storage)
        for part, value in samples:
            if len(value) != table.row_bytes:
                raise ValueError(
                    f"redis_cluster: the cluster already holds rows of {len(value)} bytes for table {table.tag!r} "
                    f"(partition {part}), not dim {table.dim} as {table.storage} ({table.row_bytes} bytes): wrong "
                    f"dim, or another table under the same tag"
                )
        if record is not None:
            table.recorded = True
            return
        if record_known:
            # No record yet. SET NX keeps a record another server wrote since the GET; the second GET says which
            # storage won, so two servers creating the table at once cannot both succeed with different storages.
            try:
                _, record = self._cluster.call(self._nodes[record_node], [
                    _pack_args([b"SET", table.storage_key, table.storage.encode(), b"NX"]),
                    _pack_args([b"GET", table.storage_key]),
                ])
            except (RedisError, OSError, RedisClusterTierError) as exc:
                record = exc
            if isinstance(record, bytes):
                check_storage_match(table.tag, self._where, self._record_name(table, record), table.storage)
                table.recorded = True
                return
            reason = f"writing it: {record!r}"
        else:
            reason = "its slot is not served" if record_node is None else f"{record_node} could not be asked"
        if writing:
            raise RedisClusterTierError(
                f"redis_cluster: cannot write table {table.tag!r}: its storage record "
                f"{table.storage_key.decode()} could not be checked ({reason}); nothing was written"
            )
        logger.warning("redis_cluster: the storage record of table %s could not be checked (%s); it is taken as "
                       "%s, and writes check it first", table.tag, reason, table.storage)

    @staticmethod
    def _record_name(table: _Table, record: bytes) -> str:
        """The storage a record names; ValueError for a record that names none (not written by us)."""
        return storage_name(bytes(record).decode(errors="replace"),
                            field=f"redis_cluster: the storage record {table.storage_key.decode()} of {table.tag!r}")

    @staticmethod
    def _keys_numpy(keys: Any) -> np.ndarray:
        if isinstance(keys, torch.Tensor):
            if keys.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"keys must be an int64 (or int32) tensor, got {keys.dtype}")
            if keys.dim() != 1:
                raise ValueError(f"keys must be 1-D (n,), got shape {tuple(keys.shape)}")
            return np.ascontiguousarray(keys.detach().cpu().numpy(), dtype=np.int64)
        arr = np.asarray(keys)
        if arr.dtype.kind not in "iu" or arr.ndim != 1:
            raise TypeError(f"keys must be a 1-D integer tensor/array, got dtype {arr.dtype} shape {arr.shape}")
        return np.ascontiguousarray(arr, dtype=np.int64)

    def _plan(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stable sort by partition -> (order int64 (n,), partition start offsets (P,), end offsets (P,))."""
        parts = partition_of(keys, self.num_partitions)
        order = np.argsort(parts, kind="stable")
        counts = np.bincount(parts, minlength=self.num_partitions)
        ends = np.cumsum(counts)
        return order, ends - counts, ends

    def _chunks(self, table: _Table, starts: np.ndarray, ends: np.ndarray):
        """(partition, node, lo, hi) for every non-empty partition range, split at max_batch_size."""
        for p in range(self.num_partitions):
            lo, end = int(starts[p]), int(ends[p])
            while lo < end:
                hi = min(lo + self.max_batch_size, end)
                yield p, table.routes[p], lo, hi
                lo = hi

    # ------------------------------------------------------------------ fetch

    def fetch(self, tag: str, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of `keys` -> (stored rows (n, stored_width) of the storage's dtype (float32 (n, dim) for a float32
        table) CPU, found bool (n,) CPU); missing rows are zero bytes.

        Never raises for a cluster problem: keys whose node cannot answer are reported not found and counted in
        `stats()[tag].errors`. Raises KeyError for an undeclared tag, TypeError/ValueError for bad keys.
        """
        table = self._table(tag)
        keys_np = self._keys_numpy(keys)
        n = keys_np.size
        # The rows as bytes (numpy has no bfloat16 / fp8), filled one row record at a time; the tensor is viewed as
        # the storage's dtype at the end (a view: no copy). np.zeros, not torch.zeros: its pages come zeroed from
        # the allocator, torch writes them.
        out = np.zeros((n, table.row_bytes), np.uint8)
        found = np.zeros(n, np.bool_)
        errors = skipped = failed = 0
        if n:
            try:
                errors, skipped, failed = self._fetch_into(table, keys_np, _records(out), found)
            except Exception:  # the contract: a lookup never sees a tier failure, whatever its cause
                logger.exception("redis_cluster: fetch of %d keys from %s failed unexpectedly; reported missing",
                                 n, tag)
                out[:] = 0
                found[:] = False
                errors, skipped, failed = n, 0, 1
        self._count(table.stats, fetches=1, keys_requested=n, keys_found=int(found.sum()), errors=errors,
                    keys_skipped=skipped, failed_requests=failed)
        if n == 0:  # numpy gives an empty array a 0 stride, which torch will not view as another dtype
            return torch.empty((0, stored_width(table.storage, table.dim)), dtype=row_dtype(table.storage)), \
                torch.from_numpy(found)
        return torch.from_numpy(out).view(row_dtype(table.storage)), torch.from_numpy(found)

    def _fetch_into(self, table: _Table, keys_np: np.ndarray, out: np.ndarray,
                    found: np.ndarray) -> tuple[int, int, int]:
        """The network part of fetch: fills out ((n,) row records) / found; returns (errors, skipped, failed
        requests)."""
        n = keys_np.size
        errors = skipped = failed = 0
        order, starts, ends = self._plan(keys_np)
        fields = _bulk_rows([_key_bytes(keys_np[order])], n)  # (n, 14): "$8\r\n<key>\r\n"
        batches: dict[str, list[_Cmd]] = {}
        for p, node, lo, hi in self._chunks(table, starts, ends):
            if node is None:
                errors += hi - lo
                continue
            head = _header(2 + hi - lo, (b"HMGET", table.hkeys[p]))
            batches.setdefault(node, []).append(_Cmd([head, memoryview(fields[lo:hi])], table, p, lo, hi, "v"))
        results = self._cluster.execute(batches, respect_backoff=True)
        meta_hits: list[tuple[str, _Cmd, np.ndarray]] = []
        for name, result in results.items():
            cmds = batches[name]
            if not isinstance(result, list):
                count = sum(c.hi - c.lo for c in cmds)
                errors += count
                if result is _SKIPPED:
                    skipped += count
                else:
                    failed += 1
                continue
            for cmd, reply in zip(cmds, result):
                hit_mask = self._decode(table, cmd, reply, order, out, found)
                if hit_mask is None:
                    errors += cmd.hi - cmd.lo
                    failed += 1
                elif self.keeps_meta and hit_mask.any():
                    meta_hits.append((name, cmd, hit_mask))
        if meta_hits:
            self._touch_meta(table, fields, meta_hits)
        return errors, skipped, failed

    def _decode(self, table: _Table, cmd: _Cmd, reply: Any, order: np.ndarray, out: np.ndarray,
                found: np.ndarray) -> np.ndarray | None:
        """Scatter one HMGET reply into `out` ((n,) row records) / `found`; returns the hit mask over [lo, hi), None
        on an error reply."""
        m = cmd.hi - cmd.lo
        if not isinstance(reply, list) or len(reply) != m:
            if isinstance(reply, ResponseError):
                logger.debug("redis_cluster: HMGET on %s failed: %s", table.hkeys[cmd.part], reply)
            else:
                logger.warning("redis_cluster: unexpected HMGET reply for %s: %s", table.hkeys[cmd.part],
                               type(reply).__name__)
            return None
        row_bytes = table.row_bytes
        misses = reply.count(None)
        if misses == m:
            return np.zeros(m, np.bool_)
        if misses == 0:
            mask = np.ones(m, np.bool_)
            data = b"".join(reply)
        else:
            mask = np.fromiter(map(operator.is_not, reply, itertools.repeat(None)), np.bool_, m)
            data = b"".join(filter(None, reply))  # stored values are never empty
        hits = int(mask.sum())
        if len(data) != hits * row_bytes:
            # Some stored row has the wrong size (another table under this tag?): keep only the good rows.
            sizes = np.fromiter((len(v) if v is not None else -1 for v in reply), np.int64, m)
            bad = mask & (sizes != row_bytes)
            logger.warning("redis_cluster: %d rows of %s have a size other than %d bytes; treated as missing",
                           int(bad.sum()), table.hkeys[cmd.part], row_bytes)
            mask = sizes == row_bytes
            data = b"".join(v for v, ok in zip(reply, mask) if ok)
            hits = int(mask.sum())
        idx = order[cmd.lo : cmd.hi]
        if hits != m:
            idx = idx[mask]
        out[idx] = np.frombuffer(data, out.dtype)
        found[idx] = True
        return mask

    def _meta_commands(self, table: _Table, p: int, rows: np.ndarray, m: int, value: bytes | None) -> list[bytes]:
        """Meta update for `m` field rows ((m, 14) RESP field args) of partition p: HSET t f value ... (LRU /
        reset) or, with value None, an LFU increment of each field."""
        if value is None:
            head = _header(3 + m + 1, (b"EVAL", _LFU_SCRIPT, b"1", table.tkeys[p]))
            return [head, memoryview(rows)]
        val = b"$%d\r\n%s\r\n" % (len(value), value)
        body = np.empty((m, rows.shape[1] + len(val)), np.uint8)
        body[:, : rows.shape[1]] = rows
        body[:, rows.shape[1] :] = np.frombuffer(val, np.uint8)
        return [_header(2 + 2 * m, (b"HSET", table.tkeys[p])), memoryview(body)]

    def _touch_meta(self, table: _Table, fields: np.ndarray, hits: list[tuple[str, _Cmd, np.ndarray]]) -> None:
        """LRU time / LFU count of the keys a fetch found (only when overflow handling needs it)."""
        value = None if self.overflow_policy == "evict_least_used" else str(int(time.time() * 1000)).encode()
        batches: dict[str, list[_Cmd]] = {}
        for name, cmd, mask in hits:
            rows = np.ascontiguousarray(fields[cmd.lo : cmd.hi][mask])
            parts = self._meta_commands(table, cmd.part, rows, int(mask.sum()), value)
            batches.setdefault(name, []).append(_Cmd(parts, table, cmd.part, kind="m"))
        results = self._cluster.execute(batches, respect_backoff=True)
        for name, result in results.items():
            if not isinstance(result, list) or any(isinstance(r, ResponseError) for r in result):
                logger.debug("redis_cluster: meta update on %s failed: %r", name, result)

    # ------------------------------------------------------------------ writes

    def _write_batches(self, table: _Table, batches: dict[str, list[_Cmd]], what: str) -> list[tuple[_Cmd, Any]]:
        """Run write pipelines on every node (no backoff skipping: writes always try); returns (cmd, reply) of
        the value commands; raises RedisClusterTierError after all nodes were tried if any failed."""
        results = self._cluster.execute(batches, respect_backoff=False)
        out: list[tuple[_Cmd, Any]] = []
        failures = []
        not_written = 0
        for name, result in results.items():
            cmds = batches[name]
            if not isinstance(result, list):
                failures.append(f"{name}: {type(result).__name__}: {result}")
                not_written += sum(c.hi - c.lo for c in cmds if c.kind == "v")
                continue
            for cmd, reply in zip(cmds, result):
                if isinstance(reply, ResponseError):
                    failures.append(f"{name}: {reply}")
                    if cmd.kind == "v":
                        not_written += cmd.hi - cmd.lo
                elif cmd.kind == "v":
                    out.append((cmd, reply))
        if failures:
            self._count(table.stats, failed_requests=len(failures), keys_not_written=not_written)
            raise RedisClusterTierError(
                f"redis_cluster: {what} of {table.tag!r} incomplete, {not_written} keys not written: "
                f"{'; '.join(failures[:4])}{' ...' if len(failures) > 4 else ''}"
            )
        return out

    def insert(self, tag: str, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Insert or overwrite stored rows (keys int64 (n,), values the table's stored rows (n, stored_width) of the
        storage's dtype: float32 (n, dim) for a float32 table, see check_values); returns how many keys were new.

        Bad input raises TypeError / ValueError before anything is written. With a finite overflow_margin,
        partitions above it are then pruned (see `overflow_policy`). Raises RedisClusterTierError when a node could
        not be written (rows on the other nodes are written).
        """
        table = self._table(tag)
        keys_np = self._keys_numpy(keys)
        values = check_values(values, keys_np.size, table.dim, tag, table.storage)
        return self._insert_numpy(table, keys_np, values.detach().view(torch.uint8).numpy())

    def _insert_numpy(self, table: _Table, keys_np: np.ndarray, rows_u8: np.ndarray) -> int:
        """Write rows given as their bytes, uint8 (n, row_bytes) C-contiguous (checked by the callers)."""
        n = keys_np.size
        if n == 0:
            return 0
        if not table.recorded:
            # The storage record could not be read at create_table (its node was down): no row goes in before the
            # cluster says the table is ours to write as table.storage (ValueError otherwise; RedisClusterTierError
            # while the node is still down).
            self._check_stored(table, writing=True)
        order, starts, ends = self._plan(keys_np)
        sorted_keys = keys_np[order]
        key_cols = _key_bytes(sorted_keys)
        # One row = "$8\r\n<key>\r\n$<rb>\r\n<row bytes>\r\n"; a stable sort keeps the last duplicate last.
        sorted_rows = _records(rows_u8)[order].view(np.uint8).reshape(n, table.row_bytes)
        rows = _bulk_rows([key_cols, sorted_rows], n)
        meta_value = None
        if self.keeps_meta:
            meta_value = b"0" if self.overflow_policy == "evict_least_used" else str(int(time.time() * 1000)).encode()
            fields = _bulk_rows([key_cols], n)
        batches: dict[str, list[_Cmd]] = {}
        touched: set[int] = set()
        unrouted = 0
        for p, node, lo, hi in self._chunks(table, starts, ends):
            if node is None:
                unrouted += hi - lo
                continue
            touched.add(p)
            head = _header(2 + 2 * (hi - lo), (b"HSET", table.hkeys[p]))
            cmds = batches.setdefault(node, [])
            cmds.append(_Cmd([head, memoryview(rows[lo:hi])], table, p, lo, hi, "v"))
            if meta_value is not None:
                cmds.append(_Cmd(self._meta_commands(table, p, fields[lo:hi], hi - lo, meta_value), table, p,
                                 kind="m"))
        if unrouted:
            raise RedisClusterTierError(f"redis_cluster: {unrouted} keys of {table.tag!r} map to slots no node "
                                        f"serves; nothing was written")
        replies = self._write_batches(table, batches, "insert")
        new = sum(int(r) for _, r in replies)
        self._count(table.stats, keys_inserted=n)
        if self.overflow_enabled:
            self._resolve_overflow(table, sorted(touched))
        return new

    def erase(self, tag: str, keys: torch.Tensor) -> int:
        """Remove keys (int64 (n,)); returns how many were present. Raises RedisClusterTierError on a node
        that could not be written."""
        table = self._table(tag)
        keys_np = self._keys_numpy(keys)
        n = keys_np.size
        if n == 0:
            return 0
        order, starts, ends = self._plan(keys_np)
        fields = _bulk_rows([_key_bytes(keys_np[order])], n)
        batches: dict[str, list[_Cmd]] = {}
        for p, node, lo, hi in self._chunks(table, starts, ends):
            if node is None:
                continue
            cmds = batches.setdefault(node, [])
            cmds.append(_Cmd([_header(2 + hi - lo, (b"HDEL", table.hkeys[p])), memoryview(fields[lo:hi])],
                             table, p, lo, hi, "v"))
            if self.keeps_meta:
                cmds.append(_Cmd([_header(2 + hi - lo, (b"HDEL", table.tkeys[p])), memoryview(fields[lo:hi])],
                                 table, p, kind="m"))
        return sum(int(r) for _, r in self._write_batches(table, batches, "erase"))

    def size(self, tag: str) -> int:
        """Keys stored for `tag` (HLEN of every partition). Raises RedisClusterTierError when a node is down."""
        table = self._table(tag)
        return sum(self._partition_sizes(table, range(self.num_partitions)).values())

    def _partition_sizes(self, table: _Table, parts: Sequence[int]) -> dict[int, int]:
        batches: dict[str, list[_Cmd]] = {}
        for p in parts:
            node = table.routes[p]
            if node is None:
                raise RedisClusterTierError(f"redis_cluster: partition {p} of {table.tag!r} is on a slot no node "
                                            f"serves")
            batches.setdefault(node, []).append(_Cmd([_pack_args([b"HLEN", table.hkeys[p]])], table, p, kind="v"))
        return {cmd.part: int(r) for cmd, r in self._write_batches(table, batches, "size")}

    # ------------------------------------------------------------------ overflow

    def _resolve_overflow(self, table: _Table, parts: Sequence[int]) -> None:
        """Prune every partition above overflow_margin to margin * target keys by the overflow policy."""
        target = int(self.overflow_margin * self.overflow_resolution_target)
        for p, size in self._partition_sizes(table, parts).items():
            if size <= self.overflow_margin:
                continue
            victims = self._pick_victims(table, p, size - target)
            evicted = 0
            node = self._nodes[table.routes[p]]
            for start in range(0, len(victims), self.max_batch_size):
                chunk = victims[start : start + self.max_batch_size]
                cmds = [_pack_args([b"HDEL", table.hkeys[p], *chunk])]
                if self.keeps_meta:
                    cmds.append(_pack_args([b"HDEL", table.tkeys[p], *chunk]))
                replies = self._cluster.call(node, cmds)
                if isinstance(replies[0], ResponseError):
                    raise RedisClusterTierError(f"redis_cluster: eviction in {table.hkeys[p]!r} failed: "
                                                f"{replies[0]}")
                evicted += int(replies[0])
            logger.debug("redis_cluster: %s partition %d held %d > %d keys; evicted %d (%s)", table.tag, p, size,
                         self.overflow_margin, evicted, self.overflow_policy)
            self._count(table.stats, keys_evicted=evicted)

    def _pick_victims(self, table: _Table, p: int, count: int) -> list[bytes]:
        """`count` fields of partition p to evict: random, least used (LFU) or oldest (LRU) first."""
        node = self._nodes[table.routes[p]]
        if self.overflow_policy == "evict_random":
            (reply,) = self._cluster.call(node, [_pack_args([b"HRANDFIELD", table.hkeys[p], b"%d" % count])])
            if isinstance(reply, ResponseError):
                raise RedisClusterTierError(f"redis_cluster: HRANDFIELD on {table.hkeys[p]!r} failed: {reply}")
            return list(reply)
        fields_reply, meta_reply = self._cluster.call(node, [_pack_args([b"HKEYS", table.hkeys[p]]),
                                                     _pack_args([b"HGETALL", table.tkeys[p]])])
        for reply in (fields_reply, meta_reply):
            if isinstance(reply, ResponseError):
                raise RedisClusterTierError(f"redis_cluster: reading {table.hkeys[p]!r} for eviction failed: {reply}")
        meta = meta_reply if isinstance(meta_reply, dict) else dict(zip(meta_reply[0::2], meta_reply[1::2]))
        # Keys without meta (written before meta was kept) count as least used / oldest.
        scores = np.fromiter((int(meta.get(f, 0)) for f in fields_reply), np.int64, len(fields_reply))
        pick = np.argsort(scores, kind="stable")[:count]
        return [fields_reply[i] for i in pick.tolist()]

    # ------------------------------------------------------------------ load state

    def _marker(self, table: _Table) -> tuple[_Node, bytes]:
        """The key recording what `table` was loaded from, and its node (partition 0's slot, by its hash tag)."""
        node = table.routes[0]
        if node is None:
            raise RedisClusterTierError(f"redis_cluster: partition 0 of {table.tag!r} is on a slot no node serves")
        return self._nodes[node], f"hps_et{{{table.tag}/p0}}loaded".encode()

    def _marker_call(self, table: _Table, args: list[bytes]) -> Any:
        node, _ = self._marker(table)
        (reply,) = self._cluster.call(node, [_pack_args(args)])
        if isinstance(reply, ResponseError):
            raise RedisClusterTierError(f"redis_cluster: {args[0].decode()} of {table.tag!r}'s load record failed: "
                                        f"{reply}")
        return reply

    def loaded_from(self, tag: str) -> str | None:
        """The identity of the table files `tag` was last completely loaded from (None: never, or a load did not
        finish). Raises RedisClusterTierError when the node cannot be asked."""
        table = self._table(tag)
        reply = self._marker_call(table, [b"GET", self._marker(table)[1]])
        return None if reply is None else bytes(reply).decode()

    def mark_loaded(self, tag: str, identity: str | None) -> None:
        """Record (None: forget) the identity of the files `tag` holds completely."""
        table = self._table(tag)
        key = self._marker(table)[1]
        self._marker_call(table, [b"DEL", key] if identity is None else [b"SET", key, identity.encode()])

    def iter_chunks(self, tag: str, chunk_rows: int = 1 << 16) -> Any:
        """Every row the cluster holds for `tag`, a partition at a time (HGETALL), as (keys int64 (m,), stored rows
        (m, stored_width) of the storage's dtype) CPU tensor blocks. A field or value of the wrong size (not written
        by a tier of this table) is left out and logged, as a fetch reports it missing. Raises RedisClusterTierError
        when a partition cannot be read."""
        table = self._table(tag)
        dtype = row_dtype(table.storage)
        for p in range(self.num_partitions):
            node = table.routes[p]
            if node is None:
                raise RedisClusterTierError(f"redis_cluster: partition {p} of {tag!r} is on a slot no node serves")
            (reply,) = self._cluster.call(self._nodes[node], [_pack_args([b"HGETALL", table.hkeys[p]])])
            if isinstance(reply, ResponseError):
                raise RedisClusterTierError(f"redis_cluster: reading {table.hkeys[p]!r} failed: {reply}")
            pairs = list(reply.items()) if isinstance(reply, dict) else list(zip(reply[0::2], reply[1::2]))
            good = [(k, v) for k, v in pairs if len(k) == _KEY_BYTES and len(v) == table.row_bytes]
            if len(good) != len(pairs):
                logger.warning("redis_cluster: %d entries of %s are not an 8-byte key with a %d-byte row; left out",
                               len(pairs) - len(good), table.hkeys[p], table.row_bytes)
            for start in range(0, len(good), chunk_rows):
                block = good[start : start + chunk_rows]
                # bytearray: writable memory for torch (frombuffer over bytes is read-only), one copy of the join.
                keys = np.frombuffer(bytearray(b"".join(k for k, _ in block)), dtype="<i8")
                rows = np.frombuffer(bytearray(b"".join(v for _, v in block)), dtype=np.uint8)
                yield (torch.from_numpy(keys.astype(np.int64, copy=False)),
                       torch.from_numpy(rows.reshape(len(block), table.row_bytes)).view(dtype))

    def load(self, tag: str, table: "Any", progress: bool = True, storage: str = "float32") -> int:
        """Write every row of a `hps_core.tables.TableFiles` into the cluster (tqdm bar when `progress`), creating
        the table with `table.dim` and `storage` when needed (an existing tag must have them).

        Blocks of float32 rows (table files) are encoded into the table's storage as they go; a source whose blocks
        are already its stored rows (another tier's iter_chunks) is copied as it is (storage.to_stored). Returns
        rows loaded. Raises ValueError when the files' dim or the storage differs from the table's, or for a block
        the storage cannot keep (NaN / inf in an int8 or fp8 table, ...: the blocks before it stay written), and
        RedisClusterTierError when a node cannot be written. The table's load record is cleared first (a load that
        does not finish leaves none).
        """
        self._check_open()
        check_table_files(table)
        t = self._tables.get(tag)
        if t is not None and table.dim != t.dim:
            raise ValueError(f"redis_cluster: table files {getattr(table, 'path', '?')} have dim {table.dim}, table "
                             f"{tag!r} has dim {t.dim}")
        self.create_table(tag, table.dim, storage)
        t = self._table(tag)
        self.mark_loaded(tag, None)
        # ~32 MB of row bytes per block: big enough for full max_batch_size commands, small enough for RAM.
        chunk_rows = max(1024, min(1 << 16, (32 << 20) // (t.row_bytes + 32)))
        where = str(getattr(table, "path", tag))
        loaded = 0
        for keys, vectors in table.iter_chunks(chunk_rows, progress=progress, desc=f"redis_cluster <- {tag}"):
            rows = to_stored(vectors, t.storage, t.dim, field=f"rows {loaded}.. of {where}")
            keys_np = self._keys_numpy(keys)
            if keys_np.size != rows.shape[0]:
                raise ValueError(f"redis_cluster: a block of {where} has {keys_np.size} keys and "
                                 f"{rows.shape[0]} rows")
            self._insert_numpy(t, keys_np, rows.view(torch.uint8).numpy())
            loaded += keys_np.size
        logger.info("redis_cluster: loaded %d rows into %s (%s)", loaded, tag, t.storage)
        return loaded

    def close(self) -> None:
        """Stop the topology thread and close every connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._cluster.close()
