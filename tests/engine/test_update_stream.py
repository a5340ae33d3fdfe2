"""Streamed updates (issue 18 item 1) against a real `redis-server`: a trainer publishes, two servers (two consumer
groups) each apply every update through update() - the tiers and the cache - while lookups run; a message that can
never apply is dropped and counted; a server that stops before acknowledging gets its entries again at start;
lag and counts in stats(); bad configs refused naming the field."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import threading
import time

import numpy as np
import pytest
import torch

from hps_core.config import ConfigError
from hps_core.engine import HierarchicalParameterServer
from hps_core.update_stream import StreamConsumer, publish

from engine_refs import Reference, make_table

redis = pytest.importorskip("redis")
pytestmark = [pytest.mark.filterwarnings("ignore:no CUDA device:RuntimeWarning"),
              pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")]
DIM = 8


def deployment(tmp_path, port, group, table_path=None, rng=None):
    if table_path is None:
        table_path = tmp_path / "t"
        make_table(table_path, 3000, DIM, rng)
    return {"key_dtype": "int64",
            "models": {"m": {"tables": [{"name": "t", "path": str(table_path), "dim": DIM,
                                         "max_keys_per_sample": 512, "default_value": 0.0}],
                             "max_batch_size": 1, "deployed_device_list": [0],
                             "cache": {"ratio": 0.5, "hit_rate_threshold": 1.1}}},
            "tiers": {"host_memory": {"enabled": True, "num_partitions": 2}},
            "update_source": {"type": "redis_stream", "brokers": f"127.0.0.1:{port}", "group": group,
                              "poll_timeout_ms": 50}}


def wait_for(cond, timeout=20.0):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_every_server_applies_every_update_while_lookups_run(tmp_path, rng, redis_port):
    path = tmp_path / "t"
    keys, vectors = make_table(path, 3000, DIM, rng)
    ref = Reference(keys, vectors, 0.0)
    client = redis.Redis(port=redis_port)
    servers = [HierarchicalParameterServer(deployment(tmp_path, redis_port, g, path), progress=False)
               for g in ("server-a", "server-b")]
    errors: list = []
    stop = threading.Event()

    def reader(hps):
        while not stop.is_set():
            q = rng.choice(keys, 256)
            try:
                hps.lookup("m", "t", torch.from_numpy(q))
            except Exception as exc:  # noqa: BLE001 - counted
                errors.append(exc)

    threads = [threading.Thread(target=reader, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    try:
        new_keys = np.concatenate([keys[:1500], np.arange(10**9, 10**9 + 500)])  # existing and new keys
        new_rows = np.random.default_rng(3).standard_normal((new_keys.size, DIM)).astype(np.float32)
        publish(client, "hps_updates", "m", "t", new_keys, new_rows, chunk_rows=300)
        ref.update(new_keys, new_rows)
        for hps in servers:
            assert wait_for(lambda: hps.stats()["update_source"]["applied_rows"] == new_keys.size)
            assert wait_for(lambda: hps.stats()["update_source"]["lag"] == 0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    q = np.concatenate([new_keys, keys[1500:]])
    for hps in servers:
        s = hps.stats()["update_source"]
        assert s["applied_messages"] == 7 and s["failed_messages"] == 0
        for part in np.array_split(q, 8):  # within max_keys_per_sample
            np.testing.assert_array_equal(hps.lookup("m", "t", torch.from_numpy(part)).numpy(), ref.lookup(part))
        hps.close()


def test_bad_messages_are_dropped_and_counted(tmp_path, rng, redis_port):
    client = redis.Redis(port=redis_port)
    cfg = deployment(tmp_path, redis_port, "g", rng=rng)
    if importlib.util.find_spec("prometheus_client") is not None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            cfg["metrics_port"] = s.getsockname()[1]
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        client.xadd("hps_updates", {"model": "nope", "table": "t", "dim": str(DIM), "keys": b"", "rows": b""})
        client.xadd("hps_updates", {"model": "m", "table": "t", "dim": "3", "keys": np.int64([1]).tobytes(),
                                    "rows": np.float32([1, 2, 3]).tobytes()})
        client.xadd("hps_updates", {"garbage": "1"})
        publish(client, "hps_updates", "m", 0, np.int64([42]), np.ones((1, DIM), np.float32))
        assert wait_for(lambda: hps.stats()["update_source"]["applied_messages"] == 1)
        s = hps.stats()["update_source"]
        assert s["failed_messages"] == 3 and wait_for(lambda: hps.stats()["update_source"]["lag"] == 0)
        assert torch.equal(hps.lookup("m", "t", torch.tensor([42])), torch.ones(1, DIM))
        if hps.metrics is not None:  # the same counts on /metrics
            import urllib.request

            body = urllib.request.urlopen(f"http://127.0.0.1:{hps.metrics.port}/metrics", timeout=10).read().decode()
            assert "hps_update_failed_messages_total 3.0" in body and "hps_update_applied_rows_total 1.0" in body


def test_unacknowledged_entries_are_applied_after_a_restart(tmp_path, rng, redis_port):
    """A consumer that read an entry but stopped before acknowledging it: the next start applies it."""
    client = redis.Redis(port=redis_port)
    client.xgroup_create("hps_updates", "g", id="0", mkstream=True)
    publish(client, "hps_updates", "m", "t", np.int64([7, 8]), np.full((2, DIM), 3.0, np.float32))
    delivered = client.xreadgroup("g", "c0", {"hps_updates": ">"}, count=10)  # read, never acknowledged
    assert len(delivered[0][1]) == 1 and client.xpending("hps_updates", "g")["pending"] == 1
    with HierarchicalParameterServer(deployment(tmp_path, redis_port, "g", rng=rng), progress=False) as hps:
        assert wait_for(lambda: hps.stats()["update_source"]["applied_rows"] == 2)
        assert torch.equal(hps.lookup("m", "t", torch.tensor([7, 8])), torch.full((2, DIM), 3.0))
        assert wait_for(lambda: client.xpending("hps_updates", "g")["pending"] == 0)


@pytest.mark.parametrize("change, field", [
    ({"group": ""}, "update_source.group"),
    ({"brokers": "localhost"}, "update_source.brokers"),
    ({"type": "rabbitmq"}, "update_source.type"),
])
def test_bad_update_source_configs_are_refused(tmp_path, rng, change, field):
    cfg = deployment(tmp_path, 6379, "g", rng=rng)
    cfg["update_source"].update(change)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        HierarchicalParameterServer(cfg, progress=False)


def test_publish_refuses_mismatched_rows(redis_port):
    with pytest.raises(ValueError, match="rows must have shape"):
        publish(redis.Redis(port=redis_port), "s", "m", "t", np.int64([1, 2]), np.ones((3, DIM), np.float32))
    assert StreamConsumer is not None
