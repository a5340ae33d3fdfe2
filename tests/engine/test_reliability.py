"""Regression tests of issue 13's nine defects: state that outlived a failed start, updates lost on restart, racing
writers, leaks. Real components throughout: RocksDB directories, the host map, threads, a subprocess."""

from __future__ import annotations

import gc
import logging
import os
import tempfile
import threading
import time
import weakref

import numpy as np
import psutil
import pytest
import torch

import hps_core
from hps_core.engine import HierarchicalParameterServer
from hps_core.nn import LookupLayer
from hps_core.tables import TableFileError, write_table
from hps_core.tiers.rocksdb import RocksDBTier

from engine_refs import Reference, make_table

pytestmark = pytest.mark.filterwarnings("ignore:no CUDA device:RuntimeWarning")
TAG = "hps_et.m.t"


def config(tmp_path, path, dim, *, tiers=("host_memory", "rocksdb"), ratio=0.3, cache=True, mode="dynamic"):
    return {
        "key_dtype": "int64",
        "models": {"m": {"tables": [{"name": "t", "path": str(path), "dim": dim, "max_keys_per_sample": 4096}],
                         "max_batch_size": 1, "deployed_device_list": [0],
                         "cache": {"enabled": cache, "ratio": ratio, "type": mode, "hit_rate_threshold": 1.1}}},
        "tiers": {"host_memory": {"enabled": "host_memory" in tiers, "num_partitions": 2},
                  "rocksdb": {"enabled": "rocksdb" in tiers, "path": str(tmp_path / "rocksdb")}},
    }


@pytest.fixture
def table(tmp_path, rng):
    keys, vectors = make_table(tmp_path / "t", 3000, 4, rng)
    return tmp_path / "t", Reference(keys, vectors, 0.0)


# 1 ---------------------------------------------------------------------------------------------------------------


def test_a_refused_start_leaves_rocksdb_as_it_found_it(tmp_path, table):
    path, ref = table
    with pytest.raises(TableFileError):
        HierarchicalParameterServer(config(tmp_path, path, 8), progress=False)  # the files have dim 4
    with RocksDBTier(tmp_path / "rocksdb") as db:
        assert db.tables() == {}
    with HierarchicalParameterServer(config(tmp_path, path, 4), progress=False) as hps:  # the right dim starts
        keys = np.array(list(ref.rows)[:50])
        np.testing.assert_array_equal(hps.lookup("m", "t", torch.from_numpy(keys)).numpy(), ref.lookup(keys))


def test_a_start_refused_after_the_tiers_were_written_drops_its_new_tables(tmp_path, table, monkeypatch):
    """A failure in the second phase (devices): the tables this start created in RocksDB are dropped again."""
    path, ref = table
    cfg = config(tmp_path, path, 4)

    def no_devices(*args, **kwargs):
        raise ValueError("injected: no such device")

    monkeypatch.setattr(HierarchicalParameterServer, "_cache_for", no_devices)
    with pytest.raises(ValueError, match="injected"):
        HierarchicalParameterServer(cfg, progress=False)
    with RocksDBTier(tmp_path / "rocksdb") as db:
        assert db.tables() == {}


# 2 ---------------------------------------------------------------------------------------------------------------


def test_a_crashed_loads_staging_folder_is_removed_on_open(tmp_path, table):
    path, _ = table
    with HierarchicalParameterServer(config(tmp_path, path, 4, tiers=("rocksdb",)), progress=False):
        pass
    # What a SIGKILL mid-load leaves: the staging folder with SST files in it.
    staging = tempfile.mkdtemp(prefix=".hps_ingest_", dir=tmp_path / "rocksdb")
    with open(os.path.join(staging, "000000.sst"), "wb") as f:
        f.write(os.urandom(1 << 16))
    with RocksDBTier(tmp_path / "rocksdb"):
        assert not os.path.exists(staging)


def test_sigkill_mid_load_then_reopen(tmp_path, rng):
    """A real crash: a child process loads a large table into RocksDB and is killed mid-load; the next start cleans
    up, reloads (no load record was written) and serves the files' rows."""
    import signal
    import subprocess
    import sys

    keys, vectors = make_table(tmp_path / "big", 300_000, 32, rng)
    child = ("import sys; sys.path.insert(0, %r); from hps_core.tiers.rocksdb import RocksDBTier; "
             "from hps_core.tables import open_table; db = RocksDBTier(%r); db.create_table('t', 32); "
             "print('ready', flush=True); db.load('t', open_table(%r, 32), progress=False, method='sst')"
             % (os.getcwd(), str(tmp_path / "rocksdb"), str(tmp_path / "big")))
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    deadline = time.time() + 30
    while time.time() < deadline and not list((tmp_path / "rocksdb").glob(".hps_ingest_*/*.sst")):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cfg = config(tmp_path, tmp_path / "big", 32, tiers=("rocksdb",))
    cfg["models"]["m"]["tables"][0]["name"] = "t"
    with RocksDBTier(tmp_path / "rocksdb") as db:
        assert not list((tmp_path / "rocksdb").glob(".hps_ingest_*"))
        assert db.loaded_from("t") is None  # a load that did not finish left no record
    ref = Reference(keys, vectors, 0.0)
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        q = rng.choice(keys, 500)
        np.testing.assert_array_equal(hps.lookup("m", "t", torch.from_numpy(q)).numpy(), ref.lookup(q))


# 3, 4 ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tiers", [("host_memory", "rocksdb"), ("rocksdb",)])
@pytest.mark.parametrize("ratio,mode", [(0.3, "dynamic"), (1.0, "dynamic"), (1.0, "static")])
def test_updates_survive_a_restart_in_every_tier(tmp_path, table, tiers, ratio, mode):
    """update -> close -> restart: every tier, and the cache or resident table, serve the updated rows - also
    after an update that added a key the files lack (which changed the table's row count)."""
    path, ref = table
    cfg = config(tmp_path, path, 4, tiers=tiers, ratio=ratio, mode=mode)
    old = np.array(list(ref.rows)[:20])
    new_key = np.array([1 << 50])
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        hps.update("m", "t", torch.from_numpy(old), torch.full((20, 4), 77.0))
        hps.update("m", "t", torch.from_numpy(new_key), torch.full((1, 4), 5.0))
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        for tier in hps.tiers:
            values, found = tier.fetch(TAG, torch.from_numpy(old))
            assert bool(found.all()) and bool((values == 77.0).all()), tier.name
        assert bool((hps.lookup("m", "t", torch.from_numpy(old)) == 77.0).all())
        assert bool((hps.lookup("m", "t", torch.from_numpy(new_key)) == 5.0).all())
        others = np.array(list(ref.rows)[100:150])
        np.testing.assert_array_equal(hps.lookup("m", "t", torch.from_numpy(others)).numpy(), ref.lookup(others))


def test_new_table_files_replace_the_persisted_rows(tmp_path, table, rng):
    """New files at the same path are a new model version: the load record no longer matches, the files reload."""
    path, ref = table
    cfg = config(tmp_path, path, 4, tiers=("rocksdb",))
    k = np.array(list(ref.rows)[:5])
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        hps.update("m", "t", torch.from_numpy(k), torch.full((5, 4), 77.0))
    keys = np.unique(rng.integers(-(1 << 40), 1 << 40, size=4000))[:3000]
    vectors = rng.standard_normal((keys.size, 4)).astype(np.float32)
    write_table(path, keys, vectors, overwrite=True)  # new files at the same path
    new_ref = Reference(keys, vectors, 0.0)
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        q = np.array(list(new_ref.rows)[:100])
        np.testing.assert_array_equal(hps.lookup("m", "t", torch.from_numpy(q)).numpy(), new_ref.lookup(q))


# 5 ---------------------------------------------------------------------------------------------------------------


def test_concurrent_updates_leave_every_tier_and_cache_agreeing(tmp_path, table):
    path, ref = table
    keys = torch.from_numpy(np.array(list(ref.rows)[:64]))
    with HierarchicalParameterServer(config(tmp_path, path, 4, ratio=0.5), progress=False) as hps:
        hps.lookup("m", "t", keys)  # cached: later lookups of these keys read the cache
        for round_ in range(30):
            values = [torch.full((64, 4), float(2 * round_ + i)) for i in range(2)]
            threads = [threading.Thread(target=hps.update, args=("m", "t", keys, v)) for v in values]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seen = {tier.name: tier.fetch(TAG, keys)[0] for tier in hps.tiers}
            cached = hps.lookup("m", "t", keys)
            first = seen["host_memory"]
            assert bool((first == first[0, 0]).all()), "one update wins whole"
            for name, rows in seen.items():
                assert torch.equal(rows, first), (round_, name)
            assert torch.equal(cached, first), round_


# 6, 7 ------------------------------------------------------------------------------------------------------------


def test_host_maps_are_freed_with_their_last_reference():
    """Each map holds 64 MB; ten made and dropped (each given a handle, as the engine does) must not stay."""
    proc = psutil.Process()
    gc.collect()
    before = proc.memory_info().rss
    for _ in range(10):
        m = torch.classes.hps.HostHashMap(32, 4, 1 << 30, 0, 0.8, 1 << 26, 0, 0)
        m.handle()
        n = 500_000
        m.insert(torch.arange(n), torch.ones(n, 32))
        del m
        gc.collect()
    grown = proc.memory_info().rss - before
    assert grown < 3 * n * 32 * 4, f"RSS grew by {grown / 2**20:.0f} MiB over 10 maps of 61 MiB"


def test_closed_servers_do_not_stay_alive(tmp_path, table):
    path, ref = table
    proc = psutil.Process()
    refs = []

    def cycle():
        hps = HierarchicalParameterServer(config(tmp_path, path, 4, tiers=("host_memory",)), progress=False)
        layer = LookupLayer("m", "t", server=hps)
        layer(torch.from_numpy(np.array(list(ref.rows)[:10])))
        hps.close()
        refs.append(weakref.ref(hps))

    cycle()
    gc.collect()
    fds = proc.num_fds()
    for _ in range(20):
        cycle()
    gc.collect()
    assert all(r() is None for r in refs), "a closed server (with its layer gone) is still alive"
    assert proc.num_fds() <= fds + 2, f"file descriptors {fds} -> {proc.num_fds()} over 20 servers"


def test_close_frees_table_state_even_if_the_server_is_still_held(tmp_path, table):
    path, ref = table
    hps = HierarchicalParameterServer(config(tmp_path, path, 4, tiers=("host_memory",)), progress=False)
    layer = LookupLayer("m", "t", server=hps)
    layer(torch.from_numpy(np.array(list(ref.rows)[:10])))
    pipe_ref = weakref.ref(hps.pipeline("m", "t", "cpu"))
    hps.close()
    gc.collect()
    assert pipe_ref() is None and hps.table("m", "t").files is None
    with pytest.raises(ValueError, match="no open lookup pipeline"):
        layer(torch.tensor([1]))


# 8 ---------------------------------------------------------------------------------------------------------------


def test_init_with_another_config_raises(tmp_path, table, rng):
    path, _ = table
    other_path = tmp_path / "other"
    make_table(other_path, 100, 4, rng)
    hps_core.shutdown()
    try:
        first = hps_core.init(config(tmp_path, path, 4, tiers=("host_memory",)), progress=False)
        assert hps_core.init() is first
        assert hps_core.init(config(tmp_path, path, 4, tiers=("host_memory",))) is first  # the same config
        with pytest.raises(ValueError, match="different config"):
            hps_core.init(config(tmp_path, other_path, 4, tiers=("host_memory",)))
        assert hps_core.init() is first
    finally:
        hps_core.shutdown()


# 9 ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", [True, False])
def test_close_racing_lookups_never_returns_wrong_rows(tmp_path, table, cache, caplog):
    """Lookups that go to RocksDB race close(): each returns the right rows or raises; the tiers close cleanly."""
    path, ref = table
    known = np.array(list(ref.rows))
    for round_ in range(10):
        cfg = config(tmp_path, path, 4, tiers=("rocksdb",), ratio=0.01, cache=cache)
        cfg["tiers"]["rocksdb"]["path"] = str(tmp_path / f"rocksdb{round_}")
        hps = HierarchicalParameterServer(cfg, progress=False)
        wrong, started = [], threading.Barrier(5)

        def lookups(seed):
            g = np.random.default_rng(seed)
            started.wait()
            for _ in range(200):
                q = g.choice(known, 1024)
                try:
                    out = hps.lookup("m", "t", torch.from_numpy(q)).numpy()
                except (RuntimeError, ValueError) as exc:
                    assert "closed" in str(exc) or "no open lookup pipeline" in str(exc), exc
                    return
                if not np.array_equal(out, ref.lookup(q)):
                    wrong.append(seed)

        threads = [threading.Thread(target=lookups, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        started.wait()
        time.sleep(0.01 * (round_ % 4))  # close at different points of the lookups in flight
        with caplog.at_level(logging.ERROR):
            hps.close()
        for t in threads:
            t.join()
        assert not wrong, f"round {round_}: lookups returned wrong rows while closing"
        assert "failed" not in caplog.text, caplog.text
