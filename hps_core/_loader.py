"""Loads the native extension `hps_core._C` (which registers torch.ops.hps.*).

A failure raises ImportError carrying the real reason plus torch and build info, so a broken build is
reported where it happens, never as a later AttributeError on `torch.ops.hps`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading

import torch

_lock = threading.Lock()
_loaded = False

REBUILD_HINT = "rebuild it with `pip install --no-build-isolation -e .` in the repository root"


def build_info() -> dict:
    """What `hps_core._C` was built as: variant (cpu|cuda), torch and CUDA versions, build time.

    Returns an empty dict when the extension was never built.

    Example:
        >>> build_info()["variant"]
        'cpu'
    """
    try:
        mod = importlib.import_module("hps_core._build_info")
    except ImportError:
        return {}
    return {k.lower(): getattr(mod, k) for k in dir(mod) if k.isupper()}


def _describe() -> str:
    info = build_info() or "no _build_info.py (the extension was never built here)"
    return f"runtime torch {torch.__version__} (cuda {torch.version.cuda}); build info: {info}"


def load_extension() -> None:
    """Import `hps_core._C` once per process; raise ImportError with the reason if it cannot be used."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        try:
            override = os.environ.get("HPS_EXTENSION_PATH")
            if override:  # another build of the extension (the sanitizer builds of `make sanitize-check`)
                spec = importlib.util.spec_from_file_location("hps_core._C", override)
                if spec is None:
                    raise ImportError(f"HPS_EXTENSION_PATH={override!r} is not a loadable extension module")
                module = importlib.util.module_from_spec(spec)
                sys.modules["hps_core._C"] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module("hps_core._C")
        except ImportError as exc:
            raise ImportError(f"hps_core._C could not be loaded: {exc}. {_describe()}. To fix, {REBUILD_HINT}.") from exc
        built_with = build_info().get("torch_version")
        if built_with is not None and built_with.split("+")[0] != torch.__version__.split("+")[0]:
            raise ImportError(
                f"hps_core._C was built against torch {built_with} but torch {torch.__version__} is imported; "
                f"{REBUILD_HINT}."
            )
        if not hasattr(torch.ops.hps, "bucket_size"):
            raise ImportError(f"hps_core._C loaded but registered no torch.ops.hps ops. {_describe()}.")
        _loaded = True
