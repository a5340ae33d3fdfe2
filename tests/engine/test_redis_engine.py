"""The engine with a Redis Cluster tier (real 3-node cluster) above RocksDB: a node killed and restarted while
lookups run never surfaces an error to callers, values stay right (RocksDB, or the default when there is no tier
below), the counters say where rows came from, and the Redis tier hits again once the node is back."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import threading
import time

import numpy as np
import pytest
import torch

from hps_core.engine import HierarchicalParameterServer, make_tag
from hps_core.tables import write_table

pytest.importorskip("redis", reason="redis-py is not installed (the GPU machine has none; CI installs it)")
from hps_core.tiers.redis_cluster import RedisClusterTierError, partition_of

_spec = importlib.util.spec_from_file_location(
    "redis_fixture", pathlib.Path(__file__).resolve().parents[1] / "tiers" / "redis_fixture.py"
)
redis_fixture = sys.modules.get("redis_fixture") or importlib.util.module_from_spec(_spec)
if "redis_fixture" not in sys.modules:
    sys.modules["redis_fixture"] = redis_fixture
    _spec.loader.exec_module(redis_fixture)

pytestmark = [
    redis_fixture.requires_redis,
    pytest.mark.redis,
    pytest.mark.filterwarnings("ignore:no CUDA device:RuntimeWarning"),
]

USER, PASSWORD = "hps", "engine-pw-92ab"
DIM, ROWS, PARTS = 16, 3000, 8
TAG = make_tag("m", "t0")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with redis_fixture.LocalRedisCluster(tmp_path_factory.mktemp("redis_engine")) as rc:
        rc.acl_setuser(USER, PASSWORD)
        yield rc


@pytest.fixture
def fresh(cluster):
    cluster.flushall()
    yield cluster
    cluster.revive()


def table(tmp_path, seed=0):
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(-(2**40), 2**40, ROWS * 2))[:ROWS]
    rng.shuffle(keys)
    vectors = rng.standard_normal((keys.size, DIM)).astype(np.float32)
    write_table(tmp_path / "t0", keys, vectors)
    return keys, vectors


def config(cluster, tmp_path, *, rocksdb=True, default=0.0):
    return {
        "key_dtype": "int64",
        "models": {"m": {
            "tables": [{"name": "t0", "path": str(tmp_path / "t0"), "dim": DIM, "max_keys_per_sample": 64,
                        "default_value": default}],
            "max_batch_size": 256,
            "deployed_device_list": [0],
            "cache": {"ratio": 0.05, "hit_rate_threshold": 1.1},
        }},
        "tiers": {
            "host_memory": {"enabled": False},
            "redis_cluster": {"enabled": True, "address": cluster.addresses, "user_name": USER,
                              "password": PASSWORD, "num_partitions": PARTS, "num_node_connections": 2,
                              "timeout_ms": 300},
            "rocksdb": {"enabled": rocksdb, "path": str(tmp_path / "rocksdb")},
        },
    }


def victim_keys(cluster, keys, node):
    """Mask of the keys whose partition lives on `node`."""
    from redis.crc import key_slot

    owners = np.array([cluster.node_index_of_slot(key_slot(f"hps_et{{{TAG}/p{p}}}v".encode()))
                       for p in range(PARTS)])
    return owners[partition_of(keys, PARTS)] == node


def redis_tier(hps):
    (tier,) = [t for t in hps.tiers if t.name == "redis_cluster"]
    return tier


def table_stats(hps):
    return hps.stats()["models"]["m"]["t0"]["cpu"]


def wait_node_up(tier, address, deadline_s=30.0):
    end = time.monotonic() + deadline_s
    probe = torch.arange(4096, dtype=torch.int64)
    while not tier.health()[address]["up"]:
        assert time.monotonic() < end, f"{address} not back after {deadline_s} s: {tier.health()[address]}"
        tier.fetch(TAG, probe)  # a probe is what brings a node back
        time.sleep(0.05)


class Runner(threading.Thread):
    """Lookups in a loop, each checked against the files; records any exception or wrong value."""

    def __init__(self, hps, keys, vectors, default, mask_default=None):
        super().__init__(daemon=True)
        self.hps, self.keys, self.vectors, self.default = hps, keys, vectors, default
        self.mask_default = mask_default  # keys whose rows may legitimately be the default while their node is down
        self.stop = threading.Event()
        self.problems: list[str] = []
        self.lookups = 0

    def run(self):
        rng = np.random.default_rng(7)
        while not self.stop.is_set():
            idx = rng.integers(0, self.keys.size, (64, 8))
            try:
                out = self.hps.lookup("m", "t0", torch.from_numpy(self.keys[idx])).numpy()
            except Exception as exc:  # the point of the test: must never happen
                self.problems.append(f"lookup raised {type(exc).__name__}: {exc}")
                continue
            want = self.vectors[idx]
            ok = np.all(out == want, axis=-1)
            if self.mask_default is not None:
                ok |= self.mask_default[idx] & np.all(out == self.default, axis=-1)
            if not ok.all():
                self.problems.append(f"{int((~ok).sum())} wrong rows in lookup {self.lookups}")
            self.lookups += 1


def test_node_killed_mid_run_falls_through_to_rocksdb_and_recovers(fresh, tmp_path):
    keys, vectors = table(tmp_path)
    with HierarchicalParameterServer(config(fresh, tmp_path), progress=False) as hps:
        tier = redis_tier(hps)
        assert tier.size(TAG) == ROWS
        victim = 1
        address = fresh.addresses[victim]
        on_victim = victim_keys(fresh, keys, victim)
        assert 0 < on_victim.sum() < ROWS

        runner = Runner(hps, keys, vectors, 0.0)
        runner.start()
        time.sleep(0.5)
        before = table_stats(hps)["tier_hits"]
        fresh.save(victim)  # the node keeps its rows over the restart
        fresh.kill(victim)
        time.sleep(1.5)
        during = table_stats(hps)["tier_hits"]
        tier_errors = hps.stats()["tiers"]["redis_cluster"][TAG]["errors"]
        fresh.restart(victim)
        wait_node_up(tier, address)
        time.sleep(0.5)
        runner.stop.set()
        runner.join()

        assert runner.problems == []
        assert runner.lookups > 10
        assert tier_errors > 0  # the Redis tier counted the keys it could not serve ...
        assert during.get("rocksdb", 0) > before.get("rocksdb", 0)  # ... and RocksDB served them
        assert table_stats(hps)["defaults_served"] == 0

        # Back: the victim's keys come from Redis again, none from RocksDB.
        hits = table_stats(hps)["tier_hits"]
        errors = hps.stats()["tiers"]["redis_cluster"][TAG]["errors"]
        sel = keys[on_victim]
        out = hps.lookup("m", "t0", torch.from_numpy(sel)).numpy()
        assert np.array_equal(out, vectors[on_victim])
        after = table_stats(hps)["tier_hits"]
        assert after.get("redis_cluster", 0) > hits.get("redis_cluster", 0)
        assert after.get("rocksdb", 0) == hits.get("rocksdb", 0)
        assert hps.stats()["tiers"]["redis_cluster"][TAG]["errors"] == errors
        assert PASSWORD not in str(hps.stats())


def test_without_rocksdb_a_dead_node_serves_defaults_and_update_restores(fresh, tmp_path):
    keys, vectors = table(tmp_path, seed=1)
    default = -7.0
    with HierarchicalParameterServer(config(fresh, tmp_path, rocksdb=False, default=default),
                                     progress=False) as hps:
        tier = redis_tier(hps)
        victim = 2
        address = fresh.addresses[victim]
        on_victim = victim_keys(fresh, keys, victim)
        fresh.kill(victim)  # no save: the node comes back empty

        runner = Runner(hps, keys, vectors, default, mask_default=on_victim)
        runner.start()
        time.sleep(1.0)
        runner.stop.set()
        runner.join()
        assert runner.problems == []
        sel = keys[on_victim][:50]
        out = hps.lookup("m", "t0", torch.from_numpy(sel)).numpy()
        assert np.all(out == default)
        assert table_stats(hps)["defaults_served"] > 0
        assert hps.stats()["tiers"]["redis_cluster"][TAG]["errors"] > 0

        # Writes need the node: update raises naming it, and lookups keep working.
        with pytest.raises(RedisClusterTierError, match=address):
            hps.update("m", "t0", torch.from_numpy(sel), torch.ones(sel.size, DIM))
        hps.lookup("m", "t0", torch.from_numpy(keys[:100]))

        fresh.restart(victim)
        wait_node_up(tier, address)
        new_rows = np.full((on_victim.sum(), DIM), 3.5, np.float32)
        hps.update("m", "t0", torch.from_numpy(keys[on_victim]), torch.from_numpy(new_rows))
        values, found = tier.fetch(TAG, torch.from_numpy(keys[on_victim]))
        assert found.all() and np.all(values.numpy() == 3.5)  # update wrote through the Redis tier
        out = hps.lookup("m", "t0", torch.from_numpy(keys)).numpy()
        expected = vectors.copy()
        expected[on_victim] = 3.5
        assert np.array_equal(out, expected)


@pytest.mark.parametrize("host,rocksdb", [(False, False), (True, False), (False, True), (True, True)])
def test_updates_survive_a_restart_with_redis(fresh, tmp_path, host, rocksdb):
    """update -> close -> restart: the Redis cluster keeps its rows and its load record, so the start does not reload
    the files over the update; host memory and RocksDB (when configured) serve the updated rows too."""
    keys, vectors = table(tmp_path)
    cfg = config(fresh, tmp_path, rocksdb=rocksdb)
    cfg["tiers"]["host_memory"] = {"enabled": host, "num_partitions": 2}
    old = keys[:20]
    new_key = np.array([1 << 50])
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        hps.update("m", 0, torch.from_numpy(old), torch.full((20, DIM), 77.0))
        hps.update("m", 0, torch.from_numpy(new_key), torch.full((1, DIM), 5.0))
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        assert [t.name for t in hps.tiers] == (["host_memory"] if host else []) + ["redis_cluster"] + (
            ["rocksdb"] if rocksdb else [])
        for tier in hps.tiers:
            values, found = tier.fetch(TAG, torch.from_numpy(old))
            assert bool(found.all()) and bool((values == 77.0).all()), tier.name
        assert bool((hps.lookup("m", 0, torch.from_numpy(old)) == 77.0).all())
        assert bool((hps.lookup("m", 0, torch.from_numpy(new_key)) == 5.0).all())
        np.testing.assert_array_equal(hps.lookup("m", 0, torch.from_numpy(keys[100:150])).numpy(), vectors[100:150])


def test_resident_table_over_a_shared_redis_asks_it_for_keys_it_lacks(fresh, tmp_path):
    """Redis is shared by several servers (shared = True): a key another server wrote there after this one started
    is served from Redis even by a table resident here (ratio 1.0); a key no tier holds gets the default. Without
    a shared tier the same table answers for every key itself (tests/engine/test_pipeline.py)."""
    keys, vectors = table(tmp_path)
    cfg = config(fresh, tmp_path, rocksdb=False, default=-2.0)
    cfg["models"]["m"]["cache"]["ratio"] = 1.0
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        pipe = hps.pipeline("m", "t0", "cpu")
        assert pipe.kind == "resident" and not pipe.answers_all
        new_key = np.array([1 << 50], dtype=np.int64)
        # another server's update, straight into the cluster
        redis_tier(hps).insert(TAG, torch.from_numpy(new_key), torch.full((1, DIM), 7.0))
        q = torch.tensor([int(new_key[0]), int(keys[3]), 1 << 51])
        out = hps.lookup("m", "t0", q)
        assert bool((out[0] == 7.0).all()) and bool((out[2] == -2.0).all())
        np.testing.assert_array_equal(out[1].numpy(), vectors[3])
        assert table_stats(hps)["tier_hits"]["redis_cluster"] == 1
