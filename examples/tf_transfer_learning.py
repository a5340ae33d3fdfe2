"""Transfer learning on frozen HPS embeddings: train a new dense head with `Model.fit` over pre-trained tables.

    python examples/tf_transfer_learning.py [--workdir DIR] [--epochs E] [--samples N]

The pre-trained table (50,000 x 32) is keyed by arbitrary 64-bit ids (hashed item ids, not 0..N-1: native TF
would need a tf.lookup.StaticHashTable in front of its embedding matrix). It is served by HPS through
`hps.SparseLookupLayer` (mean over each sample's item history); only the new head trains. The task is built so
that it is learnable from the pre-trained vectors alone: a hidden linear probe of the mean history embedding.
Exit status 1 if the head does not learn (final accuracy < 0.85 or the loss did not drop by half).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import interop.tf_plugin as hps
from hps_core.tables import write_table

MODEL = "pretrained"
ROWS, DIM = 50_000, 32
MAX_HISTORY = 8
BATCH = 512


def pretrained_table(workdir: Path, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, Path]:
    """Write the 'pre-trained' table (arbitrary int64 keys) and its HPS JSON config."""
    keys = np.unique(rng.integers(1, 2**62, ROWS * 2, dtype=np.int64))[:ROWS]
    vectors = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    write_table(workdir / "items", keys, vectors, overwrite=True)
    config = {
        "supportlonglong": True,
        "models": [{
            "model": MODEL,
            "sparse_files": [str(workdir / "items")],
            "embedding_table_names": ["items"],
            "embedding_vecsize_per_table": [DIM],
            "maxnum_catfeature_query_per_table_per_sample": [MAX_HISTORY],
            "default_value_for_each_table": [0.0],
            "deployed_device_list": [0],
            "max_batch_size": BATCH,
            "hit_rate_threshold": 1.0,
            "gpucacheper": 1.0,
        }],
    }
    path = workdir / "hps.json"
    path.write_text(json.dumps(config, indent=2))
    return keys, vectors, path


def make_data(keys: np.ndarray, vectors: np.ndarray, n: int, rng: np.random.Generator):
    """Item histories (1..8 items each) and a label that is a linear probe of their mean pre-trained vector."""
    counts = rng.integers(1, MAX_HISTORY + 1, n)
    rows = np.repeat(np.arange(n), counts)
    cols = np.concatenate([np.arange(c) for c in counts])
    picks = rng.integers(0, ROWS, rows.size)
    sp_ids = tf.SparseTensor(np.stack([rows, cols], 1).astype(np.int64), keys[picks], [n, MAX_HISTORY])
    mean = np.zeros((n, DIM), np.float64)
    np.add.at(mean, rows, vectors[picks])
    mean /= counts[:, None]
    probe = np.random.default_rng(123).standard_normal(DIM)
    labels = (mean @ probe > 0).astype(np.float32)[:, None]
    return sp_ids, labels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--samples", type=int, default=16384, help="training samples (a quarter as many held out)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="hps_tf_transfer_"))
    workdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)

    keys, vectors, config = pretrained_table(workdir, rng)
    hps.Init(global_batch_size=BATCH, ps_config_file=str(config))

    history_in = keras.Input(shape=(MAX_HISTORY,), sparse=True, dtype="int64", name="history")
    emb = hps.SparseLookupLayer(MODEL, 0, DIM, tf.float32, name="pretrained_items")(history_in, None,
                                                                                   combiner="mean")
    h = keras.layers.Dense(64, activation="relu")(emb)
    out = keras.layers.Dense(1)(h)
    model = keras.Model(history_in, out)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=keras.losses.BinaryCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    frozen = model.get_layer("pretrained_items")
    print(f"[model] trainable weights: {len(model.trainable_weights)} (head only; HPS layer: "
          f"{len(frozen.trainable_weights)})")

    train_ids, train_y = make_data(keys, vectors, args.samples, rng)
    test_ids, test_y = make_data(keys, vectors, max(args.samples // 4, 8), rng)
    train = tf.data.Dataset.from_tensor_slices((train_ids, train_y)).shuffle(args.samples, seed=0).batch(BATCH)
    test = tf.data.Dataset.from_tensor_slices((test_ids, test_y)).batch(BATCH)
    loss0, acc0 = model.evaluate(test, verbose=0)
    model.fit(train, epochs=args.epochs, shuffle=False, verbose=0)  # the dataset shuffles
    loss1, acc1 = model.evaluate(test, verbose=0)
    print(f"[fit] held-out loss {loss0:.4f} -> {loss1:.4f}, accuracy {acc0:.3f} -> {acc1:.3f}")

    # The head's predictions use exactly the pre-trained rows: check a batch against a numpy lookup.
    probe_model = keras.Model(history_in, emb)
    sample = tf.sparse.slice(test_ids, [0, 0], [8, MAX_HISTORY])
    got = probe_model(sample).numpy()
    index = {int(k): i for i, k in enumerate(keys)}
    rows = sample.indices.numpy()[:, 0]
    want = np.zeros((8, DIM), np.float32)
    for r, k in zip(rows, sample.values.numpy()):
        want[r] += vectors[index[int(k)]]
    want /= np.bincount(rows, minlength=8)[:, None]
    emb_err = float(np.max(np.abs(got - want)))
    print(f"[check] HPS embeddings vs numpy mean of pre-trained rows: max abs error {emb_err:.2e}")

    ok = acc1 >= 0.85 and loss1 <= 0.5 * loss0 and emb_err <= 1e-5
    print("[transfer] " + ("PASSED" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
