"""Tests for hps_core.tables: HPS table directories (key / emb_vector / meta) read, validated, written, converted.

Files are real files in tmp_path; bytes are checked against what `struct` writes, independent of our reader.
"""

from __future__ import annotations

import gc
import re
import resource
import signal
import struct

import numpy as np
import psutil
import pytest
import torch

from hps_core.tables import (
    TableFileError,
    TableFiles,
    from_keras_embedding,
    from_numpy,
    from_torch_embedding,
    open_table,
    validate_table,
    write_table,
)

I64 = np.iinfo(np.int64)
I32 = np.iinfo(np.int32)


def _keys_with_extremes(n: int, seed: int = 0) -> np.ndarray:
    """n distinct int64 keys including both int64 extremes, 0 and -1, in shuffled order."""
    rng = np.random.default_rng(seed)
    special = np.array([I64.min, I64.max, 0, -1, I64.min + 1, I64.max - 1], dtype=np.int64)
    rest = rng.integers(I64.min, I64.max, size=4 * n, dtype=np.int64, endpoint=True)
    keys = np.unique(np.concatenate([special, rest]))
    keys = np.concatenate([special, np.setdiff1d(keys, special)])[:n]
    rng.shuffle(keys)
    return keys


def _snapshot(directory) -> dict[str, bytes]:
    """Every file of a directory with its bytes (to show that nothing changed)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _write_raw(directory, key_bytes: bytes | None, vec_bytes: bytes | None, meta_bytes: bytes | None = None):
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in (("key", key_bytes), ("emb_vector", vec_bytes), ("meta", meta_bytes)):
        if data is not None:
            (directory / name).write_bytes(data)
    return directory


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("dim", [1, 3, 16, 129])
@pytest.mark.parametrize("with_meta", [False, True])
@pytest.mark.parametrize("given_keys", [False, True])
def test_round_trip(tmp_path, dim, with_meta, given_keys):
    n = 37
    rng = np.random.default_rng(dim)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors[0, 0], vectors[-1, -1] = np.nan, -np.inf  # HPS allows non-finite values
    keys = _keys_with_extremes(n, seed=dim) if given_keys else None
    meta = rng.integers(-(2**40), 2**40, size=n) if with_meta else None

    kw = {"meta": meta}
    t = from_numpy(tmp_path / "t", vectors, keys=keys, **kw) if keys is None else write_table(
        tmp_path / "t", keys, vectors, **kw
    )
    expected_keys = np.arange(n, dtype=np.int64) if keys is None else keys

    for opened in (t, open_table(tmp_path / "t", dim), open_table(tmp_path / "t"), validate_table(tmp_path / "t")):
        assert (opened.num_keys, opened.dim) == (n, dim)
        assert opened.keys.dtype == np.int64 and opened.vectors.dtype == np.float32
        assert opened.vectors.shape == (n, dim)
        np.testing.assert_array_equal(opened.keys, expected_keys)
        # bit-exact, NaN included
        np.testing.assert_array_equal(opened.vectors.view(np.uint32), vectors.view(np.uint32))
        if with_meta:
            np.testing.assert_array_equal(opened.meta, meta)
        else:
            assert opened.meta is None

    # The on-disk layout, read with struct (little-endian), not with our reader.
    raw_keys = (tmp_path / "t" / "key").read_bytes()
    raw_vec = (tmp_path / "t" / "emb_vector").read_bytes()
    assert len(raw_keys) == 8 * n and len(raw_vec) == 4 * n * dim
    assert list(struct.unpack(f"<{n}q", raw_keys)) == expected_keys.tolist()
    last_row = struct.unpack(f"<{dim}f", raw_vec[-4 * dim :])
    np.testing.assert_array_equal(np.array(last_row, dtype=np.float32), vectors[-1])
    names = sorted(p.name for p in (tmp_path / "t").iterdir())
    assert names == (["emb_vector", "key", "meta"] if with_meta else ["emb_vector", "key"])  # no temp files left
    if with_meta:
        assert list(struct.unpack(f"<{n}q", (tmp_path / "t" / "meta").read_bytes())) == meta.tolist()

    k, v = t.to_torch()
    assert k.dtype == torch.int64 and v.dtype == torch.float32
    assert torch.equal(k, torch.from_numpy(expected_keys))
    assert torch.equal(v.view(torch.int32), torch.from_numpy(vectors.view(np.int32)))


def test_hps_user_style_files(tmp_path):
    """A table written the way HPS notebooks do it: struct.pack('q') / struct.pack(f'{dim}f') appended."""
    dim, n = 8, 50
    rng = np.random.default_rng(1)
    keys = (rng.choice(2 * 10**6, size=n, replace=False).astype(np.int64) * 7919 - 10**12).tolist()
    vecs = rng.standard_normal((n, dim)).astype(np.float32).tolist()
    d = tmp_path / "sparse_embedding0"
    d.mkdir()
    with open(d / "key", "wb") as fk, open(d / "emb_vector", "wb") as fv:
        for key, vec in zip(keys, vecs):
            fk.write(struct.pack("q", key))
            fv.write(struct.pack(f"{dim}f", *vec))
    for t in (open_table(d, dim), open_table(d)):
        assert t.dim == dim and t.num_keys == n and t.meta is None
        assert t.keys.tolist() == keys
        np.testing.assert_array_equal(t.vectors, np.array(vecs, dtype=np.float32))


def test_float64_and_torch_inputs_cast_like_numpy(tmp_path):
    rng = np.random.default_rng(2)
    w64 = rng.standard_normal((20, 5)) * 1e3
    t = write_table(tmp_path / "a", np.arange(20, dtype=np.uint32), w64, chunk_rows=3)
    np.testing.assert_array_equal(t.vectors.view(np.uint32), w64.astype(np.float32).view(np.uint32))

    w16 = torch.from_numpy(w64).to(torch.bfloat16)
    t = write_table(tmp_path / "b", torch.arange(20, dtype=torch.int32), w16, chunk_rows=7)
    np.testing.assert_array_equal(t.vectors, w16.float().numpy())
    np.testing.assert_array_equal(t.keys, np.arange(20))


def test_overwrite_replaces_and_drops_stale_meta(tmp_path):
    d = tmp_path / "t"
    write_table(d, [1, 2, 3], np.ones((3, 2), np.float32), meta=[7, 8, 9])
    old = open_table(d)  # a reader holding the old files keeps seeing them after the replace
    t = write_table(d, [10, 20], np.full((2, 4), 2.5, np.float32), overwrite=True)
    assert t.keys.tolist() == [10, 20] and t.dim == 4 and t.meta is None
    assert sorted(p.name for p in d.iterdir()) == ["emb_vector", "key"]
    assert old.keys.tolist() == [1, 2, 3] and old.vectors.shape == (3, 2) and old.meta.tolist() == [7, 8, 9]


# ---------------------------------------------------------------------------------------------- memory mapping


def test_open_is_memory_mapped(tmp_path):
    t = write_table(tmp_path / "t", [5, 6], np.zeros((2, 3), np.float32), meta=[1, 2])
    assert isinstance(t.keys, np.memmap) and isinstance(t.vectors, np.memmap) and isinstance(t.meta, np.memmap)
    for arr in (t.keys, t.vectors, t.meta):
        assert not arr.flags.writeable
        with pytest.raises(ValueError):
            arr[0] = 1


def test_open_large_table_does_not_read_it(tmp_path):
    """A ~200 MB emb_vector (sparse file: no data written) must not become ~200 MB of RSS on open."""
    n, dim = 1 << 20, 48
    d = tmp_path / "big"
    d.mkdir()
    np.arange(n, dtype="<i8").tofile(d / "key")
    with open(d / "emb_vector", "wb") as f:
        f.truncate(n * dim * 4)  # 201 MB
    gc.collect()
    proc = psutil.Process()
    before = proc.memory_info().rss
    t = open_table(d, dim)  # includes the duplicate check (8 MB of keys)
    t2 = open_table(d)
    after = proc.memory_info().rss
    assert t.vectors.shape == (n, dim) and t2.dim == dim
    assert t.vectors[-1, -1] == 0.0
    grown = after - before
    assert grown < 80 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB opening a {n * dim * 4 / 2**20:.0f} MiB table"


# --------------------------------------------------------------------------------------------------- iter_chunks


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 333, 999, 1000, 5000])
def test_iter_chunks_covers_every_row_once_in_order(tmp_path, chunk_rows):
    n, dim = 1000, 3
    keys = _keys_with_extremes(n, seed=3)
    vectors = np.random.default_rng(3).standard_normal((n, dim)).astype(np.float32)
    t = write_table(tmp_path / "t", keys, vectors)
    chunks = list(t.iter_chunks(chunk_rows, progress=(chunk_rows == 333), desc="test"))
    sizes = [len(k) for k, _ in chunks]
    assert sizes[:-1] == [chunk_rows] * (len(chunks) - 1) and 0 < sizes[-1] <= chunk_rows
    assert len(chunks) == -(-n // chunk_rows)
    for k, v in chunks:
        assert k.dtype == np.int64 and v.dtype == np.float32 and v.shape == (len(k), dim)
    np.testing.assert_array_equal(np.concatenate([k for k, _ in chunks]), keys)
    np.testing.assert_array_equal(np.concatenate([v for _, v in chunks]), vectors)


def test_iter_chunks_rejects_bad_chunk_rows(tmp_path):
    t = write_table(tmp_path / "t", [1], np.zeros((1, 1), np.float32))
    for bad, exc in ((0, ValueError), (-3, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(exc, match="chunk_rows"):
            next(t.iter_chunks(bad))


# ------------------------------------------------------------------------------------------- validation errors


def test_missing_directory_and_not_a_directory(tmp_path):
    with pytest.raises(TableFileError, match=r"nope.*does not exist"):
        open_table(tmp_path / "nope")
    (tmp_path / "file").write_bytes(b"x" * 8)
    with pytest.raises(TableFileError, match=r"file is not a directory"):
        open_table(tmp_path / "file")


@pytest.mark.parametrize("missing", ["key", "emb_vector"])
def test_missing_file(tmp_path, missing):
    d = _write_raw(tmp_path / "t", struct.pack("<2q", 1, 2), struct.pack("<4f", 1, 2, 3, 4))
    (d / missing).unlink()
    with pytest.raises(TableFileError, match=rf"{missing} file .*t/{missing} is missing"):
        open_table(d, 2)
    (d / missing).mkdir()
    with pytest.raises(TableFileError, match=rf"t/{missing} is not a regular file"):
        open_table(d, 2)


@pytest.mark.parametrize(
    "key_bytes, vec_bytes, meta_bytes, dim, patterns",
    [
        # empty files
        (b"", struct.pack("<2f", 1, 2), None, 2, [r"key file \S+/key is empty \(0 bytes\)"]),
        (struct.pack("<q", 1), b"", None, 2, [r"emb_vector file \S+/emb_vector is empty \(0 bytes\)"]),
        # key size not a multiple of 8: 29 bytes = 3 keys + 5
        (b"\0" * 29, b"\0" * 24, None, 2, [r"\S+/key has 29 bytes, not a multiple of 8", r"3 keys \+ 5 stray"]),
        # emb_vector size not a multiple of 4: 26 bytes
        (struct.pack("<3q", 1, 2, 3), b"\0" * 26, None, 2, [r"\S+/emb_vector has 26 bytes, not a multiple of 4"]),
        # vector count != N x dim: N=3, dim=4 expects 48 bytes, file has 60 (dim 5)
        (
            struct.pack("<3q", 1, 2, 3),
            b"\0" * 60,
            None,
            4,
            [r"\S+/emb_vector has 60 bytes", r"3 x 4 x 4 = 48 bytes", r"N=3", r"15 floats = 5 per key"],
        ),
        # dim inference impossible: 7 floats for 3 keys
        (struct.pack("<3q", 1, 2, 3), b"\0" * 28, None, None, [r"cannot infer dim", r"7 floats", r"N=3"]),
        # meta empty / wrong size
        (struct.pack("<3q", 1, 2, 3), b"\0" * 24, b"", 2, [r"meta file \S+/meta is empty \(0 bytes\)"]),
        (
            struct.pack("<3q", 1, 2, 3),
            b"\0" * 24,
            b"\0" * 16,
            2,
            [r"\S+/meta has 16 bytes, expected the key file's size 24 bytes", r"N=3"],
        ),
    ],
    ids=["empty-key", "empty-vec", "key-not-x8", "vec-not-x4", "count-mismatch", "dim-not-integral",
         "meta-empty", "meta-size"],
)
def test_bad_files_raise_with_file_and_numbers(tmp_path, key_bytes, vec_bytes, meta_bytes, dim, patterns):
    d = _write_raw(tmp_path / "t", key_bytes, vec_bytes, meta_bytes)
    before = _snapshot(d)
    with pytest.raises(TableFileError) as info:
        open_table(d, dim)
    msg = str(info.value)
    assert str(d) in msg
    for pattern in patterns:
        assert re.search(pattern, msg), (pattern, msg)
    with pytest.raises(TableFileError):
        validate_table(d, dim)
    assert _snapshot(d) == before
    assert isinstance(info.value, ValueError)


def test_duplicate_keys(tmp_path):
    keys = [5, 1, 5, 9, 1, 5, 42]
    d = _write_raw(tmp_path / "t", struct.pack(f"<{len(keys)}q", *keys), b"\0" * 4 * len(keys))
    with pytest.raises(TableFileError) as info:
        open_table(d, 1)
    msg = str(info.value)
    assert f"{d}/key" in msg and "N=7" in msg
    assert "3 duplicate rows: 2 distinct keys" in msg
    assert "1 (rows 1, 4)" in msg and "5 (rows 0, 2, 5)" in msg
    t = open_table(d, 1, check_duplicates=False)
    assert t.keys.tolist() == keys


def test_duplicate_report_is_bounded(tmp_path):
    keys = np.repeat(np.arange(100, dtype=np.int64), 2)
    d = _write_raw(tmp_path / "t", keys.tobytes(), b"\0" * 4 * len(keys))
    with pytest.raises(TableFileError, match=r"100 duplicate rows: 100 distinct keys.* and 95 more"):
        open_table(d)


def test_int32_key_mode(tmp_path):
    ok = [I32.min, I32.max, 0, -1]
    d = _write_raw(tmp_path / "ok", struct.pack("<4q", *ok), b"\0" * 16)
    assert open_table(d, 1, key_dtype="int32").keys.tolist() == ok
    assert open_table(d, 1, key_dtype=np.int32).num_keys == 4

    bad = [1, 2**31, -5, -(2**31) - 1]
    d = _write_raw(tmp_path / "bad", struct.pack("<4q", *bad), b"\0" * 16)
    with pytest.raises(TableFileError, match=rf"{d}/key: key 2147483648 at row 1 does not fit key_dtype int32"):
        open_table(d, 1, key_dtype="int32")
    assert open_table(d, 1, key_dtype="int64").num_keys == 4
    bad_low = [1, -(2**31) - 1]
    d = _write_raw(tmp_path / "low", struct.pack("<2q", *bad_low), b"\0" * 8)
    with pytest.raises(TableFileError, match=r"key -2147483649 at row 1"):
        validate_table(d, key_dtype="int32")


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        ({"dim": 0}, ValueError, r"dim must be a positive int, got 0"),
        ({"dim": -4}, ValueError, r"dim must be a positive int, got -4"),
        ({"dim": 2.0}, TypeError, r"dim must be a positive int, got float 2.0"),
        ({"dim": True}, TypeError, r"dim must be a positive int, got bool True"),
        ({"key_dtype": "int16"}, ValueError, r"key_dtype must be one of \['int32', 'int64'\], got 'int16'"),
        ({"key_dtype": "uint64"}, ValueError, r"key_dtype .* got 'uint64'"),
        ({"check_duplicates": "yes"}, TypeError, r"check_duplicates must be a bool, got str 'yes'"),
    ],
)
def test_open_bad_arguments(tmp_path, kwargs, exc, pattern):
    d = _write_raw(tmp_path / "t", struct.pack("<2q", 1, 2), struct.pack("<4f", 1, 2, 3, 4))
    with pytest.raises(exc, match=pattern):
        open_table(d, **kwargs)
    with pytest.raises(exc, match=pattern):
        validate_table(d, **kwargs)


# ------------------------------------------------------------------------------------ write_table: bad input


def _bad_writes():
    v = np.zeros((3, 2), np.float32)
    return [
        ({"keys": [1.0, 2.0, 3.0], "vectors": v}, TypeError, r"keys must hold integers, got dtype float64"),
        ({"keys": torch.tensor([1.0, 2.0, 3.0]), "vectors": v}, TypeError, r"keys must hold integers.*torch.float32"),
        ({"keys": np.array([True, False, True]), "vectors": v}, TypeError, r"keys must hold integers, got dtype bool"),
        ({"keys": [[1, 2, 3]], "vectors": v}, ValueError, r"keys must be 1-D \(N,\), got shape \(1, 3\)"),
        ({"keys": [], "vectors": v}, ValueError, r"keys is empty"),
        ({"keys": [1, 2, 3], "vectors": np.zeros((3, 2), np.int32)}, TypeError, r"vectors must hold floats.*int32"),
        ({"keys": [1, 2, 3], "vectors": torch.zeros(3, 2, dtype=torch.int64)}, TypeError, r"vectors must hold floats"),
        ({"keys": [1, 2, 3], "vectors": np.zeros((3, 2, 2))}, ValueError, r"vectors must be 2-D.*\(3, 2, 2\)"),
        ({"keys": [1, 2, 3], "vectors": np.zeros(3)}, ValueError, r"vectors must be 2-D.*\(3,\)"),
        ({"keys": [1, 2, 3], "vectors": np.zeros((3, 0))}, ValueError, r"vectors must have dim > 0.*\(3, 0\)"),
        ({"keys": [1, 2, 3, 4], "vectors": v}, ValueError, r"keys has 4 rows but vectors has 3"),
        ({"keys": [1, 2, 3], "vectors": v, "meta": [1, 2]}, ValueError, r"meta has 2 rows but keys has 3"),
        ({"keys": [1, 2, 3], "vectors": v, "meta": [0.5, 1, 2]}, TypeError, r"meta must hold integers"),
        (
            {"keys": np.array([1, 2**63 + 5, 3], dtype=np.uint64), "vectors": v},
            ValueError,
            r"keys\[1\] = 9223372036854775813 does not fit int64",
        ),
        ({"keys": [1, 2, 3], "vectors": v, "chunk_rows": 0}, ValueError, r"chunk_rows must be a positive int, got 0"),
        ({"keys": [1, 2, 3], "vectors": v, "progress": "on"}, TypeError, r"progress must be a bool, got str 'on'"),
        ({"keys": [4, 2, 4], "vectors": v}, TableFileError, r"key have 1 duplicate rows.*4 \(rows 0, 2\)"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_writes())))
def test_write_bad_input_writes_nothing(tmp_path, case):
    kwargs, exc, pattern = _bad_writes()[case]
    new = tmp_path / "new" / "table"
    with pytest.raises(exc, match=pattern):
        write_table(new, **kwargs)
    assert not (tmp_path / "new").exists()

    existing = tmp_path / "old"
    write_table(existing, [7, 8], np.ones((2, 5), np.float32), meta=[0, 1])
    before = _snapshot(existing)
    with pytest.raises(exc, match=pattern):
        write_table(existing, overwrite=True, **kwargs)
    assert _snapshot(existing) == before


def test_write_refuses_existing_table_and_files(tmp_path):
    d = tmp_path / "t"
    write_table(d, [1, 2], np.ones((2, 2), np.float32))
    before = _snapshot(d)
    with pytest.raises(TableFileError, match=rf"{d} already holds key, emb_vector; pass overwrite=True"):
        write_table(d, [3], np.zeros((1, 2), np.float32))
    assert _snapshot(d) == before
    (tmp_path / "plain").write_bytes(b"abc")
    with pytest.raises(TableFileError, match=r"plain exists and is not a directory"):
        write_table(tmp_path / "plain", [3], np.zeros((1, 2), np.float32), overwrite=True)
    assert (tmp_path / "plain").read_bytes() == b"abc"


@pytest.fixture
def file_size_limit():
    """Make writes beyond 1 MiB fail with EFBIG (a real failing write, like a full disk), for this test only."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_failed_write_leaves_nothing_and_keeps_old_table(tmp_path, file_size_limit):
    big = np.ones((1000, 512), np.float32)  # 2 MB of vectors: the write fails halfway
    keys = np.arange(1000)
    new = tmp_path / "a" / "b"
    with pytest.raises(OSError):
        write_table(new, keys, big, chunk_rows=100)
    assert not (tmp_path / "a").exists()

    old = tmp_path / "old"
    old.mkdir()
    (old / "README").write_bytes(b"keep me")
    write_table(old, [1, 2, 3], np.full((3, 4), 3.0, np.float32), meta=[1, 1, 1])
    before = _snapshot(old)
    with pytest.raises(OSError):
        write_table(old, keys, big, overwrite=True, chunk_rows=100)
    assert _snapshot(old) == before  # no temp files, old table intact
    t = open_table(old, 4)
    assert t.keys.tolist() == [1, 2, 3] and t.meta.tolist() == [1, 1, 1]


# -------------------------------------------------------------------------------------------------- converters


def test_from_numpy(tmp_path):
    w = np.random.default_rng(4).standard_normal((11, 6))
    t = from_numpy(tmp_path / "a", w)
    np.testing.assert_array_equal(t.keys, np.arange(11))
    np.testing.assert_array_equal(t.vectors, w.astype(np.float32))
    keys = _keys_with_extremes(11, seed=4)
    t = from_numpy(tmp_path / "b", w.astype(np.float32), keys=keys, meta=np.zeros(11, np.int64))
    np.testing.assert_array_equal(t.keys, keys)
    assert t.meta.tolist() == [0] * 11
    with pytest.raises(ValueError, match=r"weights must be 2-D"):
        from_numpy(tmp_path / "c", w[0])
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("kind", ["Embedding", "EmbeddingBag"])
def test_from_torch_embedding(tmp_path, kind):
    torch.manual_seed(0)
    module = getattr(torch.nn, kind)(13, 5)
    t = from_torch_embedding(tmp_path / "t", module)
    assert isinstance(t, TableFiles) and t.dim == 5 and t.num_keys == 13
    np.testing.assert_array_equal(t.vectors, module.weight.detach().numpy())
    np.testing.assert_array_equal(t.keys, np.arange(13))
    keys = torch.arange(100, 113, dtype=torch.int64)
    t = from_torch_embedding(tmp_path / "k", module, keys=keys)
    np.testing.assert_array_equal(t.keys, keys.numpy())
    # A lookup through the table gives what the module gives.
    rows = np.searchsorted(t.keys, [100, 112, 105])
    np.testing.assert_array_equal(
        t.vectors[rows], torch.nn.functional.embedding(torch.tensor([0, 12, 5]), module.weight).detach().numpy()
    )


def test_from_torch_embedding_rejects_other_modules(tmp_path):
    with pytest.raises(TypeError, match=r"torch.nn.Embedding or torch.nn.EmbeddingBag, got Linear"):
        from_torch_embedding(tmp_path / "t", torch.nn.Linear(3, 4))
    assert not (tmp_path / "t").exists()


def test_from_keras_embedding(tmp_path):
    keras = pytest.importorskip("keras")
    layer = keras.layers.Embedding(input_dim=9, output_dim=4)
    with pytest.raises(ValueError, match=r"has no weights yet"):
        from_keras_embedding(tmp_path / "unbuilt", layer)
    assert not (tmp_path / "unbuilt").exists()
    out = np.asarray(layer(np.array([[0, 3, 8]])))
    t = from_keras_embedding(tmp_path / "t", layer)
    weights = layer.get_weights()[0]
    assert weights.shape == (9, 4)
    np.testing.assert_array_equal(t.vectors, weights)
    np.testing.assert_array_equal(t.keys, np.arange(9))
    np.testing.assert_array_equal(t.vectors[[0, 3, 8]], out[0])
    t = from_keras_embedding(tmp_path / "k", layer, keys=np.arange(9) * 1000)
    assert t.keys.tolist() == [i * 1000 for i in range(9)]
    with pytest.raises(TypeError, match=r"Keras Embedding layer .* got Dense"):
        from_keras_embedding(tmp_path / "d", keras.layers.Dense(3))


def test_write_rejects_non_bool_overwrite(tmp_path):
    with pytest.raises(TypeError, match=r"overwrite must be a bool, got int 1"):
        write_table(tmp_path / "t", [1], np.zeros((1, 1), np.float32), overwrite=1)
    assert not (tmp_path / "t").exists()


def test_module_does_not_import_tensorflow():
    """hps_core never imports TensorFlow/Keras, not even lazily: the Keras converter is duck-typed."""
    import ast

    import hps_core.tables as tables

    tree = ast.parse(open(tables.__file__).read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "numpy" in imported  # the walk does see imports
    assert not imported & {"tensorflow", "keras", "tf_keras"}, imported
