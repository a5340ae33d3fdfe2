"""Run one benchmark of the suite, configured with Hydra (root conf/bench_run.yaml, benches in conf/bench/).

    python -m benchmarks.run bench=lookup dims=[16,128] cache_ratios=[0.1,1.0]
    python -m benchmarks.run bench=hit_rate out_dir=benchmarks/results/suite_cpu/hit_rate
    python -m benchmarks.run -m bench=lookup device=cpu keys_per_call=[1024],[26624]     # a sweep: one job each
    python -m benchmarks.run bench=smoke_dlrm                                           # the CI-sized variants

Each run writes into `out_dir` (default: Hydra's job directory, outputs/bench/... or multirun/bench/.../<job>):
results.json (every number, the device, versions, commit, date, the resolved config and the command), results.md
(the tables), the PNG plots; the tables are also printed (rich). Bad values raise before anything runs, naming the
key and the value.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys
import time
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from benchmarks import common
from benchmarks.suite import module, report
from benchmarks.suite.config import BenchConfigError, to_schema

log = logging.getLogger("benchmarks.run")

_VERSIONED = ("hydra-core", "omegaconf", "rich", "matplotlib", "tensorflow-cpu", "tensorflow", "keras", "rocksdict",
              "redis", "hiredis")


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda:0 when torch sees a GPU, else cpu; "cuda" without a GPU is an error naming the key."""
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise BenchConfigError("device", name, "torch sees no CUDA device here (use device=cpu or auto)")
        return torch.device("cuda", 0)
    return torch.device(name)


def run_bench(cfg: DictConfig, out_dir: pathlib.Path, overrides: list[str]) -> dict[str, Any]:
    """Validate `cfg`, run its bench, write results.json / results.md / plots into `out_dir`; returns the payload."""
    bench = to_schema(cfg)  # raises on bad values before anything is created
    device = resolve_device(bench.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    mod = module(bench.name)
    env = common.machine_info()
    env["packages"] = common.package_versions(_VERSIONED)
    env["torch_threads"] = torch.get_num_threads()
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    log.info("bench %s on %s -> %s", bench.name, device, out_dir)
    start = time.perf_counter()
    out = mod.run(bench, device, str(out_dir))
    env["loadavg_end"] = os.getloadavg()[0]
    payload: dict[str, Any] = {
        "bench": bench.name, "title": bench.title, "device": str(device),
        "command": " ".join(["python -m benchmarks.run", *overrides]), "overrides": overrides,
        "config": plain, "env": env, "wall_s": time.perf_counter() - start,
        "results": out["results"], "tables": out["tables"], "notes": out.get("notes", []), "plots": [],
    }
    # results.json first: whatever happens to the optional outputs below, the numbers are on disk.
    report.write_json(out_dir / "results.json", payload)
    if bench.plots:
        payload["plots"], reason = report.make_plots(mod, payload, out_dir, bench)
        if reason:
            payload["plots_skipped"] = reason
    else:
        payload["plots_skipped"] = "plots=false"
    report.write_json(out_dir / "results.json", payload)
    (out_dir / "results.md").write_text(report.markdown(payload))
    report.print_tables(payload)
    log.info("wrote %s", out_dir / "results.json")
    return payload


@hydra.main(config_path="../conf", config_name="bench_run", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    if cfg.get("out_dir"):
        out_dir = pathlib.Path(cfg.out_dir)
        if hc.mode == RunMode.MULTIRUN:  # one directory per job of a sweep
            out_dir = out_dir / f"job{hc.job.num}"
    else:
        out_dir = pathlib.Path(hc.runtime.output_dir)
    run_bench(cfg, out_dir, list(hc.overrides.task))


if __name__ == "__main__":
    sys.exit(main())
