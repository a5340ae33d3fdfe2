"""The hierarchical parameter server: one object per process serving every model, table and device.

Lookup path of one call: keys (any shape, int32/int64, on device d) -> the table's pipeline on d, one
native call with the GIL released (hps_core.pipeline, cuda_ext/csrc/pipeline.h):
  find (rows, or the default row for a miss; misses listed on the device) -> nothing else when every key was held
  -> else the misses de-duplicated, their rows from the host-memory tier's map, the lower tiers (Redis Cluster,
  RocksDB) through a callback into this module for what the map lacks, the table's default vector for the rest
  -> one launch scatters them into the output and stores them in the table (synchronously, or by the pipeline's
  insert worker when the batch hit rate >= hit_rate_threshold: HPS semantics, where the current batch then gets the
  default vector for its misses).

Tables by mode: dynamic caches below the table's size learn (LRU/LFU); a cache that covers the table (ratio >= 1)
and a static table are resident - every row in a dense array on the device behind a hash index, never evicted;
uvm tables keep their rows in pinned host memory behind a device index. A static table answers for the whole table
(a key it lacks gets the default vector, as HPS); the others ask the tiers.

Nothing below the engine calls back up: tiers know nothing of pipelines, pipelines nothing of tiers beyond the
host map's handle and the callback the engine gives them.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import itertools
import logging
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch

from hps_core import config as hps_config
from hps_core import ops
from hps_core.pipeline import TablePipeline
from hps_core.stats import TableStats
from hps_core.storage import bytes_per_row, check_encodable, decode_rows, encode_rows, row_dtype, stored_width
from hps_core.tables import TableFiles, open_table
from hps_core.tiers.base import Tier

log = logging.getLogger(__name__)

_KEY_DTYPES = {"int64": torch.int64, "int32": torch.int32}
# What a lookup can return (the `dtype` argument); the tables keep float32 rows.
LOOKUP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FILL_CHUNK = 1 << 20  # rows per chunk when filling a resident table from the table files


# The lower-tier callback the pipelines call for keys the host-memory map lacks (pipeline.h LowerTierFn): one ctypes
# function for the process, dispatching by token to (server, table, pipeline). ctypes takes the GIL for it.
_LOWER_TIER_FN = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                  ctypes.c_void_p)
_lower_targets: dict[int, tuple[Any, Any, TablePipeline]] = {}
_lower_tokens = itertools.count(1)


def _lower_tiers_entry(token: int, keys_ptr: int, n: int, rows_ptr: int, found_ptr: int) -> int:
    try:
        target = _lower_targets.get(token)
        if target is None:
            return 1
        server_ref, rt, pipe = target
        server = server_ref()
        if server is None:
            return 1
        keys = torch.frombuffer((ctypes.c_int64 * n).from_address(keys_ptr), dtype=torch.int64)
        row_bytes = bytes_per_row(rt.storage, rt.dim)  # the pipeline's buffer of stored rows, as bytes
        rows = torch.frombuffer((ctypes.c_uint8 * (n * row_bytes)).from_address(rows_ptr), dtype=torch.uint8)
        found = torch.frombuffer((ctypes.c_bool * n).from_address(found_ptr), dtype=torch.bool)
        server._fetch_lower_tiers(rt, pipe, keys, rows.view(n, row_bytes), found)
        return 0
    except BaseException:  # never unwind into native code; the pipeline raises, this log says why
        log.exception("lower-tier fetch for lookup pipeline token %d failed", token)
        return 1


_LOWER_TIERS = _LOWER_TIER_FN(_lower_tiers_entry)
_LOWER_TIERS_ADDR = ctypes.cast(_LOWER_TIERS, ctypes.c_void_p).value


@dataclass
class TableRuntime:
    """Everything the engine knows about one table of one model."""

    model: str
    table_id: int
    name: str
    tag: str
    dim: int
    default_value: float
    max_keys_per_call: int
    config: Any  # hps_config.TableConfig
    cache_config: Any  # hps_config.CacheConfig
    files: TableFiles | None = None
    # The table's pipeline on each device it is served on (its cache, resident table or host-mapped index).
    caches: dict[torch.device, TablePipeline] = field(default_factory=dict)
    # cache.second_level host_mapped: the whole table below each device's cache (on GPUs one pinned copy of the
    # rows, shared), read for the cache's misses.
    second_levels: dict[torch.device, TablePipeline] = field(default_factory=dict)
    cache_lock: threading.Lock = field(default_factory=threading.Lock)
    # update() writes the tiers then the caches under this lock: concurrent updates reach all of them in one order.
    update_lock: threading.Lock = field(default_factory=threading.Lock)
    uncached_stats: TableStats = field(default_factory=TableStats)
    # cache.enabled false: the native pipeline CPU keys take (host map -> lower tiers -> default, nothing stored);
    # keys on a GPU take the Python path counted in uncached_stats.
    pass_through: "TablePipeline | None" = None
    load_source: Any = None  # _NewestRows: what the tiers were filled from at start (None without files)

    @property
    def mode(self) -> str:
        """dynamic (a cache that learns), static (whole table on the device) or uvm (rows in host memory)."""
        return self.cache_config.type

    @property
    def storage(self) -> str:
        """How every tier and device table keeps this table's rows (hps_core.storage): the table's choice, else the
        cache's."""
        return self.config.storage or self.cache_config.storage

    @functools.cached_property
    def default_row(self) -> torch.Tensor:
        """The default vector as a stored row (1, width): what a key no tier holds is served (a pipeline encodes the
        same row)."""
        row = torch.full((1, self.dim), float(self.default_value), dtype=torch.float32)
        return row if self.storage == "float32" else encode_rows(row, self.storage)


class _CallGate:
    """Counts the server's Python-side calls in flight (updates, refreshes, uncached lookups); close() refuses new ones
    and waits for those running, so no call meets a tier closed under it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._closed = False

    def __enter__(self) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("this HierarchicalParameterServer is closed")
            self._active += 1

    def __exit__(self, *exc: Any) -> None:
        with self._cond:
            self._active -= 1
            if self._active == 0:
                self._cond.notify_all()

    def close(self, timeout_s: float = 300.0) -> None:
        with self._cond:
            self._closed = True
            if not self._cond.wait_for(lambda: self._active == 0, timeout=timeout_s):
                log.error("close(): %d calls still running after %.0f s; closing the tiers anyway", self._active,
                          timeout_s)


class _NewestRows:
    """The newest rows of a table at start, as one table-files-like source (dim, num_keys, path, iter_chunks):
    a complete persistent tier that holds the table's load record (RocksDB: the files plus every update since), else
    the table files; then the rows of incomplete persistent tiers holding the record (a Redis cluster may have
    evicted rows, but those it has are newer than the files). Read in order, later rows win - as every loader keeps
    a key's last row. Blocks from the files are float32 numpy rows (encoded by whoever loads them); blocks from a
    tier are its stored-row tensors, loaded as they are."""

    def __init__(self, rt: "TableRuntime", holders: list[Tier]) -> None:
        complete = [t for t in holders if t.complete]
        self._base = complete[-1] if complete else None
        self._overlays = [t for t in holders if not t.complete]
        self._files = rt.files
        self._tag = rt.tag
        self.dim = rt.dim
        base = f"{self._base.name}:{rt.tag}" if self._base is not None else str(rt.files.path)
        self.path = " + ".join([base] + [f"{t.name}:{rt.tag}" for t in self._overlays])

    @property
    def num_keys(self) -> int:
        base = self._base.size(self._tag) if self._base is not None else self._files.num_keys
        return base + sum(t.size(self._tag) for t in self._overlays)

    def iter_chunks(self, chunk_rows: int = 1 << 20, progress: bool = False,
                    desc: str | None = None) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        if self._base is None:
            yield from self._files.iter_chunks(chunk_rows, progress=progress, desc=desc)
        else:
            yield from self._base.iter_chunks(self._tag, chunk_rows)
        for tier in self._overlays:
            yield from tier.iter_chunks(self._tag, chunk_rows)


def _chunk_tensors(keys: Any, rows: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A block of a load source as tensors: table files give read-only numpy blocks (copied: torch wants writable
    memory) of float32 rows; a tier gives tensors of its stored rows, passed on as they are."""
    if not isinstance(keys, torch.Tensor):
        keys = torch.from_numpy(np.array(keys, dtype=np.int64))
    if not isinstance(rows, torch.Tensor):
        rows = torch.from_numpy(np.array(rows, dtype=np.float32))
    return keys, rows


def make_tag(model: str, table: str) -> str:
    """The name of a table in every tier: "hps_et.<model>.<table>" (HPS's tag)."""
    return f"hps_et.{model}.{table}"


class HierarchicalParameterServer:
    """Serves embedding lookups for every model/table of a deployment config.

    Args:
        config: an HPS JSON path, one of our YAML paths, a dict, a composed Hydra DictConfig or a DeploymentConfig.
        load: load the table files into the tiers at start (rows already present in a persistent tier are kept).
        progress: tqdm progress bars while loading.

    Example:
        >>> hps = HierarchicalParameterServer("my_hps_config.json")
        >>> hps.lookup("demo", 0, torch.tensor([[1, 2], [3, 4]])).shape
        torch.Size([2, 2, 16])
    """

    def __init__(self, config: Any, *, load: bool = True, progress: bool = True) -> None:
        self.config = hps_config.load_config(config)
        self.key_dtype = _KEY_DTYPES[self.config.key_dtype]
        self._closed = False
        self._cuda = torch.cuda.is_available()
        self.tiers: list[Tier] = self._make_tiers()
        # Tiers that take the rows a lower tier found (HPS cache_missed_embeddings), by position in self.tiers.
        self._promote_into = [i for i, t in enumerate(self.tiers) if t.cache_missed_embeddings]
        # The host-memory tier, when it is the first tier: the miss path fetches from its map natively.
        self._host_tier = self.tiers[0] if self.tiers and self.tiers[0].native_map else None
        self.tables: dict[str, list[TableRuntime]] = {}
        self._warned_cpu_fallback = False
        self._tokens: list[int] = []  # lower-tier callback tokens of this server's pipelines
        self._gate = _CallGate()  # update / refresh / uncached lookups in flight; close() waits for them
        self.metrics = None  # hps_core.metrics.MetricsExporter when config metrics_port is set
        self.update_consumer = None  # hps_core.update_stream.StreamConsumer for an update_source redis_stream
        self.refresher = None  # hps_core.refresher.PeriodicRefresher when a model's cache has refresh_interval > 0
        created: list[tuple[Tier, str]] = []  # tables this start created in persistent tiers (undone on failure)
        self._models_lock = threading.Lock()  # add_model / swap_model / remove_model, one at a time
        self._versions: dict[str, int] = {}  # model -> version number serving (1 when never swapped)
        self._previous: dict[str, list[TableRuntime]] = {}  # model -> the version before the last swap (rollback)
        try:
            # Phase 1 - everything that can refuse the deployment (table files, devices), before any tier changes.
            for model_name, model in self.config.models.items():
                self.tables[model_name] = self._prepare_model(model_name, model, load)
            # Phase 2 - the tiers, then the devices.
            for model_name, model in self.config.models.items():
                self._install_model(model_name, model, self.tables[model_name], progress, created)
            if self.config.metrics_port:
                from hps_core.metrics import MetricsExporter

                self.metrics = MetricsExporter(self, self.config.metrics_port)
            if self.config.update_source.type == "redis_stream":
                self.update_consumer = self._start_update_stream(self.config.update_source)
            for model_name, model in self.config.models.items():
                self._schedule_refresh(model_name, model)
        except BaseException:
            for tier, tag in reversed(created):  # a refused start leaves the persistent tiers as it found them
                try:
                    tier.drop_table(tag)
                except Exception:
                    log.exception("undoing table %s in %s failed", tag, tier.name)
            self.close()
            raise

    # ------------------------------------------------------------------ construction

    def _prepare_model(self, model_name: str, model: Any, load: bool) -> list[TableRuntime]:
        """What can refuse a model before anything changes: its table files, its devices."""
        runtimes = [self._make_table(model_name, model, table_id, table_cfg, load=load)
                    for table_id, table_cfg in enumerate(model.tables)]
        self._devices_for(model_name, model.deployed_device_list)
        return runtimes

    def _install_model(self, model_name: str, model: Any, runtimes: list[TableRuntime], progress: bool,
                       created: list) -> None:
        """A prepared model's tables into the tiers (loading their files), then onto its devices. Tables this
        creates in persistent tiers are appended to `created` (the caller undoes them on failure)."""
        for rt in runtimes:
            for tier in self.tiers:
                if tier.persistent and tier.can_drop_tables and not tier.read_only and rt.tag not in tier.tables():
                    created.append((tier, rt.tag))
                tier.create_table(rt.tag, rt.dim, rt.storage)
            if rt.files is not None:
                self._load_table(rt, progress)
        for device in self._devices_for(model_name, model.deployed_device_list):
            for rt in runtimes:
                self._cache_for(rt, device, create=True)
        for rt in runtimes:
            if not rt.cache_config.enabled:
                # Made now, not on first use: close() must find every pipeline a lookup can be inside.
                rt.pass_through = TablePipeline.pass_through(dim=rt.dim, default_value=rt.default_value,
                                                             max_keys=rt.max_keys_per_call, tag=rt.tag,
                                                             storage=rt.storage)
                self._connect(rt, rt.pass_through)

    def _start_update_stream(self, u: Any) -> Any:
        import redis

        from hps_core.update_stream import StreamConsumer

        host, _, port = u.brokers.partition(":")
        client = redis.Redis(host=host, port=int(port), socket_connect_timeout=5)
        # 2 entries per read: a read of a message (up to 8,192 rows, 4 MB at dim 128) is parsed holding the GIL, so
        # few per read keep the lookup threads' waits short (16 per read: 36 MB parses of ~170 ms, a lookup p99 of
        # 6.3-7.2 ms during updates on 2 cores; 2: 5.4-5.6 ms, the same rows per second)
        return StreamConsumer(self, client, u.stream, u.group, u.consumer, batch=2,
                              block_ms=u.poll_timeout_ms, backoff_ms=u.failure_backoff_ms)

    def _make_tiers(self) -> list[Tier]:
        tiers_cfg = self.config.tiers
        tiers: list[Tier] = []
        if tiers_cfg.host_memory.enabled:
            from hps_core.tiers.host_memory import HostMemoryTier

            c = tiers_cfg.host_memory
            tiers.append(
                HostMemoryTier(
                    num_partitions=c.num_partitions,
                    overflow_margin=c.overflow_margin,
                    overflow_policy=c.overflow_policy,
                    overflow_resolution_target=c.overflow_resolution_target,
                    allocation_rate=c.allocation_rate,
                    max_batch_size=c.max_batch_size,
                    cache_missed_embeddings=c.cache_missed_embeddings,
                )
            )
        if tiers_cfg.redis_cluster.enabled:
            try:
                from hps_core.tiers.redis_cluster import RedisClusterTier
            except ImportError as exc:
                raise ValueError(
                    "tiers.redis_cluster.enabled is true but the Redis Cluster tier is not available in this build "
                    f"({exc})"
                ) from exc
            tiers.append(RedisClusterTier.from_config(tiers_cfg.redis_cluster))
        if tiers_cfg.rocksdb.enabled:
            from hps_core.tiers.rocksdb import RocksDBTier

            c = tiers_cfg.rocksdb
            tiers.append(
                RocksDBTier(c.path, num_threads=c.num_threads, read_only=c.read_only, max_batch_size=c.max_batch_size)
            )
        return tiers

    def _make_table(self, model_name: str, model: Any, table_id: int, table_cfg: Any, *, load: bool) -> TableRuntime:
        """The table's runtime, with its files opened and validated (nothing is written anywhere yet)."""
        cache_cfg = model.cache
        if cache_cfg.enabled and cache_cfg.type != "dynamic" and not load:
            raise ValueError(
                f"models.{model_name}.cache.type = {cache_cfg.type!r}: static and uvm tables are built from the "
                "table files, so they need load=True"
            )
        rt = TableRuntime(
            model=model_name,
            table_id=table_id,
            name=table_cfg.name,
            tag=make_tag(model_name, table_cfg.name),
            dim=table_cfg.dim,
            default_value=float(table_cfg.default_value),
            max_keys_per_call=model.max_batch_size * table_cfg.max_keys_per_sample,
            config=table_cfg,
            cache_config=cache_cfg,
        )
        if load:
            rt.files = open_table(table_cfg.path, table_cfg.dim, key_dtype=self.config.key_dtype)
        return rt

    def _load_table(self, rt: TableRuntime, progress: bool) -> None:
        """Fill every tier that does not hold the table yet, from the newest rows there are.

        A persistent tier records the identity of the files it was completely loaded from; holding that record it
        keeps its rows - the files' rows and every update since - and is not reloaded. The newest rows of the
        table are then: a complete persistent tier that holds the record (RocksDB), else the files; then, on top,
        the rows of incomplete persistent tiers holding the record (a Redis cluster may have evicted rows, but the
        ones it has are newer than the files). Every other tier, and later the resident tables, load those rows.
        """
        identity = rt.files.identity()
        holds = [tier.persistent and tier.loaded_from(rt.tag) == identity for tier in self.tiers]
        rt.load_source = _NewestRows(rt, [t for t, h in zip(self.tiers, holds) if h])
        for tier, held in zip(self.tiers, holds):
            if held:
                log.info("%s holds %s (from %s and the updates since): not reloading", tier.name, rt.tag,
                         rt.files.path)
                continue
            if tier.read_only:
                log.info("%s: %s is read-only, not loading %s", tier.name, rt.tag, rt.files.path)
                continue
            start = time.perf_counter()
            rows = tier.load(rt.tag, rt.load_source, progress=progress, storage=rt.storage)
            tier.mark_loaded(rt.tag, identity)
            log.info("loaded %d rows of %s into %s from %s in %.2f s", rows, rt.tag, tier.name,
                     rt.load_source.path, time.perf_counter() - start)

    def _devices_for(self, model_name: str, device_list: Iterable[int]) -> list[torch.device]:
        """GPU ordinals -> devices. Without a GPU every ordinal is served from the CPU (one warning)."""
        if not self._cuda:
            if not self._warned_cpu_fallback:
                warnings.warn(
                    f"no CUDA device: deployed_device_list {list(device_list)} of model {model_name!r} "
                    "is served from the CPU",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._warned_cpu_fallback = True
            return [torch.device("cpu")]
        count = torch.cuda.device_count()
        devices = []
        for ordinal in device_list:
            if ordinal >= count:
                raise ValueError(
                    f"models.{model_name}.deployed_device_list: device {ordinal} does not exist "
                    f"({count} CUDA devices visible)"
                )
            devices.append(torch.device("cuda", ordinal))
        return devices

    def _cache_for(self, rt: TableRuntime, device: torch.device, *, create: bool = False) -> TablePipeline | None:
        """The pipeline of `rt` on `device`; CPU keys get a CPU pipeline created on first use."""
        if not rt.cache_config.enabled:
            return None
        pipe = rt.caches.get(device)
        if pipe is not None:
            return pipe
        if not create and device.type != "cpu":
            deployed = self.config.models[rt.model].deployed_device_list
            raise ValueError(
                f"model {rt.model!r} is not deployed on {device} (deployed_device_list {list(deployed)})"
            )
        with rt.cache_lock:
            pipe = rt.caches.get(device)
            if pipe is None:
                pipe = self._new_pipeline(rt, device)
                rt.caches[device] = pipe
        return pipe

    def _new_pipeline(self, rt: TableRuntime, device: torch.device) -> TablePipeline:
        """The table's pipeline on `device`: a resident table when the whole table is meant to fit (static, uvm, or
        a cache of ratio >= 1 built from files), else a dynamic cache of ratio x rows."""
        cfg = rt.cache_config
        rows = rt.files.num_keys if rt.files is not None else self.tiers_size(rt.tag)
        common = dict(dim=rt.dim, default_value=rt.default_value, max_keys=rt.max_keys_per_call, tag=rt.tag,
                      storage=rt.storage)
        resident = rt.mode in ("static", "uvm") or (cfg.ratio >= 1.0 and rt.load_source is not None)
        shared = any(t.shared for t in self.tiers)
        if resident:
            on_host = rt.mode == "uvm" and device.type == "cuda"
            # A key a resident table lacks is in no tier: the table starts from the newest rows of every tier and
            # update() writes it too (it grows for new keys). So static tables (HPS) and covering caches answer
            # every key themselves - a lookup is one launch, nothing waited on - unless a tier other servers write
            # can hold keys this engine never saw (Redis), or the rows are host-mapped (uvm: the table cannot grow).
            asks_tiers = rt.mode == "uvm" or (rt.mode != "static" and shared)
            pipe = TablePipeline.resident(device, capacity=max(rows, 1), mode=rt.mode,
                                          misses_to_tiers=asks_tiers, rows_on_host=on_host, **common)
            self._load_resident(rt, pipe)
        else:
            capacity = max(int(cfg.ratio * max(rows, 1)), ops.bucket_size())
            admission = rt.config.admission or cfg.admission  # the table's choice, else the model cache's
            pipe = TablePipeline.dynamic_cache(device, capacity=capacity, policy=cfg.policy, admission=admission,
                                               **common)
            if cfg.second_level == "host_mapped":
                pipe.set_second_level(self._second_level_for(rt, device, shared=shared))
        self._connect(rt, pipe)
        if not resident and cfg.init and cfg.refresh_percentage > 0 and rt.load_source is not None:
            self._warm_up(rt, pipe)
        return pipe

    def _second_level_for(self, rt: TableRuntime, device: torch.device, *, shared: bool) -> TablePipeline:
        """The table's host-mapped second level on `device`: the whole table in host memory behind an index (on a
        GPU the rows are pinned and shared by every GPU's second level; the index has a copy on each). It answers
        every key itself - on a GPU the cache's misses then never reach the CPU - unless a shared tier (Redis) can
        hold keys this engine never saw, or an update() brought a key beyond its rows (host-mapped rows cannot
        grow: the key lives in the tiers); then the keys it lacks go on to the tiers."""
        l2 = rt.second_levels.get(device)
        if l2 is not None:
            return l2
        if rt.load_source is None:
            raise ValueError(f"{rt.tag}: cache.second_level host_mapped needs the table's files (path) to fill it")
        if self._host_tier is not None and not rt.second_levels:
            log.warning("%s: cache.second_level host_mapped holds the whole table in host memory, and so does the "
                        "host-memory tier: disable one of them (tiers.host_memory.enabled false) to hold it once",
                        rt.tag)
        rows = rt.load_source.num_keys
        l2 = TablePipeline.resident(device, capacity=max(rows, 1), mode="uvm", misses_to_tiers=shared,
                                    rows_on_host=device.type == "cuda", dim=rt.dim, default_value=rt.default_value,
                                    max_keys=rt.max_keys_per_call, tag=rt.tag, storage=rt.storage)
        other = next((p for p in rt.second_levels.values() if p.device.type == device.type == "cuda"), None)
        if other is not None:
            l2.load_like(other)
        else:
            for keys, vectors in rt.load_source.iter_chunks(_FILL_CHUNK):
                l2.load(*_chunk_tensors(keys, vectors))
        self._connect(rt, l2)  # its own lookups (refresh) reach the tiers for keys it lacks
        rt.second_levels[device] = l2
        return l2

    def _load_resident(self, rt: TableRuntime, pipe: TablePipeline) -> None:
        """Fill a resident table from the table files, or from the same table on another device (uvm: one pinned
        copy of the rows serves every GPU)."""
        for other in rt.caches.values():
            if other.kind == "resident" and (other.device.type == pipe.device.type or rt.mode != "uvm"):
                pipe.load_like(other)
                return
        for keys, vectors in rt.load_source.iter_chunks(_FILL_CHUNK):
            pipe.load(*_chunk_tensors(keys, vectors))

    def _connect(self, rt: TableRuntime, pipe: TablePipeline) -> None:
        """Wire a pipeline's miss path: the host map by handle, the lower tiers through the callback."""
        source = self._host_tier.map_handle(rt.tag) if self._host_tier is not None else -1
        lower = self.tiers[1:] if self._host_tier is not None else self.tiers
        token = 0
        if lower:
            token = next(_lower_tokens)
            _lower_targets[token] = (weakref.ref(self), rt, pipe)
            self._tokens.append(token)
        cfg = rt.cache_config
        pipe.connect(source=source, lower_tiers=_LOWER_TIERS_ADDR if lower else 0, token=token,
                     hit_rate_threshold=cfg.hit_rate_threshold, max_pending=max(1, int(cfg.num_worker_buffers)))

    def _warm_up(self, rt: TableRuntime, pipe: TablePipeline) -> None:
        """HPS init_ec: fill the cache with the first rows of the table (the newest rows, as the tiers got them)."""
        left = pipe.num_slots
        for keys, vectors in rt.load_source.iter_chunks(1 << 16):
            if left <= 0:
                break
            pipe.insert(*_chunk_tensors(keys[:left], vectors[:left]))
            left -= len(keys)

    def tiers_size(self, tag: str) -> int:
        """Rows of `tag` in the largest tier (for sizing caches when no files were loaded)."""
        return max((tier.size(tag) for tier in self.tiers), default=0)

    # ------------------------------------------------------------------ addressing and validation

    def table(self, model: str, table: int | str) -> TableRuntime:
        """The runtime of (model, table id or table name); KeyError naming what exists otherwise."""
        if model not in self.tables:
            raise KeyError(f"unknown model {model!r}; deployed models: {sorted(self.tables)}")
        runtimes = self.tables[model]
        if isinstance(table, bool) or not isinstance(table, (int, str)):
            raise TypeError(f"table must be a table id (int) or name (str), found {type(table).__name__}")
        if isinstance(table, int):
            if not 0 <= table < len(runtimes):
                raise KeyError(f"model {model!r} has no table id {table}; table ids are 0..{len(runtimes) - 1}")
            return runtimes[table]
        for rt in runtimes:
            if rt.name == table:
                return rt
        raise KeyError(f"model {model!r} has no table {table!r}; tables: {[rt.name for rt in runtimes]}")

    def _check_keys(self, rt: TableRuntime, keys: Any) -> None:
        if not isinstance(keys, torch.Tensor):
            raise TypeError(f"keys must be a torch.Tensor, found {type(keys).__name__}")
        if keys.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"keys must be int32 or int64, found {keys.dtype}")
        if keys.numel() > rt.max_keys_per_call:
            raise ValueError(
                f"{keys.numel()} keys for {rt.model}/{rt.name} exceed max_batch_size × max_keys_per_sample = "
                f"{rt.max_keys_per_call}"
            )

    # ------------------------------------------------------------------ lookup

    def lookup(self, model: str, table: int | str, keys: torch.Tensor,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """Embeddings of `keys`.

        Args:
            model: model name. table: table id (int) or name.
            keys: int32 or int64 tensor of any shape, on the CPU or a deployed CUDA device.
            dtype: the output's dtype: float32 (None, HPS's contract), or bfloat16 / float16 for a model that
                consumes them - each row is rounded to nearest even as the lookup writes it (no extra pass; the
                table keeps float32 rows).

        Returns:
            tensor of shape `keys.shape + (dim,)` in `dtype` on the keys' device.

        Example:
            >>> hps.lookup("demo", "user", torch.tensor([3, 7, 3]))  # (3, dim)
        """
        self._check_open()
        rt = self.table(model, table)
        if not isinstance(keys, torch.Tensor):
            raise TypeError(f"keys must be a torch.Tensor, found {type(keys).__name__}")
        pipe = rt.caches.get(keys.device) or self._cache_for(rt, keys.device)
        if pipe is None and keys.device.type == "cpu":
            pipe = rt.pass_through
        if pipe is None:
            self._check_keys(rt, keys)
            if dtype is not None and dtype not in LOOKUP_DTYPES:  # (the native pipelines check it themselves)
                raise TypeError(f"dtype must be one of {[str(d) for d in LOOKUP_DTYPES]} or None, found {dtype}")
            with self._gate:
                rows = self._lookup_uncached(rt, keys.reshape(-1), dtype)
            return rows.reshape(*keys.shape, rt.dim)
        # Checks dtype, device and size natively; after close() it raises (the pipeline is closed).
        return pipe.lookup(keys, dtype)

    def cpu_pipeline(self, model: str, table: int | str) -> TablePipeline:
        """The native pipeline that lookups of CPU keys run through: the table's CPU cache, or for a table without
        a cache its pass-through pipeline (what a framework op calls without Python: interop.tf_op.serve)."""
        rt = self.table(model, table)
        cpu = torch.device("cpu")
        pipe = rt.caches.get(cpu) or self._cache_for(rt, cpu)
        return pipe if pipe is not None else rt.pass_through

    def pipeline(self, model: str, table: int | str, device: str | torch.device) -> TablePipeline:
        """The lookup pipeline of (model, table) on `device` (what the torch layers call); ValueError if the table
        has no cache (HPS gpucache false) or the model is not deployed there."""
        rt = self.table(model, table)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        pipe = self._cache_for(rt, device)
        if pipe is None:
            raise ValueError(f"{rt.tag} has no cache (cache.enabled false): it has no lookup pipeline")
        return pipe

    def _lookup_uncached(self, rt: TableRuntime, flat: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """HPS gpucache: false - every key position straight from the tiers, no de-duplication (a sort of the batch
        costs more than fetching a repeated row twice)."""
        stats = rt.uncached_stats
        start = time.perf_counter()
        keys64 = flat.to("cpu", torch.int64)
        t0 = time.perf_counter()
        stored = self._fetch_from_tiers(rt, keys64, stats)
        stats.latency["tiers"].record(time.perf_counter() - t0)
        # decoded (and rounded) on the host, before the copy: a bf16 output sends half the bytes over the bus
        rows = stored if rt.storage == "float32" else decode_rows(stored, dtype)
        out = rows.to(dtype or torch.float32).to(flat.device, non_blocking=True)
        stats.add(lookups=1, keys=flat.numel(), cache_misses=flat.numel())
        stats.latency["total"].record(time.perf_counter() - start)
        return out

    def _fetch_from_tiers(self, rt: TableRuntime, keys: torch.Tensor, stats: TableStats) -> torch.Tensor:
        """Stored rows of int64 CPU `keys` from the tiers in order; the default vector (stored) for the rest (key
        positions)."""
        n = keys.numel()
        if self.tiers and n:
            # The first tier's answer is the output: when it holds every key (the common case) nothing is gathered
            # or copied; otherwise the lower tiers fill in the positions it lacked.
            first = self.tiers[0]
            out, hit = first.fetch(rt.tag, keys)
            hits = int(hit.sum())
            stats.add_tier_hits(first.name, hits)
            if hits == n:
                return out
            found = hit.clone()
            self._fill_from_tiers(rt, keys, out.view(torch.uint8), found, 1, stats.add_tier_hits)
        else:
            out = torch.empty((n, stored_width(rt.storage, rt.dim)), dtype=row_dtype(rt.storage))
            found = torch.zeros(n, dtype=torch.bool)
        missing = (~found).nonzero().squeeze(1)
        if missing.numel():
            out_bytes = out.view(torch.uint8)
            out_bytes[missing] = rt.default_row.view(torch.uint8)
            stats.add(defaults_served=missing.numel())
        return out

    def _fetch_lower_tiers(self, rt: TableRuntime, pipe: TablePipeline, keys: torch.Tensor, rows: torch.Tensor,
                           found: torch.Tensor) -> None:
        """The lower-tier callback of a pipeline: stored rows of distinct keys the host map lacks (rows (n, row bytes)
        uint8 / found are the pipeline's buffers; it fills the default vector for what stays missing)."""
        self._fill_from_tiers(rt, keys, rows, found, 1 if self._host_tier is not None else 0, pipe.add_tier_hits)

    def _fill_from_tiers(self, rt: TableRuntime, keys: torch.Tensor, out: torch.Tensor, found: torch.Tensor,
                         level: int, add_hits: Any) -> None:
        """out[i] = the stored row of keys[i] from tiers[level:] in order (out: (n, row bytes) uint8 - rows move as
        bytes, whatever the storage), found[i] = True where one held it. Rows found below a tier configured with
        cache_missed_embeddings are promoted into it."""
        missing = (~found).nonzero().squeeze(1)
        for lvl in range(level, len(self.tiers)):
            if missing.numel() == 0:
                break
            tier = self.tiers[lvl]
            whole = missing.numel() == keys.numel()
            values, hit = tier.fetch(rt.tag, keys if whole else keys.index_select(0, missing))
            values = values.view(torch.uint8)
            if whole and bool(hit.all()):  # the common case: the first tier asked holds every key - no gathers
                out.copy_(values)
                found.fill_(True)
                self._promote(rt, lvl, keys, out)
                add_hits(tier.name, keys.numel())
                return
            hit_pos = hit.nonzero().squeeze(1)
            hit_idx = missing.index_select(0, hit_pos)
            if hit_idx.numel():
                out.index_copy_(0, hit_idx, values.index_select(0, hit_pos))
                found.index_fill_(0, hit_idx, True)
                self._promote(rt, lvl, keys.index_select(0, hit_idx), out.index_select(0, hit_idx))
            add_hits(tier.name, hit_idx.numel())
            missing = missing[~hit]

    def _promote(self, rt: TableRuntime, level: int, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Rows found in tier `level` (stored rows as bytes): into the writable tiers above it configured with
        cache_missed_embeddings."""
        for upper in self._promote_into:
            if upper < level and not self.tiers[upper].read_only:
                self.tiers[upper].insert(rt.tag, keys, rows.view(row_dtype(rt.storage)))

    def wait_for_inserts(self) -> None:
        """Block until every queued asynchronous cache insert has been applied."""
        for runtimes in list(self.tables.values()):
            for rt in runtimes:
                for pipe in list(rt.caches.values()):
                    pipe.wait_inserts()

    # ------------------------------------------------------------------ update / refresh

    def update(self, model: str, table: int | str, keys: torch.Tensor, vectors: torch.Tensor) -> None:
        """Write rows through every writable tier, then into every cache that holds them.

        keys: int32/int64 (n,) (any shape, flattened); vectors: float32 (n, dim). Validated before anything
        is written. Concurrent lookups see the old or the new row, never a mix, and no cache keeps the old
        row after this returns.
        """
        self._check_open()
        rt = self.table(model, table)
        if not isinstance(keys, torch.Tensor) or keys.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"keys must be an int32 or int64 torch.Tensor, found {getattr(keys, 'dtype', type(keys))}")
        if not isinstance(vectors, torch.Tensor) or vectors.dtype != torch.float32:
            raise TypeError(f"vectors must be a float32 torch.Tensor, found {getattr(vectors, 'dtype', type(vectors))}")
        flat = keys.reshape(-1).to("cpu", torch.int64)
        if vectors.dim() != 2 or vectors.shape[1] != rt.dim:
            raise ValueError(f"vectors must have shape (n, {rt.dim}) for {rt.tag}, found {tuple(vectors.shape)}")
        if vectors.shape[0] != flat.numel():
            raise ValueError(f"{flat.numel()} keys but {vectors.shape[0]} vectors")
        if rt.storage != "float32":  # rows the device tables cannot keep are refused before any tier is written
            check_encodable(vectors.detach().to("cpu"), rt.storage, field=f"vectors for {rt.tag}")
        read_only = [t.name for t in self.tiers if t.read_only]
        if read_only:
            raise ValueError(f"cannot update {rt.tag}: tier(s) {read_only} are opened read-only")
        if flat.numel() == 0:
            return
        # Last occurrence wins for duplicate keys, the same rule in every tier and cache.
        unique, inverse = torch.unique(flat, return_inverse=True)
        last = torch.zeros(unique.numel(), dtype=torch.int64).scatter_reduce_(
            0, inverse, torch.arange(flat.numel()), reduce="amax", include_self=False
        )
        rows = vectors.detach().to("cpu").contiguous().index_select(0, last)
        if rt.storage != "float32":  # encoded once: every tier and table keeps these bytes
            rows = encode_rows(rows, rt.storage)
        with self._gate, rt.update_lock:
            for tier in self.tiers:
                tier.insert(rt.tag, unique, rows)
            # Then the second levels (a cache's misses read them), then every device's table: present rows
            # overwritten (a resident table that answers every key also takes new keys), queued asynchronous
            # inserts of older rows dropped.
            for pipe in list(rt.second_levels.values()) + list(rt.caches.values()):
                pipe.update(unique, rows)

    def refresh(self, model: str | None = None, table: int | str | None = None, chunk_slots: int = 1 << 16) -> int:
        """Re-read every cached key of the selected tables from the tiers (HPS refresh); returns keys refreshed.

        Static and uvm tables are skipped: nothing is cached in them that update() does not already change."""
        self._check_open()
        with self._gate:
            return self._refresh(model, table, chunk_slots)

    def _refresh(self, model: str | None, table: int | str | None, chunk_slots: int) -> int:
        total = 0
        for rt in self._select(model, table):
            if rt.mode != "dynamic":
                continue
            for pipe in list(rt.caches.values()):
                slots = pipe.num_slots
                for start in range(0, slots, chunk_slots):
                    keys, version = pipe.export_keys(start, min(start + chunk_slots, slots))
                    if keys.numel() == 0:
                        continue
                    # what a miss of these keys would fetch: the second level, the tiers, the default - stored rows
                    rows = pipe.fetch_stored(keys)
                    assigned = pipe.assign_if_version(keys, rows, version)
                    if assigned >= 0:  # else an update raced this chunk; its rows are newer than ours
                        total += keys.numel()
        return total

    def _select(self, model: str | None, table: int | str | None) -> list[TableRuntime]:
        if model is None:
            return [rt for runtimes in list(self.tables.values()) for rt in runtimes]
        if table is None:
            self.table(model, 0)
            return list(self.tables[model])
        return [self.table(model, table)]

    # ------------------------------------------------------------------ observability

    def stats(self) -> dict:
        """Counters per model / table / device (lookups, keys, cache hits, hits per tier, defaults served,
        inserts, evictions, refused inserts, latency percentiles per stage), plus per tier, plus memory."""
        out: dict = {"models": {}, "tiers": {}}
        host_tier = self._host_tier.name if self._host_tier is not None else None
        for model, runtimes in list(self.tables.items()):  # a copy: add_model / remove_model may run meanwhile
            mdict = out["models"].setdefault(model, {})
            for rt in runtimes:
                tdict = {str(device): pipe.stats(host_tier) for device, pipe in rt.caches.items()}
                if not rt.cache_config.enabled:
                    if rt.pass_through is not None:  # lookups of CPU keys
                        tdict["cpu"] = rt.pass_through.stats(host_tier)
                    tdict["uncached"] = rt.uncached_stats.as_dict()  # lookups of GPU keys
                mdict[rt.name] = tdict
        for tier in self.tiers:
            out["tiers"][tier.name] = {tag: vars(s).copy() for tag, s in tier.stats().items()}
        if self.update_consumer is not None:
            out["update_source"] = self.update_consumer.stats()
        return out

    # ------------------------------------------------------------------ models at run time

    def add_model(self, name: str, model: Any, *, progress: bool = False) -> None:
        """Deploy one more model while the server serves: `model` is a model section as our YAML/dict config writes
        it (tables, deployed_device_list, max_batch_size, cache) or a ModelConfig, validated as at start-up. Its
        tables are loaded into the tiers and onto its devices before it becomes visible: a lookup sees all of it or
        KeyError. Nothing is left behind if it fails (the tables it created in persistent tiers are dropped).

        Raises ValueError if `name` is deployed already, ConfigError for a bad section, TableFileError for missing
        or bad table files - the running models are untouched either way.
        """
        self._check_open()
        checked = self._checked_model(name, model)
        with self._models_lock:
            if name in self.tables:
                raise ValueError(f"model {name!r} is deployed already (remove_model it first)")
            runtimes = self._add_runtimes(name, checked, progress)
            self.tables[name] = runtimes  # visible to lookups from here on
            self._schedule_refresh(name, checked)
        log.info("model %s added: %d tables", name, len(runtimes))

    def swap_model(self, name: str, model: Any, *, progress: bool = False) -> int:
        """Serve a new version of deployed model `name` without downtime: the new version (a model section or
        ModelConfig, validated as at start) is loaded beside the serving one - its own tables in the tiers, its own
        device pipelines - and then one assignment makes it the one `name` names. A lookup runs on the version it
        found, whole: in-flight lookups finish on the old one, later ones see the new one. The old version stays
        loaded for `rollback_model`; the version before it is retired (its memory freed) now. Returns the new
        version number (the first deployment is version 1). Raises as add_model; a refused swap changes nothing."""
        self._check_open()
        checked = self._checked_model(name, model)
        with self._models_lock:
            if name not in self.tables:
                raise KeyError(f"no model {name!r} to swap; deployed: {sorted(self.tables)}")
            version = self._versions.get(name, 1) + 1
            internal = f"{name}__v{version}"
            runtimes = self._add_runtimes(internal, checked, progress)
            older = self._previous.pop(name, None)
            self._previous[name] = self.tables[name]
            self.tables[name] = runtimes  # the switch: one reference, read once per lookup
            self._versions[name] = version
            if older is not None:
                self._retire(older)
                self.config.models.pop(older[0].model, None)
        log.info("model %s: version %d serving", name, version)
        return version

    def rollback_model(self, name: str) -> None:
        """Serve the version `name` served before the last swap_model again (the two trade places: a second
        rollback returns to the newer one). KeyError when there is none."""
        self._check_open()
        with self._models_lock:
            previous = self._previous.get(name)
            if previous is None or name not in self.tables:
                raise KeyError(f"model {name!r} has no previous version to roll back to")
            self._previous[name] = self.tables[name]
            self.tables[name] = previous
        log.info("model %s: rolled back", name)

    def _checked_model(self, name: str, model: Any) -> Any:
        """A model section or ModelConfig, validated as at start (ConfigError names models.<name>.<field>)."""
        if isinstance(model, hps_config.ModelConfig):
            return hps_config.validate(dataclasses.replace(self.config, models={name: model})).models[name]
        return hps_config.load_config({"key_dtype": self.config.key_dtype, "models": {name: model}}).models[name]

    def _add_runtimes(self, internal: str, checked: Any, progress: bool) -> list[TableRuntime]:
        """Prepare and install a model under `internal` (its tags hps_et.<internal>.<table>); undone on failure.
        The caller publishes the runtimes. Holds _models_lock."""
        tags = {rt.tag for runtimes in list(self.tables.values()) + list(self._previous.values()) for rt in runtimes}
        runtimes = self._prepare_model(internal, checked, load=True)
        clash = sorted(tags & {rt.tag for rt in runtimes})
        if clash:
            raise ValueError(f"model {internal!r}: tables {clash} are served already")
        created: list = []
        self.config.models[internal] = checked
        try:
            self._install_model(internal, checked, runtimes, progress, created)
        except BaseException:
            self._retire(runtimes)
            for tier, tag in reversed(created):
                try:
                    tier.drop_table(tag)
                except Exception:
                    log.exception("undoing table %s in %s failed", tag, tier.name)
            del self.config.models[internal]
            raise
        return runtimes

    def remove_model(self, name: str, *, drop_persistent: bool = False) -> None:
        """Retire a model while the server serves: new lookups of it raise KeyError at once; a lookup already inside
        one of its pipelines finishes first; then its caches and its rows in the in-process tiers are freed (rows in
        persistent tiers - RocksDB, Redis - are kept unless `drop_persistent`)."""
        self._check_open()
        with self._models_lock:
            if name not in self.tables:
                raise KeyError(f"no model {name!r}; deployed: {sorted(self.tables)}")
            versions = [self.tables.pop(name)] + [v for v in [self._previous.pop(name, None)] if v is not None]
            self._versions.pop(name, None)
            for runtimes in versions:
                self._retire(runtimes, drop_persistent=drop_persistent)
                self.config.models.pop(runtimes[0].model, None)
        log.info("model %s removed", name)

    def _retire(self, runtimes: list[TableRuntime], *, drop_persistent: bool = False) -> None:
        """Close a model's pipelines (each waits for a lookup inside it), unhook their lower-tier callbacks, and
        drop its tables from the tiers (persistent ones only when asked). An update() of a table in flight finishes
        first (its update lock)."""
        for rt in runtimes:
            with rt.update_lock:
                self._retire_table(rt, drop_persistent)

    def _retire_table(self, rt: TableRuntime, drop_persistent: bool) -> None:
        passes = [rt.pass_through] if rt.pass_through is not None else []
        pipes = list(rt.caches.values()) + list(rt.second_levels.values()) + passes
        for pipe in pipes:
            pipe.close()
        for token, target in list(_lower_targets.items()):
            if target[0]() is self and target[1] is rt:
                _lower_targets.pop(token, None)
                if token in self._tokens:
                    self._tokens.remove(token)
        rt.caches.clear()
        rt.second_levels.clear()
        rt.pass_through = None
        rt.files = None
        rt.load_source = None
        for tier in self.tiers:
            if (tier.persistent and not drop_persistent) or tier.read_only:
                continue
            if not tier.can_drop_tables:  # a Redis cluster: its rows stay (other servers may share them)
                log.warning("%s: %s cannot drop tables; its rows of the retired table stay", rt.tag, tier.name)
                continue
            try:
                tier.drop_table(rt.tag)
            except Exception:
                log.exception("dropping table %s from %s failed", rt.tag, tier.name)

    def _schedule_refresh(self, name: str, model: Any) -> None:
        """HPS's periodic refresh of a model's dynamic caches (cache.refresh_delay, cache.refresh_interval)."""
        cache = model.cache
        if cache.refresh_interval <= 0:
            return
        if self.refresher is None:
            from hps_core.refresher import PeriodicRefresher

            self.refresher = PeriodicRefresher(self)
        self.refresher.schedule(name, cache.refresh_delay, cache.refresh_interval)

    # ------------------------------------------------------------------ lifecycle

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this HierarchicalParameterServer is closed")

    def close(self) -> None:
        """Finish queued inserts, stop workers, close tiers. Idempotent."""
        if getattr(self, "_closed", True):
            return
        if getattr(self, "refresher", None) is not None:
            self.refresher.close()  # before closing: a pass in flight finishes on an open server
        self._closed = True
        if getattr(self, "update_consumer", None) is not None:
            self.update_consumer.close()  # no update starts after this; one in flight finishes below
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        # Lookups through a pipeline finish (each pipeline's close waits for its call in flight) or raise; then the
        # Python-side calls in flight (updates, refreshes, uncached lookups) finish; only then do the tiers close.
        for runtimes in list(getattr(self, "tables", {}).values()) + list(getattr(self, "_previous", {}).values()):
            for rt in runtimes:
                passes = [rt.pass_through] if rt.pass_through is not None else []
                for pipe in list(rt.caches.values()) + list(rt.second_levels.values()) + passes:
                    pipe.close()
        gate = getattr(self, "_gate", None)
        if gate is not None:
            gate.close()
        for token in getattr(self, "_tokens", []):
            _lower_targets.pop(token, None)
        # Drop what the tables hold (device state, mapped files), even if something still holds this object.
        for runtimes in list(getattr(self, "tables", {}).values()) + list(getattr(self, "_previous", {}).values()):
            for rt in runtimes:
                rt.caches.clear()
                rt.second_levels.clear()
                rt.pass_through = None
                rt.files = None
                rt.load_source = None
        for tier in getattr(self, "tiers", []):
            try:
                tier.close()
            except Exception:
                log.exception("closing tier %s failed", tier.name)

    def __enter__(self) -> "HierarchicalParameterServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


_default: HierarchicalParameterServer | None = None
_default_lock = threading.Lock()


def init(config: Any = None, **kwargs: Any) -> HierarchicalParameterServer:
    """Create (once per process) and return the default server; later calls return the same one (a later call
    with a different config raises ValueError: shutdown() first).

    Example:
        >>> hps = hps_core.init("my_hps_config.json")
    """
    global _default
    with _default_lock:
        if _default is None:
            if config is None:
                raise ValueError("hps_core.init() needs a config the first time it is called")
            _default = HierarchicalParameterServer(config, **kwargs)
        elif config is not None and hps_config.load_config(config) != _default.config:
            # Serving the first deployment's rows for another config would be wrong without a sign; the TF plugin's
            # Init only warns because HPS defines it as once per process (a SavedModel's recorded config path may
            # differ from the one the deployment started with). Here the caller asked for another deployment.
            raise ValueError(
                "hps_core.init(): a server is already running with a different config; call hps_core.shutdown() "
                "first to deploy another one (or init() without a config to get the running server)"
            )
        return _default


def default_server() -> HierarchicalParameterServer:
    """The server made by `init`; RuntimeError if there is none."""
    if _default is None:
        raise RuntimeError("no default HierarchicalParameterServer: call hps_core.init(config) first")
    return _default


def shutdown() -> None:
    """Close and forget the default server (tests, re-deployment)."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.close()
            _default = None

