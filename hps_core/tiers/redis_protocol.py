"""RESP (Redis protocol) packing for the Redis Cluster tier: commands built as bytes with numpy, no per-key Python.

A bulk command (HMGET / HSET / HDEL of thousands of fields) is a small header (`_header`: the array length and the
leading arguments) followed by a uint8 matrix whose every row is the RESP bulk strings of one key's arguments
(`_bulk_rows`), so any row range of it is a valid argument sequence and is sent as a memoryview, uncopied. Small
commands go through `_pack_args`. Replies are parsed by hiredis (redis-py `Connection.read_response`), not here.

Used by hps_core.tiers.redis_cluster (the tier) and hps_core.tiers.redis_nodes (CLUSTER SLOTS / PING); these
names are package-internal.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_KEY_BYTES = 8  # a hash field is the 8 raw little-endian bytes of an int64 key

_CRLF = np.frombuffer(b"\r\n", np.uint8)


def _pack_args(args: Sequence[bytes]) -> bytes:
    """One RESP command from a few byte strings (small commands; bulk ones go through `_bulk_rows`)."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _header(total_args: int, lead: Sequence[bytes]) -> bytes:
    """RESP array header for `total_args` arguments, followed by the leading ones (command name, hash key...)."""
    return b"*%d\r\n" % total_args + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in lead)


def _bulk_rows(columns: Sequence[np.ndarray], m: int) -> np.ndarray:
    """RESP bulk strings for m rows of fixed-width arguments, built with numpy.

    columns[j]: uint8 (m, w_j) or (1, w_j) (broadcast): argument j of every row. Returns uint8 (m, W) whose row i
    is `$w_0\\r\\n<col0[i]>\\r\\n$w_1\\r\\n<col1[i]>\\r\\n...`; any row range of it is a valid argument sequence.
    """
    prefixes = [b"$%d\r\n" % c.shape[1] for c in columns]
    width = sum(len(p) + c.shape[1] + 2 for p, c in zip(prefixes, columns))
    out = np.empty((m, width), np.uint8)
    pos = 0
    for prefix, col in zip(prefixes, columns):
        out[:, pos : pos + len(prefix)] = np.frombuffer(prefix, np.uint8)
        pos += len(prefix)
        out[:, pos : pos + col.shape[1]] = col
        pos += col.shape[1]
        out[:, pos : pos + 2] = _CRLF
        pos += 2
    return out


def _key_bytes(sorted_keys: np.ndarray) -> np.ndarray:
    """uint8 (m, 8): the raw little-endian bytes of int64 keys (the hash field)."""
    return np.ascontiguousarray(sorted_keys, dtype="<i8").view(np.uint8).reshape(-1, _KEY_BYTES)


def _records(rows: np.ndarray) -> np.ndarray:
    """uint8 (m, w) C-contiguous rows as a (m,) array of w-byte records (a view).

    Row gathers and scatters (`rows[order]`, `out[idx] = ...`) then move one record per row instead of w one-byte
    elements, faster than the float32 (m, dim) copies of the same bytes, whatever the storage's dtype.
    """
    return rows.view(np.dtype((np.void, rows.shape[1])))[:, 0]
