"""The lifecycle command lines (issue 18 item 5), run as a user runs them: `python -m hps_core.publish` pushes a
delta table to a real redis-server's stream and a server's consumer applies it; `python -m hps_core.serve` keeps a
deployment up with /metrics and the update stream, and stops cleanly on SIGTERM."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hps_core.engine import HierarchicalParameterServer
from hps_core.tables import write_table

from engine_refs import make_table

pytestmark = pytest.mark.filterwarnings("ignore:no CUDA device:RuntimeWarning")
ROOT = Path(__file__).resolve().parents[2]
DIM = 8


def config(tmp_path, rng, port, **extra):
    make_table(tmp_path / "t", 2000, DIM, rng)
    return {"key_dtype": "int64",
            "models": {"m": {"tables": [{"name": "t", "path": str(tmp_path / "t"), "dim": DIM,
                                         "max_keys_per_sample": 256}],
                             "max_batch_size": 1, "deployed_device_list": [0],
                             "cache": {"ratio": 0.5, "hit_rate_threshold": 1.1}}},
            "tiers": {"host_memory": {"enabled": True, "num_partitions": 2}},
            "update_source": {"type": "redis_stream", "brokers": f"127.0.0.1:{port}", "group": "cli",
                              "poll_timeout_ms": 50}, **extra}


def test_publish_a_delta_table(tmp_path, rng, redis_port):
    delta_keys = np.arange(10**9, 10**9 + 300, dtype=np.int64)
    delta_rows = np.random.default_rng(2).standard_normal((300, DIM)).astype(np.float32)
    write_table(tmp_path / "delta", delta_keys, delta_rows)
    with HierarchicalParameterServer(config(tmp_path, rng, redis_port), progress=False) as hps:
        proc = subprocess.run([sys.executable, "-m", "hps_core.publish", "--redis", f"127.0.0.1:{redis_port}",
                               "--model", "m", "--table", "t", "--path", str(tmp_path / "delta"),
                               "--chunk-rows", "100"], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "published 300 rows of m/t in 3 messages" in proc.stdout
        end = time.time() + 20
        while hps.stats()["update_source"]["applied_rows"] < 300 and time.time() < end:
            time.sleep(0.02)
        np.testing.assert_array_equal(hps.lookup("m", "t", torch.from_numpy(delta_keys[:256])).numpy(),
                                      delta_rows[:256])
    bad = subprocess.run([sys.executable, "-m", "hps_core.publish", "--redis", "nohostport", "--model", "m",
                          "--table", "t", "--path", str(tmp_path / "delta")], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert bad.returncode != 0 and "--redis must be host:port" in bad.stderr


def test_serve_keeps_a_deployment_up_and_stops_on_sigterm(tmp_path, rng, redis_port):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    # our config format in a .yaml file (a .json file is read as HPS JSON)
    (tmp_path / "deployment.yaml").write_text(yaml.safe_dump(config(tmp_path, rng, redis_port)))
    proc = subprocess.Popen([sys.executable, "-m", "hps_core.serve", "--config", str(tmp_path / "deployment.yaml"),
                             "--metrics-port", str(metrics_port), "--log-every", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert re.search(rf"serving models \['m'\]; metrics on port {metrics_port}", line), line
        import redis

        from hps_core.update_stream import publish

        publish(redis.Redis(port=redis_port), "hps_updates", "m", "t", np.int64([5]), np.ones((1, DIM), np.float32))
        end, body = time.time() + 20, ""
        while time.time() < end and "hps_update_applied_rows_total 1.0" not in body:
            body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            time.sleep(0.05)
        assert "hps_update_applied_rows_total 1.0" in body
        time.sleep(1.0)  # a few summaries (--log-every 0.2) after the update
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
        assert "stopped" in out and "updates applied 1 rows" in err, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
