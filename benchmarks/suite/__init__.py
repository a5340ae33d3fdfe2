"""The Hydra-configured benchmark suite: one module per bench (run + table + plot), driven by benchmarks/run.py.

    python -m benchmarks.run bench=<lookup|hit_rate|tiers|dlrm|...> [key=value ...]
"""

from __future__ import annotations

import importlib
from types import ModuleType

BENCHES = ("lookup", "hit_rate", "tiers", "dlrm")


def module(name: str) -> ModuleType:
    """The module of bench `name` (imported on demand: dlrm's TF twin and the Redis harness are heavy)."""
    if name not in BENCHES:
        raise ValueError(f"name = {name!r}: unknown bench, expected one of {list(BENCHES)}")
    return importlib.import_module(f"benchmarks.suite.{name}")
