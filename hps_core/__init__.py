"""hps_core: the hierarchical parameter server engine and its torch API.

Importing this package is cheap: the native extension is loaded on first use of an op
(`hps_core.ops`), and file/config helpers work without it.
"""

from hps_core._loader import build_info, load_extension

__version__ = "0.1.0"

__all__ = ["build_info", "load_extension", "__version__"]
