"""interop.arrays: lookups for NumPy, TensorFlow, torch, DLPack capsules (CPU, in CI) and CuPy / JAX (where they are
installed: CuPy on the GPU machine): exact rows, the caller's type back, no copy of keys or rows (the pointers the
engine saw are the caller's), strided keys copied once with a warning, clear errors."""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import torch

from hps_core.engine import HierarchicalParameterServer
from hps_core.tables import write_table
from interop import arrays

DIM = 8
HAVE_CUPY = importlib.util.find_spec("cupy") is not None
HAVE_JAX = importlib.util.find_spec("jax") is not None
pytestmark = pytest.mark.filterwarnings("ignore:no CUDA device:RuntimeWarning")


@pytest.fixture
def served(tmp_path):
    rng = np.random.default_rng(5)
    keys = np.arange(1000, dtype=np.int64) * 3 + 1
    vectors = rng.standard_normal((keys.size, DIM)).astype(np.float32)
    write_table(tmp_path / "t", keys, vectors)
    cfg = {"key_dtype": "int64",
           "models": {"m": {"tables": [{"name": "t", "path": str(tmp_path / "t"), "dim": DIM, "max_keys_per_sample": 64,
                                        "default_value": 0.25}],
                            "max_batch_size": 64, "deployed_device_list": [0],
                            "cache": {"ratio": 0.5, "hit_rate_threshold": 1.1}}},
           "tiers": {"host_memory": {"enabled": True, "num_partitions": 2}}}
    table = {int(k): v for k, v in zip(keys, vectors)}

    def want(q):
        q = np.asarray(q)
        return np.stack([table.get(int(k), np.full(DIM, 0.25, np.float32)) for k in q.reshape(-1)]).reshape(
            *q.shape, DIM)

    with HierarchicalParameterServer(cfg, progress=False) as hps:
        yield hps, keys, want


@pytest.fixture
def seen(served, monkeypatch):
    """The engine's own lookup, recording the data pointers of the keys it got and the rows it returned."""
    hps = served[0]
    real = hps.lookup
    record: dict = {}

    def recording(model, table, keys, dtype=None):
        record["keys_ptr"] = keys.data_ptr()
        out = real(model, table, keys, dtype=dtype)
        record["rows_ptr"] = out.data_ptr()
        return out

    monkeypatch.setattr(hps, "lookup", recording)
    return record


def query(keys, shape=(4, 5), absent=3):
    rng = np.random.default_rng(9)
    q = rng.choice(keys, int(np.prod(shape)))
    q[:absent] = 10**9 + np.arange(absent)  # keys no tier holds
    return q.reshape(shape)


@pytest.mark.parametrize("key_dtype", [np.int64, np.int32])
def test_numpy_in_numpy_out_without_copies(served, seen, key_dtype):
    hps, keys, want = served
    q = query(keys).astype(key_dtype)
    out = arrays.lookup("m", "t", q, server=hps)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == q.shape + (DIM,)
    np.testing.assert_array_equal(out, want(q))
    assert seen["keys_ptr"] == q.ctypes.data and seen["rows_ptr"] == out.ctypes.data


def test_read_only_keys_are_used_in_place(served, seen):
    hps, keys, want = served
    q = query(keys)
    q.flags.writeable = False
    out = arrays.lookup("m", 0, q, server=hps)
    np.testing.assert_array_equal(out, want(q))
    assert seen["keys_ptr"] == q.ctypes.data


def test_strided_keys_are_copied_once_with_a_warning(served, seen):
    hps, keys, want = served
    q = query(keys, shape=(40,))[::2]
    with pytest.warns(RuntimeWarning, match="not contiguous"):
        out = arrays.lookup("m", "t", q, server=hps)
    np.testing.assert_array_equal(out, want(q))
    assert seen["keys_ptr"] != q.ctypes.data


def test_torch_and_capsule_callers_get_torch(served, seen):
    hps, keys, want = served
    q = torch.from_numpy(query(keys))
    out = arrays.lookup("m", "t", q, server=hps)
    assert isinstance(out, torch.Tensor) and torch.equal(out, torch.from_numpy(want(q.numpy())))
    assert seen["keys_ptr"] == q.data_ptr() and seen["rows_ptr"] == out.data_ptr()
    capsule = torch.utils.dlpack.to_dlpack(q)
    out = arrays.lookup("m", "t", capsule, server=hps)
    assert isinstance(out, torch.Tensor) and torch.equal(out, torch.from_numpy(want(q.numpy())))
    assert seen["keys_ptr"] == q.data_ptr()


def test_tensorflow_in_tensorflow_out(served):
    tf = pytest.importorskip("tensorflow")
    hps, keys, want = served
    q = query(keys)
    out = arrays.lookup("m", "t", tf.constant(q), server=hps)
    assert isinstance(out, tf.Tensor) and out.dtype == tf.float32
    np.testing.assert_array_equal(out.numpy(), want(q))


def test_low_precision_rows(served):
    hps, keys, want = served
    q = query(keys)
    out = arrays.lookup("m", "t", q, server=hps, dtype=torch.float16)
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, want(q).astype(np.float16))
    with pytest.raises(TypeError, match="NumPy has no bfloat16"):
        arrays.lookup("m", "t", q, server=hps, dtype=torch.bfloat16)
    out = arrays.lookup("m", "t", torch.from_numpy(q), server=hps, dtype=torch.bfloat16)  # torch holds it
    assert out.dtype == torch.bfloat16


def test_bad_input_raises(served):
    hps, keys, _ = served
    with pytest.raises(TypeError, match="keys must be an array with __dlpack__"):
        arrays.lookup("m", "t", [1, 2, 3], server=hps)
    with pytest.raises(TypeError, match="int32 or int64"):
        arrays.lookup("m", "t", np.array([1.0, 2.0]), server=hps)
    with pytest.raises(KeyError, match="no table 'nope'"):
        arrays.lookup("m", "nope", np.array([1, 2]), server=hps)


@pytest.mark.parametrize("mode", ["sum", "mean", "sqrtn"])
def test_bags_with_offsets_and_weights(served, mode):
    hps, keys, want = served
    flat = query(keys, shape=(12,))
    offsets = np.array([0, 5, 5, 9], dtype=np.int64)  # an empty bag too
    w = np.random.default_rng(2).random(12).astype(np.float32)
    out = arrays.bag_lookup("m", "t", flat, offsets=offsets, weights=w, mode=mode, server=hps)
    assert isinstance(out, np.ndarray) and out.shape == (4, DIM)
    rows = want(flat).astype(np.float64)
    bounds = list(offsets) + [flat.size]
    for b in range(4):
        s, e = bounds[b], bounds[b + 1]
        total = (rows[s:e] * w[s:e, None]).sum(0)
        if mode == "mean" and e > s:
            total /= w[s:e].sum()
        if mode == "sqrtn" and e > s:
            total /= np.sqrt((w[s:e] ** 2).sum())
        np.testing.assert_allclose(out[b], total, rtol=1e-5, atol=1e-6)
    two_d = arrays.bag_lookup("m", "t", flat.reshape(3, 4), mode="sum", server=hps)
    np.testing.assert_allclose(two_d, rows.reshape(3, 4, DIM).sum(1), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not HAVE_JAX, reason="jax is not installed")
def test_jax_in_jax_out_without_copies(served, seen):
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)  # int64 keys stay int64 (JAX's default would make them int32)
    hps, keys, want = served
    q = jnp.asarray(query(keys))
    out = arrays.lookup("m", "t", q, server=hps)
    assert type(out).__module__.split(".")[0] in ("jax", "jaxlib")
    np.testing.assert_array_equal(np.asarray(out), want(np.asarray(q)))
    assert seen["keys_ptr"] == q.unsafe_buffer_pointer() and seen["rows_ptr"] == out.unsafe_buffer_pointer()
    # A full jax.Array (the adapter may wrap the buffer through JAX's C++ entry rather than from_dlpack): it lives
    # on JAX's CPU device, jit-compiled code takes it, and each output dtype comes back as itself, still no copy.
    assert isinstance(out, jax.Array) and out.devices() == {jax.devices("cpu")[0]}
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: x * 2)(out)), 2 * want(np.asarray(q)))
    for dtype, jdtype in ((torch.bfloat16, jnp.bfloat16), (torch.float16, jnp.float16)):
        low = arrays.lookup("m", "t", q, server=hps, dtype=dtype)
        assert low.dtype == jdtype and seen["rows_ptr"] == low.unsafe_buffer_pointer()
        want_low = torch.from_numpy(want(np.asarray(q))).to(dtype).float().numpy()
        np.testing.assert_array_equal(np.asarray(low.astype(jnp.float32)), want_low)


@pytest.mark.cuda
@pytest.mark.skipif(not (HAVE_CUPY and torch.cuda.is_available()), reason="needs CuPy and a GPU")
def test_cupy_in_cupy_out_on_the_callers_stream(served, seen):
    import cupy

    hps, keys, want = served
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        q = cupy.asarray(query(keys))
        out = arrays.lookup("m", "t", q, server=hps)
        assert isinstance(out, cupy.ndarray) and out.dtype == cupy.float32
        assert seen["keys_ptr"] == q.data.ptr and seen["rows_ptr"] == out.data.ptr
        got = cupy.asnumpy(out, stream=stream)
        stream.synchronize()
    np.testing.assert_array_equal(got, want(cupy.asnumpy(q)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # contiguous device keys: no copy, no warning
        bags = arrays.bag_lookup("m", "t", cupy.asarray(query(keys)), mode="sum", server=hps)
    assert isinstance(bags, cupy.ndarray)


def test_importing_the_adapter_imports_no_framework():
    """Generic code must not pay for (or need) TensorFlow, CuPy or JAX: checked in a fresh interpreter."""
    import subprocess
    import sys

    code = "import sys, interop.arrays; print(sorted(m for m in ('tensorflow', 'cupy', 'jax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.skipif(not HAVE_JAX, reason="jax is not installed")
def test_the_arrays_example_runs(tmp_path):
    """examples/arrays_models.py as a user runs it: the JAX model's scores equal the table files' (the CuPy pipeline
    joins in on a GPU machine)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "examples" / "arrays_models.py"), "--workdir", str(tmp_path),
                           "--batches", "5"], capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = [float(e) for e in re.findall(r"max \|error\| vs the table files ([0-9.e+-]+)", proc.stdout)]
    assert errors and max(errors) < 1e-5, proc.stdout
