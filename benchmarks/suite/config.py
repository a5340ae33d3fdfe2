"""Schemas of the benchmark suite's configs (conf/bench_run.yaml + conf/bench/<name>.yaml) and their checks.

A composed config is merged into the schema of its bench (`SCHEMAS[cfg.name]`): OmegaConf rejects wrong types
and unknown keys naming the key; `check()` then rejects out-of-range values with a ValueError that names the key,
the value found and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

DEVICES = ("auto", "cpu", "cuda")
DISTRIBUTIONS = ("uniform", "zipf")
KEY_DTYPES = ("int32", "int64")
POLICIES = ("lru", "lfu")
HIT_RATE_POLICIES = ("lru", "lfu", "tinylfu")
TIERS = ("host_memory", "redis_cluster", "rocksdb")
PRECISIONS = ("fp32", "tf32", "bf16")
DLRM_VARIANTS = ("hps_engine", "native", "tf_plugin", "tf_native")


class BenchConfigError(ValueError):
    """A benchmark config value out of range; the message names the key and the value."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        super().__init__(f"{key} = {value!r}: {allowed}")
        self.key, self.value = key, value


@dataclass
class Common:
    """Keys of every run (conf/bench_run.yaml)."""

    name: str = "?"  # which bench; set by conf/bench/<file>.yaml
    device: str = "auto"  # auto = cuda when torch sees a GPU, else cpu
    out_dir: Optional[str] = None  # None: Hydra's output directory of the job
    seed: int = 0
    plots: bool = True
    title: str = ""  # free text shown in the report (e.g. "smoke")
    # Stop starting new cases after this many seconds (0: no limit); what ran is reported, the rest counted.
    # For machines that kill a command after a fixed time (the GPU machine: 10 minutes, table creation included).
    max_wall_s: float = 0.0

    def check(self) -> None:
        _one_of("device", self.device, DEVICES)
        if self.max_wall_s < 0:
            raise BenchConfigError("max_wall_s", self.max_wall_s, "must be >= 0 (0: no limit)")


@dataclass
class LookupBench(Common):
    """Engine lookup keys/s and latency over keys per call x dim x cache ratio x key distribution x key dtype."""

    rows: int = 4_000_000
    dims: List[int] = field(default_factory=lambda: [16, 128])
    keys_per_call: List[int] = field(default_factory=lambda: [26_624, 425_984, 3_407_872])
    cache_ratios: List[float] = field(default_factory=lambda: [0.05, 0.2, 1.0])
    distributions: List[str] = field(default_factory=lambda: ["uniform", "zipf"])
    zipf_alphas: List[float] = field(default_factory=lambda: [1.05])
    key_dtypes: List[str] = field(default_factory=lambda: ["int64", "int32"])
    devices: List[str] = field(default_factory=lambda: ["auto"])
    policy: str = "lru"
    hit_rate_threshold: float = 1.1  # > 1: misses are inserted synchronously, every lookup returns stored rows
    warmup_keys_factor: float = 2.0  # warm-up calls until this many x cache rows keys went through the cache
    warmup_max_calls: int = 300
    repeats: int = 30  # timed calls at most per case
    case_budget_s: float = 1.0  # stop timing a case after this long (at least min_repeats calls)
    min_repeats: int = 3
    baselines: List[str] = field(default_factory=lambda: ["f_embedding", "numpy_searchsorted"])
    host_partitions: int = 16

    def check(self) -> None:
        super().check()
        _int_at_least("rows", self.rows, 1)
        _list_of("dims", self.dims, lambda v: isinstance(v, int) and v >= 1, "integers >= 1")
        _list_of("keys_per_call", self.keys_per_call, lambda v: isinstance(v, int) and v >= 1, "integers >= 1")
        _list_of("cache_ratios", self.cache_ratios, lambda v: 0 < v <= 1, "numbers in (0, 1]")
        _list_of("distributions", self.distributions, lambda v: v in DISTRIBUTIONS, f"names in {DISTRIBUTIONS}")
        if "zipf" in self.distributions:
            _list_of("zipf_alphas", self.zipf_alphas, lambda v: v > 0, "numbers > 0")
        _list_of("key_dtypes", self.key_dtypes, lambda v: v in KEY_DTYPES, f"names in {KEY_DTYPES}")
        _list_of("devices", self.devices, lambda v: v in DEVICES, f"names in {DEVICES}")
        _one_of("policy", self.policy, POLICIES)
        _list_of("baselines", self.baselines, lambda v: v in ("f_embedding", "numpy_searchsorted"),
                 "names in ('f_embedding', 'numpy_searchsorted')", allow_empty=True)
        if self.hit_rate_threshold <= 0:
            raise BenchConfigError("hit_rate_threshold", self.hit_rate_threshold, "must be > 0")
        for key in ("warmup_max_calls", "repeats", "min_repeats", "host_partitions"):
            _int_at_least(key, getattr(self, key), 1)
        if self.min_repeats > self.repeats:
            raise BenchConfigError("min_repeats", self.min_repeats, f"must be <= repeats ({self.repeats})")
        _positive("case_budget_s", self.case_budget_s)
        if self.warmup_keys_factor < 0:
            raise BenchConfigError("warmup_keys_factor", self.warmup_keys_factor, "must be >= 0")
        if max(self.keys_per_call) > 2**31 - 1:
            raise BenchConfigError("keys_per_call", self.keys_per_call, "each must be < 2^31")


@dataclass
class HitRateBench(Common):
    """Hit rate of the cache's LRU and LFU against Belady's offline optimum on the same Zipf traces."""

    rows: int = 1_000_000  # key universe
    trace_keys: int = 2_000_000
    zipf_alphas: List[float] = field(default_factory=lambda: [0.8, 1.05, 1.2])
    cache_ratios: List[float] = field(default_factory=lambda: [0.001, 0.005, 0.01, 0.02, 0.05, 0.1])
    # lru, lfu, and tinylfu = lfu with the admission sketch (EmbeddingCache admission="tinylfu")
    policies: List[str] = field(default_factory=lambda: ["lru", "lfu", "tinylfu"])
    batch_keys: int = 256  # keys per find call of the real cache
    dim: int = 1  # row width in the cache: values do not matter here, only which keys are resident
    fully_associative_lru: bool = True  # also simulate an exact LRU of the same capacity (a reference)
    # Issue 16: at equal HBM bytes, a cache of compact rows holds more slots. For these alphas, each storage's
    # cache of the bytes the float32 cache of the point takes (rows of equal_bytes_dim plus the 13 bytes of a slot's
    # key, digest and score) is replayed too (policies lru and tinylfu).
    equal_bytes_storages: List[str] = field(default_factory=lambda: ["float16", "int8"])
    equal_bytes_alphas: List[float] = field(default_factory=lambda: [1.05])
    equal_bytes_dim: int = 128

    def check(self) -> None:
        super().check()
        _int_at_least("rows", self.rows, 2)
        _int_at_least("trace_keys", self.trace_keys, 1)
        _list_of("zipf_alphas", self.zipf_alphas, lambda v: v > 0, "numbers > 0")
        _list_of("cache_ratios", self.cache_ratios, lambda v: 0 < v <= 1, "numbers in (0, 1]")
        _list_of("policies", self.policies, lambda v: v in HIT_RATE_POLICIES, f"names in {HIT_RATE_POLICIES}")
        _int_at_least("batch_keys", self.batch_keys, 1)
        _int_at_least("dim", self.dim, 1)
        from hps_core.config import STORAGES

        _list_of("equal_bytes_storages", self.equal_bytes_storages, lambda v: v in STORAGES, "storage names")
        _list_of("equal_bytes_alphas", self.equal_bytes_alphas, lambda v: v > 0, "numbers > 0")
        _int_at_least("equal_bytes_dim", self.equal_bytes_dim, 4)


@dataclass
class TiersBench(Common):
    """Fetch rates of the host-memory map, a local Redis Cluster and RocksDB, same rows, same batches."""

    rows: int = 200_000
    dims: List[int] = field(default_factory=lambda: [16, 128])
    batch_keys: List[int] = field(default_factory=lambda: [1024, 26_624])
    # NOTE: not named `tiers`: conf/tiers/ is a config group (of the deployment root) that Hydra would take it for.
    backends: List[str] = field(default_factory=lambda: list(TIERS))
    batches: int = 30  # timed fetches per (tier, dim, batch size)
    warmup: int = 3
    redis_nodes: int = 3
    redis_partitions: int = 8
    rocksdb_threads: int = 0  # 0: one per core
    storages: List[str] = field(default_factory=lambda: ["float32"])  # how the tiers keep the rows (hps_core.storage)

    def check(self) -> None:
        super().check()
        _int_at_least("rows", self.rows, 1)
        _list_of("dims", self.dims, lambda v: isinstance(v, int) and v >= 1, "integers >= 1")
        _list_of("batch_keys", self.batch_keys, lambda v: isinstance(v, int) and v >= 1, "integers >= 1")
        _list_of("backends", self.backends, lambda v: v in TIERS, f"names in {TIERS}")
        _int_at_least("batches", self.batches, 1)
        _int_at_least("warmup", self.warmup, 0)
        _int_at_least("redis_nodes", self.redis_nodes, 3)  # a Redis Cluster needs 3 masters
        from hps_core.config import STORAGES

        _list_of("storages", self.storages, lambda v: v in STORAGES, "storage names")
        _int_at_least("redis_partitions", self.redis_partitions, 1)
        _int_at_least("rocksdb_threads", self.rocksdb_threads, 0)


@dataclass
class DlrmBench(Common):
    """Per-batch forward latency of the HPS DLRM benchmark model (26 slots sharing one table, dim 128)."""

    rows: int = 32_709_138
    dim: int = 128
    slots: int = 26
    dense_features: int = 13
    bottom_mlp: List[int] = field(default_factory=lambda: [512, 256, 128])
    top_mlp: List[int] = field(default_factory=lambda: [1024, 1024, 512, 256, 1])
    batch_sizes: List[int] = field(
        default_factory=lambda: [32, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072])
    zipf_alpha: float = 1.05
    cache_ratio: float = 0.2
    key_dtype: str = "int32"  # as HPS's DLRM benchmark
    # HPS replays one batch per size (after one warm-up call: all hits, "best case"); false draws a new batch per call.
    replay_same_batch: bool = True
    variants: List[str] = field(default_factory=lambda: ["hps_engine", "native"])
    precision: str = "tf32"  # matmuls of the MLPs / interaction: fp32 | tf32 | bf16 (autocast)
    cuda_graph_max_batch: int = 0  # GPU: replay the MLP part as a CUDA graph for batches <= this (0: never)
    repeats: int = 30
    min_repeats: int = 3
    warmup: int = 3
    batch_budget_s: float = 2.0  # per (variant, batch size)
    host_partitions: int = 16
    published: Dict[str, Any] = field(default_factory=dict)  # HPS's published numbers (conf/bench/dlrm.yaml)
    # Issue 16: the model's outputs with the table kept in each of these storages (an engine per storage, a static
    # table, the same batch) against float32 storage: max / mean abs difference. [] skips it.
    storage_error: List[str] = field(default_factory=lambda: ["float16", "bfloat16", "int8", "fp8_e4m3"])
    storage_error_batch: int = 4096

    def check(self) -> None:
        super().check()
        for key in ("rows", "dim", "slots", "dense_features", "repeats", "min_repeats", "host_partitions"):
            _int_at_least(key, getattr(self, key), 1)
        _int_at_least("warmup", self.warmup, 0)
        _int_at_least("cuda_graph_max_batch", self.cuda_graph_max_batch, 0)
        _list_of("bottom_mlp", self.bottom_mlp, lambda v: isinstance(v, int) and v >= 1, "integers >= 1")
        _list_of("top_mlp", self.top_mlp, lambda v: isinstance(v, int) and v >= 1, "integers >= 1")
        if self.bottom_mlp[-1] != self.dim:
            raise BenchConfigError("bottom_mlp", self.bottom_mlp,
                                   f"must end in dim ({self.dim}): the dense vector joins the dot interaction")
        if self.top_mlp[-1] != 1:
            raise BenchConfigError("top_mlp", self.top_mlp, "must end in 1 (the click probability)")
        _list_of("batch_sizes", self.batch_sizes, lambda v: isinstance(v, int) and v >= 1, "integers >= 1")
        _positive("zipf_alpha", self.zipf_alpha)
        if not 0 < self.cache_ratio <= 1:
            raise BenchConfigError("cache_ratio", self.cache_ratio, "must be in (0, 1]")
        _one_of("key_dtype", self.key_dtype, KEY_DTYPES)
        if self.key_dtype == "int32" and self.rows > 2**31 - 1:
            raise BenchConfigError("rows", self.rows, "int32 keys address at most 2^31 - 1 rows")
        _list_of("variants", self.variants, lambda v: v in DLRM_VARIANTS, f"names in {DLRM_VARIANTS}")
        _one_of("precision", self.precision, PRECISIONS)
        from hps_core.config import STORAGES

        _list_of("storage_error", self.storage_error, lambda v: v in STORAGES, "storage names")
        _int_at_least("storage_error_batch", self.storage_error_batch, 1)
        if self.min_repeats > self.repeats:
            raise BenchConfigError("min_repeats", self.min_repeats, f"must be <= repeats ({self.repeats})")
        _positive("batch_budget_s", self.batch_budget_s)


SCHEMAS = {"lookup": LookupBench, "hit_rate": HitRateBench, "tiers": TiersBench, "dlrm": DlrmBench}


def to_schema(cfg: DictConfig) -> Common:
    """The composed config (without Hydra's own node) as its bench's dataclass, type- and range-checked.

    Raises:
        BenchConfigError / ValueError: unknown bench name, a value of the wrong type, an unknown key, or a value
            out of range; the message names the key and the value.
    """
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    name = plain.get("name")
    if name not in SCHEMAS:
        raise BenchConfigError("name", name, f"must be one of {sorted(SCHEMAS)} (set by conf/bench/<file>.yaml)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SCHEMAS[name]), plain)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        # OmegaConf's message already carries full_key and the offending value; keep it, say which bench.
        raise ValueError(f"bench {name!r}: invalid config: {exc}") from None
    obj.check()
    return obj


# ------------------------------------------------------------------------------------------------ helpers


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise BenchConfigError(key, value, f"must be one of {list(allowed)}")


def _int_at_least(key: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BenchConfigError(key, value, f"must be an integer >= {minimum}")


def _positive(key: str, value: Any) -> None:
    if not value > 0:
        raise BenchConfigError(key, value, "must be > 0")


def _list_of(key: str, values: Any, ok, what: str, allow_empty: bool = False) -> None:
    if not values and not allow_empty:
        raise BenchConfigError(key, values, f"must be a non-empty list of {what}")
    for i, v in enumerate(values):
        if not ok(v):
            raise BenchConfigError(f"{key}[{i}]", v, f"entries of {key} must be {what}")
