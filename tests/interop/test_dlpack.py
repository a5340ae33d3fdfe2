"""interop.dlpack: zero-copy torch <-> TF conversion (checked by pointer), alignment repair, refused dtypes."""

import numpy as np
import pytest
import tensorflow as tf
import torch

from interop import dlpack

DTYPES = [
    (torch.int32, tf.int32),
    (torch.int64, tf.int64),
    (torch.float32, tf.float32),
    (torch.bfloat16, tf.bfloat16),
    (torch.float64, tf.float64),
    (torch.bool, tf.bool),
]


def _tf_ptr(t: tf.Tensor) -> int:
    # The address TF's buffer starts at, read through TF's own DLPack export (independent of our module).
    return torch.utils.dlpack.from_dlpack(tf.experimental.dlpack.to_dlpack(t)).data_ptr()


@pytest.mark.parametrize("torch_dtype,tf_dtype", DTYPES)
def test_torch_to_tf_shares_the_buffer(torch_dtype, tf_dtype):
    x = (torch.arange(24) % 7).to(torch_dtype).reshape(2, 3, 4)
    t = dlpack.torch_to_tf(x)
    assert t.dtype == tf_dtype and t.shape == (2, 3, 4)
    assert _tf_ptr(t) == x.data_ptr()
    np.testing.assert_array_equal(t.numpy().astype(np.float64) if tf_dtype == tf.bfloat16 else t.numpy(),
                                  x.float().numpy().astype(np.float64) if tf_dtype == tf.bfloat16 else x.numpy())
    # Same memory: a write on the torch side is visible through TF.
    x.view(-1)[0] = 1
    assert bool(tf.reshape(t, [-1])[0] == tf.cast(1, tf_dtype))


@pytest.mark.parametrize("torch_dtype,tf_dtype", DTYPES)
def test_tf_to_torch_shares_the_buffer(torch_dtype, tf_dtype):
    t = tf.cast(tf.reshape(tf.range(12) % 5, [3, 4]), tf_dtype)
    x = dlpack.tf_to_torch(t)
    assert x.dtype == torch_dtype and tuple(x.shape) == (3, 4)
    assert x.data_ptr() == _tf_ptr(t)
    assert torch.equal(x.to(torch.int64), torch.tensor(t.numpy().astype(np.int64)))


def test_round_trip_keeps_pointer_and_values():
    x = torch.randn(1024, 26)
    back = dlpack.tf_to_torch(dlpack.torch_to_tf(x))
    assert back.data_ptr() == x.data_ptr()
    assert torch.equal(back, x)


def test_misaligned_slice_is_copied_to_an_aligned_buffer_and_tf_survives():
    base = torch.arange(100, dtype=torch.float32)
    view = base[1:]  # 4 bytes past a 64-byte boundary: TF would abort the process on it
    assert not dlpack.is_aligned(view)
    t = dlpack.torch_to_tf(view)
    x = dlpack.tf_to_torch(t)
    assert x.data_ptr() % dlpack.ALIGNMENT == 0 and x.data_ptr() != view.data_ptr()
    # A real TF op on it runs (this is where a misaligned buffer aborts).
    assert float(tf.reduce_sum(t)) == float(view.sum())


def test_non_contiguous_is_made_contiguous():
    x = torch.arange(12, dtype=torch.int64).reshape(3, 4).t()
    t = dlpack.torch_to_tf(x)
    np.testing.assert_array_equal(t.numpy(), x.numpy())


def test_aligned_returns_the_same_tensor_when_nothing_is_needed():
    x = torch.empty(1000)
    assert dlpack.aligned(x) is x


def test_empty_and_scalar_tensors():
    e = dlpack.torch_to_tf(torch.empty(0, 16))
    assert e.shape == (0, 16) and e.dtype == tf.float32
    s = dlpack.torch_to_tf(torch.tensor(3, dtype=torch.int64))
    assert s.shape == () and int(s) == 3
    assert dlpack.tf_to_torch(tf.constant(5, tf.int32)).item() == 5


def test_string_tensor_is_refused_not_a_crash():
    with pytest.raises(TypeError, match="string"):
        dlpack.tf_to_torch(tf.constant(["a", "b"]))


def test_symbolic_tensor_is_refused():
    seen = []

    @tf.function
    def f(t):
        try:
            dlpack.tf_to_torch(t)
        except TypeError as exc:
            seen.append(str(exc))
        return t

    f(tf.constant([1]))
    assert seen and "eager" in seen[0]


def test_wrong_input_types():
    with pytest.raises(TypeError, match="torch.Tensor"):
        dlpack.torch_to_tf(np.zeros(3))
    with pytest.raises(TypeError, match="tf.Tensor"):
        dlpack.tf_to_torch(torch.zeros(3))


def test_requires_grad_is_detached():
    x = torch.ones(4, requires_grad=True)
    t = dlpack.torch_to_tf(x)
    assert _tf_ptr(t) == x.data_ptr()


def test_variable_is_read():
    v = tf.Variable([1.0, 2.0])
    assert dlpack.tf_to_torch(v).tolist() == [1.0, 2.0]


def test_release_and_capsule_round_trip():
    x = torch.arange(8, dtype=torch.float32)
    ptr = dlpack.release_to_pointer(x)
    y = torch.from_dlpack(dlpack.capsule_from_pointer(ptr))
    assert y.data_ptr() == x.data_ptr() and torch.equal(x, y)
    with pytest.raises(ValueError, match="null"):
        dlpack.capsule_from_pointer(0)
