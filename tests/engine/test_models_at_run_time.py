"""Models added, swapped and retired while the server serves (issue 18 items 2 and 3): a new model from a dict section or a
ModelConfig becomes visible whole (exact lookups), with start-up's validation; retiring one makes its lookups raise
KeyError while other models' lookups (running in threads) never fail; a refused add changes nothing; its name can
be added again."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from hps_core.config import ConfigError, ModelConfig, TableConfig
from hps_core.engine import HierarchicalParameterServer
from hps_core.tables import TableFileError, write_table

from engine_refs import Reference, make_table

pytestmark = pytest.mark.filterwarnings("ignore:no CUDA device:RuntimeWarning")


def section(path, dim=8, ratio=0.5):
    return {"tables": [{"name": "t", "path": str(path), "dim": dim, "max_keys_per_sample": 256,
                        "default_value": -1.0}],
            "max_batch_size": 1, "deployed_device_list": [0], "cache": {"ratio": ratio, "hit_rate_threshold": 1.1}}


def test_add_and_remove_while_other_lookups_run(tmp_path, rng):
    keys_a, vec_a = make_table(tmp_path / "a", 2000, 8, rng)
    keys_b, vec_b = make_table(tmp_path / "b", 3000, 16, rng)
    ref_a, ref_b = Reference(keys_a, vec_a, -1.0), Reference(keys_b, vec_b, -1.0)
    cfg = {"key_dtype": "int64", "models": {"a": section(tmp_path / "a")},
           "tiers": {"host_memory": {"enabled": True, "num_partitions": 2}}}
    errors: list = []
    stop = threading.Event()
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        def reader():
            r = np.random.default_rng(0)
            while not stop.is_set():
                q = r.choice(keys_a, 128)
                try:
                    np.testing.assert_array_equal(hps.lookup("a", "t", torch.from_numpy(q)).numpy(), ref_a.lookup(q))
                except Exception as exc:  # noqa: BLE001 - counted
                    errors.append(exc)

        threads = [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            hps.add_model("b", section(tmp_path / "b", dim=16, ratio=1.0))
            q = rng.choice(keys_b, 200)
            np.testing.assert_array_equal(hps.lookup("b", "t", torch.from_numpy(q)).numpy(), ref_b.lookup(q))
            assert hps.stats()["models"]["b"]["t"]["cpu"]["keys"] == 200
            hps.remove_model("b")
            with pytest.raises(KeyError, match="no model 'b'|unknown model|'b'"):
                hps.lookup("b", "t", torch.from_numpy(q))
            assert "b" not in hps.stats()["models"]
            assert "hps_et.b.t" not in hps.tiers[0].tags()  # its host-memory rows are freed
            # the name (and its files) can come back
            hps.add_model("b", ModelConfig(tables=[TableConfig(name="t", path=str(tmp_path / "b"), dim=16,
                                                                max_keys_per_sample=256, default_value=-1.0)],
                                           max_batch_size=1))
            np.testing.assert_array_equal(hps.lookup("b", "t", torch.from_numpy(q)).numpy(), ref_b.lookup(q))
        finally:
            stop.set()
            for t in threads:
                t.join()
    assert not errors, errors[:3]


def test_refused_adds_change_nothing(tmp_path, rng):
    keys_a, _ = make_table(tmp_path / "a", 500, 8, rng)
    cfg = {"key_dtype": "int64", "models": {"a": section(tmp_path / "a")},
           "tiers": {"host_memory": {"enabled": True, "num_partitions": 2}}}
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        before_tags = hps.tiers[0].tags()
        with pytest.raises(ValueError, match="deployed already"):
            hps.add_model("a", section(tmp_path / "a"))
        bad = section(tmp_path / "a")
        bad["cache"]["ratio"] = 2.0
        with pytest.raises(ConfigError, match=r"models\.c\.cache\.ratio"):
            hps.add_model("c", bad)
        with pytest.raises(TableFileError, match="does not exist"):
            hps.add_model("c", section(tmp_path / "missing"))
        wrong_dim = section(tmp_path / "a", dim=4)  # the files hold dim 8
        with pytest.raises(TableFileError):
            hps.add_model("c", wrong_dim)
        assert sorted(hps.tables) == ["a"] and sorted(hps.config.models) == ["a"]
        assert hps.tiers[0].tags() == before_tags
        with pytest.raises(KeyError, match="no model 'zzz'"):
            hps.remove_model("zzz")
        q = torch.from_numpy(keys_a[:10])
        assert hps.lookup("a", "t", q).shape == (10, 8)


def test_version_swap_under_concurrent_lookups(tmp_path, rng):
    """8 reader threads look up while v2 replaces v1: zero failed lookups, every batch entirely one version's rows
    (never a mix), v2 after the swap; rollback serves v1 again, a second rollback v2; a third version retires v1."""
    keys = np.unique(rng.integers(0, 1 << 40, 3000))[:2000]
    for v in (1, 2, 3):  # every row of version v is all v: a batch mixing versions shows two values
        write_table(tmp_path / f"v{v}", keys, np.full((keys.size, 8), float(v), np.float32))
    cfg = {"key_dtype": "int64", "models": {"m": section(tmp_path / "v1")},
           "tiers": {"host_memory": {"enabled": True, "num_partitions": 2}}}
    errors: list = []
    mixed: list = []
    seen: set = set()
    stop = threading.Event()
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        def reader(seed):
            r = np.random.default_rng(seed)
            while not stop.is_set():
                q = torch.from_numpy(r.choice(keys, 128))
                try:
                    out = hps.lookup("m", "t", q)
                except Exception as exc:  # noqa: BLE001 - counted
                    errors.append(exc)
                    continue
                vals = set(torch.unique(out).tolist())
                if len(vals) != 1:
                    mixed.append(vals)
                seen.update(vals)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.2)
            assert hps.swap_model("m", section(tmp_path / "v2")) == 2
            time.sleep(0.2)
            assert float(hps.lookup("m", "t", torch.from_numpy(keys[:5]))[0, 0]) == 2.0
            hps.rollback_model("m")
            assert float(hps.lookup("m", "t", torch.from_numpy(keys[:5]))[0, 0]) == 1.0
            hps.rollback_model("m")
            assert float(hps.lookup("m", "t", torch.from_numpy(keys[:5]))[0, 0]) == 2.0
            assert hps.swap_model("m", section(tmp_path / "v3")) == 3
            time.sleep(0.2)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not errors, errors[:3]
        assert not mixed, mixed[:3]
        assert {1.0, 2.0, 3.0} <= seen
        tags = hps.tiers[0].tags()
        assert "hps_et.m.t" not in tags  # v1 retired when v3 came
        assert "hps_et.m__v2.t" in tags and "hps_et.m__v3.t" in tags  # v2 kept for a rollback
        hps.remove_model("m")
        assert hps.tiers[0].tags() == []
    with HierarchicalParameterServer(cfg, progress=False) as fresh, pytest.raises(KeyError, match="no previous"):
        fresh.rollback_model("m")
