"""The tier interface every storage level implements (host memory, Redis Cluster, RocksDB), and what they share.

A tier stores, per table tag ("hps_et.<model>.<table>"), int64 keys -> stored rows of a fixed dim: the rows as the
table's storage keeps them (hps_core.storage: float32 rows, or float16 / bfloat16 / int8 / fp8 rows with their
row-wise scale), as the device tables keep them too. Rows are encoded once - by load() from the float32 table files, by
the engine's update() - and move between tiers and tables as the same bytes from then on (re-encoding a decoded int8
or fp8 row would not give them back).
Tiers know nothing of caches or of each other: the engine alone moves data between them, and it knows a tier only
through what `Tier` declares here.
A tier that fails at lookup time (a Redis node down) reports the keys as not found and counts the error;
it never raises into a lookup. Start-up errors (cannot connect, bad path) raise with the reason.
"""

from __future__ import annotations

import abc
import dataclasses
import operator
import threading
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from hps_core.storage import row_dtype, storage_name, stored_width

if TYPE_CHECKING:  # pragma: no cover
    from hps_core.tables import TableFiles


def _check_cpu_tensor(value: object, name: str, dtype: torch.dtype, ndim: int, shape: str) -> torch.Tensor:
    """`value` as a contiguous CPU tensor of `dtype` and `ndim` dims (`shape` names them in messages)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor ({str(dtype).removeprefix('torch.')} {shape} on CPU), "
            f"got {type(value).__name__}"
        )
    if value.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {value.dtype}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape}, got shape {tuple(value.shape)}")
    if value.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got device {value.device}")
    return value.contiguous()


def check_keys(keys: object, name: str = "keys") -> torch.Tensor:
    """The keys argument of a tier call: int64 (n,) on the CPU -> contiguous; TypeError/ValueError otherwise."""
    return _check_cpu_tensor(keys, name, torch.int64, 1, "(n,)")


def check_values(values: object, n: int, dim: int, tag: str, storage: str = "float32") -> torch.Tensor:
    """The values argument of an insert: stored rows of the table's storage on the CPU - float32 (n, dim) for a
    float32 table, (n, stored_width) of the storage's dtype otherwise -> contiguous; TypeError/ValueError otherwise."""
    width = stored_width(storage, dim)
    shape = "(n, dim)" if width == dim else f"(n, {width}) (dim {dim} + the row-wise scale)"
    values = _check_cpu_tensor(values, "values", row_dtype(storage), 2, shape)
    if values.shape[1] != width:
        what = f"dim={dim}" if width == dim else f"{width}: dim {dim} stored as {storage}"
        raise ValueError(
            f"values must have shape (n, {what}) for table {tag!r} of dim {dim}, got shape {tuple(values.shape)}"
        )
    if values.shape[0] != n:
        raise ValueError(
            f"values must have one row per key: keys has {n} rows, values has shape {tuple(values.shape)}"
        )
    return values


def check_storage(storage: object, dim: int, tag: str) -> str:
    """The canonical storage name (hps_core.storage) of table `tag` of `dim`; ValueError naming the table when the
    storage is unknown or cannot keep rows of that dim (int8 / fp8 need dim % 4 == 0)."""
    name = storage_name(storage, field=f"storage of table {tag!r}")
    if name in ("int8", "fp8_e4m3") and dim % 4:
        raise ValueError(f"storage of table {tag!r}: {name} needs a dim that is a multiple of 4, got dim {dim}")
    return name


def check_storage_match(tag: str, where: str, have: str, want: str) -> None:
    """An existing table asked for with another storage: ValueError naming both (its rows are kept as `have`)."""
    if have != want:
        raise ValueError(f"table {tag!r} exists in {where} with storage {have}, asked for storage {want}: its rows are "
                         f"stored as {have} (use the storage it was loaded with, or a new path / table)")


def check_int(value: Any, name: str, minimum: int, maximum: int | None = None) -> int:
    """`value` as an int in [minimum, maximum], else TypeError/ValueError naming `name` and the value.

    A bool is refused although Python counts it as an int: `max_batch_size=True` is a mistake, not 1.
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got bool {value!r}")
    try:
        as_int = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if as_int < minimum or (maximum is not None and as_int > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {allowed}, got {as_int}")
    return as_int


def check_table_files(table: object) -> None:
    """The table argument of `Tier.load`: what it reads of a `hps_core.tables.TableFiles`, else TypeError."""
    for attr in ("num_keys", "dim", "iter_chunks"):
        if not hasattr(table, attr):
            raise TypeError(
                f"table must be a hps_core.tables.TableFiles (has no {attr!r}), got {type(table).__name__}"
            )


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
    """One storage level. All tensors are CPU tensors; keys are int64 (n,), values the table's stored rows (n, width):
    float32 (n, dim) for a float32 table (storage.stored_width / row_dtype give the others).

    Everything the engine asks of a tier is declared here, with the answer of a tier that lacks the feature; the
    engine never probes a tier for attributes. An implementation keeps one record per table in `self._tables`
    (tag -> an object with `dim`, `storage` (a storage name) and `stats: TierStats`), so the lookups, listing and
    counters below serve all.
    """

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
    # Opened for reading only (a RocksDB directory another process writes): the engine neither loads, updates nor
    # promotes rows into it, and refuses update() rather than leave it behind the other tiers.
    read_only: bool = False
    # HPS cache_missed_embeddings: rows a lookup found in a tier below this one are copied into it.
    cache_missed_embeddings: bool = False
    # Its rows of each table are a torch.classes.hps.HostHashMap that the lookup pipelines read natively by handle
    # (map_handle), with no Python on the miss path. Only the first tier is read that way.
    native_map: bool = False
    # drop_table removes a table and its rows. A start that fails drops the tables it created in a persistent
    # tier, so the tier is left as it was found; a tier that cannot drop them keeps them.
    can_drop_tables: bool = False

    def __init__(self) -> None:
        self._tables: dict[str, Any] = {}  # tag -> the implementation's record of the table (`dim`, `stats`)
        self._stats_lock = threading.Lock()  # fetches on several threads count at once
        self._closed = False

    # ------------------------------------------------------------------------------------------ tables

    @abc.abstractmethod
    def create_table(self, tag: str, dim: int, storage: str = "float32") -> None:
        """Declare a table whose rows `storage` keeps (idempotent for the same dim and storage; a different dim or
        storage for an existing tag raises ValueError naming both - a persistent tier records them)."""

    def drop_table(self, tag: str) -> None:
        """Remove table `tag` and its rows (retiring a model); a tier that cannot says so (can_drop_tables)."""
        raise NotImplementedError(f"{type(self).__name__} cannot drop tables")

    def tables(self) -> dict[str, int | None]:
        """{tag: dim} of every table this tier knows (None: a table found without a recorded dim)."""
        self._check_open()
        return {tag: t.dim for tag, t in list(self._tables.items())}

    def storage(self, tag: str) -> str:
        """How table `tag` keeps its rows here (a hps_core.storage name)."""
        return self._table(tag).storage

    # ------------------------------------------------------------------------------------------ rows

    @abc.abstractmethod
    def fetch(self, tag: str, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of `keys` (int64 (n,)) -> (stored rows (n, width), found bool (n,)); missing rows are zero bytes."""

    def map_handle(self, tag: str) -> int:
        """The handle of the table's native map, read by the lookup pipelines (tiers with native_map)."""
        raise NotImplementedError(f"{type(self).__name__} has no native map")

    @abc.abstractmethod
    def insert(self, tag: str, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Insert or overwrite stored rows (check_values); returns how many keys were new."""

    @abc.abstractmethod
    def erase(self, tag: str, keys: torch.Tensor) -> int:
        """Remove keys; returns how many were present."""

    @abc.abstractmethod
    def size(self, tag: str) -> int:
        """Number of keys stored for `tag`."""

    def memory_bytes(self, tag: str) -> int | None:
        """Bytes of this process's memory holding `tag`; None for a tier that keeps its rows elsewhere."""
        return None

    @abc.abstractmethod
    def load(self, tag: str, table: "TableFiles", progress: bool = True, storage: str = "float32") -> int:
        """Bulk-load a table's files (key/emb_vector) into this tier, creating the table with `storage` if needed;
        returns rows loaded. Blocks of float32 rows are encoded as they go (storage.to_stored); a source whose blocks
        are already stored rows of the table's storage (another tier's iter_chunks) is copied as it is."""

    def loaded_from(self, tag: str) -> str | None:
        """The identity (TableFiles.identity()) of the files `tag` was last completely loaded from; None if unknown
        (a volatile tier: always)."""
        return None

    def mark_loaded(self, tag: str, identity: str | None) -> None:
        """Record that `tag` holds every row of the files with this identity (None: forget it). Volatile: no-op."""

    def iter_chunks(self, tag: str, chunk_rows: int = 1 << 16) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every row of `tag` as (keys int64 (m,), stored rows (m, width)) CPU tensor blocks (complete tiers)."""
        raise NotImplementedError(f"{type(self).__name__} cannot list its rows")

    # ------------------------------------------------------------------------------------------ counters

    def stats(self) -> dict[str, TierStats]:
        """Counters per tag (copies)."""
        with self._stats_lock:
            return {tag: dataclasses.replace(t.stats) for tag, t in self._tables.items()}

    def _count(self, stats: TierStats, **counts: int) -> None:
        """Add `counts` to one table's counters, e.g. `self._count(table.stats, fetches=1, keys_found=hits)`."""
        with self._stats_lock:
            for counter, n in counts.items():
                setattr(stats, counter, getattr(stats, counter) + n)

    # ------------------------------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Release resources (flush, close connections). Idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def _where(self) -> str:
        """How error messages name this tier."""
        return f"the {self.name} tier"

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self._where} is closed")

    def _table(self, tag: str) -> Any:
        """The record of table `tag`; RuntimeError once closed, KeyError naming the known tags if undeclared."""
        self._check_open()
        table = self._tables.get(tag)
        if table is None:
            raise KeyError(f"unknown table tag {tag!r} in {self._where}; known tags: {sorted(self._tables)}")
        return table
