"""The tier interface every storage level implements (host memory, Redis Cluster, RocksDB).

A tier stores, per table tag ("hps_et.<model>.<table>"), int64 keys -> float32 rows of a fixed dim.
Tiers know nothing of caches or of each other: the engine alone moves data between them.
A tier that fails at lookup time (a Redis node down) reports the keys as not found and counts the error;
it never raises into a lookup. Start-up errors (cannot connect, bad path) raise with the reason.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from hps_core.tables import TableFiles


def check_keys(keys: object, name: str = "keys") -> torch.Tensor:
    """The keys argument of a tier call: int64 (n,) on the CPU -> contiguous; TypeError/ValueError otherwise."""
    if not isinstance(keys, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (int64 (n,) on CPU), got {type(keys).__name__}")
    if keys.dtype != torch.int64:
        raise TypeError(f"{name} must have dtype torch.int64, got {keys.dtype}")
    if keys.dim() != 1:
        raise ValueError(f"{name} must be 1-D (n,), got shape {tuple(keys.shape)}")
    if keys.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got device {keys.device}")
    return keys.contiguous()


@dataclasses.dataclass
class TierStats:
    """Counters of one tier for one table tag."""

    fetches: int = 0  # fetch calls (host memory: calls on its map, a large tier fetch being several)
    keys_requested: int = 0
    keys_found: int = 0
    keys_inserted: int = 0
    keys_evicted: int = 0
    errors: int = 0  # keys reported missing because the tier could not answer


class Tier(abc.ABC):
    """One storage level. All tensors are CPU tensors; keys are int64 (n,), values float32 (n, dim)."""

    name: str = "tier"
    # Holds its rows across restarts of the server (RocksDB, a Redis cluster): it records which table files it was
    # loaded from (loaded_from / mark_loaded), so a start keeps rows written since instead of reloading the files.
    persistent: bool = False
    # Holds every row written to it (no eviction): when persistent and loaded, a start can rebuild the other tiers
    # and the resident tables from it (iter_chunks) - the newest row of every key.
    complete: bool = False
    # Other processes write it too (a Redis cluster several servers share): it can gain keys this engine never
    # saw, so a table resident on a GPU must still ask it for the keys it lacks. In-process tiers gain keys only
    # through this engine (load, update), which writes the resident tables too.
    shared: bool = False

    @abc.abstractmethod
    def create_table(self, tag: str, dim: int) -> None:
        """Declare a table (idempotent for the same dim; a different dim for an existing tag raises ValueError)."""

    def drop_table(self, tag: str) -> None:
        """Remove table `tag` and its rows (retiring a model); a tier that cannot says so."""
        raise NotImplementedError(f"{type(self).__name__} cannot drop tables")

    @abc.abstractmethod
    def fetch(self, tag: str, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of `keys` (int64 (n,)) -> (values float32 (n, dim), found bool (n,)); missing rows are zeros."""

    @abc.abstractmethod
    def insert(self, tag: str, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Insert or overwrite rows; returns how many keys were new."""

    @abc.abstractmethod
    def erase(self, tag: str, keys: torch.Tensor) -> int:
        """Remove keys; returns how many were present."""

    @abc.abstractmethod
    def size(self, tag: str) -> int:
        """Number of keys stored for `tag`."""

    @abc.abstractmethod
    def load(self, tag: str, table: "TableFiles", progress: bool = True) -> int:
        """Bulk-load a table's files (key/emb_vector) into this tier; returns rows loaded."""

    def loaded_from(self, tag: str) -> str | None:
        """The identity (TableFiles.identity()) of the files `tag` was last completely loaded from; None if unknown
        (a volatile tier: always)."""
        return None

    def mark_loaded(self, tag: str, identity: str | None) -> None:
        """Record that `tag` holds every row of the files with this identity (None: forget it). Volatile: no-op."""

    def iter_chunks(self, tag: str, chunk_rows: int = 1 << 16) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every row of `tag` as (keys int64 (m,), vectors float32 (m, dim)) numpy blocks (complete tiers)."""
        raise NotImplementedError(f"{type(self).__name__} cannot list its rows")

    def stats(self) -> dict[str, TierStats]:
        """Counters per tag."""
        return {}

    def close(self) -> None:
        """Release resources (flush, close connections). Idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
