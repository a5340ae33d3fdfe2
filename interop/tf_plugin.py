"""HPS-compatible TensorFlow plugin: `Init`, `LookupLayer`, `SparseLookupLayer` (Keras 3) over our engine.

Drop-in for HugeCTR's `hierarchical_parameter_server` package:

    import interop.tf_plugin as hps                      # was: import hierarchical_parameter_server as hps
    hps.Init(global_batch_size=1024, ps_config_file="hps.json")
    emb = hps.LookupLayer("foo", 0, 16, tf.float32)(ids)            # == tf.nn.embedding_lookup(table, ids)
    emb = hps.SparseLookupLayer("bar", 1, 32, tf.float32)(sp_ids, None, combiner="mean")

How a lookup runs. Every call, eager or in a graph, goes through one TF custom op, `HpsLookup`
(interop/tf_op/hps_lookup_op.cc, built on first import against the installed TF). Its kernel hands the ids to the
callback `interop.tf_op.serve` registers (this module attaches it at import), as a DLPack tensor over TF's own
buffer; the callback views it with `torch.from_dlpack` (no copy), asks the engine
(`hps_core.engine.default_server()`), and hands the float32 result back as a DLPack tensor that becomes the op's
output without a copy. A SavedModel therefore holds only that op and its attributes (model_name, table_id,
emb_vec_size, ps_config_file, global_batch_size) and runs in any process that loads the op library: one that never
imported this module, or runs no Python at all (Triton's TensorFlow backend, TF Serving, a C++ loader), gets the
callback from an interpreter the library starts itself (see hps_lookup_op.cc), and the server from the config path
stored in the graph (HPS's lazy initialisation).

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

import logging
import os
import sys
from typing import Any

import keras
import tensorflow as tf

from hps_core import engine as hps_engine
from interop.tf_op import build as _op_build
from interop.tf_op import serve as _serve

log = logging.getLogger(__name__)

__version__ = "1.0.0"  # the HPS plugin version whose API this module reproduces

__all__ = ["Init", "LookupLayer", "SparseLookupLayer", "lookup", "shutdown", "op_library_path", "__version__"]

_COMBINERS = ("mean", "sqrtn", "sum")

# ---------------------------------------------------------------------------------------------- the op library

_LIBRARY_PATH = _op_build.library_path()
_ops = tf.load_op_library(str(_LIBRARY_PATH))
_serve.attach(_LIBRARY_PATH)  # the lookup callback, registered with the library TF just loaded

tf.no_gradient("HpsLookup")  # integer ids in, no trainable state: gradients stop here (and nothing else breaks)


def op_library_path() -> str:
    """Path of the loaded `HpsLookup` op library (built against this TF on first import)."""
    return str(_LIBRARY_PATH)


# ---------------------------------------------------------------------------------------------- initialisation

def _replicas() -> int:
    """Replicas Init serves, found as HPS finds them: a tf.distribute strategy's replicas (MirroredStrategy /
    MultiWorkerMirroredStrategy; anything else is refused with HPS's message); else, when `horovod.tensorflow` is
    imported, Horovod's process count (each process one replica); else 1."""
    if not tf.distribute.has_strategy():
        hvd = sys.modules.get("horovod.tensorflow")
        if hvd is None:
            return 1
        try:
            return int(hvd.size())
        except ValueError as exc:  # Horovod's "not initialized"
            raise RuntimeError(f"hps.Init under Horovod needs hvd.init() first: {exc}") from exc
    strategy = tf.distribute.get_strategy()
    if not isinstance(strategy, (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)):
        raise RuntimeError(f"This strategy type is not supported yet. ({type(strategy).__name__}; HPS Init supports "
                           "MirroredStrategy and MultiWorkerMirroredStrategy)")
    return int(strategy.num_replicas_in_sync)


def Init(*, global_batch_size: int, ps_config_file: Any, **unused: Any) -> Any:
    """Start the hierarchical parameter server of this process (HPS `hps.Init`); later calls are no-ops.

    Under a `tf.distribute.MirroredStrategy` (or MultiWorkerMirroredStrategy) scope, as HPS: one server for the
    process serves every replica, `global_batch_size / num_replicas_in_sync` is checked against each model's
    `max_batch_size`, and the status is one "OK" per replica (a tuple, HPS's `.values`). Inside a replica function
    (`strategy.run`) it returns that replica's "OK". Another strategy type raises HPS's RuntimeError. Outside a
    strategy with `horovod.tensorflow` imported (HPS's Horovod mode: one process per replica), the batch is checked
    per Horovod process (`global_batch_size / hvd.size()`) and the status is this process's "OK".

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
    server = _serve.init(ps_config_file, global_batch_size, explicit=True, replicas=replicas)
    _serve.check_global_batch_size(server, global_batch_size, replicas)
    if replicas == 1 or not tf.distribute.has_strategy() or not tf.distribute.in_cross_replica_context():
        return tf.constant("OK")  # one replica, one Horovod process, or inside a replica function
    strategy = tf.distribute.get_strategy()
    status = strategy.run(lambda: tf.constant("OK"))
    return tuple(strategy.experimental_local_results(status))


def shutdown() -> None:
    """Close this process's server so that a later `Init` (or implicit init) starts a new one (tests, redeploys).

    Not part of HPS's API (its server lives as long as the process).
    """
    _serve.shutdown()


_TF_KEY_DTYPES = {tf.int32: "int32", tf.int64: "int64"}


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
        server = _serve.server(ps_config_file, global_batch_size)
    else:
        try:
            server = hps_engine.default_server()
        except RuntimeError:
            server = None  # building a graph before Init (e.g. to save it): the kernel checks at run time
    if server is not None:
        _serve.validate(server, model_name, int(table_id), int(emb_vec_size), _TF_KEY_DTYPES[ids.dtype],
                  ids.shape.num_elements())
    if not eager:
        return _ops.hps_lookup(ids, model_name=model_name, table_id=table_id, emb_vec_size=emb_vec_size,
                               ps_config_file=ps_config_file, global_batch_size=global_batch_size)
    _serve.clear_last_error()
    try:
        return _ops.hps_lookup(ids, model_name=model_name, table_id=table_id, emb_vec_size=emb_vec_size,
                               ps_config_file=ps_config_file, global_batch_size=global_batch_size)
    except tf.errors.OpError:
        exc = _serve.last_error()
        _serve.clear_last_error()
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

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # An eager call on concrete tensors skips Keras's __call__ machinery (input conversion, autocast and name
        # scopes, masks, call-context bookkeeping: about as long as the lookup itself at 26,624 keys on a CPU),
        # none of which does anything for a layer without variables, masks or inputs to cast. The first call, symbolic
        # calls (functional models, tf.function, SavedModel tracing) and calls with Keras arguments take the full path.
        if (self.built and args and "training" not in kwargs and "mask" not in kwargs
                and isinstance(args[0], (tf.Tensor, tf.SparseTensor)) and tf.executing_eagerly()):
            return self.call(*args, **kwargs)
        return super().__call__(*args, **kwargs)

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
