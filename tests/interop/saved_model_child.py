"""The deployment side of test_saved_model.py, run in a fresh interpreter (not collected by pytest).

    python tests/interop/saved_model_child.py WORKDIR explicit CONFIG   # hps.Init(CONFIG) first
    python tests/interop/saved_model_child.py WORKDIR implicit          # no Init: the layers' recorded config

Loads every saved form under WORKDIR (full.keras, full_savedmodel/, dense_savedmodel/, dense_export/), runs them on
WORKDIR/inputs.npz and writes WORKDIR/outputs_<mode>.npz. Only the plugin import (which loads the op and registers
its callback) and, in explicit mode, `Init` stand between a bare process and the predictions.
"""

import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import interop.tf_plugin as hps
from hps_core import engine


def main(workdir: Path, mode: str, config: str | None) -> None:
    if mode == "explicit":
        assert hps.Init(global_batch_size=1024, ps_config_file=config) == "OK"
    inputs = np.load(workdir / "inputs.npz")
    ids = tf.constant(inputs["ids"])
    sp_ids = tf.SparseTensor(inputs["sp_indices"], tf.constant(inputs["sp_values"]), inputs["sp_shape"])
    out = {}

    # The SavedModel first: in implicit mode its HpsLookup kernel is what starts the server.
    loaded = tf.saved_model.load(str(workdir / "full_savedmodel"))
    serve = loaded.signatures["serving_default"]
    result = serve(ids=ids, sp_indices=sp_ids.indices, sp_values=sp_ids.values, sp_shape=sp_ids.dense_shape)
    for k, v in result.items():
        out[f"savedmodel_{k}"] = v.numpy()
    graph = serve.graph.as_graph_def()
    graph_ops = {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}
    # The saved graph holds the HpsLookup op itself, no Python callback (py_function would fail to run here).
    assert "HpsLookup" in graph_ops and not graph_ops & {"PyFunc", "EagerPyFunc"}, graph_ops

    model = keras.models.load_model(workdir / "full.keras")
    for i, v in enumerate(model([ids, sp_ids])):
        out[f"keras_{i}"] = v.numpy()
    for i, v in enumerate(model.predict([ids, sp_ids], batch_size=64, verbose=0)):
        out[f"keras_predict_{i}"] = v

    exported = tf.saved_model.load(str(workdir / "dense_export"))
    for i, v in enumerate(exported.serve(ids)):
        out[f"export_{i}"] = v.numpy()

    plain = tf.saved_model.load(str(workdir / "dense_savedmodel")).signatures["serving_default"]
    result = plain(ids)
    for i, key in enumerate(sorted(result)):  # output_0, output_1
        out[f"dense_savedmodel_{i}"] = result[key].numpy()

    out["server_config_models"] = np.array(sorted(engine.default_server().config.models))
    np.savez(workdir / f"outputs_{mode}.npz", **out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
