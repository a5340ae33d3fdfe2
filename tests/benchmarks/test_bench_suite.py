"""CI smoke runs of the benchmark suite (benchmarks/run.py with conf/bench/smoke_*.yaml), through the real runner
in a subprocess: each must write results.json with its sections filled with finite, sane numbers, results.md and
its PNG plots. Nothing here asserts a speed.

Also: Belady's MIN (the hit_rate bench's reference) against an exhaustive optimum on tiny traces, and config errors
that name the key and the value.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_bench(tmp_path: pathlib.Path, bench: str, *overrides: str, multirun: bool = False,
              expect_ok: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "benchmarks.run", *(["-m"] if multirun else []), f"bench={bench}",
           f"out_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'hydra'}",
           f"hydra.sweep.dir={tmp_path / 'hydra_multi'}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if expect_ok:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def load(out: pathlib.Path) -> dict:
    payload = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().startswith("# Benchmark")
    for name in payload["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    assert payload["plots"], f"no plots: {payload.get('plots_skipped')}"
    env = payload["env"]
    for key in ("commit", "date", "torch", "numpy", "python", "cpu", "cores"):
        assert env[key] not in (None, ""), key
    assert payload["config"]["name"] == payload["bench"]
    assert payload["command"].startswith("python -m benchmarks.run")
    return payload


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_lookup_smoke(tmp_path):
    run_bench(tmp_path, "smoke_lookup")
    p = load(tmp_path / "out")
    cases = p["results"]["cases"]
    # 1 dim x 2 sizes x 2 ratios x (uniform + 1 zipf) x 2 dtypes
    assert len(cases) == 16
    assert {c["key_dtype"] for c in cases} == {"int32", "int64"}
    assert {c["distribution"] for c in cases} == {"uniform", "zipf(1.05)"}
    for c in cases:
        e = c["engine"]
        assert e["rows_equal"], c
        assert all(positive(e[k]) for k in ("keys_per_s", "p50_ms", "p90_ms", "p99_ms", "mean_ms")), c
        assert e["p50_ms"] <= e["p99_ms"] <= e["max_ms"]
        assert 0.0 <= e["hit_rate"] <= 1.0
        assert positive(c["baselines"]["f_embedding"]["keys_per_s"])
        if c["device"] == "cpu":
            assert positive(c["baselines"]["numpy_searchsorted"]["keys_per_s"])
    # A Zipf stream hits a cache holding every row more often than a 10% cache.
    def hit(ratio):
        return np.mean([c["engine"]["hit_rate"] for c in cases if c["cache_ratio"] == ratio
                        and c["distribution"] != "uniform"])
    assert hit(1.0) >= hit(0.1)
    assert {"lookup_throughput.png", "lookup_latency_p99.png"} <= set(p["plots"])


def test_hit_rate_smoke_belady_is_best(tmp_path):
    run_bench(tmp_path, "smoke_hit_rate")
    p = load(tmp_path / "out")
    points = p["results"]["points"]
    assert len(points) == 3
    last_belady = 0.0
    for pt in sorted(points, key=lambda q: q["cache_ratio"]):
        h = pt["hit_rate"]
        assert set(h) >= {"lru", "lfu", "belady", "exact_lru", "infinite_cache"}
        for name, v in h.items():
            assert 0.0 < v < 1.0, (name, v)
        # the offline optimum on the same trace with the same slots is never beaten, and is never above the
        # hit rate of an infinite cache (every key but its first use)
        assert h["belady"] >= max(h["lru"], h["lfu"], h["exact_lru"]), pt
        assert h["belady"] <= h["infinite_cache"] + 1e-12
        assert h["belady"] >= last_belady  # more slots never hurt the optimum
        last_belady = h["belady"]
        assert pt["slots"] >= pt["capacity"]
    assert p["plots"] == ["hit_rate.png"]


@functools.lru_cache(maxsize=None)
def _exhaustive_best(trace: tuple, slots: int, i: int = 0, cache: frozenset = frozenset()) -> int:
    """Most hits any cache of `slots` slots can get on trace[i:] (may bypass; evicts anything)."""
    if i == len(trace):
        return 0
    k = trace[i]
    if k in cache:
        return 1 + _exhaustive_best(trace, slots, i + 1, cache)
    best = _exhaustive_best(trace, slots, i + 1, cache)  # bypass
    if len(cache) < slots:
        return max(best, _exhaustive_best(trace, slots, i + 1, cache | {k}))
    for victim in cache:
        best = max(best, _exhaustive_best(trace, slots, i + 1, (cache - {victim}) | {k}))
    return best


def test_belady_matches_the_exhaustive_optimum():
    from benchmarks.suite.hit_rate import belady_hits, exact_lru_hits

    rng = np.random.default_rng(0)
    for _ in range(200):
        trace = rng.integers(0, int(rng.integers(1, 6)), int(rng.integers(1, 12)))
        slots = int(rng.integers(1, 4))
        best = _exhaustive_best(tuple(trace.tolist()), slots)
        assert belady_hits(trace, slots) == best, (trace, slots)
        assert exact_lru_hits(trace, slots) <= best


def test_tiers_smoke_without_redis(tmp_path):
    run_bench(tmp_path, "smoke_tiers", "backends=[host_memory,rocksdb]")
    p = load(tmp_path / "out")
    points = p["results"]["points"]
    assert {q["tier"] for q in points} == {"host_memory", "rocksdb"}
    for q in points:
        assert q["rows_equal"] and positive(q["keys_per_s"]) and positive(q["p50_ms"]), q
    assert {x["tier"] for x in p["results"]["loads"]} == {"host_memory", "rocksdb"}
    assert all(x["rows"] == 5000 for x in p["results"]["loads"])


@pytest.mark.redis
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_tiers_smoke_with_redis_cluster(tmp_path):
    run_bench(tmp_path, "smoke_tiers")
    p = load(tmp_path / "out")
    assert p["results"]["skipped"] == {}
    tiers = {q["tier"]: q for q in p["results"]["points"]}
    assert set(tiers) == {"host_memory", "redis_cluster", "rocksdb"}
    assert all(q["rows_equal"] and positive(q["keys_per_s"]) for q in tiers.values())


def test_dlrm_smoke(tmp_path):
    pytest.importorskip("tensorflow")
    run_bench(tmp_path, "smoke_dlrm")
    p = load(tmp_path / "out")
    r = p["results"]
    assert r["skipped"] == {}
    assert [b["batch"] for b in r["batches"]] == [4, 32]
    for b in r["batches"]:
        assert set(b["variants"]) == {"hps_engine", "native", "tf_plugin", "tf_native"}
        for v in b["variants"].values():
            assert positive(v["p50_ms"]) and v["p50_ms"] <= v["p99_ms"]
        # one batch replayed after the warm-up: every key is a cache hit
        assert b["variants"]["hps_engine"]["hit_rate"] == 1.0
        # every variant computes the same click probabilities (same weights, same rows)
        for name, diff in b["max_abs_diff_vs_native"].items():
            assert diff < 1e-5, (name, diff)
        for mean in b["output_mean"].values():
            assert 0.0 < mean < 1.0
    assert r["targets"]["note"].startswith("targets are for a GPU run")
    assert p["plots"] == ["dlrm_latency.png"]


def test_multirun_writes_one_result_per_job(tmp_path):
    run_bench(tmp_path, "smoke_hit_rate", "trace_keys=2000", "zipf_alphas=[1.05]", "cache_ratios=[0.05],[0.2]",
              "fully_associative_lru=false", "plots=false", multirun=True)
    ratios = []
    for job in ("job0", "job1"):
        payload = json.loads((tmp_path / "out" / job / "results.json").read_text())
        ratios += [pt["cache_ratio"] for pt in payload["results"]["points"]]
        assert payload["plots_skipped"] == "plots=false"
    assert sorted(ratios) == [0.05, 0.2]


# ---------------------------------------------------------------------------------------------------- config errors


def compose(*overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="bench_run", overrides=list(overrides))


@pytest.mark.parametrize("overrides, message", [
    (["bench=lookup", "cache_ratios=[0.5,1.5]"], "cache_ratios[1] = 1.5"),
    (["bench=lookup", "distributions=[uniform,pareto]"], "distributions[1] = 'pareto'"),
    (["bench=lookup", "device=tpu"], "device = 'tpu'"),
    (["bench=lookup", "min_repeats=40"], "min_repeats = 40"),
    (["bench=dlrm", "bottom_mlp=[512,256,64]"], "bottom_mlp = [512, 256, 64]"),
    (["bench=dlrm", "precision=fp8"], "precision = 'fp8'"),
    (["bench=hit_rate", "policies=[lru,arc]"], "policies[1] = 'arc'"),
    (["bench=tiers", "redis_nodes=2"], "redis_nodes = 2"),
    (["bench=lookup", "dims=[x]"], "dims"),  # a type error from OmegaConf, naming the key
])
def test_bad_values_name_the_key(overrides, message):
    from benchmarks.suite.config import to_schema

    with pytest.raises(ValueError) as err:
        to_schema(compose(*overrides))
    assert message in str(err.value)


def test_every_bench_config_composes_and_validates():
    from benchmarks.suite.config import to_schema

    for path in sorted((ROOT / "conf" / "bench").glob("*.yaml")):
        bench = to_schema(compose(f"bench={path.stem}"))
        assert bench.name in path.stem


def test_runner_exits_with_the_message(tmp_path):
    proc = run_bench(tmp_path, "smoke_lookup", "cache_ratios=[0]", expect_ok=False)
    assert proc.returncode != 0
    assert "cache_ratios[0] = 0" in proc.stderr
    assert not (tmp_path / "out" / "results.json").exists()


def test_without_matplotlib_and_rich_results_still_written_then_replotted(tmp_path):
    """The GPU image may lack matplotlib and rich: the run still writes results.json / results.md, and
    `python -m benchmarks.replot` draws the plots later from results.json."""
    blocked = ("import sys; sys.modules['matplotlib'] = None; sys.modules['rich'] = None; "  # import -> ImportError
               "sys.argv = sys.argv[:1] + sys.argv[2:]; import runpy; runpy.run_module('benchmarks.run', "
               "run_name='__main__')")
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", blocked, "--", "bench=smoke_hit_rate", "trace_keys=2000", "cache_ratios=[0.05]",
           f"out_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((out / "results.json").read_text())
    assert payload["plots"] == [] and "matplotlib" in payload["plots_skipped"]
    assert (out / "results.md").exists() and not list(out.glob("*.png"))

    from benchmarks.replot import replot

    assert replot(out) == ["hit_rate.png"]
    assert (out / "hit_rate.png").read_bytes()[:8] == PNG_MAGIC
    payload = json.loads((out / "results.json").read_text())
    assert payload["plots"] == ["hit_rate.png"] and "plots_skipped" not in payload


def test_tiers_without_redis_server_records_the_reason(tmp_path):
    """No redis-server on the machine (the GPU image): the Redis tier is skipped with the reason, the rest runs."""
    no_redis = ("import shutil, sys; which = shutil.which; "
                "shutil.which = lambda name, *a, **k: None if name.startswith('redis') else which(name, *a, **k); "
                "sys.argv = sys.argv[:1] + sys.argv[2:]; import runpy; runpy.run_module('benchmarks.run', "
                "run_name='__main__')")
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", no_redis, "--", "bench=smoke_tiers", "backends=[host_memory,redis_cluster]",
           "plots=false", f"out_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())["results"]
    assert "redis-server" in r["skipped"]["redis_cluster"]
    assert {q["tier"] for q in r["points"]} == {"host_memory"}
