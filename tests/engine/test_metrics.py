"""Prometheus metrics (issue 18 item 4): `metrics_port` in the config starts `/metrics`; scraping the real HTTP
endpoint returns the server's own counters (equal to stats()), per model / table / device and per tier, latency
quantiles, memory; close() stops it; a bad port is refused naming the field."""

from __future__ import annotations

import json
import socket
import urllib.request

import numpy as np
import pytest
import torch

from hps_core.config import ConfigError
from hps_core.engine import HierarchicalParameterServer

from engine_refs import make_table

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:no CUDA device:RuntimeWarning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict:
    """{(metric sample name, sorted labels): value} of one scrape."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def L(**labels) -> tuple:
    return tuple(sorted(labels.items()))


def deployment(tmp_path, rng, port):
    keys, _ = make_table(tmp_path / "t", 5000, 8, rng)
    cfg = {"key_dtype": "int64", "metrics_port": port,
           "models": {"m": {"tables": [{"name": "t", "path": str(tmp_path / "t"), "dim": 8,
                                        "max_keys_per_sample": 256}],
                            "max_batch_size": 1, "deployed_device_list": [0],
                            "cache": {"ratio": 0.1, "hit_rate_threshold": 1.1}}},
           "tiers": {"host_memory": {"enabled": True, "num_partitions": 2}}}
    return cfg, keys


def test_scrape_equals_stats(tmp_path, rng):
    port = free_port()
    cfg, keys = deployment(tmp_path, rng, port)
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        for _ in range(5):
            q = np.concatenate([rng.choice(keys, 200), [1 << 50, 1 << 51]])  # two keys no tier holds
            hps.lookup("m", "t", torch.from_numpy(q))
        stats = hps.stats()["models"]["m"]["t"]["cpu"]
        got = scrape(port)
        labels = L(device="cpu", model="m", table="t")
        assert got[("hps_lookups_total", labels)] == stats["lookups"] == 5
        assert got[("hps_keys_total", labels)] == stats["keys"] == 5 * 202
        assert got[("hps_cache_hits_total", labels)] == stats["cache_hits"]
        assert got[("hps_cache_misses_total", labels)] == stats["cache_misses"] > 0
        assert got[("hps_defaults_served_total", labels)] == stats["defaults_served"] >= 2
        assert got[("hps_cache_memory_bytes", labels)] == stats["cache_memory_bytes"] > 0
        assert got[("hps_tier_hits_total", L(device="cpu", model="m", table="t", tier="host_memory"))] == stats["tier_hits"]["host_memory"]
        p99 = got[("hps_lookup_latency_seconds", L(device="cpu", model="m", table="t", quantile="0.99", stage="total"))]
        assert p99 == pytest.approx(stats["latency"]["total"]["p99_ms"] / 1e3, rel=1e-9) and p99 > 0
        tier = hps.stats()["tiers"]["host_memory"]["hps_et.m.t"]
        tier_labels = L(table_tag="hps_et.m.t", tier="host_memory")
        assert got[("hps_tier_keys_requested_total", tier_labels)] == tier["keys_requested"] > 0
        # the next scrape sees the next lookups
        hps.lookup("m", "t", torch.from_numpy(keys[:10]))
        assert scrape(port)[("hps_lookups_total", labels)] == 6
    with pytest.raises(OSError):  # closed with the server
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_no_port_no_endpoint_and_bad_ports_refused(tmp_path, rng):
    cfg, _ = deployment(tmp_path, rng, 0)
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        assert hps.metrics is None
    for bad in (-1, 70000):
        cfg["metrics_port"] = bad
        with pytest.raises(ConfigError, match="metrics_port"):
            HierarchicalParameterServer(cfg, progress=False)


def test_hps_json_key(tmp_path, rng):
    port = free_port()
    keys, _ = make_table(tmp_path / "t", 1000, 4, rng)
    hps_json = {"supportlonglong": True, "metrics_port": port, "models": [{
        "model": "m", "sparse_files": [str(tmp_path / "t")], "embedding_table_names": ["t"],
        "embedding_vecsize_per_table": [4], "maxnum_catfeature_query_per_table_per_sample": [8],
        "default_value_for_each_table": [0.0], "deployed_device_list": [0], "max_batch_size": 4}]}
    (tmp_path / "hps.json").write_text(json.dumps(hps_json))
    with HierarchicalParameterServer(str(tmp_path / "hps.json"), progress=False) as hps:
        hps.lookup("m", 0, torch.from_numpy(keys[:8]))
        assert scrape(port)[("hps_lookups_total", L(device="cpu", model="m", table="t"))] == 1
