"""RedisClusterTier against a real local 3-node Redis Cluster (redis-server processes started by the fixture).

Covers: results equal the table files, HPS's layout (hash per partition, raw key / raw float32 bytes), partitions
spread over the nodes, max_batch_size chunking seen from the server, writes/erase/size, overflow eviction
(random, LRU, LFU), faults (killed / hung / restarted node, start-up errors), AUTH with an ACL user, TLS, and no
secrets in logs or stats.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time

import numpy as np
import pytest
import torch
from redis.crc import key_slot

from hps_core.tables import open_table, write_table
from hps_core.tiers.redis_cluster import RedisClusterTier, RedisClusterTierError, partition_of

try:  # tests/ as a package (with __init__.py files) ...
    from .redis_fixture import LocalRedisCluster, TLSFiles, free_ports, requires_redis
except ImportError:  # ... or pytest's default rootdir-relative imports (this directory on sys.path)
    from redis_fixture import LocalRedisCluster, TLSFiles, free_ports, requires_redis

pytestmark = [requires_redis, pytest.mark.redis]

USER, PASSWORD = "hps", "s3cret-pw-7c1f"
FAST = dict(timeout_ms=300, retry_backoff_ms=100, max_backoff_ms=400)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalRedisCluster(tmp_path_factory.mktemp("redis")) as rc:
        rc.acl_setuser(USER, PASSWORD)
        yield rc


@pytest.fixture
def fresh(cluster):
    """The shared cluster, emptied, with every node up (a test that kills a node restarts it)."""
    cluster.revive()
    cluster.flushall()
    yield cluster
    cluster.revive()


@pytest.fixture
def tiers():
    made: list[RedisClusterTier] = []
    yield made
    for t in made:
        t.close()


def make_tier(cluster, tiers, **kw) -> RedisClusterTier:
    args = dict(user_name=USER, password=PASSWORD, num_partitions=16, num_node_connections=4, **FAST)
    args.update(kw)
    tier = RedisClusterTier(cluster.addresses, **args)
    tiers.append(tier)
    return tier


def random_table(rng, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    extremes = np.array([np.iinfo(np.int64).min, np.iinfo(np.int64).max, 0, -1, 1], np.int64)
    keys = np.unique(np.concatenate([extremes, rng.integers(-(2**62), 2**62, n)]))[: n + len(extremes)]
    rng.shuffle(keys)
    return keys, rng.standard_normal((keys.size, dim)).astype(np.float32)


def hkey(tag: str, p: int, suffix: str = "v") -> bytes:
    return f"hps_et{{{tag}/p{p}}}{suffix}".encode()


def node_of_partition(cluster, tag: str, p: int) -> int:
    """Index of the node serving partition p of `tag`, as the cluster itself reports it."""
    return cluster.node_index_of_slot(key_slot(hkey(tag, p)))


def keys_on_node(cluster, tag: str, keys: np.ndarray, num_partitions: int, node: int) -> np.ndarray:
    parts = partition_of(keys, num_partitions)
    owners = np.array([node_of_partition(cluster, tag, p) for p in range(num_partitions)])
    return owners[parts] == node


def fetch_np(tier, tag, keys):
    values, found = tier.fetch(tag, torch.from_numpy(np.ascontiguousarray(keys)))
    return values.numpy(), found.numpy()


def wait_all_found(tier, tag, keys, deadline_s: float = 30.0):
    end = time.monotonic() + deadline_s
    while True:
        values, found = fetch_np(tier, tag, keys)
        if found.all() or time.monotonic() > end:
            return values, found
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------ correctness


def test_load_then_fetch_equals_table_files(fresh, tiers, tmp_path):
    rng = np.random.default_rng(1)
    keys, vectors = random_table(rng, 5000, 16)
    files = write_table(tmp_path / "t0", keys, vectors)
    tier = make_tier(fresh, tiers)
    tag = "hps_et.m.t0"
    tier.create_table(tag, 16)
    assert tier.load(tag, open_table(tmp_path / "t0", 16), progress=False) == files.num_keys
    assert tier.size(tag) == keys.size

    absent = np.setdiff1d(rng.integers(-(2**62), 2**62, 300), keys)
    query = np.concatenate([keys, keys[:700], absent])  # every key, duplicates, missing keys
    order = rng.permutation(query.size)
    query = query[order]
    values, found = fetch_np(tier, tag, query)
    expected_found = np.isin(query, keys)
    assert np.array_equal(found, expected_found)
    row_of = {int(k): i for i, k in enumerate(keys)}
    expected = np.zeros((query.size, 16), np.float32)
    for i, k in enumerate(query.tolist()):
        if k in row_of:
            expected[i] = vectors[row_of[k]]
    assert np.array_equal(values, expected)  # bit-exact: raw float32 bytes round-trip
    s = tier.stats()[tag]
    assert (s.fetches, s.keys_requested, s.keys_found, s.errors) == (1, query.size, int(expected_found.sum()), 0)

    v0, f0 = tier.fetch(tag, torch.empty(0, dtype=torch.int64))
    assert v0.shape == (0, 16) and v0.dtype == torch.float32 and f0.shape == (0,)


def test_layout_is_hps_hash_per_partition(fresh, tiers):
    tier = make_tier(fresh, tiers, num_partitions=8)
    tag = "hps_et.layout.t"
    tier.create_table(tag, 4)
    keys = np.array([0, 1, -1, 123456789, np.iinfo(np.int64).min], np.int64)
    vals = np.arange(20, dtype=np.float32).reshape(5, 4)
    assert tier.insert(tag, torch.from_numpy(keys), torch.from_numpy(vals)) == 5

    # rrxmrrxmsx_0 written with Python ints, independently of the numpy version.
    mask = (1 << 64) - 1

    def ror(x, r):
        return ((x >> r) | (x << (64 - r))) & mask

    def mix(k):
        v = k & mask
        v ^= ror(v, 25) ^ ror(v, 50)
        v = (v * 0xA24BAED4963EE407) & mask
        v ^= ror(v, 24) ^ ror(v, 49)
        v = (v * 0x9FB21C651E98DF25) & mask
        return v ^ (v >> 28)

    for k, row in zip(keys.tolist(), vals):
        p = mix(k) % 8
        node = node_of_partition(fresh, tag, p)
        with contextlib.closing(fresh.admin(node)) as c:
            stored = c.hget(hkey(tag, p), int(k).to_bytes(8, "little", signed=True))
        assert stored == row.tobytes()
    # No LRU/LFU meta hash without overflow handling (written lazily, only when eviction needs it).
    for p in range(8):
        with contextlib.closing(fresh.admin(node_of_partition(fresh, tag, p))) as c:
            assert not c.exists(hkey(tag, p, "t"))


def test_partitions_spread_over_nodes(fresh, tiers):
    tier = make_tier(fresh, tiers, num_partitions=16)
    tag = "hps_et.spread.t"
    tier.create_table(tag, 8)
    rng = np.random.default_rng(2)
    keys = np.unique(rng.integers(0, 2**40, 20000))
    tier.insert(tag, torch.from_numpy(keys), torch.from_numpy(rng.random((keys.size, 8), dtype=np.float32)))
    owners = [node_of_partition(fresh, tag, p) for p in range(16)]
    assert set(owners) == {0, 1, 2}, owners
    for i in range(3):
        with contextlib.closing(fresh.admin(i)) as c:
            names = sorted(c.keys("*"))
            expected = sorted(hkey(tag, p) for p in range(16) if owners[p] == i)
            if owners[0] == i:  # the table's storage record, in partition 0's slot
                expected = sorted(expected + [hkey(tag, 0, "storage")])
                assert c.get(hkey(tag, 0, "storage")) == b"float32"
            assert names == expected  # one hash per partition, each on the node that owns its slot
            held = sum(c.hlen(n) for n in names if not n.endswith(b"storage"))
        assert held == int(keys_on_node(fresh, tag, keys, 16, i).sum()) > 0


def test_batches_are_chunked_by_max_batch_size(fresh, tiers):
    tier = make_tier(fresh, tiers, num_partitions=4, num_node_connections=2, max_batch_size=100)
    tag = "hps_et.chunks.t"
    tier.create_table(tag, 4)
    rng = np.random.default_rng(3)
    keys = np.unique(rng.integers(0, 2**40, 3000))
    vals = rng.random((keys.size, 4), dtype=np.float32)
    for i in range(3):
        with contextlib.closing(fresh.admin(i)) as c:
            c.config_resetstat()
    tier.insert(tag, torch.from_numpy(keys), torch.from_numpy(vals))
    values, found = fetch_np(tier, tag, keys)
    assert found.all() and np.array_equal(values, vals)
    counts = np.bincount(partition_of(keys, 4), minlength=4)
    expected_cmds = sum(math.ceil(c / 100) for c in counts)  # one command per (partition, chunk of <= 100 keys)

    def calls(cmd):
        total = 0
        for i in range(3):
            with contextlib.closing(fresh.admin(i)) as c:
                total += c.info("commandstats").get(f"cmdstat_{cmd}", {}).get("calls", 0)
        return total

    assert calls("hset") == expected_cmds
    assert calls("hmget") == expected_cmds


def test_insert_overwrite_duplicates_erase_size(fresh, tiers):
    tier = make_tier(fresh, tiers)
    tag = "hps_et.rw.t"
    tier.create_table(tag, 3)
    keys = torch.tensor([5, 6, 7], dtype=torch.int64)
    assert tier.insert(tag, keys, torch.ones(3, 3)) == 3
    assert tier.insert(tag, keys[:2], torch.full((2, 3), 2.0)) == 0  # overwrite: nothing new
    # duplicates in one batch: the last row wins (as in the engine and the other tiers)
    assert tier.insert(tag, torch.tensor([8, 8]), torch.tensor([[1.0] * 3, [9.0] * 3])) == 1
    values, found = tier.fetch(tag, torch.tensor([5, 6, 7, 8, 9]))
    assert found.tolist() == [True, True, True, True, False]
    assert values[:, 0].tolist() == [2.0, 2.0, 1.0, 9.0, 0.0]
    assert tier.size(tag) == 4
    assert tier.erase(tag, torch.tensor([5, 9, 8])) == 2
    assert tier.size(tag) == 2
    assert tier.fetch(tag, torch.tensor([5, 6]))[1].tolist() == [False, True]
    assert tier.stats()[tag].keys_inserted == 7


def test_tables_are_separate_and_dims_checked(fresh, tiers):
    tier = make_tier(fresh, tiers)
    tier.create_table("hps_et.a.t", 4)
    tier.create_table("hps_et.a.t", 4)  # idempotent
    tier.create_table("hps_et.b.t", 4)
    tier.insert("hps_et.a.t", torch.tensor([1]), torch.ones(1, 4))
    assert tier.fetch("hps_et.b.t", torch.tensor([1]))[1].tolist() == [False]
    with pytest.raises(ValueError, match="dim 4"):
        tier.create_table("hps_et.a.t", 8)
    # Another tier instance (another process) declaring the stored table with a different dim is refused.
    other = make_tier(fresh, tiers)
    with pytest.raises(ValueError, match="16 bytes"):
        other.create_table("hps_et.a.t", 8)
    with pytest.raises(ValueError, match="braces"):
        tier.create_table("bad{tag}", 4)


def test_bad_inputs_raise_and_change_nothing(fresh, tiers):
    tier = make_tier(fresh, tiers)
    tag = "hps_et.bad.t"
    tier.create_table(tag, 4)
    with pytest.raises(KeyError, match="unknown table"):
        tier.fetch("hps_et.nope", torch.tensor([1]))
    with pytest.raises(TypeError, match="int64"):
        tier.fetch(tag, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="shape"):
        tier.insert(tag, torch.tensor([1, 2]), torch.ones(2, 5))
    with pytest.raises(TypeError, match="float32"):
        tier.insert(tag, torch.tensor([1, 2]), torch.ones(2, 4, dtype=torch.float64))
    assert tier.size(tag) == 0


def test_rows_of_the_wrong_size_are_reported_missing(fresh, tiers):
    tier = make_tier(fresh, tiers, num_partitions=1, num_node_connections=1)
    tag = "hps_et.corrupt.t"
    tier.create_table(tag, 4)
    keys = np.arange(10, dtype=np.int64)
    vals = np.arange(40, dtype=np.float32).reshape(10, 4)
    tier.insert(tag, torch.from_numpy(keys), torch.from_numpy(vals))
    with contextlib.closing(fresh.admin(node_of_partition(fresh, tag, 0))) as c:  # someone writes 3 floats
        c.hset(hkey(tag, 0), int(3).to_bytes(8, "little", signed=True), np.zeros(3, np.float32).tobytes())
    values, found = fetch_np(tier, tag, keys)
    assert found.tolist() == [k != 3 for k in range(10)]
    assert np.array_equal(values[found], vals[found]) and not values[3].any()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_partitions=2, num_node_connections=3), "num_node_connections"),
        (dict(overflow_policy="lru"), "overflow_policy"),
        (dict(overflow_resolution_target=1.0), "overflow_resolution_target"),
        (dict(max_batch_size=0), "max_batch_size"),
        (dict(timeout_ms=0), "timeout_ms"),
    ],
)
def test_bad_config_raises_before_connecting(kw, match):
    with pytest.raises(ValueError, match=match):
        RedisClusterTier(["127.0.0.1:1"], **kw)


def test_bad_address_raises():
    with pytest.raises(ValueError, match=r"address\[1\]"):
        RedisClusterTier(["127.0.0.1:7000", "127.0.0.1:99999"])


def test_concurrent_fetches_from_many_threads(fresh, tiers):
    tier = make_tier(fresh, tiers, num_node_connections=2)
    tag = "hps_et.mt.t"
    tier.create_table(tag, 8)
    rng = np.random.default_rng(4)
    keys = np.unique(rng.integers(0, 2**40, 8000))
    vals = rng.random((keys.size, 8), dtype=np.float32)
    tier.insert(tag, torch.from_numpy(keys), torch.from_numpy(vals))
    failures: list[str] = []

    def worker(seed):
        r = np.random.default_rng(seed)
        for _ in range(20):
            idx = r.integers(0, keys.size, 500)
            values, found = fetch_np(tier, tag, keys[idx])
            if not (found.all() and np.array_equal(values, vals[idx])):
                failures.append(f"thread {seed}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert tier.stats()[tag].errors == 0


# ---------------------------------------------------------------------------------------------------- config


def test_from_config_dataclass_mapping_and_hps_json(fresh, tiers, tmp_path):
    from hps_core import config as hps_config

    cfg = hps_config.RedisClusterTierConfig(enabled=True, address=fresh.addresses, user_name=USER,
                                            password=PASSWORD, num_partitions=4, num_node_connections=2,
                                            max_batch_size=1000, timeout_ms=300)
    tier = RedisClusterTier.from_config(cfg)
    tiers.append(tier)
    assert (tier.num_partitions, tier.num_node_connections, tier.max_batch_size) == (4, 2, 1000)

    tier2 = RedisClusterTier.from_config({"address": ",".join(fresh.addresses), "user_name": USER,
                                          "password": PASSWORD, "num_partitions": 6, "num_node_connections": 1})
    tiers.append(tier2)
    assert tier2.num_partitions == 6

    # HPS JSON: volatile_db of type redis_cluster with HPS's comma-separated address string.
    (tmp_path / "t0").mkdir()
    write_table(tmp_path / "t0", np.arange(10), np.ones((10, 4), np.float32), overwrite=True)
    hps_json = {
        "supportlonglong": True,
        "volatile_db": {"type": "redis_cluster", "address": ",".join(fresh.addresses), "user_name": USER,
                        "password": PASSWORD, "num_partitions": 5, "num_node_connections": 2,
                        "max_batch_size": 777, "overflow_margin": 1000, "overflow_policy": "oldest"},
        "models": [{"model": "m", "sparse_files": [str(tmp_path / "t0")], "embedding_table_names": ["t0"],
                    "embedding_vecsize_per_table": [4], "maxnum_catfeature_query_per_table_per_sample": [2],
                    "default_value_for_each_table": [0.0], "deployed_device_list": [0], "max_batch_size": 16,
                    "gpucacheper": 0.5, "hit_rate_threshold": 1.0, "gpucache": True}],
    }
    path = tmp_path / "hps.json"
    path.write_text(json.dumps(hps_json))
    deployment = hps_config.load_config(str(path))
    assert deployment.tiers.redis_cluster.enabled
    tier3 = RedisClusterTier.from_config(deployment.tiers.redis_cluster)
    tiers.append(tier3)
    assert (tier3.num_partitions, tier3.max_batch_size, tier3.overflow_margin, tier3.overflow_policy) == (
        5, 777, 1000, "evict_oldest")
    tier3.create_table("hps_et.json.t", 4)
    tier3.insert("hps_et.json.t", torch.tensor([1, 2]), torch.ones(2, 4))
    assert tier3.fetch("hps_et.json.t", torch.tensor([1, 2]))[1].all()


def test_from_yaml_config(fresh, tiers, tmp_path):
    from hps_core import config as hps_config

    write_table(tmp_path / "t0", np.arange(10), np.ones((10, 4), np.float32))
    addresses = ", ".join(f'"{a}"' for a in fresh.addresses)
    (tmp_path / "deploy.yaml").write_text(f"""
key_dtype: int64
models:
  m:
    tables:
      - {{name: t0, path: "{tmp_path / 't0'}", dim: 4, max_keys_per_sample: 2}}
tiers:
  host_memory: {{enabled: false}}
  redis_cluster:
    enabled: true
    address: [{addresses}]
    user_name: {USER}
    password: "{PASSWORD}"
    num_partitions: 12
    num_node_connections: 3
    max_batch_size: 4096
    overflow_margin: 100000
    overflow_policy: evict_random
    overflow_resolution_target: 0.5
    timeout_ms: 250
""")
    deployment = hps_config.load_config(str(tmp_path / "deploy.yaml"))
    tier = RedisClusterTier.from_config(deployment.tiers.redis_cluster)
    tiers.append(tier)
    assert (tier.num_partitions, tier.num_node_connections, tier.max_batch_size, tier.overflow_margin,
            tier.overflow_resolution_target, tier.timeout_s) == (12, 3, 4096, 100000, 0.5, 0.25)
    tier.create_table("hps_et.yaml.t", 4)
    assert tier.insert("hps_et.yaml.t", torch.tensor([3]), torch.ones(1, 4)) == 1


# ---------------------------------------------------------------------------------------------------- faults


def loaded_tier(cluster, tiers, tag, n=6000, dim=8, seed=5, **kw):
    tier = make_tier(cluster, tiers, **kw)
    tier.create_table(tag, dim)
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(-(2**50), 2**50, n))
    vals = rng.standard_normal((keys.size, dim)).astype(np.float32)
    tier.insert(tag, torch.from_numpy(keys), torch.from_numpy(vals))
    return tier, keys, vals


def test_killed_node_keys_reported_missing_then_recovered(fresh, tiers):
    tag = "hps_et.kill.t"
    tier, keys, vals = loaded_tier(fresh, tiers, tag)
    victim = 1
    on_victim = keys_on_node(fresh, tag, keys, 16, victim)
    assert 0 < on_victim.sum() < keys.size
    fresh.save(victim)  # persistence: the restarted node reloads its rows
    fresh.kill(victim)

    for _ in range(5):  # never raises; exactly the victim's keys are missing; the rest are right
        values, found = fetch_np(tier, tag, keys)
        assert np.array_equal(found, ~on_victim)
        assert np.array_equal(values[found], vals[found])
        assert not values[~found].any()
    s = tier.stats()[tag]
    assert s.errors == 5 * int(on_victim.sum())  # every missing key is counted as an error
    assert s.failed_requests >= 1
    assert s.keys_found == 5 * int((~on_victim).sum())
    victim_name = fresh.addresses[victim]
    assert tier.health()[victim_name]["up"] is False

    fresh.restart(victim)
    values, found = wait_all_found(tier, tag, keys)
    assert found.all() and np.array_equal(values, vals)  # the tier hits again without any action
    health = tier.health()[victim_name]
    assert health["up"] and health["recoveries"] >= 1
    errors_after = tier.stats()[tag].errors
    fetch_np(tier, tag, keys)
    assert tier.stats()[tag].errors == errors_after


def test_restarted_node_without_persistence_misses_until_rewritten(fresh, tiers):
    tag = "hps_et.nopersist.t"
    tier, keys, vals = loaded_tier(fresh, tiers, tag)
    victim = 2
    on_victim = keys_on_node(fresh, tag, keys, 16, victim)
    fresh.kill(victim)  # no SAVE: the node comes back empty
    fetch_np(tier, tag, keys)
    fresh.restart(victim)
    end = time.monotonic() + 30
    while tier.health()[fresh.addresses[victim]]["up"] is False and time.monotonic() < end:
        fetch_np(tier, tag, keys)
        time.sleep(0.05)
    errors = tier.stats()[tag].errors
    values, found = fetch_np(tier, tag, keys)
    assert np.array_equal(found, ~on_victim)  # plain misses now: the node answers, it just lost the rows
    assert tier.stats()[tag].errors == errors
    tier.insert(tag, torch.from_numpy(keys[on_victim]), torch.from_numpy(vals[on_victim]))
    values, found = fetch_np(tier, tag, keys)
    assert found.all() and np.array_equal(values, vals)


def test_hung_node_costs_one_timeout_per_backoff_interval(fresh, tiers):
    tag = "hps_et.hung.t"
    # A long backoff makes the count exact: one attempt (one timeout), then skipping.
    tier, keys, vals = loaded_tier(fresh, tiers, tag, timeout_ms=200, retry_backoff_ms=60000,
                                   max_backoff_ms=60000)
    victim = 0
    on_victim = keys_on_node(fresh, tag, keys, 16, victim)
    fresh.pause(victim)  # SIGSTOP: connects, never answers
    try:
        for _ in range(4):
            values, found = fetch_np(tier, tag, keys)
            assert np.array_equal(found, ~on_victim)
            assert np.array_equal(values[found], vals[found])
    finally:
        fresh.resume(victim)
    s = tier.stats()[tag]
    assert s.failed_requests == 1  # the first call timed out once ...
    assert s.keys_skipped == 3 * int(on_victim.sum())  # ... later calls did not wait on the node at all
    assert s.errors == 4 * int(on_victim.sum())
    assert "Timeout" in tier.health()[fresh.addresses[victim]]["last_error"]


def test_full_coverage_cluster_answering_clusterdown_never_raises(tmp_path, tiers):
    """Redis's default cluster-require-full-coverage yes: once the dead master is marked FAIL, the live ones
    refuse every key (CLUSTERDOWN). Lookups still return (all keys counted missing) and recover afterwards."""
    with LocalRedisCluster(tmp_path / "full", require_full_coverage=True, node_timeout_ms=500) as rc:
        tier = RedisClusterTier(rc.addresses, num_partitions=16, num_node_connections=4, **FAST)
        tiers.append(tier)
        tag = "hps_et.clusterdown.t"
        tier.create_table(tag, 4)
        keys = np.arange(3000, dtype=np.int64)
        vals = np.random.default_rng(8).random((keys.size, 4), dtype=np.float32)
        tier.insert(tag, torch.from_numpy(keys), torch.from_numpy(vals))
        rc.save(0)
        rc.kill(0)
        with contextlib.closing(rc.admin(1)) as c:
            end = time.monotonic() + 30
            while c.cluster("INFO")["cluster_state"] != "fail" and time.monotonic() < end:
                time.sleep(0.05)
            assert c.cluster("INFO")["cluster_state"] == "fail"
        values, found = fetch_np(tier, tag, keys)
        assert not found.any() and not values.any()
        assert tier.stats()[tag].errors == keys.size
        rc.restart(0)
        values, found = wait_all_found(tier, tag, keys)
        assert found.all() and np.array_equal(values, vals)


def test_writes_to_a_dead_node_raise_naming_it(fresh, tiers):
    tag = "hps_et.deadwrite.t"
    tier, keys, vals = loaded_tier(fresh, tiers, tag)
    victim = 1
    on_victim = keys_on_node(fresh, tag, keys, 16, victim)
    fresh.kill(victim)
    new_vals = vals + 1
    with pytest.raises(RedisClusterTierError, match=fresh.addresses[victim]):
        tier.insert(tag, torch.from_numpy(keys), torch.from_numpy(new_vals))
    assert tier.stats()[tag].keys_not_written == int(on_victim.sum())
    values, found = fetch_np(tier, tag, keys)
    assert np.array_equal(values[~on_victim], new_vals[~on_victim])  # the live nodes took their rows
    with pytest.raises(RedisClusterTierError):
        tier.size(tag)


def test_start_with_one_node_down_is_degraded_not_fatal(fresh, tiers):
    tag = "hps_et.degraded.t"
    tier, keys, vals = loaded_tier(fresh, tiers, tag)
    tier.close()
    fresh.kill(0)
    tier2 = make_tier(fresh, tiers)  # the dead node is the first seed
    assert tier2.health()[fresh.addresses[0]]["up"] is False
    tier2.create_table(tag, 8)
    on_dead = keys_on_node(fresh, tag, keys, 16, 0)
    values, found = fetch_np(tier2, tag, keys)
    assert np.array_equal(found, ~on_dead)


def test_unreachable_cluster_at_startup_is_a_clear_error():
    (port,) = free_ports(1)
    with pytest.raises(RedisClusterTierError, match=rf"cannot use any node of \['127.0.0.1:{port}'\]"):
        RedisClusterTier([f"127.0.0.1:{port}"], timeout_ms=300)


# -------------------------------------------------------------------------------------------------- security


def test_acl_user_authenticates(fresh, tiers):
    tier = make_tier(fresh, tiers)
    tier.create_table("hps_et.acl.t", 4)
    tier.insert("hps_et.acl.t", torch.tensor([1]), torch.ones(1, 4))
    assert tier.fetch("hps_et.acl.t", torch.tensor([1]))[1].all()
    users = set()
    for i in range(3):
        with contextlib.closing(fresh.admin(i)) as c:
            users |= {cl["user"] for cl in c.client_list() if cl.get("name") == "hps_core"}
    assert users == {USER}


@pytest.mark.parametrize("user, password", [(USER, "wrong-password"), ("nobody", PASSWORD)])
def test_wrong_credentials_fail_at_startup(fresh, user, password, caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RedisClusterTierError, match="authentication failed") as info:
        RedisClusterTier(fresh.addresses, user_name=user, password=password, **FAST)
    assert user in str(info.value)
    assert password not in str(info.value)
    assert all(password not in r.getMessage() for r in caplog.records)


def test_acl_user_missing_on_one_node_is_a_startup_error(fresh):
    for i in (0, 1):
        with contextlib.closing(fresh.admin(i)) as c:
            c.execute_command("ACL", "SETUSER", "partial", "reset", "on", ">pw-partial", "~*", "&*", "+@all")
    try:
        with pytest.raises(RedisClusterTierError, match=rf"authentication failed at {fresh.addresses[2]}"):
            RedisClusterTier(fresh.addresses, user_name="partial", password="pw-partial", **FAST)
    finally:
        for i in (0, 1):
            with contextlib.closing(fresh.admin(i)) as c:
                c.execute_command("ACL", "DELUSER", "partial")


def test_no_secret_in_logs_stats_or_repr(fresh, tiers, caplog):
    caplog.set_level(logging.DEBUG)
    tag = "hps_et.secret.t"
    tier, keys, _ = loaded_tier(fresh, tiers, tag, n=500)
    fresh.kill(2)
    fetch_np(tier, tag, keys)
    with contextlib.suppress(RedisClusterTierError):
        tier.insert(tag, torch.from_numpy(keys[:10]), torch.zeros(10, 8))
    fresh.restart(2)
    end = time.monotonic() + 30
    while not tier.health()[fresh.addresses[2]]["up"] and time.monotonic() < end:
        fetch_np(tier, tag, keys)
        time.sleep(0.05)
    text = " ".join(r.getMessage() for r in caplog.records)
    text += repr(tier) + str(tier.stats()) + str(tier.health())
    assert PASSWORD not in text
    assert "node" in text  # the failure was logged at all


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("redis_tls")
    files = TLSFiles.create(base / "certs")
    with LocalRedisCluster(base, tls=files) as rc:
        rc.acl_setuser(USER, PASSWORD)
        yield rc


def tls_kwargs(files: TLSFiles, **over):
    kw = dict(enable_tls=True, tls_ca_certificate=str(files.ca), tls_client_certificate=str(files.client_cert),
              tls_client_key=str(files.client_key), tls_server_name_identification=files.server_name,
              user_name=USER, password=PASSWORD, num_partitions=8, num_node_connections=2, **FAST)
    kw.update(over)
    return kw


def test_tls_with_client_certificate_and_sni(tls_cluster, tiers):
    files = tls_cluster.tls
    tier = RedisClusterTier(tls_cluster.addresses, **tls_kwargs(files))
    tiers.append(tier)
    tag = "hps_et.tls.t"
    tier.create_table(tag, 8)
    rng = np.random.default_rng(6)
    keys = np.unique(rng.integers(0, 2**40, 2000))
    vals = rng.random((keys.size, 8), dtype=np.float32)
    tier.insert(tag, torch.from_numpy(keys), torch.from_numpy(vals))
    values, found = fetch_np(tier, tag, keys)
    assert found.all() and np.array_equal(values, vals)


def test_tls_rejects_wrong_server_name_wrong_ca_and_plain(tls_cluster, tmp_path):
    files = tls_cluster.tls
    with pytest.raises(RedisClusterTierError, match="(?i)certificate|hostname|ssl"):
        RedisClusterTier(tls_cluster.addresses, **tls_kwargs(files, tls_server_name_identification="other.host"))
    other = TLSFiles.create(tmp_path / "other")
    with pytest.raises(RedisClusterTierError, match="(?i)certificate|ssl"):
        RedisClusterTier(tls_cluster.addresses, **tls_kwargs(files, tls_ca_certificate=str(other.ca)))
    with pytest.raises(RedisClusterTierError):  # plain TCP to a TLS port
        RedisClusterTier(tls_cluster.addresses, user_name=USER, password=PASSWORD, **FAST)
    with pytest.raises(FileNotFoundError, match="tls_ca_certificate"):
        RedisClusterTier(tls_cluster.addresses, **tls_kwargs(files, tls_ca_certificate=str(tmp_path / "none.crt")))


# -------------------------------------------------------------------------------------------------- overflow


def test_overflow_evict_random_bounds_every_partition(fresh, tiers):
    tag = "hps_et.ovr.t"
    tier = make_tier(fresh, tiers, num_partitions=4, num_node_connections=2, overflow_margin=50,
                     overflow_policy="evict_random", overflow_resolution_target=0.8)
    tier.create_table(tag, 4)
    rng = np.random.default_rng(7)
    keys = np.unique(rng.integers(0, 2**40, 1000))
    vals = rng.random((keys.size, 4), dtype=np.float32)
    for start in range(0, keys.size, 100):
        tier.insert(tag, torch.from_numpy(keys[start:start + 100]), torch.from_numpy(vals[start:start + 100]))
    sizes = []
    for p in range(4):
        with contextlib.closing(fresh.admin(node_of_partition(fresh, tag, p))) as c:
            sizes.append(c.hlen(hkey(tag, p)))
    assert max(sizes) <= 50
    size = tier.size(tag)
    assert size == sum(sizes)
    assert tier.stats()[tag].keys_evicted == keys.size - size
    values, found = fetch_np(tier, tag, keys)
    assert found.sum() == size
    assert np.array_equal(values[found], vals[found])  # survivors keep their own rows


def test_overflow_evict_oldest_keeps_recently_fetched(fresh, tiers):
    tag = "hps_et.lru.t"
    tier = make_tier(fresh, tiers, num_partitions=1, num_node_connections=1, overflow_margin=100,
                     overflow_policy="evict_oldest", overflow_resolution_target=0.5)
    tier.create_table(tag, 4)
    keys = np.arange(1000, 1100, dtype=np.int64)
    tier.insert(tag, torch.from_numpy(keys), torch.zeros(100, 4))  # exactly at the margin: nothing evicted
    assert tier.size(tag) == 100
    time.sleep(0.02)  # LRU time has millisecond resolution: let the clock move
    recent = keys[:30]
    assert fetch_np(tier, tag, recent)[1].all()  # touches their LRU time
    time.sleep(0.02)
    tier.insert(tag, torch.tensor([5000]), torch.zeros(1, 4))  # 101 > 100 -> prune to 50: 51 oldest go
    assert tier.size(tag) == 50
    found = fetch_np(tier, tag, np.concatenate([recent, [5000]]))[1]
    assert found.all()
    assert fetch_np(tier, tag, keys[30:])[1].sum() == 19
    assert tier.stats()[tag].keys_evicted == 51


def test_overflow_evict_least_used_keeps_frequently_fetched(fresh, tiers):
    tag = "hps_et.lfu.t"
    tier = make_tier(fresh, tiers, num_partitions=1, num_node_connections=1, overflow_margin=100,
                     overflow_policy="least_used", overflow_resolution_target=0.5)
    tier.create_table(tag, 4)
    keys = np.arange(100, dtype=np.int64)
    tier.insert(tag, torch.from_numpy(keys), torch.zeros(100, 4))
    hot, warm = keys[:30], keys[30:50]
    fetch_np(tier, tag, hot)
    fetch_np(tier, tag, hot)
    fetch_np(tier, tag, warm)
    with contextlib.closing(fresh.admin(node_of_partition(fresh, tag, 0))) as c:
        assert int(c.hget(hkey(tag, 0, "t"), int(hot[0]).to_bytes(8, "little", signed=True))) == 2
    tier.insert(tag, torch.tensor([777]), torch.zeros(1, 4))  # 101 -> 50: the 51 keys never fetched go
    assert tier.size(tag) == 50
    assert fetch_np(tier, tag, np.concatenate([hot, warm]))[1].all()
    assert not fetch_np(tier, tag, keys[50:])[1].any()
    assert not fetch_np(tier, tag, np.array([777]))[1].any()  # new, count 0: least used too
