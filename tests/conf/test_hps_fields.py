"""The HPS JSON reader is derived from the schemas' field metadata: every dataclass field that names an HPS key
(`_hps(...)`) must be read from that key by read_hps_json.

The cases are generated from the field list (walking DeploymentConfig's type tree), so a new field with HPS metadata
gets a case without anyone writing one: for each field, an HPS JSON config is read without and with the key set to
a value that differs from the reader's default, and the field must change to that value.
"""

import copy
import dataclasses
import typing

import pytest

from hps_core.config import DeploymentConfig, read_hps_json


def _base():
    return {
        "supportlonglong": True,
        "models": [{
            "model": "m", "sparse_files": ["/d/t0"], "embedding_vecsize_per_table": [16],
            "maxnum_catfeature_query_per_table_per_sample": [3], "default_value_for_each_table": [1.0],
            "deployed_device_list": [0],
        }],
    }


def _walk(cls, steps=(), in_model=False, per_table=False):
    """(dataclass, steps from a DeploymentConfig to an instance of it, read from a model object?, per-table?)."""
    yield cls, steps, in_model, per_table
    for name, tp in typing.get_type_hints(cls).items():
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            yield from _walk(tp, steps + (name,), in_model, per_table)
        elif origin is dict and dataclasses.is_dataclass(args[1]):  # models: the one model "m"
            yield from _walk(args[1], steps + (name, "m"), True, per_table)
        elif origin is list and dataclasses.is_dataclass(args[0]):  # tables: the one table
            yield from _walk(args[0], steps + (name, 0), in_model, True)


_CASES = [
    pytest.param(cls, f, steps, in_model, per_table, id=f"{cls.__name__}.{f.name}")
    for cls, steps, in_model, per_table in _walk(DeploymentConfig)
    for f in dataclasses.fields(cls) if "hps" in f.metadata
]

# Extra JSON that a class's keys need to be in effect (merged before the key under test is set).
_CONTEXT = {
    "HostMemoryTierConfig": {"volatile_db": {"type": "hash_map"}},
    "RedisClusterTierConfig": {"volatile_db": {"type": "redis_cluster", "num_partitions": 8}},
    "RocksDBTierConfig": {"persistent_db": {"type": "rocks_db"}},
}
# Fields whose generic new value (below) is not valid or not distinguishable:
# "Class.field" -> (JSON value, expected field value, extra JSON merged into the model object / top level).
_SPECIAL = {
    "DeploymentConfig.key_dtype": (False, "int32", {}),
    "ModelConfig.deployed_device_list": ([1, 2], [1, 2], {}),
    "ModelConfig.fuse_embedding_table": (False, False, {"top": {"fuse_embedding_table": True}}),
    "CacheConfig.policy": ("lfu", "lfu", {}),
    "CacheConfig.admission": ("tinylfu", "tinylfu", {"model": {"gpucache_policy": "lfu"}}),
    "CacheConfig.type": ("static", "static", {}),
    "CacheConfig.refresh_interval": (2, 2.0, {}),  # HPS reads whole seconds
    "CacheConfig.second_level": ("host_mapped", "host_mapped", {}),
    "CacheConfig.storage": ("float16", "float16", {}),
    "HostMemoryTierConfig.overflow_margin": (1000, 1000, {}),
    "HostMemoryTierConfig.overflow_policy": ("oldest", "evict_oldest", {}),
    "RedisClusterTierConfig.overflow_margin": (1000, 1000, {}),
    "RedisClusterTierConfig.overflow_policy": ("least_used", "evict_least_used", {}),
    "RedisClusterTierConfig.address": ("h1:1, h2:2", ["h1:1", "h2:2"], {}),
    "UpdateSourceConfig.type": ("kafka", "kafka_message_queue", {}),
}


def _generic(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    if isinstance(value, str):
        return value + "_x"
    raise AssertionError(f"no generic new value for {value!r}: add the field to _SPECIAL")


def _get(cfg, steps):
    for s in steps:
        cfg = cfg[s] if isinstance(s, (int, str)) and isinstance(cfg, (dict, list)) else getattr(cfg, s)
    return cfg


def _merge(dst, src):
    for k, v in src.items():
        if isinstance(v, dict):
            _merge(dst.setdefault(k, {}), v)
        else:
            dst[k] = copy.deepcopy(v)


@pytest.mark.parametrize("cls, f, steps, in_model, per_table", _CASES)
def test_every_hps_field_is_read_from_its_key(cls, f, steps, in_model, per_table):
    d = _base()
    _merge(d, _CONTEXT.get(cls.__name__, {}))
    special = _SPECIAL.get(f"{cls.__name__}.{f.name}")
    if special:
        _merge(d, special[2].get("top", {}))
        _merge(d["models"][0], special[2].get("model", {}))
    key = f.metadata["hps"]
    *objects, leaf = key.split(".")
    node = d["models"][0] if in_model else d
    assert not (in_model and objects), f"{key}: a model's field cannot be read from a nested object"
    for o in objects:
        node = node.setdefault(o, {})

    before = getattr(_get(read_hps_json(d), steps), f.name)
    json_value, expected = special[:2] if special else (_generic(before),) * 2
    assert expected != before, f"{key}: pick a value other than the reader's default {before!r}"
    node[leaf] = [json_value] if per_table else json_value
    assert getattr(_get(read_hps_json(d), steps), f.name) == expected, key


def test_cases_cover_every_schema():
    classes = {p.values[0].__name__ for p in _CASES}
    assert classes == {"DeploymentConfig", "ModelConfig", "TableConfig", "CacheConfig", "HostMemoryTierConfig",
                       "RedisClusterTierConfig", "RocksDBTierConfig", "UpdateSourceConfig"}
    ids = {p.id for p in _CASES}
    assert set(_SPECIAL) <= ids, f"stale _SPECIAL entries: {set(_SPECIAL) - ids}"
    assert len(_CASES) >= 70
