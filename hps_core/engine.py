"""The hierarchical parameter server: one object per process serving every model, table and device.

Lookup path of one call (DESIGN.md):
  keys (any shape, int32/int64, on device d) -> validate -> cache[d].find -> misses compacted and de-duplicated
  -> tiers in order (host memory -> Redis Cluster -> RocksDB), each asked only for what the previous lacked
  -> the table's default vector for what is still missing -> merged into the output -> cache insert
  (synchronous, or queued to the cache's insert worker when the batch hit rate >= hit_rate_threshold:
  HPS semantics, where the current batch then gets the default vector for its misses).

Where it runs: a small batch (<= 65,536 keys on a GPU; any CPU batch) of a learning cache goes through one native
call, `hps::cache_lookup_host` (find, the miss plan with its one host sync, the host-memory tier's fetch, scatter,
insert); it hands back to Python only what it cannot finish (an async insert, rows the host map lacks: the lower
tiers). A large GPU batch runs the same steps as separate ops (find, an "all hit?" flag, `collect_misses` planning on
the device, `apply_misses`, insert). cuda_ext/csrc/miss_path.cpp holds the native half.

Nothing below the engine calls back up: tiers know nothing of caches, caches nothing of tiers (the engine hands the
host map's handle to the native miss path; the map itself stays the tier's).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

from hps_core import config as hps_config
from hps_core import ops, pipeline_ops
from hps_core.cache import EmbeddingCache
from hps_core.stats import TableStats
from hps_core.table_modes import HostMappedTable, HostMappedValues, StaticTable
from hps_core.tables import TableFiles, open_table
from hps_core.tiers.base import Tier

log = logging.getLogger(__name__)

_KEY_DTYPES = {"int64": torch.int64, "int32": torch.int32}


@dataclass
class CacheRuntime:
    """One embedding cache of one table on one device, with what serialises access to it."""

    cache: EmbeddingCache | StaticTable | HostMappedTable
    device: torch.device
    stats: TableStats = field(default_factory=TableStats)
    # One writer at a time and no find during a write: rows are never seen half-written.
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Bumped (under `lock`) by every update of the table; an insert of rows fetched before the bump is dropped,
    # so a cache can never re-learn a value older than an update.
    version: int = 0
    # [inserted, assigned, evicted, refused] summed on the cache's device: the lookup path never reads them back
    # (a sync); stats() does.
    insert_counts: Any = None
    insert_worker: concurrent.futures.ThreadPoolExecutor | None = None
    pending_inserts: int = 0
    max_pending_inserts: int = 1
    # GPU ordering: the lock orders launches on the host; on the device, kernels of one stream run in launch order
    # already, so only work on OTHER streams needs ordering (callers' streams, the insert worker's). These hold
    # the streams (by handle) whose reads / writes since the last write may still be running.
    _readers: dict = field(default_factory=dict)
    _writers: dict = field(default_factory=dict)

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the cache for a find/export: its kernels start after the writes already launched."""
        with self.lock:
            if self.device.type == "cuda":
                handle = torch._C._cuda_getCurrentRawStream(self.device.index)
                self._order_after(handle, self._writers)
                if handle not in self._readers:
                    self._readers[handle] = torch.cuda.current_stream(self.device)
            yield

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the cache for an insert/assign: its kernels start after every read and write already launched."""
        with self.lock:
            if self.device.type == "cuda":
                handle = torch._C._cuda_getCurrentRawStream(self.device.index)
                self._order_after(handle, self._readers)
                self._order_after(handle, self._writers)
                # Everything launched so far now precedes this write, so later work need only follow it.
                self._readers.clear()
                mine = self._writers.get(handle) or torch.cuda.current_stream(self.device)
                self._writers.clear()
                self._writers[handle] = mine
            yield

    def _order_after(self, handle: int, others: dict) -> None:
        """Make the current stream (raw `handle`) wait for the work launched so far on each other stream of
        `others`: an event recorded now covers everything launched there before, all of it under this lock.
        The usual case - one stream - costs one raw-handle read and no stream object."""
        current = None
        for other_handle, other in others.items():
            if other_handle != handle:
                current = current or torch.cuda.current_stream(self.device)
                current.wait_event(other.record_event())


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
    caches: dict[torch.device, CacheRuntime] = field(default_factory=dict)
    cache_lock: threading.Lock = field(default_factory=threading.Lock)
    uncached_stats: TableStats = field(default_factory=TableStats)
    host_values: HostMappedValues | None = None  # uvm mode: the rows, in pinned host memory, shared by devices

    @property
    def mode(self) -> str:
        """dynamic (a cache that learns), static (whole table on the device) or uvm (rows in host memory)."""
        return self.cache_config.type


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
        self._promote_into = [i for i, t in enumerate(self.tiers) if getattr(self._tier_config(t), "cache_missed_embeddings", False)]
        # The host-memory tier, when it is the first tier: the miss path fetches from its map natively.
        self._host_tier = self.tiers[0] if self.tiers and hasattr(self.tiers[0], "map_handle") else None
        self.tables: dict[str, list[TableRuntime]] = {}
        self._warned_cpu_fallback = False
        try:
            for model_name, model in self.config.models.items():
                runtimes = []
                for table_id, table_cfg in enumerate(model.tables):
                    rt = self._make_table(model_name, model, table_id, table_cfg, load=load, progress=progress)
                    runtimes.append(rt)
                self.tables[model_name] = runtimes
            for model_name, model in self.config.models.items():
                for device in self._devices_for(model_name, model.deployed_device_list):
                    for rt in self.tables[model_name]:
                        self._cache_for(rt, device, create=True)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ construction

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

    def _tier_config(self, tier: Tier) -> Any:
        return getattr(self.config.tiers, tier.name)

    def _make_table(self, model_name: str, model: Any, table_id: int, table_cfg: Any, *, load: bool,
                    progress: bool) -> TableRuntime:
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
        for tier in self.tiers:
            tier.create_table(rt.tag, rt.dim)
        if load:
            rt.files = open_table(table_cfg.path, table_cfg.dim, key_dtype=self.config.key_dtype)
            self._load_table(rt, progress)
        return rt

    def _load_table(self, rt: TableRuntime, progress: bool) -> None:
        files = rt.files
        for tier in self.tiers:
            if getattr(tier, "read_only", False):
                log.info("%s: %s is read-only, not loading %s", tier.name, rt.tag, files.path)
                continue
            if getattr(tier, "persistent", False) and tier.size(rt.tag) == files.num_keys:
                log.info("%s already holds %d rows of %s, not reloading", tier.name, files.num_keys, rt.tag)
                continue
            start = time.perf_counter()
            tier.load(rt.tag, files, progress=progress)
            log.info("loaded %d rows of %s into %s in %.2f s", files.num_keys, rt.tag, tier.name,
                     time.perf_counter() - start)

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

    def _cache_for(self, rt: TableRuntime, device: torch.device, *, create: bool = False) -> CacheRuntime | None:
        """The cache of `rt` on `device`; CPU keys get a CPU cache created on first use."""
        if not rt.cache_config.enabled:
            return None
        cr = rt.caches.get(device)
        if cr is not None:
            return cr
        if not create and device.type != "cpu":
            deployed = self.config.models[rt.model].deployed_device_list
            raise ValueError(
                f"model {rt.model!r} is not deployed on {device} (deployed_device_list {list(deployed)})"
            )
        with rt.cache_lock:
            cr = rt.caches.get(device)
            if cr is None:
                cr = self._new_cache(rt, device)
                rt.caches[device] = cr
        return cr

    def _new_cache(self, rt: TableRuntime, device: torch.device) -> CacheRuntime:
        cfg = rt.cache_config
        if rt.mode == "static":
            return CacheRuntime(cache=StaticTable(rt.files, device), device=device)
        if rt.mode == "uvm":
            if rt.host_values is None:
                rt.host_values = HostMappedValues(rt.files)
            return CacheRuntime(cache=HostMappedTable(rt.host_values, device), device=device)
        rows = rt.files.num_keys if rt.files is not None else self.tiers_size(rt.tag)
        capacity = max(int(cfg.ratio * max(rows, 1)), ops.bucket_size())
        cache = EmbeddingCache(capacity, rt.dim, device=device, policy=cfg.policy)
        cr = CacheRuntime(cache=cache, device=device, insert_counts=torch.zeros(4, dtype=torch.int64, device=device))
        cr.max_pending_inserts = max(1, int(cfg.num_worker_buffers))
        if cfg.hit_rate_threshold <= 1.0:
            cr.insert_worker = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"hps-insert-{rt.model}-{rt.name}-{device}"
            )
        if cfg.init and cfg.refresh_percentage > 0 and rt.files is not None:
            self._warm_up(rt, cr)
        return cr

    def _warm_up(self, rt: TableRuntime, cr: CacheRuntime) -> None:
        """HPS init_ec: fill the cache with the first rows of the table file."""
        n = min(rt.files.num_keys, cr.cache.num_slots)
        chunk = 1 << 16
        for start in range(0, n, chunk):
            keys = torch.from_numpy(rt.files.keys[start:start + chunk].copy())
            values = torch.from_numpy(rt.files.vectors[start:start + chunk].copy())
            with cr.writing():
                cr.cache.insert_or_assign(keys.to(cr.device), values.to(cr.device))

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

    def lookup(self, model: str, table: int | str, keys: torch.Tensor) -> torch.Tensor:
        """Embeddings of `keys`.

        Args:
            model: model name. table: table id (int) or name.
            keys: int32 or int64 tensor of any shape, on the CPU or a deployed CUDA device.

        Returns:
            float32 tensor of shape `keys.shape + (dim,)` on the keys' device.

        Example:
            >>> hps.lookup("demo", "user", torch.tensor([3, 7, 3]))  # (3, dim)
        """
        self._check_open()
        rt = self.table(model, table)
        self._check_keys(rt, keys)
        flat = keys.reshape(-1)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        cr = self._cache_for(rt, flat.device)
        if cr is None:
            out = self._lookup_uncached(rt, flat)
        else:
            out = self._lookup_cached(rt, cr, flat)
        return out.reshape(*keys.shape, rt.dim)

    def _lookup_uncached(self, rt: TableRuntime, flat: torch.Tensor) -> torch.Tensor:
        """HPS gpucache: false — every key position straight from the tiers, no de-duplication (a sort of the batch
        costs more than fetching a repeated row twice)."""
        stats = rt.uncached_stats
        start = time.perf_counter()
        keys64 = flat.to("cpu", torch.int64)
        t0 = time.perf_counter()
        rows = self._fetch_from_tiers(rt, keys64, stats)
        stats.latency["tiers"].record(time.perf_counter() - t0)
        out = rows.to(flat.device, non_blocking=True)
        stats.add(lookups=1, keys=flat.numel(), cache_misses=flat.numel())
        stats.latency["total"].record(time.perf_counter() - start)
        return out

    def _lookup_cached(self, rt: TableRuntime, cr: CacheRuntime, flat: torch.Tensor) -> torch.Tensor:
        stats = cr.stats
        lat = stats.latency
        start = time.perf_counter()
        n = flat.numel()
        if n == 0:
            stats.add(lookups=1)
            return torch.empty((0, rt.dim), dtype=torch.float32, device=flat.device)
        source = self._host_tier.map_handle(rt.tag) if self._host_tier is not None else -1
        learns = rt.mode == "dynamic"
        threshold = rt.cache_config.hit_rate_threshold
        async_ok = cr.insert_worker is not None and cr.pending_inserts < cr.max_pending_inserts
        if learns and (flat.device.type == "cpu" or n <= ops.host_plan_max_keys()):
            # One native call does find -> plan -> host-map fetch -> scatter -> insert (cache_lookup_host); it
            # leaves the plan to the code below only for an async insert or rows the host map lacks.
            cache = cr.cache
            cache.note_find(n)
            with cr.writing():
                (values, unique_keys, rows, in_source, index, misses, unique, source_hits, grouped,
                 done) = torch.ops.hps.cache_lookup_host(
                    cache.slot_keys, cache.digests, cache.scores, cache.values, cache.clock, flat,
                    cache.policy_code, source, cr.insert_counts, threshold if async_ok else 2.0)
                version = cr.version
            t_collect = time.perf_counter()
            lat["fused_lookup"].record(t_collect - start)
        else:
            with cr.reading():
                values, found = cr.cache.find(flat)
                version = cr.version
            t_find = time.perf_counter()
            lat["cache_find"].record(t_find - start)
            # A large batch checks "all hit?" on the device first (one flag read) rather than copying every key to
            # the host for collect_misses.
            if n > ops.host_plan_max_keys() and bool(found.all()):
                stats.add(lookups=1, keys=n, cache_hits=n)
                lat["total"].record(time.perf_counter() - start)
                return values
            num_buckets = cr.cache.num_buckets if learns else 0  # plan the keys in the cache's bucket order
            unique_keys, rows, in_source, index, misses, unique, source_hits, grouped = torch.ops.hps.collect_misses(
                flat, found, rt.dim, source, num_buckets)
            t_collect = time.perf_counter()
            lat["miss_compaction"].record(t_collect - t_find)
            done = misses == 0
        if misses and source >= 0:
            self._host_tier.record_fetch(rt.tag, unique, source_hits)
            stats.add_tier_hits(self._host_tier.name, source_hits)
        stats.add(lookups=1, keys=n, cache_hits=n - misses, cache_misses=misses, unique_misses=unique)
        if done:
            lat["total"].record(time.perf_counter() - start)
            return values

        hit_rate = 1.0 - misses / n
        if (learns and hit_rate >= threshold and cr.insert_worker is not None
                and cr.pending_inserts < cr.max_pending_inserts):
            # HPS async mode: the current batch gets defaults for its misses; the insert worker fetches them.
            rows.fill_(rt.default_value)
            torch.ops.hps.apply_misses(values, index, rows)
            stats.add(defaults_served=misses, async_insert_batches=1)
            with cr.lock:
                cr.pending_inserts += 1
            cr.insert_worker.submit(self._async_insert, rt, cr, unique_keys.clone(), version)
            lat["total"].record(time.perf_counter() - start)
            return values

        level = 1 if source >= 0 else 0
        if source_hits < unique:  # rows the host map lacks: the lower tiers, then the default vector
            missing = (~in_source).nonzero().squeeze(1)
            occurrences = torch.bincount(index[2 + misses:2 + 2 * misses], minlength=unique)
            self._fill_missing(rt, unique_keys, rows, missing, stats, level, occurrences)
        t_tiers = time.perf_counter()
        lat["tiers"].record(t_tiers - t_collect)
        dev_keys, dev_rows = torch.ops.hps.apply_misses(values, index, rows)
        t_merge = time.perf_counter()
        lat["merge"].record(t_merge - t_tiers)
        if learns:
            self._insert(rt, cr, dev_keys, dev_rows, version, grouped=grouped)
        lat["cache_insert"].record(time.perf_counter() - t_merge)
        lat["total"].record(time.perf_counter() - start)
        return values

    def _fetch_from_tiers(self, rt: TableRuntime, keys: torch.Tensor, stats: TableStats,
                          positions_per_key: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of int64 CPU `keys` from the tiers in order; the default vector for the rest.

        The first tier answers for every key into its own fresh buffer (no extra copy); later tiers are asked
        only for what is still missing. `stats.defaults_served` counts key positions: keys are weighted by how
        often they occurred when `positions_per_key` is given, else counted once each.
        """
        n = keys.numel()
        if not self.tiers:
            out = torch.empty((n, rt.dim), dtype=torch.float32)
            self._fill_missing(rt, keys, out, torch.arange(n), stats, 0, positions_per_key)
            return out
        first = self.tiers[0]
        out, found = first.fetch(rt.tag, keys)
        hits = int(found.count_nonzero())  # ~10x cheaper than nonzero(), which only a partial hit needs
        stats.add_tier_hits(first.name, hits)
        if hits < n:
            self._fill_missing(rt, keys, out, (~found).nonzero().squeeze(1), stats, 1, positions_per_key)
        return out

    def _fill_missing(self, rt: TableRuntime, keys: torch.Tensor, out: torch.Tensor, missing: torch.Tensor,
                      stats: TableStats, level: int, positions_per_key: torch.Tensor | None) -> None:
        """out[missing] = the rows of keys[missing] from tiers[level:] in order, the default vector for the rest.

        Rows found below a tier configured with cache_missed_embeddings are promoted into it.
        """
        for lvl in range(level, len(self.tiers)):
            if missing.numel() == 0:
                break
            tier = self.tiers[lvl]
            values, found = tier.fetch(rt.tag, keys.index_select(0, missing))
            hit_pos = found.nonzero().squeeze(1)
            hit_idx = missing.index_select(0, hit_pos)
            if hit_idx.numel():
                out.index_copy_(0, hit_idx, values.index_select(0, hit_pos))
                for upper in self._promote_into:
                    if upper < lvl and not getattr(self.tiers[upper], "read_only", False):
                        self.tiers[upper].insert(rt.tag, keys.index_select(0, hit_idx), out.index_select(0, hit_idx))
            stats.add_tier_hits(tier.name, hit_idx.numel())
            missing = missing[~found]
        if missing.numel():
            out.index_fill_(0, missing, rt.default_value)
            weight = (positions_per_key.index_select(0, missing).sum() if positions_per_key is not None
                      else missing.numel())
            stats.add(defaults_served=int(weight))

    def _insert(self, rt: TableRuntime, cr: CacheRuntime, keys: torch.Tensor, rows: torch.Tensor,
                version: int, grouped: bool = False) -> None:
        """Insert rows fetched under cache version `version` (dropped if an update came since). `grouped`: the keys
        are in the cache's bucket order (collect_misses planned them so), which needs no sort."""
        keys = keys.to(cr.device)
        rows = rows.to(cr.device)
        with cr.writing():
            if cr.version != version:
                cr.stats.add(stale_inserts_skipped=keys.numel())
                return
            if grouped:
                cr.cache.insert_grouped(keys, rows, cr.insert_counts)
            else:
                cr.insert_counts.add_(cr.cache.insert_or_assign_async(keys, rows))

    def _async_insert(self, rt: TableRuntime, cr: CacheRuntime, keys: torch.Tensor, version: int) -> None:
        try:
            rows = self._fetch_from_tiers(rt, keys, cr.stats, positions_per_key=torch.zeros(keys.numel(),
                                                                                            dtype=torch.int64))
            self._insert(rt, cr, keys, rows, version)
        except Exception:  # the worker must survive; the failure is visible in the log
            log.exception("asynchronous cache insert for %s on %s failed", rt.tag, cr.device)
        finally:
            with cr.lock:
                cr.pending_inserts -= 1

    def wait_for_inserts(self) -> None:
        """Block until every queued asynchronous cache insert has been applied."""
        for runtimes in self.tables.values():
            for rt in runtimes:
                for cr in list(rt.caches.values()):
                    if cr.insert_worker is not None:
                        cr.insert_worker.submit(lambda: None).result()

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
        read_only = [t.name for t in self.tiers if getattr(t, "read_only", False)]
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
        for tier in self.tiers:
            tier.insert(rt.tag, unique, rows)
        if rt.host_values is not None:
            self._update_host_mapped(rt, unique, rows)
        for cr in list(rt.caches.values()):
            if isinstance(cr.cache, HostMappedTable):
                continue
            dev_keys, dev_rows = unique.to(cr.device), rows.to(cr.device)
            with cr.writing():
                cr.version += 1
                cr.cache.assign(dev_keys, dev_rows)
            cr.stats.add(updates=1)

    def _update_host_mapped(self, rt: TableRuntime, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """uvm mode: overwrite the shared host rows once no device still reads them (locks held, streams drained)."""
        crs = list(rt.caches.values())
        for cr in crs:
            cr.lock.acquire()
        try:
            for cr in crs:
                if cr.device.type == "cuda":
                    torch.cuda.synchronize(cr.device)
            rt.host_values.assign(keys, rows)
            for cr in crs:
                cr.version += 1
                cr.stats.add(updates=1)
        finally:
            for cr in reversed(crs):
                cr.lock.release()

    def refresh(self, model: str | None = None, table: int | str | None = None, chunk_slots: int = 1 << 16) -> int:
        """Re-read every cached key of the selected tables from the tiers (HPS refresh); returns keys refreshed."""
        self._check_open()
        total = 0
        for rt in self._select(model, table):
            for cr in list(rt.caches.values()):
                if not isinstance(cr.cache, EmbeddingCache):
                    continue  # static / uvm tables are updated in place by update(); nothing cached to re-read
                slots = cr.cache.num_slots
                for start in range(0, slots, chunk_slots):
                    end = min(start + chunk_slots, slots)
                    with cr.reading():
                        keys, _ = cr.cache.export_batch(start, end)
                        version = cr.version
                    if keys.numel() == 0:
                        continue
                    rows = self._fetch_from_tiers(rt, keys.to("cpu", torch.int64), TableStats())
                    with cr.writing():
                        if cr.version == version:
                            cr.cache.assign(keys, rows.to(cr.device))
                            total += keys.numel()
                            cr.stats.add(refreshed_keys=keys.numel())
                        # else: an update raced this chunk; its rows are newer than ours.
        return total

    def _select(self, model: str | None, table: int | str | None) -> list[TableRuntime]:
        if model is None:
            return [rt for runtimes in self.tables.values() for rt in runtimes]
        if table is None:
            self.table(model, 0)
            return list(self.tables[model])
        return [self.table(model, table)]

    # ------------------------------------------------------------------ observability

    def stats(self) -> dict:
        """Counters per model / table / device (lookups, keys, cache hits, hits per tier, defaults served,
        inserts, evictions, refused inserts, latency percentiles per stage), plus per tier, plus memory."""
        out: dict = {"models": {}, "tiers": {}}
        for model, runtimes in self.tables.items():
            mdict = out["models"].setdefault(model, {})
            for rt in runtimes:
                tdict = {}
                for device, cr in rt.caches.items():
                    d = cr.stats.as_dict()
                    with cr.lock:
                        counts = cr.insert_counts.tolist() if cr.insert_counts is not None else [0, 0, 0, 0]
                    d["inserts"] += counts[0]
                    d["evictions"] += counts[2]
                    d["refused_inserts"] += counts[3]
                    d["mode"] = rt.mode
                    if isinstance(cr.cache, EmbeddingCache):
                        d["cache_size"] = cr.cache.size()
                        d["cache_slots"] = cr.cache.num_slots
                    d["cache_memory_bytes"] = cr.cache.memory_bytes()
                    tdict[str(device)] = d
                if not rt.cache_config.enabled:
                    tdict["uncached"] = rt.uncached_stats.as_dict()
                mdict[rt.name] = tdict
        for tier in self.tiers:
            out["tiers"][tier.name] = {tag: vars(s).copy() for tag, s in tier.stats().items()}
        return out

    # ------------------------------------------------------------------ lifecycle

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this HierarchicalParameterServer is closed")

    def close(self) -> None:
        """Finish queued inserts, stop workers, close tiers. Idempotent."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for runtimes in getattr(self, "tables", {}).values():
            for rt in runtimes:
                for cr in rt.caches.values():
                    if cr.insert_worker is not None:
                        cr.insert_worker.shutdown(wait=True)
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
    """Create (once per process) and return the default server; later calls return the same one.

    Example:
        >>> hps = hps_core.init("my_hps_config.json")
    """
    global _default
    with _default_lock:
        if _default is None:
            if config is None:
                raise ValueError("hps_core.init() needs a config the first time it is called")
            _default = HierarchicalParameterServer(config, **kwargs)
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

