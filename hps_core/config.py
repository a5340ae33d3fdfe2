"""Deployment configuration: dataclass schemas, Hydra ConfigStore registration, the HPS-JSON reader, validation.

One schema (`DeploymentConfig`) describes everything the engine deploys: models and their tables, the per-device
embedding cache of each model, the storage tiers below the caches (host memory -> Redis Cluster -> RocksDB) and the
(not yet consumed) Kafka update source. It can come from

- Hydra YAML in `conf/` (the native form; compose it, then `load_config(cfg)`),
- a plain dict or a `.yaml`/`.yml` file in the same shape,
- an unchanged HugeCTR HPS JSON file (`.json`), read with HPS's key names, parser defaults and enum aliases,

and every path ends in `validate()`, which type-checks strictly, normalises enum aliases and raises `ConfigError`
(a ValueError) naming the key path, the value found and what is allowed. Nothing is logged-and-continued.

This module imports neither torch nor tensorflow: it must stay cheap to import.
"""

import collections.abc
import copy
import dataclasses
import difflib
import json
import logging
import math
import os
import re
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

logger = logging.getLogger(__name__)

__all__ = [
    "ConfigError",
    "TableConfig",
    "CacheConfig",
    "ModelConfig",
    "HostMemoryTierConfig",
    "RedisClusterTierConfig",
    "RocksDBTierConfig",
    "TiersConfig",
    "UpdateSourceConfig",
    "DeploymentConfig",
    "RunConfig",
    "register_configs",
    "load_config",
    "read_hps_json",
    "validate",
    "to_yaml",
    "NAME_PATTERN",
    "MAX_INT64",
    "OVERFLOW_POLICIES",
]

# Model and table names become parts of the table tag "hps_et.<model>.<table>" in every tier.
NAME_PATTERN = r"[a-zA-Z0-9_\-]{1,120}"
_NAME_RE = re.compile(NAME_PATTERN)
# HPS writes "no limit" as 2^64-1 (size_t); we hold sizes as signed 64-bit and clamp to this.
MAX_INT64 = 2**63 - 1
_DEFAULT_NUM_PARTITIONS = min(16, os.cpu_count() or 1)


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, unknown, or out of range.

    Attributes:
        path: key path of the offending value, e.g. "models.demo.tables[1].dim" (HPS JSON: "models[0].gpucacheper").
        value: the value found (None when the key is missing).
    """

    def __init__(self, path: str, value: Any, message: str):
        self.path = path
        self.value = value
        super().__init__(f"{path or '<root>'} = {value!r}: {message}")


_SAME = object()


def _hps(key: str, default: Any = _SAME, json_type: Any = None, convert: Any = None) -> Dict[str, Any]:
    """Field metadata naming the HPS JSON key a field is read from (shown in validation errors); `read_hps_json`
    derives its key tables and builds the dataclasses from it. Only what the field does not say is stated here:

    - default: HPS's parser default where it differs from the field's (MISSING: HPS requires the key). A
      TableConfig field's JSON value is a per-table list, required unless a default is given;
    - json_type: the JSON value's type where it is not the field's own (a per-table list is derived, not stated);
    - convert: JSON value -> field value, where a json_type is given.
    """
    md: Dict[str, Any] = {"hps": key}
    if default is not _SAME:
        md["hps_default"] = default
    if json_type is not None:
        md["hps_json_type"], md["hps_convert"] = json_type, convert
    return md


def _comma_list(value: str) -> List[str]:
    return [a.strip() for a in value.split(",") if a.strip()]


def _key_dtype_of(supportlonglong: bool) -> str:
    return "int64" if supportlonglong else "int32"


# --------------------------------------------------------------------------------------------------------------
# Schemas. Required fields hold omegaconf.MISSING ("???"); lists and nested configs use default_factory.
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TableConfig:
    """One embedding table of a model; its id is its index in `ModelConfig.tables`."""

    name: str = field(default=MISSING, metadata=_hps("embedding_table_names", default=None))  # sparse_embedding<i>
    path: str = field(default=MISSING, metadata=_hps("sparse_files"))  # directory holding `key` and `emb_vector`
    dim: int = field(default=MISSING, metadata=_hps("embedding_vecsize_per_table"))
    max_keys_per_sample: int = field(default=1, metadata=_hps("maxnum_catfeature_query_per_table_per_sample"))
    default_value: float = field(default=0.0, metadata=_hps("default_value_for_each_table"))
    admission: str = ""  # ours: "" = the model cache's admission, or none | tinylfu for this table
    storage: str = ""  # ours: "" = the model cache's storage, or a storage dtype for this table (hps_core.storage)


@dataclass
class CacheConfig:
    """The per-device embedding cache of one model (HPS "GPU embedding cache")."""

    enabled: bool = field(default=True, metadata=_hps("gpucache"))
    ratio: float = field(default=0.2, metadata=_hps("gpucacheper"))  # cache rows / table rows, in (0, 1]
    policy: str = field(default="lru", metadata=_hps("gpucache_policy"))  # ours (HPS had LRU only): lru | lfu
    # Admission below a dynamic LFU cache: none, or tinylfu - a frequency sketch of the misses lets a key evict only
    # when it was seen more often than the victim was hit (HPS-style key: gpucache_admission). A table may override
    # it (tables[i].admission).
    admission: str = field(default="none", metadata=_hps("gpucache_admission"))
    # dynamic | static | uvm; alias stochastic -> dynamic (HPS: use_static_table true forces static)
    type: str = field(default="dynamic", metadata=_hps("embedding_cache_type"))
    # Insert asynchronously iff the batch hit rate >= threshold; values > 1 mean always synchronous.
    hit_rate_threshold: float = field(default=0.9, metadata=_hps("hit_rate_threshold"))
    refresh_percentage: float = field(default=0.0, metadata=_hps("cache_refresh_percentage_per_iteration"))
    refresh_delay: float = field(default=0.0, metadata=_hps("refresh_delay"))  # seconds
    refresh_interval: float = field(default=0.0, metadata=_hps("refresh_interval"))  # seconds
    init: bool = field(default=True, metadata=_hps("init_ec"))  # allow start-up warm-up of the cache
    # Below a dynamic cache (ratio < 1): none, or host_mapped - the whole table in pinned host memory behind an
    # index (one copy shared by every GPU of the process), read for the cache's misses before the tiers.
    second_level: str = field(default="none", metadata=_hps("gpucache_second_level"))
    # 1..256; HPS's docs say 2, its parser uses 1
    num_worker_buffers: int = field(default=1, metadata=_hps("num_of_worker_buffer_in_pool"))
    num_refresher_buffers: int = field(default=1, metadata=_hps("num_of_refresher_buffer_in_pool"))  # 1..256
    use_context_stream: bool = field(default=True, metadata=_hps("use_context_stream"))
    enable_pagelock: bool = field(default=False, metadata=_hps("enable_pagelock"))
    # HPS: fp8 rows in static tables (its tiers kept float32). Here: a static table's storage becomes fp8_e4m3
    # (row-wise scale), in its tiers too - one storage per table, so rows move between levels as the same bytes.
    fp8_quant: bool = field(default=False, metadata=_hps("fp8_quant"))
    # How the table keeps its rows, in every tier (host memory, Redis, RocksDB) and device table (cache, static /
    # uvm table, host-mapped second level): float32 | float16 | bfloat16 | int8 (row-wise scale + bias) | fp8_e4m3
    # (row-wise scale) - hps_core.storage states each one's error. Rows are encoded once (load, update) and copied
    # as bytes from then on; lookups return float32 (or the dtype asked for). A table may override it
    # (tables[i].storage).
    storage: str = field(default="float32", metadata=_hps("embedding_storage_dtype"))
    thread_pool_size: int = field(default=16, metadata=_hps("thread_pool_size"))
    # Accepted for compatibility with HPS JSON; has no effect here.
    use_hctr_cache_implementation: bool = field(default=True, metadata=_hps("use_hctr_cache_implementation"))


@dataclass
class ModelConfig:
    """One deployed model: its tables, the devices it runs on, its cache."""

    tables: List[TableConfig] = field(default_factory=list)  # non-empty after validation; table id = index
    deployed_device_list: List[int] = field(default_factory=lambda: [0],
                                            metadata=_hps("deployed_device_list", default=MISSING))
    max_batch_size: int = field(default=64, metadata=_hps("max_batch_size"))  # per device
    cache: CacheConfig = field(default_factory=CacheConfig)
    dense_file: str = field(default="", metadata=_hps("dense_file"))  # unused by lookups
    maxnum_des_feature_per_sample: int = field(default=26, metadata=_hps("maxnum_des_feature_per_sample"))
    # Effective only when DeploymentConfig.fuse_embedding_table is true (HPS reads it, default true, only then).
    fuse_embedding_table: bool = field(default=False, metadata=_hps("fuse_embedding_table", default=True))


@dataclass
class HostMemoryTierConfig:
    """Partitioned in-process hash map (HPS volatile_db of type hash_map / parallel_hash_map)."""

    enabled: bool = True
    num_partitions: int = field(default=_DEFAULT_NUM_PARTITIONS, metadata=_hps("volatile_db.num_partitions"))
    allocation_rate: int = field(default=256 * 1024**2, metadata=_hps("volatile_db.allocation_rate"))  # bytes
    # Max entries per partition; HPS's 2^64-1 ("no limit", its parser default) maps to 2^63-1.
    overflow_margin: int = field(default=MAX_INT64, metadata=_hps("volatile_db.overflow_margin"))
    # evict_random | evict_least_used | evict_oldest (aliases random, least_used, oldest)
    overflow_policy: str = field(default="evict_random", metadata=_hps("volatile_db.overflow_policy"))
    overflow_resolution_target: float = field(default=0.8, metadata=_hps("volatile_db.overflow_resolution_target"))
    initial_cache_rate: float = field(default=1.0, metadata=_hps("volatile_db.initial_cache_rate"))
    cache_missed_embeddings: bool = field(default=False, metadata=_hps("volatile_db.cache_missed_embeddings"))
    max_batch_size: int = field(default=65536, metadata=_hps("volatile_db.max_batch_size"))


@dataclass
class RedisClusterTierConfig:
    """Redis Cluster tier (HPS volatile_db of type redis_cluster)."""

    enabled: bool = False
    # HPS gives one string "host[:port],host[:port]"; here it is a list.
    address: List[str] = field(default_factory=lambda: ["127.0.0.1:7000"], metadata=_hps(
        "volatile_db.address", default="127.0.0.1:7000", json_type=str, convert=_comma_list))
    user_name: str = field(default="default", metadata=_hps("volatile_db.user_name"))
    password: str = field(default="", metadata=_hps("volatile_db.password"))
    # HPS's parser default is the host tier's for every type (its docs say 8 for redis).
    num_partitions: int = field(default=8, metadata=_hps("volatile_db.num_partitions",
                                                         default=_DEFAULT_NUM_PARTITIONS))
    num_node_connections: int = field(default=5, metadata=_hps("volatile_db.num_node_connections"))
    max_batch_size: int = field(default=65536, metadata=_hps("volatile_db.max_batch_size"))
    overflow_margin: int = field(default=MAX_INT64, metadata=_hps("volatile_db.overflow_margin"))
    overflow_policy: str = field(default="evict_random", metadata=_hps("volatile_db.overflow_policy"))
    overflow_resolution_target: float = field(default=0.8, metadata=_hps("volatile_db.overflow_resolution_target"))
    enable_tls: bool = field(default=False, metadata=_hps("volatile_db.enable_tls"))
    tls_ca_certificate: str = field(default="cacertbundle.crt", metadata=_hps("volatile_db.tls_ca_certificate"))
    tls_client_certificate: str = field(
        default="client_cert.pem", metadata=_hps("volatile_db.tls_client_certificate")
    )
    tls_client_key: str = field(default="client_key.pem", metadata=_hps("volatile_db.tls_client_key"))
    tls_server_name_identification: str = field(
        default="redis.localhost", metadata=_hps("volatile_db.tls_server_name_identification")
    )
    timeout_ms: int = 500  # ours: per-request socket timeout
    cache_missed_embeddings: bool = field(default=False, metadata=_hps("volatile_db.cache_missed_embeddings"))


@dataclass
class RocksDBTierConfig:
    """RocksDB tier (HPS persistent_db of type rocks_db)."""

    enabled: bool = False
    path: str = field(default=os.path.join(tempfile.gettempdir(), "rocksdb"), metadata=_hps("persistent_db.path"))
    num_threads: int = field(default=16, metadata=_hps("persistent_db.num_threads"))
    read_only: bool = field(default=False, metadata=_hps("persistent_db.read_only"))
    max_batch_size: int = field(default=65536, metadata=_hps("persistent_db.max_batch_size"))


@dataclass
class TiersConfig:
    """The storage tiers shared by every model, in lookup order."""

    host_memory: HostMemoryTierConfig = field(default_factory=HostMemoryTierConfig)
    redis_cluster: RedisClusterTierConfig = field(default_factory=RedisClusterTierConfig)
    rocksdb: RocksDBTierConfig = field(default_factory=RocksDBTierConfig)


@dataclass
class UpdateSourceConfig:
    """Online updates. HPS's Kafka source (kafka_message_queue) is parsed and validated but not consumed; ours,
    redis_stream, is: a Redis stream at `brokers` (host:port) read in consumer group `group` (one group per server:
    every server gets every update), applied through update() (hps_core.update_stream)."""

    type: str = field(default="none", metadata=_hps("update_source.type"))  # none | kafka_message_queue | redis_stream
    stream: str = field(default="hps_updates", metadata=_hps("update_source.stream"))
    group: str = field(default="", metadata=_hps("update_source.group"))  # required for redis_stream
    consumer: str = field(default="c0", metadata=_hps("update_source.consumer"))
    brokers: str = field(default="127.0.0.1:9092", metadata=_hps("update_source.brokers"))
    metadata_refresh_interval_ms: int = field(
        default=30000, metadata=_hps("update_source.metadata_refresh_interval_ms")
    )
    receive_buffer_size: int = field(default=262144, metadata=_hps("update_source.receive_buffer_size"))
    poll_timeout_ms: int = field(default=500, metadata=_hps("update_source.poll_timeout_ms"))
    max_batch_size: int = field(default=8192, metadata=_hps("update_source.max_batch_size"))
    failure_backoff_ms: int = field(default=50, metadata=_hps("update_source.failure_backoff_ms"))
    max_commit_interval: int = field(default=32, metadata=_hps("update_source.max_commit_interval"))


@dataclass
class DeploymentConfig:
    """Everything one parameter server deploys.

    Example:
        >>> cfg = load_config({"models": {"demo": {"tables": [{"name": "t0", "path": "/data/t0", "dim": 16}]}}})
        >>> cfg.models["demo"].tables[0].dim, cfg.key_dtype, cfg.tiers.host_memory.enabled
        (16, 'int64', True)
    """

    key_dtype: str = field(default="int64", metadata=_hps("supportlonglong", default=MISSING, json_type=bool,
                                                          convert=_key_dtype_of))  # int64 | int32
    models: Dict[str, ModelConfig] = field(default_factory=dict)  # key = model name; non-empty after validation
    tiers: TiersConfig = field(default_factory=TiersConfig)
    update_source: UpdateSourceConfig = field(default_factory=UpdateSourceConfig)
    fuse_embedding_table: bool = field(default=False, metadata=_hps("fuse_embedding_table"))
    # Prometheus `/metrics` of this server (hps_core.metrics): a TCP port on the loopback interface, 0 = off
    # (HPS-style key: metrics_port).
    metrics_port: int = field(default=0, metadata=_hps("metrics_port"))


@dataclass
class RunConfig(DeploymentConfig):
    """Root schema of a composed Hydra config (`conf/config.yaml`): a DeploymentConfig plus run-level sections.

    `data_dir` is interpolated into table paths; `bench` is where `conf/bench/` options land; `demo` holds the
    settings of `python -m hps_core.demo` (`conf/demo.yaml`). `load_config` drops them (they describe the run, not
    the deployment) without resolving them. The root is a closed (struct) schema so that a mistyped top-level key
    fails at compose time: a new run-level section must be declared here.
    """

    data_dir: str = "./hps_data"
    bench: Any = None
    demo: Any = None


_RUN_ONLY_KEYS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name not in
                       {g.name for g in dataclasses.fields(DeploymentConfig)})


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore so that the YAML in `conf/` is validated against them.

    Call once before composing `conf/` (idempotent). Stored nodes:
      - `deployment_schema` (root, RunConfig), used by `conf/config.yaml`'s defaults list;
      - `model/model_schema` (ModelConfig), used by each `conf/model/*.yaml`;
      - `tiers/tiers_schema` (TiersConfig), used by each `conf/tiers/*.yaml`.

    Example:
        >>> from hydra import compose, initialize_config_dir
        >>> register_configs()
        >>> with initialize_config_dir(config_dir="/abs/path/conf", version_base="1.3"):  # doctest: +SKIP
        ...     cfg = load_config(compose(config_name="config", overrides=["tiers=host_rocksdb"]))
    """
    from hydra.core.config_store import ConfigStore  # imported here: hydra is only needed for composing

    cs = ConfigStore.instance()
    cs.store(name="deployment_schema", node=RunConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="tiers", name="tiers_schema", node=TiersConfig)


# --------------------------------------------------------------------------------------------------------------
# Strict conversion of plain data (dicts/lists/scalars) into the dataclasses.
# --------------------------------------------------------------------------------------------------------------

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "a boolean (true/false)", str: "a string"}


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _is_missing(value: Any) -> bool:
    return isinstance(value, str) and value == MISSING


def _scalar(tp: type, value: Any, path: str) -> Any:
    """Strict scalar check: no str->number, no bool->number, no number->bool; integral floats ok for ints."""
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - only the types above appear in the schemas
        raise TypeError(f"unsupported schema type {tp!r} at {path}")
    raise ConfigError(path, value, f"expected {_TYPE_NAMES[tp]}, got {type(value).__name__}")


def _build(tp: Any, value: Any, path: str) -> Any:
    """Convert plain `value` into schema type `tp`, checking every key and type. Returns new objects only."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = _container(value, path)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = _asdict_shallow(value)
        if not isinstance(value, collections.abc.Mapping):
            raise ConfigError(path, value, f"expected a mapping with keys {_known(tp)}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = [k for k in value if k not in fields]
        if unknown:
            hint = ""
            if tp is DeploymentConfig and "supportlonglong" in value:
                hint = " (this looks like an HPS JSON config: pass a .json path or use read_hps_json)"
            raise ConfigError(_join(path, str(unknown[0])), value[unknown[0]],
                              f"unknown key; known keys of {tp.__name__}: {_known(tp)}{hint}")
        kwargs = {}
        for name, f in fields.items():
            sub = _join(path, name)
            if name in value and not _is_missing(value[name]):
                kwargs[name] = _build(hints[name], value[name], sub)
            elif f.default is not dataclasses.MISSING and _is_missing(f.default):
                raise ConfigError(sub, None, f"required key is missing{_hps_hint(f)}")
            elif name in value:  # explicit "???" on a field that has a default: treat as unset
                pass
        return tp(**kwargs)
    if origin in (list, List):
        (elem,) = typing.get_args(tp)
        if isinstance(value, (str, bytes)) or not isinstance(value, collections.abc.Sequence):
            raise ConfigError(path, value, "expected a list")
        return [_build(elem, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        key_tp, elem = typing.get_args(tp)
        if not isinstance(value, collections.abc.Mapping):
            raise ConfigError(path, value, "expected a mapping")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(path, k, "mapping keys must be strings")
            out[k] = _build(elem, v, _join(path, k))
        return out
    if tp is Any:
        return copy.deepcopy(value)
    if _is_missing(value):
        raise ConfigError(path, None, "required key is missing")
    return _scalar(tp, value, path)


def _asdict_shallow(obj: Any) -> Dict[str, Any]:
    """Fields of a dataclass instance as a dict (values not copied: _build copies while converting)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _known(tp: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(tp))


def _hps_hint(f: dataclasses.Field) -> str:
    key = f.metadata.get("hps") if f.metadata else None
    return f" (HPS key: {key})" if key else ""


def _container(node: Union[DictConfig, ListConfig], path: str) -> Any:
    """Plain containers from an omegaconf node, resolving interpolations; errors become ConfigError."""
    try:
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or path
        raise ConfigError(key, None, f"cannot resolve value: {str(e).splitlines()[0]}") from e


# --------------------------------------------------------------------------------------------------------------
# Validation (ranges, names, enums, cross-field rules). Runs on a private copy; aliases are normalised there.
# --------------------------------------------------------------------------------------------------------------

_CACHE_TYPES = {"dynamic": "dynamic", "static": "static", "uvm": "uvm", "stochastic": "dynamic"}
_CACHE_POLICIES = {"lru": "lru", "lfu": "lfu"}
_SECOND_LEVELS = {"none": "none", "host_mapped": "host_mapped", "uvm": "host_mapped"}
_ADMISSIONS = {"none": "none", "tinylfu": "tinylfu"}
# Storage dtypes of a table's rows (hps_core.storage documents each; its code order is STORAGE_NAMES there).
STORAGES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "int8": "int8", "uint8": "int8",
    "fp8_e4m3": "fp8_e4m3", "fp8": "fp8_e4m3", "e4m3": "fp8_e4m3", "float8_e4m3fn": "fp8_e4m3",
}
# Every tier's overflow policies (the Redis and host-memory tiers take these names too): alias -> canonical name.
OVERFLOW_POLICIES = {
    "evict_random": "evict_random", "random": "evict_random",
    "evict_least_used": "evict_least_used", "least_used": "evict_least_used",
    "evict_oldest": "evict_oldest", "oldest": "evict_oldest",
}
_UPDATE_SOURCE_TYPES = {
    "none": "none", "null": "none",
    "kafka_message_queue": "kafka_message_queue", "kafka_mq": "kafka_message_queue", "kafka": "kafka_message_queue",
    "redis_stream": "redis_stream",
}
_KEY_DTYPES = {"int64": "int64", "int32": "int32"}
_MAX_BUFFERS = 256  # HPS memory pool limit per model and device


class _Checker:
    """Range checks with messages "<path> = <value>: <rule> (HPS key: ...)"."""

    def __init__(self, obj: Any, path: str):
        self.obj = obj
        self.path = path

    def _fail(self, name: str, rule: str) -> None:
        f = next(f for f in dataclasses.fields(self.obj) if f.name == name)
        raise ConfigError(_join(self.path, name), getattr(self.obj, name), rule + _hps_hint(f))

    def check(self, name: str, ok: bool, rule: str) -> None:
        if not ok:
            self._fail(name, rule)

    def at_least(self, name: str, lo: float) -> None:
        self.check(name, getattr(self.obj, name) >= lo, f"must be >= {lo}")

    def enum(self, name: str, table: Mapping[str, str]) -> None:
        value = getattr(self.obj, name)
        if value not in table:
            self._fail(name, f"allowed: {' | '.join(sorted(set(table.values())))} "
                             f"(aliases: {', '.join(sorted(k for k, v in table.items() if k != v)) or 'none'})")
        setattr(self.obj, name, table[value])

    def name(self, name: str) -> None:
        value = getattr(self.obj, name)
        self.check(name, bool(_NAME_RE.fullmatch(value)), f"must match {NAME_PATTERN}")


# Keys accepted so HPS configs load unchanged but with no effect on this server: a value other than the default logs
# a warning naming the key and why (never a silent no-op). (field owner, field) -> why.
_NO_EFFECT = {
    ("cache", "use_context_stream"): "GPU work always runs on the caller's current stream",
    ("cache", "enable_pagelock"): "the host memory the GPU reads (host-mapped tables, staging) is pinned whenever used",
    ("cache", "thread_pool_size"): "CPU work runs on torch's intra-op threads (torch.set_num_threads)",
    ("cache", "use_hctr_cache_implementation"): "there is one cache implementation",
    ("cache", "num_refresher_buffers"): "a refresh runs in the refresher thread, or the caller's",
    ("model", "fuse_embedding_table"): "tables are looked up one by one (no fused table)",
    ("model", "maxnum_des_feature_per_sample"): "the server looks up embeddings only (no dense features)",
    ("model", "dense_file"): "the server looks up embeddings only (the dense model is the framework's)",
}


def _warn_no_effect(model: "ModelConfig", path: str) -> None:
    for (owner, name), why in _NO_EFFECT.items():
        obj = model.cache if owner == "cache" else model
        spec = next(f for f in dataclasses.fields(obj) if f.name == name)
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        value = getattr(obj, name)
        if value != default:
            where = f"{path}.cache.{name}" if owner == "cache" else f"{path}.{name}"
            logger.warning("%s = %r has no effect here: %s", where, value, why)


def validate(cfg: DeploymentConfig) -> DeploymentConfig:
    """Check every value of `cfg` and return a validated, alias-normalised deep copy (`cfg` is left unchanged).

    Raises ConfigError (a ValueError) naming the key path, the value found and what is allowed.

    Example:
        >>> cfg = DeploymentConfig(models={"m": ModelConfig(tables=[TableConfig("t", "/d", 8)])})
        >>> validate(cfg).models["m"].cache.type
        'dynamic'
    """
    if not isinstance(cfg, DeploymentConfig):
        raise TypeError(f"validate() expects a DeploymentConfig, got {type(cfg).__name__}")
    plain = _asdict_shallow(cfg)
    for key in _RUN_ONLY_KEYS:  # a RunConfig (e.g. OmegaConf.to_object of a composed config)
        plain.pop(key, None)
    out: DeploymentConfig = _build(DeploymentConfig, plain, "")  # strict types; a fresh deep copy

    top = _Checker(out, "")
    top.enum("key_dtype", _KEY_DTYPES)
    top.check("metrics_port", 0 <= out.metrics_port <= 65535, "must be a TCP port (1..65535), or 0 for no metrics")
    top.check("models", len(out.models) > 0, "at least one model is required")
    for model_name, model in out.models.items():
        _validate_model(model_name, model)
        _warn_no_effect(model, f"models.{model_name}")
    _validate_tiers(out.tiers)
    _validate_update_source(out.update_source)
    return out


def _validate_model(model_name: str, m: ModelConfig) -> None:
    path = _join("models", model_name)
    if not _NAME_RE.fullmatch(model_name):
        raise ConfigError(path, model_name, f"model name must match {NAME_PATTERN} (HPS key: model)")
    c = _Checker(m, path)
    c.check("tables", len(m.tables) > 0, "a model needs at least one table")
    seen: Dict[str, int] = {}
    for i, t in enumerate(m.tables):
        tc = _Checker(t, f"{path}.tables[{i}]")
        tc.name("name")
        tc.check("name", t.name not in seen, f"duplicate table name (also tables[{seen.get(t.name)}])")
        seen[t.name] = i
        tc.check("path", len(t.path) > 0, "must be a non-empty directory path")
        tc.at_least("dim", 1)
        tc.at_least("max_keys_per_sample", 1)
        tc.check("default_value", math.isfinite(t.default_value), "must be finite")
    c.check("deployed_device_list", len(m.deployed_device_list) > 0, "at least one device is required")
    for j, d in enumerate(m.deployed_device_list):
        if d < 0:
            raise ConfigError(f"{path}.deployed_device_list[{j}]", d, "device ids must be >= 0")
    dup = sorted({d for d in m.deployed_device_list if m.deployed_device_list.count(d) > 1})
    c.check("deployed_device_list", not dup, f"duplicate device ids {dup}")
    c.at_least("max_batch_size", 1)
    c.at_least("maxnum_des_feature_per_sample", 0)

    k = _Checker(m.cache, f"{path}.cache")
    k.check("ratio", 0.0 < m.cache.ratio <= 1.0, "must be in (0, 1]")
    k.enum("policy", _CACHE_POLICIES)
    k.enum("type", _CACHE_TYPES)
    k.enum("second_level", _SECOND_LEVELS)
    k.enum("admission", _ADMISSIONS)
    k.enum("storage", STORAGES)
    if m.cache.fp8_quant:
        if m.cache.type == "static":
            # HPS's fp8_quant: the static table's rows in fp8. Our storage key says the same thing, or conflicts.
            k.check("fp8_quant", m.cache.storage in ("float32", "fp8_e4m3"),
                    f"fp8_quant asks for fp8 rows but cache.storage is {m.cache.storage!r}; set one of them")
            m.cache.storage = "fp8_e4m3"
        else:
            logger.warning("%s.cache.fp8_quant is true but cache.type is %r: HPS applies fp8_quant to static tables "
                           "only, and so does this server (cache.storage chooses compact rows for any table)",
                           path, m.cache.type)
    checkers = [k] + [_Checker(table, f"{path}.tables[{t}]") for t, table in enumerate(m.tables)]
    for checker in checkers[1:]:
        if checker.obj.admission:
            checker.enum("admission", _ADMISSIONS)
        if checker.obj.storage:
            checker.enum("storage", STORAGES)
        storage = checker.obj.storage or m.cache.storage
        checker.check("storage", storage not in ("int8", "fp8_e4m3") or checker.obj.dim % 4 == 0,
                      f"{storage} storage needs a dim that is a multiple of 4 (its row-wise scale follows the row); "
                      f"the table has dim {checker.obj.dim}")
    for checker in checkers:
        checker.check("admission", checker.obj.admission != "tinylfu" or (m.cache.policy == "lfu"
                                                                          and m.cache.type == "dynamic"),
                      f"tinylfu admission needs cache.policy lfu and cache.type dynamic (it compares a key's "
                      f"frequency with the victim's hit count); found policy {m.cache.policy!r}, type "
                      f"{m.cache.type!r}")
    if m.cache.second_level != "none":
        k.check("second_level", m.cache.type == "dynamic",
                f"a second level goes below a dynamic cache; cache.type is {m.cache.type!r}")
        k.check("second_level", m.cache.ratio < 1.0,
                f"a cache of ratio {m.cache.ratio} already holds the whole table (it is resident)")
        k.check("second_level", m.cache.enabled, "needs the cache enabled (gpucache true)")
    k.check("hit_rate_threshold", m.cache.hit_rate_threshold >= 0.0 and not math.isnan(m.cache.hit_rate_threshold),
            "must be >= 0 (values > 1 mean always synchronous insertion)")
    k.check("refresh_percentage", 0.0 <= m.cache.refresh_percentage <= 1.0, "must be in [0, 1]")
    k.check("refresh_delay", m.cache.refresh_delay >= 0.0, "must be >= 0 (seconds)")
    k.check("refresh_interval", m.cache.refresh_interval >= 0.0, "must be >= 0 (seconds)")
    for name in ("num_worker_buffers", "num_refresher_buffers"):
        k.check(name, 1 <= getattr(m.cache, name) <= _MAX_BUFFERS, f"must be in [1, {_MAX_BUFFERS}]")
    k.at_least("thread_pool_size", 1)


def _validate_overflow(c: _Checker, obj: Any) -> None:
    if obj.overflow_margin > MAX_INT64:  # HPS "no limit" (2^64-1) and anything above int64
        obj.overflow_margin = MAX_INT64
    c.at_least("overflow_margin", 1)
    c.enum("overflow_policy", OVERFLOW_POLICIES)
    c.check("overflow_resolution_target", 0.0 < obj.overflow_resolution_target < 1.0, "must be in (0, 1)")


def _validate_tiers(t: TiersConfig) -> None:
    h = t.host_memory
    c = _Checker(h, "tiers.host_memory")
    c.at_least("num_partitions", 1)
    c.at_least("allocation_rate", 1)
    _validate_overflow(c, h)
    c.check("initial_cache_rate", 0.0 <= h.initial_cache_rate <= 1.0, "must be in [0, 1]")
    c.at_least("max_batch_size", 1)

    r = t.redis_cluster
    c = _Checker(r, "tiers.redis_cluster")
    c.check("address", len(r.address) > 0, "at least one 'host[:port]' is required")
    for j, a in enumerate(r.address):
        _check_address(f"tiers.redis_cluster.address[{j}]", a)
    c.at_least("num_partitions", 1)
    c.at_least("num_node_connections", 1)
    c.check("num_node_connections", r.num_node_connections <= r.num_partitions,
            f"must be <= num_partitions ({r.num_partitions}); raise num_partitions or lower this")
    c.at_least("max_batch_size", 1)
    _validate_overflow(c, r)
    c.at_least("timeout_ms", 1)

    d = t.rocksdb
    c = _Checker(d, "tiers.rocksdb")
    c.check("path", len(d.path) > 0, "must be a non-empty directory path")
    c.at_least("num_threads", 1)
    c.at_least("max_batch_size", 1)


def _check_address(path: str, address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep:
        host, port = address, ""
    if not host.strip() or any(ch.isspace() for ch in address):
        raise ConfigError(path, address, "expected 'host' or 'host:port'")
    if sep and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ConfigError(path, address, "port must be an integer in [1, 65535]")


def _validate_update_source(u: UpdateSourceConfig) -> None:
    c = _Checker(u, "update_source")
    c.enum("type", _UPDATE_SOURCE_TYPES)
    if u.type == "kafka_message_queue":
        c.check("brokers", len(u.brokers.strip()) > 0, "at least one broker is required")
    if u.type == "redis_stream":
        host, _, port = u.brokers.partition(":")
        c.check("brokers", bool(host.strip()) and port.isdigit() and 1 <= int(port) <= 65535,
                "a redis_stream source needs one 'host:port'")
        c.check("group", bool(u.group.strip()), "a redis_stream source needs this server's consumer group name "
                "(one per server: each server must get every update)")
        c.check("stream", bool(u.stream.strip()), "must name the stream")
    c.at_least("metadata_refresh_interval_ms", 10)
    c.at_least("receive_buffer_size", 1)
    c.at_least("poll_timeout_ms", 0)
    c.at_least("max_batch_size", 1)
    c.at_least("failure_backoff_ms", 0)
    c.check("max_commit_interval", u.max_commit_interval > 0, "must be > 0")


# --------------------------------------------------------------------------------------------------------------
# HPS JSON reader (HugeCTR parameter_server_config::init): key names, parser defaults, aliases.
# --------------------------------------------------------------------------------------------------------------

_REQUIRED = object()


def _hps_fields(cls: type, prefix: str = "") -> List[Tuple[dataclasses.Field, str]]:
    """(field, JSON key within its object) of each field of `cls` that is read from HPS JSON (has `_hps` metadata)."""
    out = []
    for f in dataclasses.fields(cls):
        key = f.metadata.get("hps")
        if key is not None:
            if not key.startswith(prefix) or "." in key[len(prefix):]:
                raise TypeError(f"{cls.__name__}.{f.name}: HPS key {key!r} is not in JSON object {prefix!r}")
            out.append((f, key[len(prefix):]))
    return out


def _json_type(tp: Any) -> Any:
    return (list, typing.get_args(tp)[0]) if typing.get_origin(tp) in (list, List) else tp


def _hps_keys(*classes: type, prefix: str = "", explicit: Optional[Dict[str, Tuple[Any, Any]]] = None,
              ) -> Dict[str, Tuple[Any, Any]]:
    """Keys of one HPS JSON object: JSON key -> (type, parser default), list types as (list, element type).

    Derived from the `_hps` metadata of the classes' fields; `explicit` adds the keys that map to no field. A key
    read into fields of two classes (volatile_db's host and redis settings) must have one type and default."""
    keys: Dict[str, Tuple[Any, Any]] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f, key in _hps_fields(cls, prefix):
            json_type = f.metadata.get("hps_json_type") or _json_type(hints[f.name])
            if cls is TableConfig:  # one value per table: a JSON list, required unless a default is given
                json_type, default = (list, json_type), f.metadata.get("hps_default", _REQUIRED)
            elif "hps_default" in f.metadata:
                default = f.metadata["hps_default"]
            else:
                default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            spec = (json_type, _REQUIRED if _is_missing(default) else default)
            if keys.setdefault(key, spec) != spec:
                raise TypeError(f"HPS key {prefix}{key}: {cls.__name__}.{f.name} reads it as {spec}, another "
                                f"field as {keys[key]}")
    for key, spec in (explicit or {}).items():
        if keys.setdefault(key, spec) is not spec:
            raise TypeError(f"HPS key {prefix}{key} is both explicit and a field's")
    return keys


def _hps_kwargs(cls: type, section: Mapping[str, Any], prefix: str = "", skip: Any = ()) -> Dict[str, Any]:
    """Keyword arguments for `cls` from one read JSON object (`_hps_section`'s result), by its fields' metadata."""
    kwargs = {}
    for f, key in _hps_fields(cls, prefix):
        if key not in skip:
            convert = f.metadata.get("hps_convert")
            kwargs[f.name] = convert(section[key]) if convert else section[key]
    return kwargs


# What cannot be derived: JSON keys that map to no field (each is handled by the reader, or type-checked and
# accepted with no effect here: shared_memory_*, update_filters).
_HPS_MODEL_KEYS = _hps_keys(TableConfig, ModelConfig, CacheConfig, explicit={
    "model": (str, ""),  # the key of DeploymentConfig.models
    "use_static_table": (bool, False),  # true forces cache.type static
})
# Documented by HPS but never read from JSON (InferenceParams / HugeCTR inference only): accepted and ignored.
_HPS_MODEL_IGNORED = (
    "network_file", "label_dim", "slot_num", "use_mixed_precision", "scaler", "use_algorithm_search",
    "use_cuda_graph", "i64_input_key", "device_id",
)
_HPS_DB_IGNORED = ("initialize_after_startup",)
_HPS_UPDATE_FILTERS = ((list, str), ["^hps_.+$"])
_HPS_VDB_KEYS = _hps_keys(HostMemoryTierConfig, RedisClusterTierConfig, prefix="volatile_db.", explicit={
    "type": (str, None),  # selects the tier; absent from a present object => disabled
    "shared_memory_size": (int, 16 * 1024**3),
    "shared_memory_name": (str, "hctr_mp_hash_map_database"),
    "shared_memory_auto_remove": (bool, True),
    "update_filters": _HPS_UPDATE_FILTERS,
})
# volatile_db keys read by both the host memory and the redis tier: they go to the active one (HPS keeps one struct).
_HPS_VDB_SHARED = ({k for _, k in _hps_fields(HostMemoryTierConfig, "volatile_db.")}
                   & {k for _, k in _hps_fields(RedisClusterTierConfig, "volatile_db.")})
_HPS_PDB_KEYS = _hps_keys(RocksDBTierConfig, prefix="persistent_db.", explicit={
    "type": (str, "disabled"),  # rocks_db => the RocksDB tier is enabled
    "update_filters": _HPS_UPDATE_FILTERS,
})
# update_source.type: HPS's parser default is "null", which validate() normalises to the field's default "none".
_HPS_UPDATE_SOURCE_KEYS = _hps_keys(UpdateSourceConfig, prefix="update_source.")
_HPS_GLOBAL_KEYS = _hps_keys(DeploymentConfig, explicit={
    "models": (list, _REQUIRED),  # one object per model, read with _HPS_MODEL_KEYS
    "volatile_db": (dict, None),
    "persistent_db": (dict, None),
    "update_source": (dict, None),
})

# Database type aliases (HPS get_hps_database_type).
_HPS_DB_TYPES = {
    **dict.fromkeys(("disabled", "disable", "none"), "disabled"),
    **dict.fromkeys(("hash_map", "hashmap", "hash", "map"), "hash_map"),
    **dict.fromkeys(("parallel_hash_map", "parallel_hashmap", "parallel_hash", "parallel_map"), "parallel_hash_map"),
    **dict.fromkeys(("multi_process_hash_map", "multi_process_hashmap", "multi_process_hash", "multi_process_map"),
                    "multi_process_hash_map"),
    **dict.fromkeys(("redis_cluster", "redis"), "redis_cluster"),
    **dict.fromkeys(("rocks_db", "rocksdb", "rocks"), "rocks_db"),
}
_VDB_TYPES = ("disabled", "hash_map", "parallel_hash_map", "multi_process_hash_map", "redis_cluster")
_PDB_TYPES = ("disabled", "rocks_db")


def _hps_value(spec: Any, value: Any, path: str) -> Any:
    """Strict type check of one HPS JSON value."""
    if spec is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, value, "expected a JSON object")
        return value
    if spec is list:
        if not isinstance(value, list):
            raise ConfigError(path, value, "expected a JSON list")
        return value
    if isinstance(spec, tuple):
        _, elem = spec
        if not isinstance(value, list):
            raise ConfigError(path, value, f"expected a JSON list, each element {_TYPE_NAMES[elem]}")
        return [_scalar(elem, v, f"{path}[{i}]") for i, v in enumerate(value)]
    return _scalar(spec, value, path)


def _hps_section(obj: Mapping[str, Any], keys: Dict[str, Tuple[Any, Any]], path: str, where: str,
                 ignored: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """Read one JSON object: unknown keys are logged and ignored (as HPS does), mistyped values raise, missing keys
    take the parser default."""
    for k in obj:
        if k in ignored:
            logger.debug("HPS JSON %s: key %r is not read by HPS from JSON; ignored", _join(path, k), k)
        elif k not in keys:
            # HPS reads the keys it knows and never looks at the others: a config that runs under HPS runs here.
            close = difflib.get_close_matches(str(k), list(keys) + list(ignored), n=1)
            logger.warning("HPS JSON %s = %r: unknown key%s, ignored as HPS ignores it%s", _join(path, k), obj[k],
                           where, f" (did you mean {close[0]!r}?)" if close else "")
    out = {}
    for k, (spec, default) in keys.items():
        if k in obj:
            out[k] = _hps_value(spec, obj[k], _join(path, k))
        elif default is _REQUIRED:
            raise ConfigError(_join(path, k), None, f"required key is missing{where}")
        else:
            out[k] = copy.deepcopy(default)
    return out


def _hps_db_type(value: str, path: str, allowed: Tuple[str, ...], default: str) -> str:
    canonical = _HPS_DB_TYPES.get(value)
    aliases = sorted(k for k, v in _HPS_DB_TYPES.items() if v in allowed)
    if canonical is None:
        # HPS's get_hps_database_type leaves the default for a string it does not know.
        logger.warning("HPS JSON %s = %r: not a database type; %r as HPS does (allowed: %s; aliases: %s)", path,
                       value, default, " | ".join(allowed), ", ".join(aliases))
        return default
    if canonical not in allowed:  # a type HPS knows but cannot create here: HPS dies at start
        raise ConfigError(path, value, f"allowed: {' | '.join(allowed)} (with aliases: {', '.join(aliases)})")
    return canonical


def read_hps_json(path_or_dict: Union[str, os.PathLike, Mapping[str, Any]]) -> DeploymentConfig:
    """Read a HugeCTR HPS JSON config (file path or parsed dict) into a validated DeploymentConfig.

    Unchanged HPS files are accepted: key names, parser defaults (not the docs' where they differ), enum aliases
    and HPS's leniencies follow HPS - an unknown key is ignored, an unknown cache or database type string takes
    HPS's default, default_value_for_each_table is padded with 0.0 or truncated to the table count,
    refresh_interval is truncated to whole seconds - each logged with the key's path. What HPS would turn into
    garbage or a crash raises ConfigError: wrong value types, short sparse_files / maxnum_catfeature... /
    embedding_table_names lists, a database type HPS knows but cannot create there (e.g. volatile_db rocks_db),
    out-of-range values. Keys HPS documents but never reads from JSON (network_file, slot_num, i64_input_key, ...,
    initialize_after_startup) are accepted and ignored.

    `volatile_db` absent => host memory tier (parallel_hash_map); present without "type" => disabled (HPS's
    asymmetry, kept). redis_cluster => Redis tier on, host tier off. multi_process_hash_map => host memory tier
    (in-process here, not shared between processes; a warning is logged).

    Example:
        >>> cfg = read_hps_json({"supportlonglong": False, "models": [{"model": "foo",
        ...     "sparse_files": ["/d/foo0"], "embedding_vecsize_per_table": [16],
        ...     "maxnum_catfeature_query_per_table_per_sample": [3], "default_value_for_each_table": [1.0],
        ...     "deployed_device_list": [0]}]})
        >>> cfg.key_dtype, cfg.models["foo"].tables[0].name, cfg.models["foo"].cache.num_worker_buffers
        ('int32', 'sparse_embedding0', 1)
    """
    if isinstance(path_or_dict, collections.abc.Mapping):
        source, data = "<dict>", dict(path_or_dict)
    else:
        source = os.fspath(path_or_dict)
        with open(source, "r", encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as e:
                raise ConfigError("", source, f"not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError("", data, f"the top level of an HPS JSON config ({source}) must be an object")
    try:
        return validate(_hps_to_deployment(data))
    except ConfigError as e:
        if source != "<dict>":
            e.args = (f"{e.args[0]} [in {source}]",)
        raise


def _hps_to_deployment(data: Mapping[str, Any]) -> DeploymentConfig:
    g = _hps_section(data, _HPS_GLOBAL_KEYS, "", "")
    if not g["models"]:
        raise ConfigError("models", [], "no model configurations: at least one model is required")
    fuse = g["fuse_embedding_table"]
    models: Dict[str, ModelConfig] = {}
    where_seen: Dict[str, int] = {}
    for i, raw in enumerate(g["models"]):
        name, model = _hps_model(raw, f"models[{i}]", fuse)
        if name in where_seen:
            raise ConfigError(f"models[{i}].model", name, f"duplicate model name (also models[{where_seen[name]}])")
        where_seen[name] = i
        models[name] = model
    return DeploymentConfig(models=models, tiers=_hps_tiers(g["volatile_db"], g["persistent_db"]),
                            update_source=_hps_update_source(g["update_source"]), **_hps_kwargs(DeploymentConfig, g))


def _hps_model(raw: Any, path: str, global_fuse: bool) -> Tuple[str, ModelConfig]:
    if not isinstance(raw, dict):
        raise ConfigError(path, raw, "expected a JSON object (one model)")
    where = f" (model {raw.get('model', '')!r})"
    m = _hps_section(raw, _HPS_MODEL_KEYS, path, where, _HPS_MODEL_IGNORED)
    name = m["model"]
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(_join(path, "model"), name, f"model name must match {NAME_PATTERN}")

    dims = m["embedding_vecsize_per_table"]
    n = len(dims)
    names = m["embedding_table_names"]
    if names is None:
        names = [f"sparse_embedding{j}" for j in range(n)]
    defaults = list(m["default_value_for_each_table"])
    if len(defaults) != n:
        # HPS's parser truncates this list or pads it with 0.0 to the table count (its own examples give one value
        # for many tables); the other per-table lists it indexes blindly, so a short one is an error here.
        logger.info("HPS JSON %s: default_value_for_each_table has %d entries for %d tables; %s as HPS does", path,
                    len(defaults), n, "padded with 0.0" if len(defaults) < n else "truncated")
        defaults = (defaults + [0.0] * n)[:n]
    m["embedding_table_names"], m["default_value_for_each_table"] = names, defaults
    per_table = {key: m[key] for _, key in _hps_fields(TableConfig)}
    # Table names last: absent, they are generated, so a count mismatch is the fault of the other lists.
    for key, values in sorted(per_table.items(), key=lambda kv: kv[0] == "embedding_table_names"):
        if len(values) != n:
            raise ConfigError(_join(path, key), values,
                              f"has {len(values)} entries but embedding_vecsize_per_table has {n}{where}")

    cache_type = _hps_cache_type(m["embedding_cache_type"], _join(path, "embedding_cache_type"))
    if m["use_static_table"]:
        if cache_type != "static":
            logger.info("HPS JSON %s: use_static_table is true; embedding_cache_type %r becomes 'static'",
                        path, m["embedding_cache_type"])
        cache_type = "static"
    if m["refresh_interval"] != int(m["refresh_interval"]):
        logger.warning("HPS JSON %s.refresh_interval = %r: HPS reads it as an integer; truncated to %d s as HPS does",
                       path, m["refresh_interval"], int(m["refresh_interval"]))
        m["refresh_interval"] = float(int(m["refresh_interval"]))
    m["embedding_cache_type"] = cache_type

    if not global_fuse and "fuse_embedding_table" in raw:
        logger.debug("HPS JSON %s.fuse_embedding_table ignored: the global fuse_embedding_table is false", path)
    # HPS reads the per-model flag (default true) only when the global flag is on.
    m["fuse_embedding_table"] = bool(global_fuse and m["fuse_embedding_table"])
    tables = [TableConfig(**_hps_kwargs(TableConfig, {k: v[j] for k, v in per_table.items()})) for j in range(n)]
    model = ModelConfig(tables=tables, cache=CacheConfig(**_hps_kwargs(CacheConfig, m)), **_hps_kwargs(ModelConfig, m))
    return name, model


def _hps_cache_type(value: str, path: str) -> str:
    if value not in _CACHE_TYPES:
        logger.warning("HPS JSON %s = %r: not a cache type; 'dynamic' as HPS does (allowed: dynamic | static | uvm | "
                       "stochastic, stochastic means dynamic)", path, value)
        return "dynamic"
    return _CACHE_TYPES[value]


def _hps_tiers(vdb: Optional[Dict[str, Any]], pdb: Optional[Dict[str, Any]]) -> TiersConfig:
    tiers = TiersConfig()
    if vdb is None:
        # Absent object: HPS's struct default, a parallel hash map with default settings.
        logger.debug("HPS JSON: no volatile_db; using the host memory tier (parallel_hash_map) with defaults")
        v = _hps_section({}, _HPS_VDB_KEYS, "volatile_db", "")
        vtype = "parallel_hash_map"
    else:
        v = _hps_section(vdb, _HPS_VDB_KEYS, "volatile_db", "", _HPS_DB_IGNORED)
        if v["type"] is None:
            # HPS asymmetry, kept on purpose: an object without "type" disables the volatile database.
            logger.info("HPS JSON: volatile_db has no 'type'; it is disabled (as in HPS)")
            vtype = "disabled"
        else:
            vtype = _hps_db_type(v["type"], "volatile_db.type", _VDB_TYPES, "parallel_hash_map")
    if vtype == "multi_process_hash_map":
        logger.warning("HPS JSON: volatile_db type multi_process_hash_map is served by the in-process host memory "
                       "tier here; it is not shared between processes (shared_memory_* keys are ignored)")
    for k in ("shared_memory_size", "shared_memory_name", "shared_memory_auto_remove", "update_filters"):
        if vdb is not None and k in vdb:
            logger.debug("HPS JSON: volatile_db.%s is accepted but has no effect here", k)

    redis_primary = vtype == "redis_cluster"
    # Every volatile_db key goes to the tier it configures; shared keys go to the active one (HPS keeps one struct).
    tiers.host_memory = HostMemoryTierConfig(
        enabled=vtype in ("hash_map", "parallel_hash_map", "multi_process_hash_map"),
        **_hps_kwargs(HostMemoryTierConfig, v, "volatile_db.", skip=_HPS_VDB_SHARED if redis_primary else ()))
    tiers.redis_cluster = RedisClusterTierConfig(
        enabled=redis_primary,
        **_hps_kwargs(RedisClusterTierConfig, v, "volatile_db.", skip=() if redis_primary else _HPS_VDB_SHARED))

    if pdb is not None:
        p = _hps_section(pdb, _HPS_PDB_KEYS, "persistent_db", "", _HPS_DB_IGNORED)
        ptype = _hps_db_type(p["type"], "persistent_db.type", _PDB_TYPES, "disabled")
        if "update_filters" in pdb:
            logger.debug("HPS JSON: persistent_db.update_filters is accepted but has no effect here")
        tiers.rocksdb = RocksDBTierConfig(enabled=ptype == "rocks_db", **_hps_kwargs(RocksDBTierConfig, p,
                                                                                      "persistent_db."))
    return tiers


def _hps_update_source(obj: Optional[Dict[str, Any]]) -> UpdateSourceConfig:
    # The type string and its aliases (null, kafka_mq, kafka) are checked and normalised by validate().
    u = _hps_section(obj or {}, _HPS_UPDATE_SOURCE_KEYS, "update_source", "")
    return UpdateSourceConfig(**_hps_kwargs(UpdateSourceConfig, u, "update_source."))


# --------------------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------------------

ConfigSource = Union[str, os.PathLike, Mapping[str, Any], DictConfig, DeploymentConfig]


def load_config(source: ConfigSource) -> DeploymentConfig:
    """Load and validate a deployment configuration from any supported source.

    Args:
        source: a path to an HPS JSON file (`.json`) or one of our YAML files (`.yaml`/`.yml`); a dict in our
            schema's shape; an omegaconf DictConfig (e.g. a composed Hydra config; its run-level keys
            `data_dir`/`bench` are dropped and interpolations resolved); or a DeploymentConfig.

    Returns:
        A validated DeploymentConfig dataclass instance (never a DictConfig), with enum aliases normalised.

    Raises:
        ConfigError: a missing, unknown, mistyped or out-of-range value (message: key path, value, what is allowed).
        FileNotFoundError: the file does not exist.

    Example:
        >>> cfg = load_config({"models": {"demo": {"tables": [{"name": "t0", "path": "/d/t0", "dim": 16}]}},
        ...                    "tiers": {"rocksdb": {"enabled": True, "path": "hps_data/rocksdb"}}})
        >>> cfg.tiers.rocksdb.enabled, cfg.models["demo"].cache.ratio
        (True, 0.2)
    """
    if isinstance(source, DeploymentConfig):
        return validate(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        suffix = path.suffix.lower()
        if suffix == ".json":
            return read_hps_json(path)
        if suffix not in (".yaml", ".yml"):
            raise ConfigError("", os.fspath(source), "unrecognised config file type; use .json (HPS) or .yaml/.yml")
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            node = OmegaConf.load(path)
        except Exception as e:  # yaml.YAMLError and friends: say which file
            raise ConfigError("", os.fspath(path), f"cannot parse YAML: {e}") from e
        if not isinstance(node, DictConfig):
            raise ConfigError("", os.fspath(path), "the top level of a YAML config must be a mapping")
        try:
            return _from_mapping(_deployment_part(node))
        except ConfigError as e:
            e.args = (f"{e.args[0]} [in {path}]",)
            raise
    if isinstance(source, DictConfig):
        return _from_mapping(_deployment_part(source))
    if isinstance(source, collections.abc.Mapping):
        return _from_mapping(source)
    raise TypeError(f"load_config() expects a path, dict, DictConfig or DeploymentConfig, got {type(source).__name__}")


def _deployment_part(node: DictConfig) -> Dict[str, Any]:
    """Plain, resolved top-level entries of `node` except the run-level ones (left unresolved: e.g. a
    `${hydra:...}` interpolation in the demo section does not stop a composed config from loading)."""
    out: Dict[str, Any] = {}
    for key in node.keys():
        if key in _RUN_ONLY_KEYS:
            continue
        try:
            value = node[key]  # resolves a scalar interpolation; "???" raises MissingMandatoryValue
        except OmegaConfBaseException as e:
            if OmegaConf.is_missing(node, key):
                out[key] = MISSING
                continue
            raise ConfigError(str(key), None, f"cannot resolve value: {str(e).splitlines()[0]}") from e
        out[key] = _container(value, str(key)) if isinstance(value, (DictConfig, ListConfig)) else value
    return out


def _from_mapping(data: Mapping[str, Any]) -> DeploymentConfig:
    plain = {k: v for k, v in data.items() if k not in _RUN_ONLY_KEYS}
    return validate(_build(DeploymentConfig, plain, ""))


def _escape_interpolations(value: Any) -> Any:
    """Escape "${" in strings so a dumped YAML loads back to the same literal text."""
    if isinstance(value, str):
        return value.replace("${", "\\${")
    if isinstance(value, dict):
        return {k: _escape_interpolations(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape_interpolations(v) for v in value]
    return value


def to_yaml(cfg: Union[DeploymentConfig, DictConfig, Mapping[str, Any]]) -> str:
    """YAML text of a config; `load_config` of that text (saved as .yaml) gives back an equal DeploymentConfig.

    Example:
        >>> text = to_yaml(load_config({"models": {"m": {"tables": [{"name": "t", "path": "/d", "dim": 4}]}}}))
        >>> text.splitlines()[:3]
        ['key_dtype: int64', 'models:', '  m:']
    """
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_yaml(cfg)
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        plain = dataclasses.asdict(cfg)
    elif isinstance(cfg, collections.abc.Mapping):
        plain = copy.deepcopy(dict(cfg))
    else:
        raise TypeError(f"to_yaml() expects a DeploymentConfig, DictConfig or dict, got {type(cfg).__name__}")
    return OmegaConf.to_yaml(OmegaConf.create(_escape_interpolations(plain)))
