"""The HPS TensorFlow workflow end to end: train -> dissect -> build the inference model -> deploy elsewhere.

    python examples/tf_workflow.py [--workdir DIR] [--samples N] [--epochs E]

1. Train a small TF model with native embeddings: `tf.nn.embedding_lookup_sparse` (mean) over table 0 for a
   multi-hot field of up to 9 ids, and `keras.layers.Embedding` (`tf.nn.embedding_lookup`) over table 1 for two
   one-hot slots, followed by an MLP (the "dense part").
2. Dissect it: export each trained embedding table to an HPS table directory (`key` int64, `emb_vector` float32)
   and save the dense part on its own (`dense.keras`); write the HPS JSON deployment config.
3. Build the inference model: `hps.SparseLookupLayer` + `hps.LookupLayer` feeding the saved dense part, and save
   it whole, as a SavedModel (Keras 3 `ExportArchive`, a `serving_default` signature) and as `inference.keras`.
4. Deploy: a fresh Python process (`... deploy --workdir DIR`) imports the plugin, calls `hps.Init`, loads both
   saved forms and predicts the held-out samples.
5. Compare with the trained model: embeddings and predictions must agree (MSE <= 1e-6); exit status 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import interop.tf_plugin as hps
from hps_core.tables import from_keras_embedding, write_table

MODEL = "workflow"
VOCAB = (10000, 2000)  # rows of table 0 (multi-hot field) and table 1 (one-hot slots)
DIMS = (16, 32)
MAX_NNZ = 9  # ids per sample in the multi-hot field (HPS test: max_nnz_per_slot [4, 2, 3])
SLOTS = 2  # one-hot slots on table 1
BATCH = 1024  # HPS max_batch_size and the inference batch
TOLERANCE = 1e-6


# ---------------------------------------------------------------------------------------------- data


def make_data(n: int, seed: int) -> tuple[tf.SparseTensor, np.ndarray, np.ndarray]:
    """Synthetic click data: a multi-hot field (sparse ids), two one-hot slots, a label that depends on both."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, MAX_NNZ + 1, n)
    rows = np.repeat(np.arange(n), counts)
    cols = np.concatenate([np.arange(c) for c in counts])
    values = rng.zipf(1.3, rows.size) % VOCAB[0]  # long-tailed, like real categorical features
    sp_ids = tf.SparseTensor(np.stack([rows, cols], 1).astype(np.int64), values.astype(np.int64), [n, MAX_NNZ])
    ids = rng.integers(0, VOCAB[1], (n, SLOTS)).astype(np.int64)
    score = np.bincount(rows, weights=np.sin(values), minlength=n) / counts + np.cos(ids).sum(1)
    labels = (score > 0).astype(np.float32)[:, None]
    return sp_ids, ids, labels


def batches(sp_ids: tf.SparseTensor, ids: np.ndarray, size: int):
    n = ids.shape[0]
    for start in range(0, n, size):
        stop = min(start + size, n)
        yield tf.sparse.slice(sp_ids, [start, 0], [stop - start, MAX_NNZ]), ids[start:stop]


# ---------------------------------------------------------------------------------------------- 1. train


@keras.saving.register_keras_serializable(package="workflow")
class NativeSparseEmbedding(keras.layers.Layer):
    """A trainable table read with tf.nn.embedding_lookup_sparse (native TF, what the model is trained with)."""

    def __init__(self, vocab: int, dim: int, combiner: str = "mean", **kwargs):
        super().__init__(**kwargs)
        self.vocab, self.dim, self.combiner = vocab, dim, combiner

    def build(self, input_shape):
        self.table = self.add_weight(shape=(self.vocab, self.dim), initializer="uniform", name="table")

    def call(self, sp_ids):
        return tf.nn.embedding_lookup_sparse(self.table.value, sp_ids, None, combiner=self.combiner)

    def compute_output_spec(self, sp_ids):
        return keras.KerasTensor((sp_ids.shape[0], self.dim), dtype="float32")

    def get_config(self):
        return {**super().get_config(), "vocab": self.vocab, "dim": self.dim, "combiner": self.combiner}


def build_dense_part() -> keras.Model:
    """The MLP over [field embedding (16), flattened slot embeddings (2 x 32)] -> click logit."""
    field = keras.Input(shape=(DIMS[0],), name="field_emb")
    slots = keras.Input(shape=(SLOTS * DIMS[1],), name="slot_emb")
    h = keras.layers.Concatenate()([field, slots])
    h = keras.layers.Dense(64, activation="relu")(h)
    h = keras.layers.Dense(32, activation="relu")(h)
    return keras.Model([field, slots], keras.layers.Dense(1)(h), name="dense_part")


def train(samples: int, epochs: int) -> tuple[keras.Model, keras.Model]:
    keras.utils.set_random_seed(0)
    sp_in = keras.Input(shape=(MAX_NNZ,), sparse=True, dtype="int64", name="field_ids")
    ids_in = keras.Input(shape=(SLOTS,), dtype="int64", name="slot_ids")
    field = NativeSparseEmbedding(VOCAB[0], DIMS[0], name="field_embedding")(sp_in)
    slots = keras.layers.Embedding(VOCAB[1], DIMS[1], name="slot_embedding")(ids_in)
    dense = build_dense_part()
    logit = dense([field, keras.layers.Flatten()(slots)])
    model = keras.Model([sp_in, ids_in], logit)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=keras.losses.BinaryCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    sp_ids, ids, labels = make_data(samples, seed=1)
    data = tf.data.Dataset.from_tensor_slices(((sp_ids, ids), labels)).shuffle(samples, seed=0).batch(256)
    history = model.fit(data, epochs=epochs, shuffle=False, verbose=0)  # the dataset shuffles
    print(f"[train] {samples} samples, {epochs} epochs: loss {history.history['loss'][0]:.4f} -> "
          f"{history.history['loss'][-1]:.4f}, accuracy {history.history['accuracy'][-1]:.3f}")
    return model, dense


# ---------------------------------------------------------------------------------------------- 2. dissect


def dissect(model: keras.Model, dense: keras.Model, workdir: Path) -> Path:
    """Trained tables -> HPS table directories; dense part -> dense.keras; HPS JSON config -> returned path."""
    field_table = model.get_layer("field_embedding").table.numpy()
    paths = [workdir / "tables" / "field", workdir / "tables" / "slot"]
    write_table(paths[0], np.arange(VOCAB[0], dtype=np.int64), field_table, overwrite=True)
    from_keras_embedding(paths[1], model.get_layer("slot_embedding"), overwrite=True)
    dense.save(workdir / "dense.keras")
    config = {
        "supportlonglong": True,
        "models": [{
            "model": MODEL,
            "sparse_files": [str(p) for p in paths],
            "embedding_table_names": ["field", "slot"],
            "embedding_vecsize_per_table": list(DIMS),
            "maxnum_catfeature_query_per_table_per_sample": [MAX_NNZ, SLOTS],
            "default_value_for_each_table": [0.0, 0.0],
            "deployed_device_list": [0],
            "max_batch_size": BATCH,
            "hit_rate_threshold": 1.0,
            "gpucacheper": 1.0,
            "gpucache": True,
        }],
    }
    config_path = workdir / "hps.json"
    config_path.write_text(json.dumps(config, indent=2))
    print(f"[dissect] tables {[str(p) for p in paths]}, dense part {workdir / 'dense.keras'}, config {config_path}")
    return config_path


# ---------------------------------------------------------------------------------------------- 3. inference model


SERVING_SIGNATURE = [  # the sparse field as its components: a serving signature takes plain tensors
    tf.TensorSpec([None, 2], tf.int64, name="field_indices"),
    tf.TensorSpec([None], tf.int64, name="field_values"),
    tf.TensorSpec([2], tf.int64, name="field_shape"),
    tf.TensorSpec([None, SLOTS], tf.int64, name="slot_ids"),
]


def export_savedmodel(model: keras.Model, path: Path) -> None:
    """The inference model as a SavedModel with a `serving_default` signature, through Keras 3's ExportArchive.

    NOTE: ExportArchive, not `tf.saved_model.save` of a tf.Module holding the layers: the latter writes Keras 3
    variables that TensorFlow's C++ loader (TF Serving, Triton, the C API) does not restore ("Could not find variable
    dense/kernel"); and `model.export` traces a dense spec for the sparse Input, which no sparse embedding layer
    accepts.
    """
    def serve(field_indices, field_values, field_shape, slot_ids):
        logit, field, slots = model([tf.SparseTensor(field_indices, field_values, field_shape), slot_ids])
        return {"logit": logit, "field_emb": field, "slot_emb": slots}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(name="serving_default", fn=serve, input_signature=SERVING_SIGNATURE)
    archive.write_out(str(path), verbose=False)


def build_inference(workdir: Path) -> None:
    sp_in = keras.Input(shape=(MAX_NNZ,), sparse=True, dtype="int64", name="field_ids")
    ids_in = keras.Input(shape=(SLOTS,), dtype="int64", name="slot_ids")
    # The layers carry the config path, as in HPS's Triton notebooks: a process that never calls hps.Init (or runs
    # no Python: Triton's TensorFlow backend, TF Serving) starts the server from it on the first lookup.
    lazy = {"ps_config_file": str(workdir / "hps.json"), "global_batch_size": BATCH}
    field = hps.SparseLookupLayer(MODEL, 0, DIMS[0], tf.float32, name="hps_field", **lazy)(sp_in, None,
                                                                                           combiner="mean")
    slots = hps.LookupLayer(MODEL, 1, DIMS[1], tf.float32, name="hps_slots", **lazy)(ids_in)
    dense = keras.models.load_model(workdir / "dense.keras")
    logit = dense([field, keras.layers.Flatten()(slots)])
    inference = keras.Model([sp_in, ids_in], [logit, field, slots])
    export_savedmodel(inference, workdir / "inference_savedmodel")
    inference.save(workdir / "inference.keras")
    print(f"[build] inference model saved to {workdir / 'inference_savedmodel'} and {workdir / 'inference.keras'}")


# ---------------------------------------------------------------------------------------------- 4. deploy


def deploy(workdir: Path) -> None:
    """Runs in a fresh process: Init, load both saved forms, predict the test set, save the outputs."""
    hps.Init(global_batch_size=BATCH, ps_config_file=str(workdir / "hps.json"))
    test = np.load(workdir / "test.npz")
    sp_ids = tf.SparseTensor(test["indices"], test["values"], test["shape"])
    serve = tf.saved_model.load(str(workdir / "inference_savedmodel")).signatures["serving_default"]
    keras_model = keras.models.load_model(workdir / "inference.keras")
    outs: dict[str, list[np.ndarray]] = {}
    for sp, ids in batches(sp_ids, test["ids"], BATCH):
        r = serve(field_indices=sp.indices, field_values=sp.values, field_shape=sp.dense_shape, slot_ids=ids)
        for name in ("logit", "field_emb", "slot_emb"):
            outs.setdefault(f"savedmodel_{name}", []).append(r[name].numpy())
        for name, value in zip(("logit", "field_emb", "slot_emb"), keras_model([sp, tf.constant(ids)])):
            outs.setdefault(f"keras_{name}", []).append(value.numpy())
    np.savez(workdir / "deployed.npz", **{k: np.concatenate(v) for k, v in outs.items()})
    print(f"[deploy] fresh process: Init + load + predict {test['ids'].shape[0]} samples")


# ---------------------------------------------------------------------------------------------- 5. compare


def reference(model: keras.Model, dense: keras.Model, sp_ids: tf.SparseTensor, ids: np.ndarray) -> dict:
    """The trained model's own embeddings and logits on the test set."""
    field_layer, slot_layer = model.get_layer("field_embedding"), model.get_layer("slot_embedding")
    out: dict[str, list[np.ndarray]] = {}
    for sp, i in batches(sp_ids, ids, BATCH):
        field, slots = field_layer(sp), slot_layer(tf.constant(i))
        out.setdefault("logit", []).append(model([sp, tf.constant(i)]).numpy())
        out.setdefault("field_emb", []).append(field.numpy())
        out.setdefault("slot_emb", []).append(slots.numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", nargs="?", default="all", choices=["all", "deploy"])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--samples", type=int, default=16384)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="hps_tf_workflow_"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.step == "deploy":
        deploy(workdir)
        return 0

    model, dense = train(args.samples, args.epochs)
    dissect(model, dense, workdir)
    build_inference(workdir)
    sp_ids, ids, _ = make_data(3000, seed=2)
    np.savez(workdir / "test.npz", indices=sp_ids.indices.numpy(), values=sp_ids.values.numpy(),
             shape=sp_ids.dense_shape.numpy(), ids=ids)
    subprocess.run([sys.executable, __file__, "deploy", "--workdir", str(workdir)], check=True)

    expected = reference(model, dense, sp_ids, ids)
    deployed = np.load(workdir / "deployed.npz")
    ok = True
    for form in ("savedmodel", "keras"):
        for name in ("field_emb", "slot_emb", "logit"):
            mse = float(np.mean((deployed[f"{form}_{name}"] - expected[name]) ** 2))
            good = mse <= TOLERANCE
            ok &= good
            print(f"[compare] {form:10s} {name:9s} MSE {mse:.3e} {'OK' if good else 'FAIL'} (<= {TOLERANCE:g})")
    print("[workflow] " + ("PASSED" if ok else "FAILED") + f" (workdir {workdir})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
