"""Output of a suite run: results.json, results.md (markdown tables + machine + notes), the same tables printed
with rich, PNG plots with matplotlib. rich and matplotlib are optional (the GPU image may lack them): without
them the run still writes results.json and results.md and says what it skipped.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
from typing import Any

log = logging.getLogger(__name__)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, pathlib.Path):
        return str(obj)
    return str(obj)


def _finite(obj: Any) -> Any:
    """NaN/inf -> None so results.json stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: pathlib.Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_finite(payload), indent=1, default=_json_default) + "\n")
    tmp.replace(path)


def markdown(payload: dict[str, Any]) -> str:
    env = payload["env"]
    hw = env.get("gpu") if payload.get("device", "").startswith("cuda") else None
    lines = [f"# Benchmark `{payload['bench']}`{' — ' + payload['title'] if payload.get('title') else ''}", "",
             f"Device: **{payload['device']}**{f' ({hw})' if hw else ''}; CPU {env['cpu']}, {env['cores']} cores; "
             f"torch {env['torch']}, numpy {env['numpy']}, Python {env['python']}; commit {env['commit']}; "
             f"{env['date']}; load average at start {env['loadavg_start']:.2f}.",
             f"Command: `{payload['command']}`", ""]
    for t in payload["tables"]:
        lines += [f"## {t['title']}", "", "| " + " | ".join(t["columns"]) + " |",
                  "|" + "|".join("---" for _ in t["columns"]) + "|"]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in t["rows"]]
        lines.append("")
    if payload.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in payload["notes"]] + [""]
    if payload.get("plots"):
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in payload["plots"]] + [""]
    return "\n".join(lines)


def print_tables(payload: dict[str, Any]) -> bool:
    """Print the tables with rich (markdown-style boxes); False when rich is missing."""
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        log.warning("rich is not installed: tables not printed (they are in results.md)")
        return False
    console = Console(width=max(120, sum(len(c) + 3 for c in payload["tables"][0]["columns"])) if payload["tables"]
                      else 120)
    for t in payload["tables"]:
        table = Table(*t["columns"], title=t["title"], box=box.MARKDOWN)
        for row in t["rows"]:
            table.add_row(*(str(c) for c in row))
        console.print(table)
    for n in payload.get("notes", []):
        console.print(f"- {n}", highlight=False)
    return True


def save_figure(fig: Any, plt: Any, out_dir: str, name: str) -> str:
    """Lay `fig` out, write it to out_dir/name at the suite's resolution and free it; returns name."""
    fig.tight_layout()
    fig.savefig(f"{out_dir}/{name}", dpi=110)
    plt.close(fig)
    return name


def make_plots(module: Any, payload: dict[str, Any], out_dir: pathlib.Path, cfg: Any) -> tuple[list[str], str]:
    """(PNG file names, "" or the reason nothing was plotted)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        log.warning("matplotlib is not installed: no plots (%s)", exc)
        return [], f"matplotlib not importable: {exc}"
    env = payload["env"]
    label = env.get("gpu", payload["device"]) if payload["device"].startswith("cuda") else \
        f"CPU ({env['cores']} cores)"
    try:
        return module.plot(payload["results"], str(out_dir), plt, cfg=cfg, device_label=label), ""
    except Exception as exc:  # noqa: BLE001 - a plotting bug must not lose a long run's tables
        log.exception("plotting failed")
        return [], f"plotting failed: {type(exc).__name__}: {exc}"
