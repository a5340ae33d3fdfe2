"""HPS-compatible TensorFlow plugin: `Init`, `LookupLayer`, `SparseLookupLayer` (Keras 3) over our engine.

Drop-in for HugeCTR's `hierarchical_parameter_server` package:

    import interop.tf_plugin as hps                      # was: import hierarchical_parameter_server as hps
    hps.Init(global_batch_size=1024, ps_config_file="hps.json")
    emb = hps.LookupLayer("foo", 0, 16, tf.float32)(ids)            # == tf.nn.embedding_lookup(table, ids)
    emb = hps.SparseLookupLayer("bar", 1, 32, tf.float32)(sp_ids, None, combiner="mean")

How a lookup runs. Every call, eager or in a graph, goes through one TF custom op, `HpsLookup`
(interop/tf_op/hps_lookup_op.cc, built on first import against the installed TF). Its kernel hands the ids to the
callback this module registers at import, as a DLPack tensor over TF's own buffer; the callback views it with
`torch.from_dlpack` (no copy), asks the engine (`hps_core.engine.default_server()`), and hands the float32 result
back as a DLPack tensor that becomes the op's output without a copy. A SavedModel therefore holds only that op and
its attributes (model_name, table_id, emb_vec_size, ps_config_file, global_batch_size) and runs in any process that
imports this module.

Bit-identical to TF. The engine returns exact float32 copies of the stored rows; `max_norm` clipping and the sparse
combiners are then applied with the very TF ops `tf.nn.embedding_lookup(_sparse)` applies to its gathered rows
(clip_by_norm over the trailing axis; unique + sparse_segment_{sum,mean,sqrt_n}, or the weighted segment_sum path),
so results equal TF's bit for bit on the same table.

Differences from HPS, on purpose: every failed check raises (HPS logged and returned garbage): TypeError for the
key dtype, ValueError for emb_vec_size / batch size, KeyError for an unknown model or table id, RuntimeError when
nothing is initialised. In eager mode the Python exception itself is raised; inside a graph it surfaces as the TF
error of the matching code (InvalidArgumentError, NotFoundError, FailedPreconditionError). The layers run on the
CPU (their op has a CPU kernel; under a GPU build TF places it on the host).
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import threading
from typing import Any

import keras
import tensorflow as tf
import torch

from hps_core import engine as hps_engine
from interop import dlpack
from interop.tf_op import build as _op_build

log = logging.getLogger(__name__)

__version__ = "1.0.0"  # the HPS plugin version whose API this module reproduces

__all__ = ["Init", "LookupLayer", "SparseLookupLayer", "lookup", "shutdown", "op_library_path", "__version__"]

_ABI_VERSION = 1  # must equal kAbiVersion in hps_lookup_op.cc

# absl::StatusCode numbers the kernel turns into TF errors.
_OK, _INVALID_ARGUMENT, _NOT_FOUND, _FAILED_PRECONDITION, _INTERNAL = 0, 3, 5, 9, 13

_COMBINERS = ("mean", "sqrtn", "sum")

# ---------------------------------------------------------------------------------------------- the op library

_LIBRARY_PATH = _op_build.library_path()
_ops = tf.load_op_library(str(_LIBRARY_PATH))
# Same path -> same dlopen handle as TF's: the callback registered here is the one the kernel sees.
_clib = ctypes.CDLL(str(_LIBRARY_PATH))
_clib.hps_tf_op_abi_version.restype = ctypes.c_int
if _clib.hps_tf_op_abi_version() != _ABI_VERSION:  # pragma: no cover - a stale library with another ABI
    raise ImportError(
        f"{_LIBRARY_PATH} has callback ABI {_clib.hps_tf_op_abi_version()}, this module needs {_ABI_VERSION}: "
        "rebuild it with `python -m interop.tf_op.build --force`"
    )
_clib.hps_tf_delete_dlpack.argtypes = [ctypes.c_void_p]
_clib.hps_tf_delete_dlpack.restype = None

_CALLBACK_TYPE = ctypes.CFUNCTYPE(
    ctypes.c_int,  # status code
    ctypes.c_char_p,  # model_name
    ctypes.c_int64,  # table_id
    ctypes.c_int64,  # emb_vec_size
    ctypes.c_char_p,  # ps_config_file
    ctypes.c_int64,  # global_batch_size
    ctypes.c_void_p,  # DLManagedTensor* keys (ours to free)
    ctypes.POINTER(ctypes.c_void_p),  # DLManagedTensor** result (the kernel's to free)
    ctypes.c_void_p,  # char* err
    ctypes.c_int64,  # err capacity
)
_clib.hps_tf_register_lookup_callback.argtypes = [_CALLBACK_TYPE]
_clib.hps_tf_register_lookup_callback.restype = None

tf.no_gradient("HpsLookup")  # integer ids in, no trainable state: gradients stop here (and nothing else breaks)


def op_library_path() -> str:
    """Path of the loaded `HpsLookup` op library (built against this TF on first import)."""
    return str(_LIBRARY_PATH)


# ---------------------------------------------------------------------------------------------- initialisation

_init_lock = threading.Lock()
_init_source: Any = None  # what the server was started from, for the "already initialised" message


def _check_global_batch_size(server: hps_engine.HierarchicalParameterServer, global_batch_size: Any,
                             num_replicas: int = 1) -> int:
    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int) or global_batch_size < 1:
        raise ValueError(f"global_batch_size must be an int >= 1, found {global_batch_size!r}")
    # HPS: global_batch_size / num_replicas <= max_batch_size (per replica) of every model.
    per_replica = -(-global_batch_size // num_replicas)
    for name, model in server.config.models.items():
        if per_replica > model.max_batch_size:
            across = f" / {num_replicas} replicas = {per_replica}" if num_replicas > 1 else ""
            raise ValueError(
                f"global_batch_size = {global_batch_size}{across} exceeds models.{name}.max_batch_size = "
                f"{model.max_batch_size} (HPS: max_batch_size, per replica)"
            )
    return global_batch_size


def _replicas() -> int:
    """Replicas of the tf.distribute strategy Init runs under (HPS: MirroredStrategy / MultiWorkerMirroredStrategy,
    anything else is refused with HPS's message); 1 without a strategy."""
    if not tf.distribute.has_strategy():
        return 1
    strategy = tf.distribute.get_strategy()
    if not isinstance(strategy, (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)):
        raise RuntimeError(f"This strategy type is not supported yet. ({type(strategy).__name__}; HPS Init supports "
                           "MirroredStrategy and MultiWorkerMirroredStrategy)")
    return int(strategy.num_replicas_in_sync)


def _init(ps_config_file: Any, global_batch_size: Any, explicit: bool = False,
          replicas: int = 1) -> hps_engine.HierarchicalParameterServer:
    global _init_source
    with _init_lock:
        try:
            server = hps_engine.default_server()
        except RuntimeError:
            server = None
        if server is None:
            empty_path = isinstance(ps_config_file, (str, os.PathLike)) and not os.fspath(ps_config_file)
            if ps_config_file is None or empty_path:
                raise ValueError("ps_config_file must name an HPS JSON or YAML config (or be a config object), found "
                                 f"{ps_config_file!r}")
            if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int) or global_batch_size < 1:
                raise ValueError(f"global_batch_size must be an int >= 1, found {global_batch_size!r}")
            server = hps_engine.init(ps_config_file)
            try:
                _check_global_batch_size(server, global_batch_size, replicas)
            except ValueError:
                hps_engine.shutdown()  # a rejected Init leaves nothing behind
                raise
            _init_source = ps_config_file
            log.info("hierarchical parameter server initialised from %s", ps_config_file)
        elif ps_config_file is not None and ps_config_file != _init_source and _init_source is not None:
            # HPS semantics: once per process, later calls are no-ops (an implicit init from a SavedModel's
            # recorded config path must not fail where the deployment initialised explicitly).
            log.log(logging.WARNING if explicit else logging.DEBUG,
                    "HPS is already initialised from %s (once per process); ignoring %s", _init_source, ps_config_file)
        return server


def Init(*, global_batch_size: int, ps_config_file: Any, **unused: Any) -> Any:
    """Start the hierarchical parameter server of this process (HPS `hps.Init`); later calls are no-ops.

    Under a `tf.distribute.MirroredStrategy` (or MultiWorkerMirroredStrategy) scope, as HPS: one server for the
    process serves every replica, `global_batch_size / num_replicas_in_sync` is checked against each model's
    `max_batch_size`, and the status is one "OK" per replica (a tuple, HPS's `.values`). Inside a replica function
    (`strategy.run`) it returns that replica's "OK". Another strategy type raises HPS's RuntimeError.

    Args:
        global_batch_size: the largest batch (samples) one lookup call will carry across the replicas; divided by
            the replicas, it must not exceed any model's `max_batch_size` (HPS: the per-replica batch).
        ps_config_file: an HPS JSON file (`.json`), one of our YAML configs (`.yaml`), or a config dict /
            DeploymentConfig.
    Returns:
        the string tensor "OK" (as HPS), also when the server was already running; a tuple of them, one per
        replica, under a strategy's scope.
    Raises:
        ValueError / ConfigError: bad global_batch_size or config; FileNotFoundError: missing config or tables.
        TypeError: an argument HPS does not know. RuntimeError: an unsupported tf.distribute strategy.

    Example:
        >>> hps.Init(global_batch_size=1024, ps_config_file="hps.json")
        <tf.Tensor: shape=(), dtype=string, numpy=b'OK'>
    """
    if unused:
        raise TypeError(f"Init() got unexpected keyword arguments {sorted(unused)}; it takes global_batch_size "
                        "and ps_config_file")
    replicas = _replicas()
    server = _init(ps_config_file, global_batch_size, explicit=True, replicas=replicas)
    _check_global_batch_size(server, global_batch_size, replicas)
    if replicas == 1 or not tf.distribute.in_cross_replica_context():
        return tf.constant("OK")
    strategy = tf.distribute.get_strategy()
    status = strategy.run(lambda: tf.constant("OK"))
    return tuple(strategy.experimental_local_results(status))


def shutdown() -> None:
    """Close this process's server so that a later `Init` (or implicit init) starts a new one (tests, redeploys).

    Not part of HPS's API (its server lives as long as the process).
    """
    global _init_source
    with _init_lock:
        hps_engine.shutdown()
        _init_source = None


def _server(ps_config_file: str, global_batch_size: int) -> hps_engine.HierarchicalParameterServer:
    """The running server; started from the layer's config when there is none yet (HPS implicit init)."""
    try:
        return hps_engine.default_server()
    except RuntimeError:
        if not ps_config_file:
            raise RuntimeError(
                "the hierarchical parameter server is not initialised: call "
                "hps.Init(global_batch_size=..., ps_config_file=...) first, or construct the layer with "
                "ps_config_file and global_batch_size (implicit init)"
            ) from None
        return _init(ps_config_file, global_batch_size)


# ---------------------------------------------------------------------------------------------- validation

_TF_KEY_DTYPES = {tf.int32: "int32", tf.int64: "int64"}
_TORCH_KEY_DTYPES = {torch.int32: "int32", torch.int64: "int64"}


def _validate(server: hps_engine.HierarchicalParameterServer, model_name: str, table_id: int, emb_vec_size: int,
              key_dtype: str, num_keys: int | None) -> None:
    """HPS's forward_check, raising: model, table id, dim, key dtype, batch size (when known)."""
    rt = server.table(model_name, table_id)  # KeyError naming the models / table ids that exist
    if emb_vec_size != rt.dim:
        raise ValueError(
            f"emb_vec_size = {emb_vec_size} but table {table_id} ({rt.name!r}) of model {model_name!r} has "
            f"dimension {rt.dim}"
        )
    expected = server.config.key_dtype
    if key_dtype != expected:
        raise TypeError(
            f"ids are {key_dtype} but the deployment's keys are {expected} (supportlonglong = "
            f"{'true' if expected == 'int64' else 'false'}): cast the ids to {expected}"
        )
    if num_keys is not None and num_keys > rt.max_keys_per_call:
        raise ValueError(
            f"{num_keys} ids in one lookup of {model_name}/{rt.name} exceed max_batch_size × "
            f"maxnum_catfeature_query_per_table_per_sample = {rt.max_keys_per_call}"
        )


# ---------------------------------------------------------------------------------------------- the callback

_errors = threading.local()  # the Python exception behind the last failed kernel call of this thread


def _error_code(exc: BaseException) -> int:
    if isinstance(exc, KeyError):
        return _NOT_FOUND
    if isinstance(exc, (TypeError, ValueError)):
        return _INVALID_ARGUMENT
    if isinstance(exc, RuntimeError):
        return _FAILED_PRECONDITION
    return _INTERNAL


def _exception_message(exc: BaseException) -> str:
    # KeyError's str() quotes its argument; show the text itself.
    text = exc.args[0] if isinstance(exc, KeyError) and len(exc.args) == 1 else str(exc)
    return f"{type(exc).__name__}: {text}"


def _lookup_callback(model_name: bytes, table_id: int, emb_vec_size: int, ps_config_file: bytes,
                     global_batch_size: int, keys_ptr: int, result: Any, err: int, err_capacity: int) -> int:
    """Called by the HpsLookup kernel (any TF thread; ctypes holds the GIL). Never raises: returns a status."""
    try:
        keys = torch.from_dlpack(dlpack.capsule_from_pointer(keys_ptr))  # TF's buffer, not copied
    except BaseException as exc:  # noqa: BLE001 - must not unwind into C++
        _clib.hps_tf_delete_dlpack(keys_ptr)
        return _fail(exc, err, err_capacity)
    try:
        model = model_name.decode()
        server = _server(ps_config_file.decode(), global_batch_size)
        _validate(server, model, table_id, emb_vec_size, _TORCH_KEY_DTYPES[keys.dtype], keys.numel())
        out = server.lookup(model, table_id, keys)
        # The kernel adopts this buffer as its output: it must be contiguous and 64-byte aligned for TF.
        result[0] = dlpack.release_to_pointer(dlpack.aligned(out))
        return _OK
    except BaseException as exc:  # noqa: BLE001 - must not unwind into C++
        return _fail(exc, err, err_capacity)


def _fail(exc: BaseException, err: int, err_capacity: int) -> int:
    _errors.last = exc
    message = _exception_message(exc).encode("utf-8", "replace")[: max(err_capacity - 1, 0)]
    ctypes.memmove(err, message + b"\0", len(message) + 1)
    if _error_code(exc) == _INTERNAL:
        log.error("HPS lookup failed", exc_info=exc)
    return _error_code(exc)


_callback = _CALLBACK_TYPE(_lookup_callback)  # module global: must outlive every kernel call
_clib.hps_tf_register_lookup_callback(_callback)


@atexit.register
def _unregister() -> None:
    # A kernel running during interpreter shutdown gets a clean FailedPrecondition instead of calling into a
    # finalising interpreter.
    _clib.hps_tf_register_lookup_callback(_CALLBACK_TYPE())


# ---------------------------------------------------------------------------------------------- raw lookup


def lookup(ids: Any, model_name: str, table_id: int, emb_vec_size: int, ps_config_file: str = "",
           global_batch_size: int = 1) -> tf.Tensor:
    """Raw embedding lookup (HPS `hps_lib.lookup`): no clipping.

    Args:
        ids: int32/int64 tensor of any shape (the dtype the deployment's key type asks for).
        model_name, table_id, emb_vec_size: the table and its width.
        ps_config_file, global_batch_size: for implicit init when the server is not started yet.
    Returns:
        float32 tensor `ids.shape + [emb_vec_size]`.

    Example:
        >>> hps.lookup(tf.constant([[1, 2]], tf.int32), "foo", 0, 16).shape
        TensorShape([1, 2, 16])
    """
    ids = tf.convert_to_tensor(ids)
    if ids.dtype not in _TF_KEY_DTYPES:
        raise TypeError(f"ids must be int32 or int64, found {ids.dtype.name}")
    eager = tf.executing_eagerly()
    server = None
    if eager:
        server = _server(ps_config_file, global_batch_size)
    else:
        try:
            server = hps_engine.default_server()
        except RuntimeError:
            server = None  # building a graph before Init (e.g. to save it): the kernel checks at run time
    if server is not None:
        _validate(server, model_name, int(table_id), int(emb_vec_size), _TF_KEY_DTYPES[ids.dtype],
                  ids.shape.num_elements())
    if not eager:
        return _ops.hps_lookup(ids, model_name=model_name, table_id=table_id, emb_vec_size=emb_vec_size,
                               ps_config_file=ps_config_file, global_batch_size=global_batch_size)
    _errors.last = None
    try:
        return _ops.hps_lookup(ids, model_name=model_name, table_id=table_id, emb_vec_size=emb_vec_size,
                               ps_config_file=ps_config_file, global_batch_size=global_batch_size)
    except tf.errors.OpError:
        exc, _errors.last = getattr(_errors, "last", None), None
        if exc is not None:  # eager: raise the engine's own exception, not its TF translation
            raise exc from None
        raise


def _clip(emb: tf.Tensor, ids: tf.Tensor, max_norm: Any) -> tf.Tensor:
    """clip_by_norm over the embedding axis, exactly as tf.nn.embedding_lookup applies `max_norm`."""
    if max_norm is None:
        return emb
    rank = ids.shape.rank
    if rank:  # static rank >= 1: the trailing axis, as a list (TF does the same)
        axes: Any = [rank]
    else:  # scalar ids or unknown rank: TF computes the axes as a tensor
        axes = tf.range(tf.rank(ids), tf.rank(emb))
    return tf.clip_by_norm(emb, max_norm, axes=axes)


# ---------------------------------------------------------------------------------------------- Keras layers


def _float32_only(emb_vec_dtype: Any) -> str:
    try:
        dtype = tf.as_dtype(getattr(emb_vec_dtype, "name", emb_vec_dtype))
    except TypeError as exc:
        raise TypeError(f"emb_vec_dtype must be tf.float32, found {emb_vec_dtype!r}") from exc
    if dtype != tf.float32:
        raise TypeError(f"emb_vec_dtype must be tf.float32 (HPS serves float32 embeddings), found {dtype.name}")
    return "float32"


class _HpsLayerBase(keras.layers.Layer):
    """Constructor, config and checks shared by both layers (HPS's signature)."""

    def __init__(self, model_name: str, table_id: int, emb_vec_size: int, emb_vec_dtype: Any = tf.float32,
                 ps_config_file: str = "", global_batch_size: int = 1, **kwargs: Any) -> None:
        kwargs.setdefault("trainable", False)  # no variables: nothing to train (HPS layers are not trainable)
        super().__init__(**kwargs)
        if not isinstance(model_name, str) or not model_name:
            raise ValueError(f"model_name must be a non-empty str, found {model_name!r}")
        if isinstance(table_id, bool) or not isinstance(table_id, int) or table_id < 0:
            raise ValueError(f"table_id must be an int >= 0, found {table_id!r}")
        if isinstance(emb_vec_size, bool) or not isinstance(emb_vec_size, int) or emb_vec_size < 1:
            raise ValueError(f"emb_vec_size must be an int >= 1, found {emb_vec_size!r}")
        if not isinstance(ps_config_file, (str, os.PathLike)):
            raise TypeError(f"ps_config_file must be a path (str), found {type(ps_config_file).__name__}")
        if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int) or global_batch_size < 1:
            raise ValueError(f"global_batch_size must be an int >= 1, found {global_batch_size!r}")
        self.model_name = model_name
        self.table_id = table_id
        self.emb_vec_size = emb_vec_size
        self.emb_vec_dtype = tf.float32
        self._emb_vec_dtype_name = _float32_only(emb_vec_dtype)
        self.ps_config_file = os.fspath(ps_config_file)
        self.global_batch_size = global_batch_size
        # The HpsLookup op has no XLA kernel: keep Keras from jit-compiling models that hold this layer.
        self.supports_jit = False

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            model_name=self.model_name,
            table_id=self.table_id,
            emb_vec_size=self.emb_vec_size,
            emb_vec_dtype=self._emb_vec_dtype_name,
            ps_config_file=self.ps_config_file,
            global_batch_size=self.global_batch_size,
        )
        return config

    def _lookup(self, ids: tf.Tensor) -> tf.Tensor:
        return lookup(ids, self.model_name, self.table_id, self.emb_vec_size, self.ps_config_file,
                      self.global_batch_size)


@keras.saving.register_keras_serializable(package="hps")
class LookupLayer(_HpsLayerBase):
    """Dense embedding lookup served by HPS: the analogue of `tf.nn.embedding_lookup` (HPS `hps.LookupLayer`).

    Args:
        model_name: model in the deployment config. table_id: index of the table in that model.
        emb_vec_size: the table's dimension (checked). emb_vec_dtype: tf.float32 (the only one).
        ps_config_file, global_batch_size: set both for implicit init on first use (no `hps.Init` needed).
        **kwargs: Keras Layer arguments (`name`, ...).

    `call(ids, max_norm=None)`: ids int32/int64 of any rank -> float32 `ids.shape + [emb_vec_size]`, equal bit for
    bit to `tf.nn.embedding_lookup(table, ids, max_norm)`; `max_norm` a float, tensor or tf.Variable.

    Example:
        >>> layer = hps.LookupLayer("foo", 0, 16, tf.float32, name="emb")
        >>> layer(tf.constant([[1, 2, 3]], tf.int32)).shape
        TensorShape([1, 3, 16])
    """

    def call(self, ids: Any, max_norm: Any = None) -> tf.Tensor:
        ids = tf.convert_to_tensor(ids)
        emb = self._lookup(ids)
        return tf.identity(_clip(emb, ids, max_norm))

    def compute_output_shape(self, ids_shape: Any) -> tuple:
        return tuple(ids_shape) + (self.emb_vec_size,)

    def compute_output_spec(self, ids: Any, max_norm: Any = None) -> keras.KerasTensor:
        # Declared rather than traced: building a functional model must not need a running server.
        return keras.KerasTensor(tuple(ids.shape) + (self.emb_vec_size,), dtype="float32")


@keras.saving.register_keras_serializable(package="hps")
class SparseLookupLayer(_HpsLayerBase):
    """Sparse lookup + combine served by HPS: the analogue of `tf.nn.embedding_lookup_sparse`.

    Same constructor as `LookupLayer`.

    `call(sp_ids, sp_weights=None, name=None, combiner=None, max_norm=None)`:
        sp_ids: rank-2 `tf.SparseTensor` (N x M) of int32/int64 ids, canonical row-major order, >= 1 id per row.
        sp_weights: None (weights 1) or a float SparseTensor with the indices of `sp_ids`.
        combiner: "sum", "mean" (default) or "sqrtn". max_norm: clip each embedding before combining.
    Returns float32 `[N', emb_vec_size]` where N' = last non-empty row + 1 (as TF), equal bit for bit to
    `tf.nn.embedding_lookup_sparse(table, sp_ids, sp_weights, combiner=..., max_norm=...)`.

    Example:
        >>> sp = tf.sparse.from_dense(tf.constant([[1, 2], [3, 0]], tf.int32))
        >>> hps.SparseLookupLayer("bar", 1, 32, tf.float32)(sp, None, combiner="sum").shape
        TensorShape([2, 32])
    """

    def call(self, sp_ids: Any, sp_weights: Any = None, name: str | None = None, combiner: str | None = None,
             max_norm: Any = None) -> tf.Tensor:
        if combiner is None:
            combiner = "mean"
        if combiner not in _COMBINERS:
            raise ValueError(f"combiner must be one of {list(_COMBINERS)}, found {combiner!r}")
        if not isinstance(sp_ids, tf.SparseTensor):
            raise TypeError(f"sp_ids must be a tf.SparseTensor, found {type(sp_ids).__name__}")
        if sp_ids.shape.rank is not None and sp_ids.shape.rank != 2:
            raise ValueError(f"sp_ids must be a rank-2 SparseTensor (N x M), found rank {sp_ids.shape.rank}")
        weighted = sp_weights is not None
        if weighted:
            if not isinstance(sp_weights, tf.SparseTensor):
                raise TypeError(f"sp_weights must be None or a tf.SparseTensor, found {type(sp_weights).__name__}")
            for part in ("values", "indices", "dense_shape"):
                a, b = getattr(sp_ids, part).shape, getattr(sp_weights, part).shape
                if not a.is_compatible_with(b):
                    raise ValueError(f"sp_weights.{part} has shape {b}, incompatible with sp_ids.{part} {a}")
        with tf.name_scope(name or "embedding_lookup_sparse"):
            segment_ids = sp_ids.indices[:, 0]
            ids, idx = tf.unique(sp_ids.values)
            # The unique rows, clipped like tf.nn.embedding_lookup(params, ids, max_norm) clips them.
            emb = tf.identity(_clip(self._lookup(ids), ids, max_norm))
            if weighted:
                out = self._combine_weighted(emb, idx, segment_ids, sp_weights.values, combiner)
            else:
                out = self._combine(emb, idx, segment_ids, combiner)
        out.set_shape([None, self.emb_vec_size])
        return out

    @staticmethod
    def _combine(emb: tf.Tensor, idx: tf.Tensor, segment_ids: tf.Tensor, combiner: str) -> tf.Tensor:
        # TF sums params[ids] per segment; gathering our unique rows by `idx` adds the same floats in the same order.
        if segment_ids.dtype not in (tf.int32, tf.int64):
            segment_ids = tf.cast(segment_ids, tf.int32)
        if combiner == "sum":
            return tf.sparse.segment_sum(emb, idx, segment_ids)
        if combiner == "mean":
            return tf.sparse.segment_mean(emb, idx, segment_ids)
        return tf.sparse.segment_sqrt_n(emb, idx, segment_ids)

    @staticmethod
    def _combine_weighted(emb: tf.Tensor, idx: tf.Tensor, segment_ids: tf.Tensor, weights: tf.Tensor,
                          combiner: str) -> tf.Tensor:
        # The weighted path of tf.nn.embedding_lookup_sparse, op for op (float32 embeddings: no up-cast needed).
        segment_ids = tf.cast(segment_ids, tf.int32)
        emb = tf.gather(emb, idx)
        if weights.dtype != emb.dtype:
            weights = tf.cast(weights, emb.dtype)
        static_weights_shape = weights.shape
        bcast_shape = tf.concat([tf.shape(weights), tf.ones(tf.expand_dims(tf.rank(emb) - 1, 0), tf.int32)], 0)
        weights = tf.reshape(weights, bcast_shape)
        if emb.shape.rank is not None:
            weights.set_shape(static_weights_shape.concatenate([1] * (emb.shape.rank - 1)))
        emb = emb * weights
        if combiner == "sum":
            return tf.math.segment_sum(emb, segment_ids)
        summed = tf.math.segment_sum(emb, segment_ids)
        if combiner == "mean":
            return tf.math.divide_no_nan(summed, tf.math.segment_sum(weights, segment_ids))
        return tf.math.divide_no_nan(summed, tf.sqrt(tf.math.segment_sum(tf.pow(weights, 2), segment_ids)))

    def compute_output_shape(self, sp_ids_shape: Any, *args: Any, **kwargs: Any) -> tuple:
        return (tuple(sp_ids_shape)[0], self.emb_vec_size)

    def compute_output_spec(self, sp_ids: Any, *args: Any, **kwargs: Any) -> keras.KerasTensor:
        return keras.KerasTensor((tuple(sp_ids.shape)[0], self.emb_vec_size), dtype="float32")
