"""Redraw the plots and results.md of a recorded suite run from its results.json (no benchmark is re-run).

    python -m benchmarks.replot benchmarks/results/suite_h200/dlrm [more run directories ...]

For runs made where matplotlib or rich was missing (the GPU image), or after a change to a plot.
"""

from __future__ import annotations

import json
import pathlib
import sys

from omegaconf import OmegaConf

from benchmarks.suite import module, report
from benchmarks.suite.config import to_schema


def replot(run_dir: pathlib.Path) -> list[str]:
    payload = json.loads((run_dir / "results.json").read_text())
    bench = to_schema(OmegaConf.create(payload["config"]))
    payload["plots"], reason = report.make_plots(module(bench.name), payload, run_dir, bench)
    payload.pop("plots_skipped", None)
    if reason:
        payload["plots_skipped"] = reason
    report.write_json(run_dir / "results.json", payload)
    (run_dir / "results.md").write_text(report.markdown(payload))
    return payload["plots"]


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    for d in argv:
        print(d, replot(pathlib.Path(d)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
