"""Engine test helpers: synthetic tables written in the HPS file format, and a numpy reference."""

from __future__ import annotations

import numpy as np
import torch

from hps_core.storage import decode_rows, encode_rows
from hps_core.tables import write_table


class Reference:
    """What a lookup must return: the row of each key from the files, the table's default otherwise."""

    def __init__(self, keys: np.ndarray, vectors: np.ndarray, default: float) -> None:
        self.rows = {int(k): vectors[i] for i, k in enumerate(keys)}
        self.dim = vectors.shape[1]
        self.default = np.float32(default)

    def lookup(self, keys) -> np.ndarray:
        flat = np.asarray(keys).reshape(-1)
        out = np.full((flat.size, self.dim), self.default, dtype=np.float32)
        for i, k in enumerate(flat.tolist()):
            row = self.rows.get(int(k))
            if row is not None:
                out[i] = row
        return out.reshape(*np.asarray(keys).shape, self.dim)

    def update(self, keys, vectors) -> None:
        for k, v in zip(np.asarray(keys).reshape(-1).tolist(), np.asarray(vectors)):
            self.rows[int(k)] = v.copy()


def make_table(path, rows: int, dim: int, rng: np.random.Generator, key_range: int = 1 << 40,
               int32: bool = False) -> tuple[np.ndarray, np.ndarray]:
    hi = np.iinfo(np.int32).max if int32 else key_range
    lo = np.iinfo(np.int32).min if int32 else -key_range
    keys = np.unique(rng.integers(lo, hi, size=rows * 2, dtype=np.int64))[:rows]
    rng.shuffle(keys)
    vectors = rng.standard_normal((keys.size, dim)).astype(np.float32)
    write_table(path, keys, vectors)
    return keys, vectors


def stored(rows: np.ndarray, storage: str) -> np.ndarray:
    """float32 rows as a table of `storage` serves them: decode(encode(rows))."""
    return decode_rows(encode_rows(torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)), storage)).numpy()
