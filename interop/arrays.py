"""Lookups for any array library through DLPack: keys from NumPy, CuPy, JAX, torch or TensorFlow (or a bare DLPack
capsule) reach the engine without a copy, and the rows come back as the caller's own array type, again without a
copy.

    >>> import numpy as np
    >>> from interop import arrays
    >>> rows = arrays.lookup("my_model", "user_table", np.array([[3, 14], [15, 92]]))   # numpy (2, 2, dim)
    >>> bags = arrays.bag_lookup("my_model", 0, np.array([1, 2, 3, 4]), offsets=np.array([0, 3]), mode="sum")

How: the keys become a torch tensor with `torch.from_dlpack` (the producer's `__dlpack__`, with the stream handshake
on CUDA), the engine looks them up, and the caller's library takes the result with its own `from_dlpack` (which asks
torch to order the hand-over on the caller's stream). A CuPy caller's lookup runs on CuPy's current stream itself.
TensorFlow tensors go through interop.dlpack (its alignment rules keep TF from aborting).

What is copied, once: keys that are not contiguous (a strided view) - with a RuntimeWarning; nothing else. Read-only
key buffers are used in place (a lookup never writes its keys). What is refused (TypeError): objects that are no
array, key dtypes other than int32/int64, and a `dtype` the caller's library cannot hold (bfloat16 for NumPy).

Neither this module nor hps_core imports TensorFlow, CuPy or JAX: each is imported only to hand back its own type,
when its array came in.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Optional

import torch

from hps_core.engine import HierarchicalParameterServer, default_server
from hps_core.nn import pooled_lookup

__all__ = ["lookup", "bag_lookup", "framework_of"]

_FRAMEWORKS = ("numpy", "cupy", "jax", "tensorflow", "torch")


_KNOWN: dict[type, str] = {}  # array type -> its library, learned on first sight (the per-call check is one dict get)


def framework_of(x: Any) -> str:
    """Which library an array comes from: numpy, cupy, jax, tensorflow, torch, or "capsule" (a bare DLPack
    capsule, answered with a torch tensor). TypeError for anything else."""
    known = _KNOWN.get(type(x))
    if known is not None:
        return known
    name = _framework_of(x)
    _KNOWN[type(x)] = name
    return name


def _framework_of(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return "torch"
    root = type(x).__module__.split(".")[0]
    if root == "jaxlib":
        root = "jax"
    if root in _FRAMEWORKS and (hasattr(x, "__dlpack__") or root == "tensorflow"):
        return root
    if type(x).__name__ == "PyCapsule":
        return "capsule"
    raise TypeError(f"keys must be an array with __dlpack__ (NumPy, CuPy, JAX, torch, TensorFlow) or a DLPack "
                    f"capsule, found {type(x).__module__}.{type(x).__name__}")


def _to_torch(x: Any, framework: str, what: str) -> torch.Tensor:
    if framework == "torch":
        t = x
    elif framework == "tensorflow":
        from interop import dlpack

        t = dlpack.tf_to_torch(x)
    elif framework == "numpy" and x.flags.writeable:  # the same zero-copy view as from_dlpack, ~1 us cheaper
        t = torch.from_numpy(x)
    else:  # numpy, cupy, jax (their __dlpack__ takes torch's stream for the handshake), or a capsule
        t = torch.from_dlpack(x)
    if not t.is_contiguous():
        warnings.warn(f"{what} are not contiguous (strides {tuple(t.stride())}): copied once for the lookup",
                      RuntimeWarning, stacklevel=3)
        t = t.contiguous()
    return t


def _from_torch(rows: torch.Tensor, framework: str) -> Any:
    """`rows` as the caller's array type, sharing the buffer."""
    if framework in ("torch", "capsule"):
        return rows
    if framework == "numpy":
        if rows.dtype == torch.bfloat16:
            raise TypeError("dtype bfloat16 cannot be returned as a NumPy array (NumPy has no bfloat16): ask for "
                            "float32 or float16")
        return rows.numpy()  # shares the buffer (np.from_dlpack does too, through ~10 us of torch's __dlpack__)
    if framework == "cupy":
        import cupy

        return cupy.from_dlpack(rows)
    if framework == "jax":
        return _jax_array(rows)
    from interop import dlpack

    return dlpack.torch_to_tf(rows)


# JAX's own import, jax.dlpack.from_dlpack, spends ~70 us in Python (backend and device lookups, a dtype
# canonicalisation through jnp.asarray) around a ~4 us C++ call that wraps the buffer: on the CPU that is most of a
# small lookup. For CPU rows - no stream to hand over, and every lookup dtype (float32, bfloat16, float16) one JAX
# keeps as it is - the adapter makes the same C++ call with the arguments from_dlpack would pass; GPU rows, or a JAX
# whose internals differ, take from_dlpack.
@functools.cache
def _jax_cpu_import() -> Any:
    """rows -> jax.Array through JAX's C++ DLPack entry, or None when this JAX has no such entry."""
    try:
        from jax._src import xla_bridge
        from jax._src.lib import _jax, jaxlib_extension_version

        device = xla_bridge.get_backend("cpu").device_from_local_hardware_id(0)
        to_buffer = _jax.dlpack_managed_tensor_to_buffer
        if jaxlib_extension_version >= 467:  # from_dlpack passes the DLPack device type since this version
            return lambda rows: to_buffer(rows.__dlpack__(), device, None, None, 1)  # 1: kDLCPU
        return lambda rows: to_buffer(rows.__dlpack__(), device, None, None)
    except Exception:  # noqa: BLE001 - any other JAX: the public path
        return None


def _jax_array(rows: torch.Tensor) -> Any:
    wrap = _jax_cpu_import() if rows.device.type == "cpu" else None
    if wrap is not None:
        return wrap(rows)
    import jax.dlpack

    return jax.dlpack.from_dlpack(rows)


def _on_callers_stream(framework: str, keys: torch.Tensor) -> bool:
    return framework == "cupy" and keys.is_cuda


def _callers_stream(keys: torch.Tensor):
    """CuPy's current CUDA stream as torch's current one: the lookup runs on the caller's stream."""
    import cupy

    return torch.cuda.stream(torch.cuda.ExternalStream(cupy.cuda.get_current_stream().ptr, device=keys.device))


def lookup(model: str, table: int | str, keys: Any, server: Optional[HierarchicalParameterServer] = None,
           dtype: Optional[torch.dtype] = None) -> Any:
    """Embeddings of `keys` (any array library), returned as the keys' library's array.

    Args:
        model, table: the model and its table (id or name).
        keys: int32/int64 array of any shape on the CPU or a deployed GPU: NumPy, CuPy, JAX, torch, TF, or a DLPack
            capsule (answered with a torch tensor).
        server: the server; default the process's (`hps_core.init`).
        dtype: torch.float32 (None), torch.bfloat16 or torch.float16 - as `HierarchicalParameterServer.lookup`.
    Returns:
        `keys.shape + (dim,)` rows on the keys' device, the caller's array type, no copy.
    """
    framework = framework_of(keys)
    server = server if server is not None else default_server()
    k = _to_torch(keys, framework, "keys")
    if _on_callers_stream(framework, k):
        with _callers_stream(k):
            return _from_torch(server.lookup(model, table, k, dtype=dtype), framework)
    return _from_torch(server.lookup(model, table, k, dtype=dtype), framework)


def bag_lookup(model: str, table: int | str, keys: Any, offsets: Any = None, weights: Any = None,
               mode: str = "mean", server: Optional[HierarchicalParameterServer] = None) -> Any:
    """Pooled lookup (sum / mean / sqrtn of each bag's rows), the caller's array type in and out - the semantics
    of `hps_core.BagLookupLayer` (nn.EmbeddingBag): keys 2-D (B, L) without offsets, or 1-D with offsets (B,);
    weights (float32, keys' shape) or None. Returns float32 (B, dim)."""
    framework = framework_of(keys)
    server = server if server is not None else default_server()
    k = _to_torch(keys, framework, "keys")
    off = _to_torch(offsets, framework_of(offsets), "offsets") if offsets is not None else None
    w = _to_torch(weights, framework_of(weights), "weights") if weights is not None else None
    def pooled() -> Any:
        return _from_torch(pooled_lookup(lambda flat: server.lookup(model, table, flat), k, off, w, mode), framework)

    if _on_callers_stream(framework, k):
        with _callers_stream(k):
            return pooled()
    return pooled()
