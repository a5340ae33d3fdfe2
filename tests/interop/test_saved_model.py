"""Saved whole, deployed elsewhere: models holding HPS layers saved as `.keras`, with `tf.saved_model.save` and with
`model.export`, then loaded and run in fresh Python processes (tests/interop/saved_model_child.py):

- explicit: the child calls `hps.Init` with the config moved to another path (the path recorded in the layers no
  longer exists), as a deployment would;
- implicit: the child never calls Init; the first HpsLookup kernel starts the server from the recorded
  ps_config_file (HPS's lazy initialisation inside a SavedModel).

Embeddings must come back bit-identical, logits within float rounding of graph-level rewrites (MSE <= 1e-12).
"""

from __future__ import annotations

import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

import interop.tf_plugin as hps

from hps_tf_testing import (MAX_BATCH_SIZE, MAX_NNZ, REPO, assert_bit_identical, random_sparse, run_python,
                            write_deployment)

CHILD = REPO / "tests" / "interop" / "saved_model_child.py"


class Serving(tf.Module):
    """What tf.saved_model.save stores: the model behind a signature of plain tensors (sparse ids as components).

    NOTE: it tracks the model's layers (they own the variables), not the functional model itself: saving a Keras 3
    functional model with a sparse Input makes Keras trace its default signature with a *dense* spec for that
    input, which fails in any sparse layer (tf.nn.embedding_lookup_sparse too) -- a Keras limitation.
    """

    def __init__(self, model: keras.Model) -> None:
        super().__init__()
        self.layers = list(model.layers)
        self._forward = model.__call__  # a bound method: not tracked

    @tf.function(input_signature=[
        tf.TensorSpec([None, MAX_NNZ], tf.int32, name="ids"),
        tf.TensorSpec([None, 2], tf.int64, name="sp_indices"),
        tf.TensorSpec([None], tf.int32, name="sp_values"),
        tf.TensorSpec([2], tf.int64, name="sp_shape"),
    ])
    def serve(self, ids, sp_indices, sp_values, sp_shape):
        logits, dense_emb, sparse_emb = self._forward([ids, tf.SparseTensor(sp_indices, sp_values, sp_shape)])
        return {"logits": logits, "dense_emb": dense_emb, "sparse_emb": sparse_emb}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    hps.shutdown()
    root = tmp_path_factory.mktemp("saved")
    dep = write_deployment(root / "tables", key_dtype="int32", fmt="json", seed=5)
    config = str(dep.config_path)
    foo, bar1 = dep.tables[0], dep.tables[2]
    kw = dict(ps_config_file=config, global_batch_size=MAX_BATCH_SIZE)

    ids_in = keras.Input(shape=(MAX_NNZ,), dtype="int32", name="ids")
    sp_in = keras.Input(shape=(MAX_NNZ,), sparse=True, dtype="int32", name="sp_ids")
    dense_emb = hps.LookupLayer(foo.model, foo.table_id, foo.dim, tf.float32, name="lookup", **kw)(
        ids_in, max_norm=0.5)
    sparse_emb = hps.SparseLookupLayer(bar1.model, bar1.table_id, bar1.dim, tf.float32, name="sparse_lookup",
                                       **kw)(sp_in, None, combiner="mean")
    h = keras.layers.Concatenate()([keras.layers.Flatten()(dense_emb), sparse_emb])
    h = keras.layers.Dense(32, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(0))(h)
    logits = keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(1))(h)
    model = keras.Model([ids_in, sp_in], [logits, dense_emb, sparse_emb])
    # Keras' exporter has no sparse input specs: model.export, and tf.saved_model.save of the model itself (HPS's
    # own tests' way), are exercised on a dense-input model.
    dense_model = keras.Model(ids_in, [keras.layers.Dense(4)(keras.layers.Flatten()(dense_emb)), dense_emb])

    rng = np.random.default_rng(0)
    ids = tf.constant(rng.integers(0, foo.rows + 50, (200, MAX_NNZ)), tf.int32)  # some unknown keys too
    sp_ids = random_sparse(rng, 200, MAX_NNZ, bar1.rows, tf.int32)
    np.savez(root / "inputs.npz", ids=ids.numpy(), sp_indices=sp_ids.indices.numpy(), sp_values=sp_ids.values.numpy(),
             sp_shape=sp_ids.dense_shape.numpy())

    # Saving happens before this process has a server: nothing may need one.
    model.save(root / "full.keras")
    tf.saved_model.save(Serving(model), str(root / "full_savedmodel"))
    tf.saved_model.save(dense_model, str(root / "dense_savedmodel"))
    dense_model.export(str(root / "dense_export"), format="tf_saved_model", verbose=False)

    # In-process reference, served from the same files.
    hps.Init(global_batch_size=MAX_BATCH_SIZE, ps_config_file=config)
    reference = {
        "logits": model([ids, sp_ids])[0].numpy(),
        "dense_emb": tf.nn.embedding_lookup(
            np.vstack([foo.vectors, np.full((50, foo.dim), foo.default_value, np.float32)]), ids,
            max_norm=0.5).numpy(),
        "sparse_emb": tf.nn.embedding_lookup_sparse(bar1.vectors, sp_ids, None, combiner="mean").numpy(),
        "export_0": dense_model(ids)[0].numpy(),
    }
    hps.shutdown()
    return root, dep, reference


def _check(out, reference):
    for name in ("logits", "dense_emb", "sparse_emb"):
        saved = out[f"savedmodel_{name}"]
        if name == "logits":
            assert np.mean((saved - reference[name]) ** 2) <= 1e-12
        else:
            assert_bit_identical(saved, reference[name])
    assert np.mean((out["keras_0"] - reference["logits"]) ** 2) <= 1e-12
    assert np.mean((out["keras_predict_0"] - reference["logits"]) ** 2) <= 1e-12
    for i, name in ((1, "dense_emb"), (2, "sparse_emb")):
        assert_bit_identical(out[f"keras_{i}"], reference[name])
        assert_bit_identical(out[f"keras_predict_{i}"], reference[name])
    for form in ("export", "dense_savedmodel"):
        assert np.mean((out[f"{form}_0"] - reference["export_0"]) ** 2) <= 1e-12
        assert_bit_identical(out[f"{form}_1"], reference["dense_emb"])


def test_saved_forms_run_with_implicit_init_in_a_fresh_process(saved):
    root, _, reference = saved
    run_python([str(CHILD), str(root), "implicit"])
    _check(np.load(root / "outputs_implicit.npz"), reference)


def test_saved_forms_run_after_explicit_init_elsewhere(saved):
    root, dep, reference = saved
    # Deployed elsewhere: the config the layers recorded is gone; Init names the deployment's own copy.
    deployed = root / "deploy" / "hps.json"
    deployed.parent.mkdir()
    shutil.move(dep.config_path, deployed)
    try:
        run_python([str(CHILD), str(root), "explicit", str(deployed)])
    finally:
        shutil.move(deployed, dep.config_path)
    _check(np.load(root / "outputs_explicit.npz"), reference)
