"""hps_core: the hierarchical parameter server engine and its torch API.

Importing this package is cheap: the engine, layers and native extension load on first use.

Example:
    >>> import torch, hps_core
    >>> hps = hps_core.init("my_hps_config.json")
    >>> hps.lookup("foo", 0, torch.tensor([1, 2, 3])).shape
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> module that defines it; resolved lazily so `import hps_core` stays light.
_LAZY = {
    "build_info": "hps_core._loader",
    "load_extension": "hps_core._loader",
    "HierarchicalParameterServer": "hps_core.engine",
    "init": "hps_core.engine",
    "default_server": "hps_core.engine",
    "shutdown": "hps_core.engine",
    "LookupLayer": "hps_core.nn",
    "BagLookupLayer": "hps_core.nn",
    "EmbeddingCache": "hps_core.cache",
    "load_config": "hps_core.config",
    "open_table": "hps_core.tables",
    "write_table": "hps_core.tables",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hps_core' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
