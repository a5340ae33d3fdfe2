"""HPS's periodic refresh (cache.refresh_delay / refresh_interval; HPS's Triton backend drove it, our server does): a
row changed in the tiers behind the cache's back reaches the cache's lookups within an interval, not before the delay;
no refresh without an interval; close() stops the thread. And keys accepted for HPS compatibility that have no effect
here log a warning naming them."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import torch

from hps_core.config import load_config
from hps_core.engine import HierarchicalParameterServer

from engine_refs import make_table


def server(tmp_path, rng, **cache):
    path = tmp_path / "t"
    keys, vectors = make_table(path, 2000, 8, rng)
    cfg = {"key_dtype": "int64",
           "models": {"m": {"tables": [{"name": "t", "path": str(path), "dim": 8, "max_keys_per_sample": 512}],
                            "max_batch_size": 1, "deployed_device_list": [0],
                            "cache": {"ratio": 0.5, "hit_rate_threshold": 1.1, **cache}}},
           "tiers": {"host_memory": {"enabled": True, "num_partitions": 2}}}
    return HierarchicalParameterServer(cfg, progress=False), keys


def behind_the_cache(hps, keys):
    """New rows written into the host tier only: the cache keeps the old ones until a refresh."""
    q = torch.from_numpy(keys[:100])
    old = hps.lookup("m", "t", q)
    new = old + 1.0
    hps.tiers[0].insert(hps.tables["m"][0].tag, q, new)
    assert torch.equal(hps.lookup("m", "t", q), old)  # cached: stale
    return q, new


def test_rows_changed_in_the_tiers_reach_the_cache_within_an_interval(tmp_path, rng):
    hps, keys = server(tmp_path, rng, refresh_delay=0.3, refresh_interval=0.2)
    with hps:
        q, new = behind_the_cache(hps, keys)
        deadline = time.monotonic() + 5.0
        while not torch.equal(hps.lookup("m", "t", q), new):
            assert time.monotonic() < deadline, "the periodic refresh never brought the new rows"
            time.sleep(0.05)
        assert hps.refresher.refreshes >= 1 and hps.refresher.errors == 0
        thread = hps.refresher._thread
    assert not thread.is_alive()  # close() stopped it


def test_no_interval_no_refresh(tmp_path, rng):
    hps, keys = server(tmp_path, rng)
    with hps:
        assert hps.refresher is None
        q, new = behind_the_cache(hps, keys)
        time.sleep(0.3)
        assert not torch.equal(hps.lookup("m", "t", q), new)


def test_added_model_is_refreshed_and_removed_model_leaves_the_schedule(tmp_path, rng):
    hps, keys = server(tmp_path, rng)
    with hps:
        section = {"tables": [{"name": "t", "path": str(tmp_path / "t"), "dim": 8, "max_keys_per_sample": 512}],
                   "max_batch_size": 1, "deployed_device_list": [0],
                   "cache": {"ratio": 0.5, "hit_rate_threshold": 1.1, "refresh_interval": 0.1}}
        hps.add_model("m2", section)
        assert hps.refresher is not None
        deadline = time.monotonic() + 5.0
        while hps.refresher.refreshes == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        hps.remove_model("m2")
        time.sleep(0.3)
        assert hps.refresher.errors == 0 and "m2" not in hps.refresher._due


def test_keys_without_effect_log_a_warning_naming_them(tmp_path, caplog):
    cfg = {"models": {"m": {"tables": [{"name": "t", "path": str(tmp_path), "dim": 8}],
                            "fuse_embedding_table": True,
                            "cache": {"enable_pagelock": True, "thread_pool_size": 4}}}}
    with caplog.at_level(logging.WARNING, logger="hps_core.config"):
        load_config(cfg)
    text = caplog.text
    for key in ("models.m.cache.enable_pagelock = True", "models.m.cache.thread_pool_size = 4",
                "models.m.fuse_embedding_table = True"):
        assert key in text and "has no effect here" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hps_core.config"):
        load_config({"models": {"m": {"tables": [{"name": "t", "path": str(tmp_path), "dim": 8}]}}})
    assert "has no effect" not in caplog.text  # defaults say nothing
