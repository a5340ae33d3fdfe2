"""HPS's two non-caching table modes, on any device.

* static: the whole table in device memory behind the cache's hash index (an EmbeddingCache sized at twice the
  rows, filled once, never evicting). Keys the index refused (a bucket overflowing at load) and keys absent from
  the table are served through the tiers like cache misses, so results stay exact.
* host-mapped (HPS "uvm"): the values stay in pinned host memory - one copy shared by every device - and each
  device holds only a sorted key index; a zero-copy gather kernel reads the rows over the bus. The index is a
  sorted key array + the row of each key (16 B per row on the device); a lookup is a binary search whose cost is
  small next to moving the rows across the bus.
"""

from __future__ import annotations

import logging

import torch

from hps_core import ops  # noqa: F401  (loads the extension: torch.ops.hps.gather_rows)
from hps_core.cache import EmbeddingCache
from hps_core.tables import TableFiles

log = logging.getLogger(__name__)

_FILL_CHUNK = 1 << 20


GATHER_STRATEGIES = {"auto": 0, "zero_copy": 1, "staged": 2}


def gather_rows(table: torch.Tensor, rows: torch.Tensor, strategy: str = "auto") -> torch.Tensor:
    """out[i] = table[rows[i]] (zeros where rows[i] is outside the table), on rows' device.

    Args:
        table: float32 (N, D) on the CPU, on rows' CUDA device, or in host memory read from a CUDA device.
        rows: int64 (n,).
        strategy: for a host table and CUDA rows, how the rows travel (the result is the same): "zero_copy" (the
            kernel reads pinned memory over the bus; no host sync), "staged" (CPU threads gather into pinned
            buffers the copy engine moves; syncs the host), "auto" (zero-copy for a pinned table, staged for a
            pageable one).

    Example:
        >>> gather_rows(torch.eye(3), torch.tensor([2, 0, 5]))  # last row is zeros
    """
    if strategy not in GATHER_STRATEGIES:
        raise ValueError(f"strategy must be one of {sorted(GATHER_STRATEGIES)}, found {strategy!r}")
    return torch.ops.hps.gather_rows(table, rows, GATHER_STRATEGIES[strategy])


@torch.library.register_fake("hps::gather_rows")
def _gather_rows_fake(table: torch.Tensor, rows: torch.Tensor, strategy: int = 0) -> torch.Tensor:
    return rows.new_empty((rows.shape[0], table.shape[1]), dtype=torch.float32)


class StaticTable:
    """The whole table on one device behind the cache's hash index; no eviction, no insertion after load.

    find(keys) -> (values (n, D), found (n,)) like EmbeddingCache.find; not-found keys (absent from the table or
    refused by a full bucket at load time) are the caller's misses.
    """

    def __init__(self, files: TableFiles, device: torch.device) -> None:
        self.device = device
        self.index = EmbeddingCache(max(2 * files.num_keys, 1), files.dim, device=device, policy="lfu")
        refused = 0
        for keys, vectors in files.iter_chunks(_FILL_CHUNK):
            counts = self.index.insert_or_assign(torch.from_numpy(keys.copy()).to(device),
                                                 torch.from_numpy(vectors.copy()).to(device))
            refused += counts["refused"]
        self.refused = refused
        if refused:
            log.info("static table %s: %d of %d keys overflowed their bucket; they are served from the tiers",
                     files.path, refused, files.num_keys)

    def find(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.index.find(keys)

    def assign(self, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Overwrite rows of keys in the table (others ignored)."""
        return self.index.assign(keys, values)

    def memory_bytes(self) -> int:
        return self.index.memory_bytes()


class HostMappedValues:
    """The rows of one table in (pinned, when CUDA is available) host memory, shared by every device."""

    def __init__(self, files: TableFiles) -> None:
        pin = torch.cuda.is_available()
        self.values = torch.empty((files.num_keys, files.dim), dtype=torch.float32, pin_memory=pin)
        self.keys = torch.from_numpy(files.keys[:].copy())  # (N,) int64, row i of values
        start = 0
        for _, vectors in files.iter_chunks(_FILL_CHUNK):
            self.values[start:start + vectors.shape[0]].copy_(torch.from_numpy(vectors.copy()))
            start += vectors.shape[0]
        self._sorted_keys, self._order = torch.sort(self.keys)

    def assign(self, keys: torch.Tensor, rows: torch.Tensor) -> int:
        """Overwrite the rows of keys (int64 (n,) CPU, unique) present in the table; returns how many were."""
        if self.keys.numel() == 0 or keys.numel() == 0:
            return 0
        pos = torch.searchsorted(self._sorted_keys, keys).clamp_(max=self.keys.numel() - 1)
        found = self._sorted_keys[pos] == keys
        self.values.index_copy_(0, self._order[pos[found]], rows[found])
        return int(found.sum())


class HostMappedTable:
    """A device-side sorted key index over HostMappedValues; rows gathered zero-copy from host memory."""

    def __init__(self, host: HostMappedValues, device: torch.device) -> None:
        self.device = device
        self.host = host
        sorted_keys, order = torch.sort(host.keys)
        self.sorted_keys = sorted_keys.to(device)  # (N,) int64
        self.row_of = order.to(device)  # (N,) int64: row in host.values of sorted_keys[i]

    def find(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys (n,) int32/int64 on the index's device -> (values (n, D), found (n,))."""
        keys64 = keys.to(torch.int64)
        n_rows = self.sorted_keys.numel()
        if n_rows == 0:
            return (torch.zeros((keys.numel(), self.host.values.shape[1]), device=keys.device),
                    torch.zeros(keys.numel(), dtype=torch.bool, device=keys.device))
        pos = torch.searchsorted(self.sorted_keys, keys64).clamp_(max=n_rows - 1)
        found = self.sorted_keys.index_select(0, pos) == keys64
        rows = torch.where(found, self.row_of.index_select(0, pos), torch.full_like(pos, -1))
        return gather_rows(self.host.values, rows), found

    def memory_bytes(self) -> int:
        return self.sorted_keys.numel() * 16
