"""Tests of hps_core.config: Hydra composition of conf/, the HPS JSON reader, aliases, validation errors, round trips.

Everything here is real: configs are composed by Hydra from the repository's conf/ tree, HPS JSON files are written
to tmp files and read back, YAML round trips go through files.
"""

import copy
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf, open_dict

from hps_core.config import (
    MAX_INT64,
    CacheConfig,
    ConfigError,
    DeploymentConfig,
    ModelConfig,
    RunConfig,
    TableConfig,
    load_config,
    read_hps_json,
    register_configs,
    to_yaml,
    validate,
)

REPO = Path(__file__).resolve().parents[2]
CONF_DIR = REPO / "conf"
DEFAULT_PARTITIONS = min(16, os.cpu_count() or 1)
DELETE = object()


# ------------------------------------------------------------------------------------------------ helpers


def _compose(overrides=()):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _set(d, dotted, value):
    """Set (or delete with DELETE) a nested key; numeric parts index lists. Missing dicts are created."""
    parts = dotted.split(".")
    node = d
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    elif value is DELETE:
        del node[last]
    else:
        node[last] = value
    return d


def _write_json(tmp_path, data, name="ps.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data, indent=2))
    return p


def _ours():
    """A small valid config in our schema's shape."""
    return {
        "models": {
            "demo": {
                "tables": [
                    {"name": "a", "path": "/d/a", "dim": 8},
                    {"name": "b", "path": "/d/b", "dim": 4, "max_keys_per_sample": 3, "default_value": -1.0},
                ]
            }
        }
    }


def _tf_unit_test_json():
    """The config of HPS's TF unit test (hps_tf/test/unit/test_hps.py): models foo (1 table) and bar (2 tables)."""
    common = {
        "num_of_worker_buffer_in_pool": 3,
        "deployed_device_list": [0],
        "max_batch_size": 1024,
        "cache_refresh_percentage_per_iteration": 0.2,
        "hit_rate_threshold": 1.0,
        "gpucacheper": 1.0,
        "gpucache": True,
    }
    return {
        "supportlonglong": False,
        "models": [
            {
                "model": "foo",
                "sparse_files": ["foo_sparse.model"],
                "embedding_table_names": ["sparse_embedding0"],
                "embedding_vecsize_per_table": [16],
                "maxnum_catfeature_query_per_table_per_sample": [10],
                "default_value_for_each_table": [1.0],
                **common,
            },
            {
                "model": "bar",
                "sparse_files": ["bar_sparse_0.model", "bar_sparse_1.model"],
                "embedding_table_names": ["sparse_embedding0", "sparse_embedding1"],
                "embedding_vecsize_per_table": [64, 32],
                "maxnum_catfeature_query_per_table_per_sample": [3, 5],
                "default_value_for_each_table": [1.0, 1],
                **common,
            },
        ],
    }


def _redis_rocks_json():
    d = _tf_unit_test_json()
    d["supportlonglong"] = True
    d["volatile_db"] = {
        "type": "redis_cluster",
        "address": "127.0.0.1:7000,127.0.0.1:7001, 127.0.0.1:7002",
        "user_name": "hps",
        "password": "secret",
        "num_partitions": 8,
        "num_node_connections": 4,
        "max_batch_size": 10000,
        "overflow_margin": 10000000,
        "overflow_policy": "evict_oldest",
        "overflow_resolution_target": 0.7,
        "initial_cache_rate": 0.5,
        "cache_missed_embeddings": True,
        "enable_tls": True,
        "tls_server_name_identification": "redis.example",
        "update_filters": [".+"],
        "initialize_after_startup": True,
    }
    d["persistent_db"] = {
        "type": "rocks_db",
        "path": "/data/hps_rocksdb",
        "num_threads": 8,
        "read_only": True,
        "max_batch_size": 1000,
        "update_filters": [".+"],
    }
    d["update_source"] = {"type": "kafka_message_queue", "brokers": "10.0.0.1:9092;10.0.0.2:9092",
                          "poll_timeout_ms": 100, "max_commit_interval": 8}
    return d


def _assert_error(excinfo, path, value):
    err = excinfo.value
    msg = str(err)
    assert err.path == path, msg
    assert path in msg, msg
    assert repr(value) in msg, msg


# ------------------------------------------------------------------------------------------------ Hydra


def test_compose_default(monkeypatch, tmp_path):
    monkeypatch.setenv("HPS_DATA_DIR", str(tmp_path))
    composed = _compose()
    assert isinstance(composed, DictConfig)
    cfg = load_config(composed)
    assert type(cfg) is DeploymentConfig
    assert list(cfg.models) == ["demo"]
    demo = cfg.models["demo"]
    assert [t.name for t in demo.tables] == ["user", "item", "category"]
    assert [t.dim for t in demo.tables] == [16, 32, 64]
    assert [t.path for t in demo.tables] == [f"{tmp_path}/demo/{n}" for n in ("user", "item", "category")]
    assert demo.cache.ratio == 0.25 and demo.cache.enabled and demo.cache.type == "dynamic"
    assert demo.max_batch_size == 256 and demo.deployed_device_list == [0]
    assert cfg.key_dtype == "int64"
    assert cfg.tiers.host_memory.enabled
    assert not cfg.tiers.redis_cluster.enabled and not cfg.tiers.rocksdb.enabled
    assert cfg.update_source.type == "none"


def test_compose_data_dir_default_without_env(monkeypatch):
    monkeypatch.delenv("HPS_DATA_DIR", raising=False)
    cfg = load_config(_compose())
    assert cfg.models["demo"].tables[0].path == "./hps_data/demo/user"


def test_compose_with_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("HPS_DATA_DIR", str(tmp_path))
    cfg = load_config(_compose(["tiers=host_rocksdb", "models.demo.cache.ratio=0.5", "+model@models.dlrm=dlrm",
                                "key_dtype=int32"]))
    assert list(cfg.models) == ["demo", "dlrm"]
    assert cfg.models["demo"].cache.ratio == 0.5
    assert cfg.key_dtype == "int32"
    dlrm = cfg.models["dlrm"]
    assert len(dlrm.tables) == 1
    t = dlrm.tables[0]
    assert (t.dim, t.max_keys_per_sample, t.path) == (128, 26, f"{tmp_path}/dlrm/categorical")
    assert dlrm.cache.ratio == 0.2
    assert cfg.tiers.rocksdb.enabled and cfg.tiers.rocksdb.path == f"{tmp_path}/rocksdb"
    assert cfg.tiers.host_memory.enabled and cfg.tiers.host_memory.overflow_policy == "evict_least_used"
    assert cfg.tiers.host_memory.overflow_margin == 1_000_000
    assert not cfg.tiers.redis_cluster.enabled


def test_compose_redis_tiers():
    cfg = load_config(_compose(["tiers=host_redis_rocksdb"]))
    r = cfg.tiers.redis_cluster
    assert r.enabled and r.address == ["127.0.0.1:7000", "127.0.0.1:7001", "127.0.0.1:7002"]
    assert r.num_node_connections <= r.num_partitions
    assert cfg.tiers.host_memory.enabled and cfg.tiers.rocksdb.enabled


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF_DIR / "tiers").glob("*.yaml")))
def test_every_tiers_option_validates(option):
    cfg = load_config(_compose([f"tiers={option}"]))
    assert cfg.tiers.host_memory.enabled  # every shipped layout keeps the host tier in front


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")))
def test_every_model_option_validates(option):
    cfg = load_config(_compose([f"+model@models.extra={option}"]))
    assert cfg.models["extra"].tables


def test_compose_bad_override_is_reported_with_path():
    with pytest.raises(ConfigError) as e:
        load_config(_compose(["models.demo.cache.ratio=1.5"]))
    _assert_error(e, "models.demo.cache.ratio", 1.5)
    with pytest.raises(ConfigError) as e:
        load_config(_compose(["+models.demo.bogus=1"]))
    _assert_error(e, "models.demo.bogus", 1)
    assert "known keys of ModelConfig" in str(e.value)


def test_compose_to_object_runconfig_loads():
    obj = OmegaConf.to_object(_compose())
    assert isinstance(obj, RunConfig)
    cfg = load_config(obj)
    assert type(cfg) is DeploymentConfig and cfg == load_config(_compose())


def test_schema_rejects_wrong_type_at_compose_time():
    # The ConfigStore schemas make Hydra itself refuse a value of the wrong type.
    with pytest.raises(ConfigCompositionException, match="max_batch_size"):
        _compose(["models.demo.max_batch_size=lots"])


def test_mistyped_top_level_key_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException, match="tier"):
        _compose(["tier=host_memory"])


def test_run_level_sections_dropped_unresolved():
    # A composed config may carry run-level sections (bench, demo) that only resolve inside a Hydra run.
    node = _compose()
    with open_dict(node):
        node.bench = {"out": "${hydra:runtime.output_dir}/bench"}
        node.demo = {"batches": 3, "where": "${oc.env:NO_SUCH_VARIABLE_HPS}"}
    assert load_config(node) == load_config(_compose())


def test_run_level_keys_dropped_from_dict():
    d = _ours()
    d["data_dir"] = "/somewhere"
    d["bench"] = {"iters": 3}
    assert load_config(d) == load_config(_ours())


# ------------------------------------------------------------------------------------------------ HPS JSON


def test_hps_tf_unit_test_config(tmp_path):
    cfg = load_config(_write_json(tmp_path, _tf_unit_test_json()))
    assert type(cfg) is DeploymentConfig
    assert cfg.key_dtype == "int32"
    assert list(cfg.models) == ["foo", "bar"]
    foo, bar = cfg.models["foo"], cfg.models["bar"]
    assert foo.tables == [TableConfig("sparse_embedding0", "foo_sparse.model", 16, 10, 1.0)]
    assert bar.tables == [
        TableConfig("sparse_embedding0", "bar_sparse_0.model", 64, 3, 1.0),
        TableConfig("sparse_embedding1", "bar_sparse_1.model", 32, 5, 1.0),
    ]
    for m in (foo, bar):
        assert m.deployed_device_list == [0] and m.max_batch_size == 1024
        c = m.cache
        assert (c.enabled, c.ratio, c.hit_rate_threshold, c.refresh_percentage, c.num_worker_buffers) == (
            True, 1.0, 1.0, 0.2, 3)
        # Every omitted key takes the HPS parser's default.
        assert c == CacheConfig(ratio=1.0, hit_rate_threshold=1.0, refresh_percentage=0.2, num_worker_buffers=3)
        assert (m.dense_file, m.maxnum_des_feature_per_sample, m.fuse_embedding_table) == ("", 26, False)
    h = cfg.tiers.host_memory  # no volatile_db => parallel hash map with defaults
    assert h.enabled and h.num_partitions == DEFAULT_PARTITIONS and h.overflow_margin == MAX_INT64
    assert (h.overflow_policy, h.overflow_resolution_target, h.allocation_rate, h.max_batch_size) == (
        "evict_random", 0.8, 256 * 1024**2, 65536)
    assert (h.initial_cache_rate, h.cache_missed_embeddings) == (1.0, False)
    assert not cfg.tiers.redis_cluster.enabled and not cfg.tiers.rocksdb.enabled
    assert cfg.update_source.type == "none" and cfg.update_source.metadata_refresh_interval_ms == 30000
    assert cfg.fuse_embedding_table is False
    # A dict gives the same result as the file.
    assert read_hps_json(_tf_unit_test_json()) == cfg


def test_hps_defaults_of_minimal_model():
    d = _tf_unit_test_json()
    d["supportlonglong"] = True
    d["models"] = [{k: v for k, v in d["models"][1].items() if k in (
        "model", "sparse_files", "deployed_device_list", "maxnum_catfeature_query_per_table_per_sample",
        "embedding_vecsize_per_table", "default_value_for_each_table")}]
    cfg = read_hps_json(d)
    m = cfg.models["bar"]
    assert cfg.key_dtype == "int64"
    assert [t.name for t in m.tables] == ["sparse_embedding0", "sparse_embedding1"]
    assert m.max_batch_size == 64
    assert m.cache == CacheConfig()  # gpucache true, 0.2, 0.9, workers 1 (parser, not docs' 2), ...
    assert m.cache.num_worker_buffers == 1 and m.cache.num_refresher_buffers == 1


def test_hps_redis_and_rocksdb(tmp_path, caplog):
    with caplog.at_level(logging.DEBUG, logger="hps_core.config"):
        cfg = load_config(_write_json(tmp_path, _redis_rocks_json()))
    r, h, p = cfg.tiers.redis_cluster, cfg.tiers.host_memory, cfg.tiers.rocksdb
    assert r.enabled and not h.enabled
    assert r.address == ["127.0.0.1:7000", "127.0.0.1:7001", "127.0.0.1:7002"]
    assert (r.user_name, r.password, r.num_partitions, r.num_node_connections, r.max_batch_size) == (
        "hps", "secret", 8, 4, 10000)
    assert (r.overflow_margin, r.overflow_policy, r.overflow_resolution_target) == (10000000, "evict_oldest", 0.7)
    assert r.cache_missed_embeddings and r.enable_tls and r.tls_server_name_identification == "redis.example"
    assert (r.tls_ca_certificate, r.tls_client_certificate, r.tls_client_key) == (
        "cacertbundle.crt", "client_cert.pem", "client_key.pem")
    assert r.timeout_ms == 500
    assert h.initial_cache_rate == 0.5  # host-only keys still land in the (disabled) host config
    assert (p.enabled, p.path, p.num_threads, p.read_only, p.max_batch_size) == (
        True, "/data/hps_rocksdb", 8, True, 1000)
    u = cfg.update_source
    assert (u.type, u.brokers, u.poll_timeout_ms, u.max_commit_interval, u.max_batch_size) == (
        "kafka_message_queue", "10.0.0.1:9092;10.0.0.2:9092", 100, 8, 8192)
    assert "initialize_after_startup" in caplog.text


def test_hps_redis_default_num_partitions_is_parser_default():
    d = _redis_rocks_json()
    del d["volatile_db"]["num_partitions"]
    d["volatile_db"]["num_node_connections"] = 1
    assert read_hps_json(d).tiers.redis_cluster.num_partitions == DEFAULT_PARTITIONS


def test_hps_volatile_db_present_without_type_is_disabled():
    d = _tf_unit_test_json()
    d["volatile_db"] = {"num_partitions": 3, "overflow_margin": 1000}
    cfg = read_hps_json(d)
    assert not cfg.tiers.host_memory.enabled and not cfg.tiers.redis_cluster.enabled
    assert cfg.tiers.host_memory.num_partitions == 3 and cfg.tiers.host_memory.overflow_margin == 1000


def test_hps_hash_map_keys():
    d = _tf_unit_test_json()
    d["volatile_db"] = {"type": "hash_map", "num_partitions": 5, "allocation_rate": 1024, "overflow_margin": 77,
                        "overflow_policy": "least_used", "overflow_resolution_target": 0.5,
                        "cache_missed_embeddings": True, "max_batch_size": 100, "address": "h1:1,h2:2"}
    cfg = read_hps_json(d)
    h = cfg.tiers.host_memory
    assert h.enabled and (h.num_partitions, h.allocation_rate, h.overflow_margin, h.overflow_policy) == (
        5, 1024, 77, "evict_least_used")
    assert (h.overflow_resolution_target, h.cache_missed_embeddings, h.max_batch_size) == (0.5, True, 100)
    assert not cfg.tiers.redis_cluster.enabled and cfg.tiers.redis_cluster.address == ["h1:1", "h2:2"]
    assert cfg.tiers.redis_cluster.num_partitions == 8  # shared keys went to the active (host) tier


def test_hps_multi_process_hash_map_warns(caplog):
    d = _tf_unit_test_json()
    d["volatile_db"] = {"type": "multi_process_hash_map", "shared_memory_size": 1 << 30,
                        "shared_memory_name": "x", "shared_memory_auto_remove": False}
    with caplog.at_level(logging.WARNING, logger="hps_core.config"):
        cfg = read_hps_json(d)
    assert cfg.tiers.host_memory.enabled and not cfg.tiers.redis_cluster.enabled
    assert any(r.levelno == logging.WARNING and "not shared" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("pdb, enabled", [(None, False), ({}, False), ({"type": "disabled"}, False),
                                          ({"type": "rocks_db"}, True)])
def test_hps_persistent_db_presence(pdb, enabled):
    d = _tf_unit_test_json()
    if pdb is not None:
        d["persistent_db"] = pdb
    r = read_hps_json(d).tiers.rocksdb
    assert r.enabled is enabled
    assert r.path.endswith("rocksdb") and r.num_threads == 16 and not r.read_only and r.max_batch_size == 65536


def test_hps_use_static_table_forces_static():
    d = _tf_unit_test_json()
    d["models"][0].update(use_static_table=True, embedding_cache_type="uvm")
    d["models"][1]["embedding_cache_type"] = "uvm"
    cfg = read_hps_json(d)
    assert cfg.models["foo"].cache.type == "static" and cfg.models["bar"].cache.type == "uvm"


@pytest.mark.parametrize("global_flag, model_flag, expected", [
    (True, None, True), (True, False, False), (True, True, True), (False, True, False), (False, None, False)])
def test_hps_fusion_flags(global_flag, model_flag, expected):
    d = _tf_unit_test_json()
    d["fuse_embedding_table"] = global_flag
    if model_flag is not None:
        d["models"][0]["fuse_embedding_table"] = model_flag
    cfg = read_hps_json(d)
    assert cfg.fuse_embedding_table is global_flag
    assert cfg.models["foo"].fuse_embedding_table is expected


def test_hps_overflow_margin_clamped():
    d = _tf_unit_test_json()
    d["volatile_db"] = {"type": "parallel_hash_map", "overflow_margin": 2**64 - 1}
    assert read_hps_json(d).tiers.host_memory.overflow_margin == MAX_INT64
    d["volatile_db"]["overflow_margin"] = 2**63 + 5
    assert read_hps_json(d).tiers.host_memory.overflow_margin == MAX_INT64
    d["volatile_db"]["overflow_margin"] = 2**63 - 2
    assert read_hps_json(d).tiers.host_memory.overflow_margin == 2**63 - 2


def test_hps_ignored_keys_accepted(caplog):
    d = _tf_unit_test_json()
    d["models"][0].update(network_file="n.json", label_dim=1, slot_num=10, use_mixed_precision=False, scaler=1.0,
                          use_algorithm_search=True, use_cuda_graph=True, i64_input_key=True, device_id=0)
    d["volatile_db"] = {"type": "hash_map", "initialize_after_startup": False}
    d["persistent_db"] = {"type": "disabled", "initialize_after_startup": False}
    with caplog.at_level(logging.DEBUG, logger="hps_core.config"):
        assert read_hps_json(d) == read_hps_json(_set(_tf_unit_test_json(), "volatile_db", {"type": "hash_map"}))
    assert "network_file" in caplog.text and "i64_input_key" in caplog.text


def test_hps_all_model_keys_mapped():
    d = _tf_unit_test_json()
    d["models"][0].update(dense_file="dense.model", num_of_refresher_buffer_in_pool=2, maxnum_des_feature_per_sample=13,
                          refresh_delay=1.5, refresh_interval=30, use_context_stream=False,
                          use_hctr_cache_implementation=False, thread_pool_size=4, init_ec=False,
                          enable_pagelock=True, fp8_quant=True, embedding_cache_type="static", gpucache=False,
                          deployed_device_list=[1, 0])
    m = read_hps_json(d).models["foo"]
    c = m.cache
    assert (m.dense_file, m.maxnum_des_feature_per_sample, m.deployed_device_list) == ("dense.model", 13, [1, 0])
    assert (c.num_refresher_buffers, c.refresh_delay, c.refresh_interval, c.use_context_stream) == (2, 1.5, 30.0, False)
    assert (c.use_hctr_cache_implementation, c.thread_pool_size, c.init, c.enable_pagelock, c.fp8_quant) == (
        False, 4, False, True, True)
    assert (c.type, c.enabled) == ("static", False)


# ------------------------------------------------------------------------------------------------ aliases


@pytest.mark.parametrize("alias, host, redis", [
    *[(a, False, False) for a in ("disabled", "disable", "none")],
    *[(a, True, False) for a in ("hash_map", "hashmap", "hash", "map")],
    *[(a, True, False) for a in ("parallel_hash_map", "parallel_hashmap", "parallel_hash", "parallel_map")],
    *[(a, True, False) for a in ("multi_process_hash_map", "multi_process_hashmap", "multi_process_hash",
                                 "multi_process_map")],
    *[(a, False, True) for a in ("redis_cluster", "redis")],
])
def test_alias_volatile_db_type(alias, host, redis):
    d = _tf_unit_test_json()
    d["volatile_db"] = {"type": alias, "num_partitions": 8}
    t = read_hps_json(d).tiers
    assert (t.host_memory.enabled, t.redis_cluster.enabled) == (host, redis)


@pytest.mark.parametrize("alias, enabled", [("rocks_db", True), ("rocksdb", True), ("rocks", True),
                                            ("disabled", False), ("disable", False), ("none", False)])
def test_alias_persistent_db_type(alias, enabled):
    d = _tf_unit_test_json()
    d["persistent_db"] = {"type": alias}
    assert read_hps_json(d).tiers.rocksdb.enabled is enabled


@pytest.mark.parametrize("alias, canonical", [("random", "evict_random"), ("evict_random", "evict_random"),
                                              ("least_used", "evict_least_used"),
                                              ("evict_least_used", "evict_least_used"),
                                              ("oldest", "evict_oldest"), ("evict_oldest", "evict_oldest")])
def test_alias_overflow_policy(alias, canonical):
    d = _tf_unit_test_json()
    d["volatile_db"] = {"type": "hash_map", "overflow_policy": alias}
    assert read_hps_json(d).tiers.host_memory.overflow_policy == canonical
    ours = _ours()
    _set(ours, "tiers.host_memory.overflow_policy", alias)
    _set(ours, "tiers.redis_cluster.overflow_policy", alias)
    cfg = load_config(ours)
    assert cfg.tiers.host_memory.overflow_policy == canonical == cfg.tiers.redis_cluster.overflow_policy


@pytest.mark.parametrize("alias, canonical", [("dynamic", "dynamic"), ("stochastic", "dynamic"),
                                              ("static", "static"), ("uvm", "uvm")])
def test_alias_cache_type(alias, canonical):
    d = _tf_unit_test_json()
    d["models"][0]["embedding_cache_type"] = alias
    assert read_hps_json(d).models["foo"].cache.type == canonical
    assert load_config(_set(_ours(), "models.demo.cache.type", alias)).models["demo"].cache.type == canonical


@pytest.mark.parametrize("alias, canonical", [("null", "none"), ("none", "none"),
                                              ("kafka_message_queue", "kafka_message_queue"),
                                              ("kafka_mq", "kafka_message_queue"), ("kafka", "kafka_message_queue")])
def test_alias_update_source_type(alias, canonical):
    d = _tf_unit_test_json()
    d["update_source"] = {"type": alias}
    assert read_hps_json(d).update_source.type == canonical
    assert load_config(_set(_ours(), "update_source.type", alias)).update_source.type == canonical


@pytest.mark.parametrize("flag, dtype", [(True, "int64"), (False, "int32")])
def test_supportlonglong(flag, dtype):
    assert read_hps_json(_set(_tf_unit_test_json(), "supportlonglong", flag)).key_dtype == dtype


def test_validate_normalises_a_copy_and_leaves_input_unchanged():
    cfg = DeploymentConfig(models={"m": ModelConfig(tables=[TableConfig("t", "/d", 8)])})
    cfg.tiers.host_memory.overflow_policy = "oldest"
    cfg.models["m"].cache.type = "stochastic"
    before = copy.deepcopy(cfg)
    out = validate(cfg)
    assert out.tiers.host_memory.overflow_policy == "evict_oldest" and out.models["m"].cache.type == "dynamic"
    assert cfg == before and out is not cfg and out.models["m"] is not cfg.models["m"]


# ------------------------------------------------------------------------------------------------ HPS errors


def _hps_error(mutate, path, value, *also):
    d = _tf_unit_test_json()
    mutate(d)
    with pytest.raises(ConfigError) as e:
        read_hps_json(d)
    _assert_error(e, path, value)
    for text in also:
        assert text in str(e.value), str(e.value)
    return e


@pytest.mark.parametrize("key", ["sparse_files", "deployed_device_list", "maxnum_catfeature_query_per_table_per_sample",
                                 "embedding_vecsize_per_table", "default_value_for_each_table"])
def test_hps_missing_required_model_key(key):
    _hps_error(lambda d: d["models"][1].pop(key), f"models[1].{key}", None, "'bar'", "required")


@pytest.mark.parametrize("key", ["supportlonglong", "models"])
def test_hps_missing_required_global_key(key):
    _hps_error(lambda d: d.pop(key), key, None, "required")


def test_hps_empty_models():
    _hps_error(lambda d: d.update(models=[]), "models", [], "at least one model")


@pytest.mark.parametrize("name", [None, "", "foo bar", "x" * 121, "a.b"])
def test_hps_bad_model_name(name):
    def mutate(d):
        if name is None:
            del d["models"][0]["model"]
        else:
            d["models"][0]["model"] = name
    _hps_error(mutate, "models[0].model", "" if name is None else name, "[a-zA-Z0-9_\\-]{1,120}")


def test_hps_duplicate_model_name():
    _hps_error(lambda d: d["models"][1].update(model="foo"), "models[1].model", "foo", "duplicate")


@pytest.mark.parametrize("key, value", [
    ("sparse_files", ["a"]), ("maxnum_catfeature_query_per_table_per_sample", [1, 2, 3]),
    ("embedding_table_names", ["x", "y", "z"])])
def test_hps_list_length_mismatch(key, value):
    """Lists HPS indexes per table without a check (out of bounds: garbage) raise."""
    _hps_error(lambda d: d["models"][1].update({key: value}), f"models[1].{key}", value,
               f"has {len(value)} entries", "embedding_vecsize_per_table has 2", "'bar'")


@pytest.mark.parametrize("value, want", [([2.5], [2.5, 0.0]), ([], [0.0, 0.0]), ([1.0, 2.0, 3.0], [1.0, 2.0])])
def test_hps_default_values_padded_or_truncated_as_hps_does(value, want, caplog):
    """HPS pads default_value_for_each_table with 0.0 or truncates it to the table count (its context-stream and
    table-fusion examples give one value for many tables)."""
    d = _tf_unit_test_json()
    d["models"][1]["default_value_for_each_table"] = value
    with caplog.at_level(logging.INFO, logger="hps_core.config"):
        cfg = read_hps_json(d)
    assert [t.default_value for t in cfg.models["bar"].tables] == want
    assert "models[1]: default_value_for_each_table has" in caplog.text


def test_hps_refresh_interval_truncated_as_hps_does(caplog):
    d = _tf_unit_test_json()
    d["models"][0]["refresh_interval"] = 2.7
    with caplog.at_level(logging.WARNING, logger="hps_core.config"):
        cfg = read_hps_json(d)
    assert cfg.models["foo"].cache.refresh_interval == 2.0 and "refresh_interval = 2.7" in caplog.text


@pytest.mark.parametrize("path, value, err_path, err_value", [
    ("models.0.max_batch_size", "64", "models[0].max_batch_size", "64"),
    ("models.0.max_batch_size", 64.5, "models[0].max_batch_size", 64.5),
    ("models.1.default_value_for_each_table", [1.0, "x"], "models[1].default_value_for_each_table[1]", "x"),
    ("models.1.embedding_vecsize_per_table", [64, "32"], "models[1].embedding_vecsize_per_table[1]", "32"),
    ("models.1.embedding_vecsize_per_table", 64, "models[1].embedding_vecsize_per_table", 64),
    ("models.1.sparse_files", ["a", 3], "models[1].sparse_files[1]", 3),
    ("models.0.gpucache", "true", "models[0].gpucache", "true"),
    ("models.0.gpucacheper", True, "models[0].gpucacheper", True),
    ("models.0.deployed_device_list", [True], "models[0].deployed_device_list[0]", True),
    ("supportlonglong", "false", "supportlonglong", "false"),
    ("supportlonglong", 0, "supportlonglong", 0),
    ("volatile_db", "hash_map", "volatile_db", "hash_map"),
    ("volatile_db", {"type": "hash_map", "num_partitions": "4"}, "volatile_db.num_partitions", "4"),
    ("persistent_db", {"type": "rocks_db", "read_only": 1}, "persistent_db.read_only", 1),
    ("update_source", {"type": "kafka", "poll_timeout_ms": "5"}, "update_source.poll_timeout_ms", "5"),
    ("volatile_db", {"type": None}, "volatile_db.type", None),
])
def test_hps_wrong_types(path, value, err_path, err_value):
    _hps_error(lambda d: _set(d, path, value), err_path, err_value)


def test_hps_models_not_a_list():
    _hps_error(lambda d: d.update(models={"foo": {}}), "models", {"foo": {}}, "list")


@pytest.mark.parametrize("path, key", [
    ("bogus", "bogus"),
    ("models.0.gpu_cache_per", "models[0].gpu_cache_per"),
    ("volatile_db.adress", "volatile_db.adress"),
    ("persistent_db.paths", "persistent_db.paths"),
    ("update_source.broker", "update_source.broker"),
])
def test_hps_unknown_key(path, key, tmp_path, caplog):
    """HPS never reads keys it does not know: the config is accepted as HPS would run it, and each unknown key is
    logged with its path and the closest known key."""
    d = _tf_unit_test_json()
    d.setdefault("volatile_db", {"type": "hash_map"})
    d.setdefault("persistent_db", {"type": "rocks_db", "path": str(tmp_path / "db")})
    d.setdefault("update_source", {"type": "none"})
    _set(d, path, 1)
    with caplog.at_level(logging.WARNING, logger="hps_core.config"):
        cfg = read_hps_json(d)
    assert cfg.models["foo"].cache.ratio == 1.0  # the rest as written
    close = {"bogus": None, "models[0].gpu_cache_per": "gpucacheper", "volatile_db.adress": "address",
             "persistent_db.paths": "path", "update_source.broker": "brokers"}[key]
    msg = next(r.getMessage() for r in caplog.records if "unknown key" in r.getMessage())
    assert f"{key} = 1: unknown key" in msg and (close is None or f"did you mean {close!r}" in msg), msg


def test_hps_unknown_type_strings_take_hps_defaults(caplog):
    """HPS keeps its default for a cache or database type string it does not know; each is logged here."""
    d = _tf_unit_test_json()
    d["models"][0]["embedding_cache_type"] = "fast"
    d["volatile_db"] = {"type": "hashmapz"}
    d["persistent_db"] = {"type": "leveldb"}
    with caplog.at_level(logging.WARNING, logger="hps_core.config"):
        cfg = read_hps_json(d)
    assert cfg.models["foo"].cache.type == "dynamic"
    assert cfg.tiers.host_memory.enabled and not cfg.tiers.redis_cluster.enabled and not cfg.tiers.rocksdb.enabled
    for text in ("models[0].embedding_cache_type = 'fast'", "volatile_db.type = 'hashmapz'",
                 "persistent_db.type = 'leveldb'"):
        assert text in caplog.text, caplog.text


@pytest.mark.parametrize("path, value, err_path, bad", [
    ("volatile_db", {"type": "rocks_db"}, "volatile_db.type", "rocks_db"),
    ("persistent_db", {"type": "redis"}, "persistent_db.type", "redis"),
    ("persistent_db", {"type": "hash_map"}, "persistent_db.type", "hash_map"),
    ("update_source", {"type": "rabbitmq"}, "update_source.type", "rabbitmq"),
    ("volatile_db", {"type": "hash_map", "overflow_policy": "evict_all"}, "tiers.host_memory.overflow_policy",
     "evict_all"),
])
def test_hps_unknown_enum(path, value, err_path, bad):
    _hps_error(lambda d: _set(d, path, value), err_path, bad, "allowed")


@pytest.mark.parametrize("path, value, err_path, hps_key", [
    ("models.0.gpucacheper", 0.0, "models.foo.cache.ratio", "gpucacheper"),
    ("models.0.gpucacheper", 1.5, "models.foo.cache.ratio", "gpucacheper"),
    ("models.1.embedding_vecsize_per_table", [64, 0], "models.bar.tables[1].dim", "embedding_vecsize_per_table"),
    ("models.1.maxnum_catfeature_query_per_table_per_sample", [0, 1], "models.bar.tables[0].max_keys_per_sample",
     "maxnum_catfeature_query_per_table_per_sample"),
    ("models.0.deployed_device_list", [], "models.foo.deployed_device_list", "deployed_device_list"),
    ("models.0.num_of_worker_buffer_in_pool", 0, "models.foo.cache.num_worker_buffers", "num_of_worker_buffer_in_pool"),
    ("models.0.num_of_worker_buffer_in_pool", 257, "models.foo.cache.num_worker_buffers",
     "num_of_worker_buffer_in_pool"),
    ("models.0.cache_refresh_percentage_per_iteration", 1.1, "models.foo.cache.refresh_percentage",
     "cache_refresh_percentage_per_iteration"),
    ("models.0.hit_rate_threshold", -0.5, "models.foo.cache.hit_rate_threshold", "hit_rate_threshold"),
    ("models.0.max_batch_size", 0, "models.foo.max_batch_size", "max_batch_size"),
    ("models.1.embedding_table_names", ["t", "t"], "models.bar.tables[1].name", "embedding_table_names"),
    ("models.1.embedding_table_names", ["t", "bad name"], "models.bar.tables[1].name", "embedding_table_names"),
    ("update_source", {"type": "kafka", "metadata_refresh_interval_ms": 5},
     "update_source.metadata_refresh_interval_ms", "update_source.metadata_refresh_interval_ms"),
    ("update_source", {"type": "kafka", "max_commit_interval": 0}, "update_source.max_commit_interval",
     "update_source.max_commit_interval"),
    ("volatile_db", {"type": "redis", "num_partitions": 4, "num_node_connections": 5},
     "tiers.redis_cluster.num_node_connections", "volatile_db.num_node_connections"),
    ("volatile_db", {"type": "hash_map", "overflow_resolution_target": 1.0},
     "tiers.host_memory.overflow_resolution_target", "volatile_db.overflow_resolution_target"),
    ("volatile_db", {"type": "hash_map", "overflow_margin": 0}, "tiers.host_memory.overflow_margin",
     "volatile_db.overflow_margin"),
])
def test_hps_validation_errors_name_our_path_and_hps_key(path, value, err_path, hps_key):
    d = _tf_unit_test_json()
    _set(d, path, value)
    with pytest.raises(ConfigError) as e:
        read_hps_json(d)
    assert e.value.path == err_path, str(e.value)
    assert err_path in str(e.value) and f"HPS key: {hps_key}" in str(e.value), str(e.value)


def test_hps_invalid_json_file(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('{"supportlonglong": true, "models": [')
    with pytest.raises(ConfigError, match="broken.json"):
        load_config(p)
    p.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be an object"):
        load_config(p)


def test_hps_error_names_file(tmp_path):
    d = _tf_unit_test_json()
    d["models"][0]["gpucacheper"] = 2.0
    p = _write_json(tmp_path, d, "named.json")
    with pytest.raises(ConfigError, match="named.json"):
        load_config(p)


# ------------------------------------------------------------------------------------------------ our errors


@pytest.mark.parametrize("path, value, err_path, err_value", [
    ("models", {}, "models", {}),
    ("key_dtype", "int16", "key_dtype", "int16"),
    ("models.demo.tables", [], "models.demo.tables", []),
    ("models.demo.tables.1.name", "b b", "models.demo.tables[1].name", "b b"),
    ("models.demo.tables.1.name", "a", "models.demo.tables[1].name", "a"),
    ("models.demo.tables.1.name", DELETE, "models.demo.tables[1].name", None),
    ("models.demo.tables.1.path", DELETE, "models.demo.tables[1].path", None),
    ("models.demo.tables.1.path", "", "models.demo.tables[1].path", ""),
    ("models.demo.tables.1.dim", DELETE, "models.demo.tables[1].dim", None),
    ("models.demo.tables.1.dim", 0, "models.demo.tables[1].dim", 0),
    ("models.demo.tables.1.dim", "16", "models.demo.tables[1].dim", "16"),
    ("models.demo.tables.1.dim", True, "models.demo.tables[1].dim", True),
    ("models.demo.tables.1.dim", 1.5, "models.demo.tables[1].dim", 1.5),
    ("models.demo.tables.0.max_keys_per_sample", 0, "models.demo.tables[0].max_keys_per_sample", 0),
    ("models.demo.tables.0.default_value", float("nan"), "models.demo.tables[0].default_value", float("nan")),
    ("models.demo.tables.0.bogus", 1, "models.demo.tables[0].bogus", 1),
    ("models.demo.max_batch_size", 0, "models.demo.max_batch_size", 0),
    ("models.demo.max_batch_size", "64", "models.demo.max_batch_size", "64"),
    ("models.demo.deployed_device_list", [], "models.demo.deployed_device_list", []),
    ("models.demo.deployed_device_list", [0, 1, 0], "models.demo.deployed_device_list", [0, 1, 0]),
    ("models.demo.deployed_device_list", [0, -1], "models.demo.deployed_device_list[1]", -1),
    ("models.demo.deployed_device_list", 0, "models.demo.deployed_device_list", 0),
    ("models.demo.cache.ratio", 0.0, "models.demo.cache.ratio", 0.0),
    ("models.demo.cache.ratio", 1.01, "models.demo.cache.ratio", 1.01),
    ("models.demo.cache.hit_rate_threshold", -0.1, "models.demo.cache.hit_rate_threshold", -0.1),
    ("models.demo.cache.refresh_percentage", 1.5, "models.demo.cache.refresh_percentage", 1.5),
    ("models.demo.cache.refresh_interval", -1.0, "models.demo.cache.refresh_interval", -1.0),
    ("models.demo.cache.policy", "fifo", "models.demo.cache.policy", "fifo"),
    ("models.demo.cache.type", "hbm", "models.demo.cache.type", "hbm"),
    ("models.demo.cache.num_worker_buffers", 0, "models.demo.cache.num_worker_buffers", 0),
    ("models.demo.cache.num_refresher_buffers", 300, "models.demo.cache.num_refresher_buffers", 300),
    ("models.demo.cache.thread_pool_size", 0, "models.demo.cache.thread_pool_size", 0),
    ("models.demo.cache.enabled", "yes", "models.demo.cache.enabled", "yes"),
    ("models.demo.cache.bogus", 1, "models.demo.cache.bogus", 1),
    ("models.demo.cache", 5, "models.demo.cache", 5),
    ("models.bad name", {"tables": [{"name": "a", "path": "/d", "dim": 1}]}, "models.bad name", "bad name"),
    ("tiers.host_memory.num_partitions", 0, "tiers.host_memory.num_partitions", 0),
    ("tiers.host_memory.overflow_margin", 0, "tiers.host_memory.overflow_margin", 0),
    ("tiers.host_memory.overflow_policy", "lru", "tiers.host_memory.overflow_policy", "lru"),
    ("tiers.host_memory.overflow_resolution_target", 0.0, "tiers.host_memory.overflow_resolution_target", 0.0),
    ("tiers.host_memory.initial_cache_rate", 2.0, "tiers.host_memory.initial_cache_rate", 2.0),
    ("tiers.redis_cluster.num_node_connections", 9, "tiers.redis_cluster.num_node_connections", 9),
    ("tiers.redis_cluster.num_partitions", 0, "tiers.redis_cluster.num_partitions", 0),
    ("tiers.redis_cluster.overflow_resolution_target", 1.0, "tiers.redis_cluster.overflow_resolution_target", 1.0),
    ("tiers.redis_cluster.address", [], "tiers.redis_cluster.address", []),
    ("tiers.redis_cluster.address", ["h:99999"], "tiers.redis_cluster.address[0]", "h:99999"),
    ("tiers.redis_cluster.address", "h:1,h:2", "tiers.redis_cluster.address", "h:1,h:2"),
    ("tiers.redis_cluster.timeout_ms", 0, "tiers.redis_cluster.timeout_ms", 0),
    ("tiers.rocksdb.num_threads", 0, "tiers.rocksdb.num_threads", 0),
    ("tiers.rocksdb.path", "", "tiers.rocksdb.path", ""),
    ("tiers.rocksdb.max_batch_size", 0, "tiers.rocksdb.max_batch_size", 0),
    ("tiers.memcached", {}, "tiers.memcached", {}),
    ("update_source.type", "zmq", "update_source.type", "zmq"),
    ("update_source.metadata_refresh_interval_ms", 9, "update_source.metadata_refresh_interval_ms", 9),
    ("update_source.max_commit_interval", 0, "update_source.max_commit_interval", 0),
    ("bogus", 1, "bogus", 1),
])
def test_our_validation_errors(path, value, err_path, err_value, tmp_path):
    d = _set(_ours(), path, value)
    snapshot = copy.deepcopy(d)
    with pytest.raises(ConfigError) as e:
        load_config(d)
    err = e.value
    assert err.path == err_path, str(err)
    assert err_path in str(err)
    if isinstance(err_value, float) and math.isnan(err_value):
        assert "= nan:" in str(err), str(err)
    else:
        assert repr(err_value) in str(err), str(err)
    assert d == snapshot  # the input is untouched
    # The same error through a YAML file and through a DeploymentConfig-shaped DictConfig.
    p = tmp_path / "bad.yaml"
    p.write_text(OmegaConf.to_yaml(OmegaConf.create(d)))
    with pytest.raises(ConfigError) as e2:
        load_config(p)
    assert e2.value.path == err_path and "bad.yaml" in str(e2.value)


def test_hps_shaped_dict_to_load_config_gets_a_hint():
    with pytest.raises(ConfigError, match="looks like an HPS JSON config"):
        load_config(_tf_unit_test_json())


def test_validate_checks_types_of_dataclass_instances():
    cfg = DeploymentConfig(models={"m": ModelConfig(tables=[TableConfig("t", "/d", "8")])})
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    _assert_error(e, "models.m.tables[0].dim", "8")
    with pytest.raises(TypeError):
        validate({"models": {}})


def test_unresolvable_interpolation():
    node = OmegaConf.create({"models": {"m": {"tables": [{"name": "t", "path": "${nowhere}/x", "dim": 4}]}}})
    with pytest.raises(ConfigError) as e:
        load_config(node)
    assert e.value.path == "models.m.tables[0].path"


def test_bad_sources(tmp_path):
    with pytest.raises(TypeError):
        load_config(42)
    with pytest.raises(ConfigError, match=r"\.txt"):
        load_config(tmp_path / "x.txt")
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.json")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


# ------------------------------------------------------------------------------------------------ round trips


def _round_trip(cfg, tmp_path):
    p = tmp_path / "rt.yaml"
    p.write_text(to_yaml(cfg))
    return load_config(p)


def test_round_trip_composed(tmp_path):
    cfg = load_config(_compose(["tiers=host_redis_rocksdb", "+model@models.dlrm=dlrm"]))
    assert _round_trip(cfg, tmp_path) == cfg


def test_round_trip_hps_json(tmp_path):
    for data in (_tf_unit_test_json(), _redis_rocks_json()):
        cfg = load_config(_write_json(tmp_path, data))
        back = _round_trip(cfg, tmp_path)
        assert back == cfg and type(back) is DeploymentConfig


def test_round_trip_tricky_strings(tmp_path):
    d = _ours()
    _set(d, "models.demo.tables.0.path", "/data/${not_an_interpolation}/t")
    _set(d, "models.demo.dense_file", "true")
    _set(d, "tiers.redis_cluster.password", "1234")
    _set(d, "tiers.redis_cluster.user_name", "null")
    _set(d, "tiers.host_memory.overflow_margin", 2**64 - 1)
    cfg = load_config(d)
    assert cfg.tiers.host_memory.overflow_margin == MAX_INT64
    back = _round_trip(cfg, tmp_path)
    assert back == cfg
    assert back.models["demo"].tables[0].path == "/data/${not_an_interpolation}/t"
    assert back.tiers.redis_cluster.password == "1234" and back.models["demo"].dense_file == "true"


# ------------------------------------------------------------------------------------------------ import hygiene


def test_config_module_imports_neither_torch_nor_tensorflow():
    # Load hps_core/config.py on its own (the package __init__ is not this module's business).
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('hps_config_probe', {str(REPO / 'hps_core' / 'config.py')!r})\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['hps_config_probe'] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "mod.load_config({'models': {'m': {'tables': [{'name': 't', 'path': '/d', 'dim': 4}]}}})\n"
        "print(sorted(m for m in ('torch', 'tensorflow') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
