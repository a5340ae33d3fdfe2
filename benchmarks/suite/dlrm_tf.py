"""The TensorFlow twin of benchmarks.suite.dlrm_model.DLRM (same weights, same interaction), for variant (c) of
`bench=dlrm`: embeddings through the TF plugin (`interop.tf_plugin.LookupLayer`) vs native TF
(`tf.nn.embedding_lookup` on a tf.Variable holding the table). Imported only when TF variants are asked for.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


class TFDLRM(tf.Module):
    """forward(dense (B, F) float32, emb (B, S, dim) float32) -> (B, 1), the torch model's weights copied."""

    def __init__(self, torch_model) -> None:
        super().__init__()
        weights = torch_model.numpy_weights()
        n_bottom = sum(1 for m in torch_model.bottom if hasattr(m, "weight"))
        self.bottom = [(tf.constant(w), tf.constant(b)) for w, b in weights[:n_bottom]]
        self.top = [(tf.constant(w), tf.constant(b)) for w, b in weights[n_bottom:]]
        self.slots = torch_model.slots
        self.pair_index = tf.constant(torch_model.pair_index.cpu().numpy().astype(np.int64))

    def __call__(self, dense: tf.Tensor, emb: tf.Tensor) -> tf.Tensor:
        d = dense
        for w, b in self.bottom:
            d = tf.nn.relu(tf.matmul(d, w) + b)
        gram = tf.reshape(tf.matmul(emb, emb, transpose_b=True), [-1, self.slots * self.slots])
        with_dense = tf.squeeze(tf.matmul(emb, d[:, :, None]), 2)
        z = tf.concat([d, with_dense, tf.gather(gram, self.pair_index, axis=1)], axis=1)
        for i, (w, b) in enumerate(self.top):
            z = tf.matmul(z, w) + b
            if i < len(self.top) - 1:
                z = tf.nn.relu(z)
        return tf.sigmoid(z)


def forwards(model: TFDLRM, table: np.ndarray, model_name: str, dim: int) -> dict:
    """{"tf_plugin": f(keys, dense), "tf_native": f(rows, dense)} as tf.functions (keys == row ids here)."""
    import interop.tf_plugin as hps

    layer = hps.LookupLayer(model_name, 0, dim, tf.float32)
    params = tf.Variable(table, trainable=False)

    @tf.function
    def plugin(keys, dense):
        return model(dense, layer(keys))

    @tf.function
    def native(rows, dense):
        return model(dense, tf.nn.embedding_lookup(params, rows))

    return {"tf_plugin": plugin, "tf_native": native}
