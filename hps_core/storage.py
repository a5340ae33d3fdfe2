"""How a table stores its rows: the storage dtypes, their stored-row layout and the encode/decode ops.

A stored row (``cuda_ext/csrc/row_codec.h``) is one row of a 2-D tensor whose dtype names the codec:

============  =====================  ======================================================================
storage       stored tensor          element error vs the float32 row (stated bound, tested)
============  =====================  ======================================================================
float32       (n, D) float32         exact
float16       (n, D) float16         ``|x| * 2**-11`` (normal range; ``2**-25`` absolute below ``2**-14``)
bfloat16      (n, D) bfloat16        ``|x| * 2**-8``
int8          (n, D + 8) int8        ``scale / 2`` plus float rounding; ``scale = (max - min) / 255`` per row
fp8_e4m3      (n, D + 4) float8      ``|x| * 2**-4``, at least ``scale * 2**-10``; ``scale = max|x| / 448``
============  =====================  ======================================================================

int8 keeps FBGEMM's row-wise (scale, bias) uint8 code, shifted into int8, in the row's last 8 bytes; fp8 keeps one
scale in its last 4. Both need ``D % 4 == 0``. Encoding and decoding give the same bits on CPU and CUDA.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from hps_core.config import STORAGES

__all__ = [
    "STORAGE_NAMES",
    "STORAGE_DTYPES",
    "storage_name",
    "storage_code",
    "storage_of",
    "stored_width",
    "dim_of_stored",
    "bytes_per_row",
    "encode_rows",
    "decode_rows",
    "error_bound",
    "check_encodable",
    "row_dtype",
    "to_stored",
]

# Index = the op's storage code (row_codec.h: Storage).
STORAGE_NAMES = ("float32", "float16", "bfloat16", "int8", "fp8_e4m3")
STORAGE_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "fp8_e4m3": torch.float8_e4m3fn,
}
_TAIL_BYTES = {"float32": 0, "float16": 0, "bfloat16": 0, "int8": 8, "fp8_e4m3": 4}
_FP16_MAX = 65504.0


def storage_name(value, field: str = "storage") -> str:
    """The canonical storage name of ``value`` (a name, an alias, or a torch dtype); ValueError naming ``field``."""
    if isinstance(value, torch.dtype):
        for name, dtype in STORAGE_DTYPES.items():
            if dtype == value:
                return name
        raise ValueError(f"{field}: no storage keeps rows as {value}; choose one of {', '.join(STORAGE_NAMES)}")
    if not isinstance(value, str):
        raise ValueError(f"{field} must be one of {', '.join(STORAGE_NAMES)}, found {value!r}")
    key = STORAGES.get(value.strip().lower())
    if key is None:
        raise ValueError(f"{field} must be one of {', '.join(STORAGE_NAMES)}, found {value!r}")
    return key


def storage_code(value, field: str = "storage") -> int:
    return STORAGE_NAMES.index(storage_name(value, field))


def storage_of(stored: Tensor) -> str:
    """The storage a stored tensor's dtype names."""
    return storage_name(stored.dtype, "stored")


def _elem_bytes(name: str) -> int:
    return STORAGE_DTYPES[name].itemsize


def stored_width(storage, dim: int) -> int:
    """Elements per stored row (the stored tensor's second dimension) for embedding dim ``dim``."""
    name = storage_name(storage)
    return dim + _TAIL_BYTES[name] // _elem_bytes(name)


def dim_of_stored(stored: Tensor) -> int:
    name = storage_of(stored)
    return stored.shape[1] - _TAIL_BYTES[name] // _elem_bytes(name)


def bytes_per_row(storage, dim: int) -> int:
    name = storage_name(storage)
    return stored_width(name, dim) * _elem_bytes(name)


def check_encodable(rows: Tensor, storage, field: str = "rows") -> None:
    """Raises ValueError (naming ``field``, the row and the value) for rows ``storage`` cannot keep: non-finite values
    in a scaled storage (the scale would be inf / NaN), magnitudes past float16's range, a dim int8 / fp8 cannot hold.
    """
    name = storage_name(storage)
    if rows.dim() != 2:
        raise ValueError(f"{field} must be 2-D (rows, dim), found shape {tuple(rows.shape)}")
    if _TAIL_BYTES[name] and rows.shape[1] % 4 != 0:
        raise ValueError(f"{field}: {name} storage needs a dim that is a multiple of 4, found dim {rows.shape[1]}")
    if name in ("int8", "fp8_e4m3"):
        bad = ~torch.isfinite(rows)
        if bool(bad.any()):
            r, c = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"{field}: row {r} holds {float(rows[r, c])} at column {c}; {name} storage keeps "
                             f"finite rows only (its row-wise scale would be undefined)")
    if name == "float16":
        big = rows.abs() > _FP16_MAX
        if bool(big.any()):
            r, c = (int(v) for v in big.nonzero()[0])
            raise ValueError(f"{field}: row {r} holds {float(rows[r, c])} at column {c}, beyond float16's range "
                             f"(+-{_FP16_MAX:g}); store this table as float32 or bfloat16")


def encode_rows(rows: Tensor, storage) -> Tensor:
    """float32 rows (n, D) -> stored rows (n, stored_width) on the same device (``hps::encode_rows``)."""
    from hps_core import ops  # noqa: F401  (loads the extension: torch.ops.hps)

    return torch.ops.hps.encode_rows.default(rows, storage_code(storage))


def decode_rows(stored: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Stored rows -> (n, D) float32 (or bfloat16 / float16, rounded to nearest even) (``hps::decode_rows``)."""
    from hps_core import ops  # noqa: F401

    return torch.ops.hps.decode_rows.default(stored, dtype)


def error_bound(rows: Tensor, storage) -> Tensor:
    """Per-element bound on ``|decode(encode(rows)) - rows|`` (float64, rows' shape): the module docstring's table,
    plus the float32 roundings of decoding (a few ulps of the row's largest magnitude)."""
    name = storage_name(storage)
    x = rows.double()
    ax = x.abs()
    row_max = ax.amax(dim=1, keepdim=True) if x.shape[1] else ax
    ulps = row_max * 2.0**-22
    if name == "float32":
        return torch.zeros_like(x)
    if name == "float16":
        return torch.maximum(ax * 2.0**-11, torch.full_like(x, 2.0**-25))
    if name == "bfloat16":
        return ax * 2.0**-8
    if name == "int8":
        scale = (x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True)) / 255.0
        return (scale * 0.5 * (1 + 2.0**-18) + ulps).expand_as(x)
    scale = row_max / 448.0
    return torch.maximum(ax * 2.0**-4, (scale * 2.0**-10).expand_as(x)) * (1 + 2.0**-18) + ulps


def row_dtype(storage) -> torch.dtype:
    """The dtype of a stored tensor of ``storage`` (float32 rows are their own stored rows)."""
    return STORAGE_DTYPES[storage_name(storage)]


def to_stored(rows, storage, dim: int, field: str = "rows") -> Tensor:
    """``rows`` as ``storage`` keeps them, a contiguous CPU tensor (m, stored_width): float32 (m, dim) rows - a tensor
    or a numpy array, e.g. a block of table files - are checked (check_encodable) and encoded; rows already stored
    that way (the storage's dtype, (m, stored_width)) pass as they are. Anything else raises naming ``field``."""
    if not isinstance(rows, Tensor):
        rows = torch.from_numpy(np.array(rows, copy=True))  # a memmap block is read-only; torch wants writable memory
    name = storage_name(storage)
    rows = rows.detach().to("cpu")
    width = stored_width(name, dim)
    if rows.dtype == STORAGE_DTYPES[name] and rows.dim() == 2 and rows.shape[1] == width:
        return rows.contiguous()
    if rows.dtype != torch.float32 or rows.dim() != 2 or rows.shape[1] != dim:
        raise ValueError(f"{field} must be float32 (m, {dim}) rows or {name} stored rows ({STORAGE_DTYPES[name]}, "
                         f"(m, {width})), found {rows.dtype} of shape {tuple(rows.shape)}")
    if name == "float32":
        return rows.contiguous()
    check_encodable(rows, name, field=field)
    return encode_rows(rows.contiguous(), name)
