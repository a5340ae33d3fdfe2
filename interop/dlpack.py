"""Zero-copy tensor exchange between torch and TensorFlow through DLPack.

Both directions share the buffer: no byte is copied when the source is contiguous and 64-byte aligned, which is
what every fresh torch or TF allocation is. Two situations would kill the process inside TensorFlow rather than
raise, so they are handled here before TF ever sees the tensor:

- a torch tensor whose data pointer is not 64-byte aligned (a slice, `x[1:]`) makes the first TF op on it abort
  (`Check failed: IsAligned()`): such tensors, and non-contiguous ones (an error in TF), are copied once into a
  fresh aligned buffer (`aligned`), the only case where a conversion copies;
- a TF string (or resource / variant) tensor handed to torch aborts too: refused with a TypeError.

dtypes are kept (int32, int64, float32, bfloat16, float16, float64, int8, uint8, bool, ...), devices too (CPU, and
CUDA where TF was built with a GPU).

The second half of the module is the raw capsule plumbing used by the TF custom op's callback
(`interop.tf_plugin`): a `DLManagedTensor*` handed over by C++ becomes a "dltensor" PyCapsule for
`torch.from_dlpack`, and a torch result is released into a bare `DLManagedTensor*` that C++ then owns.

Example:
    >>> t = tf.constant([[1, 2], [3, 4]], dtype=tf.int64)
    >>> x = tf_to_torch(t)                 # torch.int64 (2, 2), same buffer as t
    >>> back = torch_to_tf(x * 2)          # tf.int64 (2, 2), same buffer as the torch result
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import torch
import torch.utils.dlpack

log = logging.getLogger(__name__)

__all__ = [
    "ALIGNMENT",
    "is_aligned",
    "aligned",
    "tf_to_torch",
    "torch_to_tf",
    "capsule_from_pointer",
    "release_to_pointer",
]

# TF is built with EIGEN_MAX_ALIGN_BYTES=64 (see tf.sysconfig.get_compile_flags()): every buffer it reads with
# Eigen must start on a 64-byte boundary.
ALIGNMENT = 64


def _tf() -> Any:
    # TensorFlow's Python package is imported on first use only: the capsule helpers below also serve the op's
    # lookups in a process that runs no TF Python (interop.tf_op.serve, embedded by the op library).
    import tensorflow as tf

    return tf

_CAPSULE_NAME = b"dltensor"
_USED_CAPSULE_NAME = b"used_dltensor"

_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_PyCapsule_GetPointer = ctypes.pythonapi.PyCapsule_GetPointer
_PyCapsule_GetPointer.restype = ctypes.c_void_p
_PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_PyCapsule_SetName = ctypes.pythonapi.PyCapsule_SetName
_PyCapsule_SetName.restype = ctypes.c_int
_PyCapsule_SetName.argtypes = [ctypes.py_object, ctypes.c_char_p]


def is_aligned(x: torch.Tensor, alignment: int = ALIGNMENT) -> bool:
    """True when `x`'s first element sits on an `alignment`-byte boundary (empty tensors always are)."""
    return x.numel() == 0 or x.data_ptr() % alignment == 0


def aligned(x: torch.Tensor, alignment: int = ALIGNMENT) -> torch.Tensor:
    """`x` itself when it is contiguous and aligned; otherwise one copy into a fresh, aligned, contiguous buffer.

    torch's CPU allocator returns 64-byte aligned blocks and the CUDA caching allocator 512-byte aligned ones, so a
    fresh `torch.empty` is enough; the assertion guards against an allocator that would not be.

    Args:
        x: a tensor of any dtype, shape and device.
    Returns:
        a tensor equal to `x`, same dtype/shape/device, contiguous, data pointer % alignment == 0.
    """
    if x.is_contiguous() and is_aligned(x, alignment):
        return x
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out.copy_(x)
    if not is_aligned(out, alignment):  # pragma: no cover - would mean torch's allocator changed
        raise RuntimeError(f"torch allocated a buffer at {out.data_ptr():#x}, not {alignment}-byte aligned")
    return out


def tf_to_torch(t: Any) -> torch.Tensor:
    """A TF tensor as a torch tensor over the same buffer (no copy).

    Args:
        t: an eager `tf.Tensor` (or `tf.Variable`, read once) of a numeric or bool dtype, any shape, on CPU or GPU.
    Returns:
        torch tensor of the same dtype, shape and device sharing `t`'s memory. Writing to it writes to `t`, which
        TF assumes immutable: treat it as read-only unless you own `t`.
    Raises:
        TypeError: `t` is not a TF tensor, is symbolic (inside `tf.function` there is no buffer to share), or has
            a string/resource/variant dtype.
    """
    tf = _tf()
    if isinstance(t, tf.Variable):
        t = t.read_value()
    if not isinstance(t, tf.Tensor):
        raise TypeError(f"tf_to_torch expects a tf.Tensor, found {type(t).__name__}")
    if t.dtype in (tf.string, tf.resource, tf.variant):  # no DLPack form, or one that would crash torch
        raise TypeError(
            f"tf_to_torch: a tf.Tensor of dtype {t.dtype.name} has no DLPack form (only numeric and bool tensors "
            "can be shared with torch)"
        )
    if tf.is_symbolic_tensor(t):
        raise TypeError(
            f"tf_to_torch needs an eager tensor, found the symbolic {t.name!r} (inside tf.function there is no "
            "buffer to share; the HPS layers use their HpsLookup op there)"
        )
    return torch.from_dlpack(t)


def torch_to_tf(x: torch.Tensor) -> tf.Tensor:
    """A torch tensor as an eager TF tensor over the same buffer.

    Zero-copy when `x` is contiguous and 64-byte aligned (every fresh tensor is); otherwise `x` is first copied
    once into an aligned buffer, because TF aborts the process on misaligned data (see module docstring).

    Args:
        x: torch tensor of any shape, a dtype TF knows (numeric or bool), on CPU (or CUDA with a GPU build of TF).
           Tensors requiring grad are detached (TF does not see torch's autograd graph).
    Returns:
        `tf.Tensor` with the same dtype, shape and values, sharing memory with `x` (or with its aligned copy).
    Raises:
        TypeError: `x` is not a torch tensor.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"torch_to_tf expects a torch.Tensor, found {type(x).__name__}")
    x = aligned(x.detach())
    # NOTE: tf.experimental.dlpack.from_dlpack takes a capsule; passing the torch tensor itself is a TypeError.
    return _tf().experimental.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(x))


# ---------------------------------------------------------------------------------------------- raw capsules


def capsule_from_pointer(dl_managed_tensor: int) -> Any:
    """Wrap a `DLManagedTensor*` (an int address) in a "dltensor" PyCapsule for `torch.from_dlpack`.

    Ownership: the consumer (torch.from_dlpack) takes it and calls the tensor's deleter when done. The capsule
    has no destructor, so a capsule that is never consumed leaks its tensor: consume it at once.
    """
    if not dl_managed_tensor:
        raise ValueError("capsule_from_pointer: null DLManagedTensor pointer")
    return _PyCapsule_New(dl_managed_tensor, _CAPSULE_NAME, None)


def release_to_pointer(x: torch.Tensor) -> int:
    """Export `x` through DLPack and hand the bare `DLManagedTensor*` (an int address) to the caller.

    The capsule is marked consumed, so Python will not free the tensor: whoever receives the pointer owns it and
    must call its `deleter` exactly once (the TF op's output buffer does, when TF frees the tensor). `x` is
    exported as is: make it contiguous and aligned (`aligned`) first if the consumer needs that.
    """
    capsule = torch.utils.dlpack.to_dlpack(x)
    ptr = _PyCapsule_GetPointer(capsule, _CAPSULE_NAME)
    if not ptr:  # pragma: no cover - GetPointer raises for a wrong name
        raise RuntimeError("torch.utils.dlpack.to_dlpack returned an empty capsule")
    if _PyCapsule_SetName(capsule, _USED_CAPSULE_NAME) != 0:  # pragma: no cover
        raise RuntimeError("could not mark the DLPack capsule as consumed")
    return int(ptr)
