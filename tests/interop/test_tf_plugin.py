"""interop.tf_plugin against TensorFlow itself, modelled on HPS's hps_tf/test/unit/test_hps.py.

Every lookup is compared bit for bit (uint32 views, so even -0.0 vs 0.0 or NaN payloads would show) with
`tf.nn.embedding_lookup` / `tf.nn.embedding_lookup_sparse` on the very table the files hold. Beyond HPS's tests:
sqrtn, weights, int64 keys (our YAML config), unknown keys -> the table's default value, errors that raise, graph
mode, Model.predict / Model.fit, concurrent calls, implicit init.
"""

from __future__ import annotations

import threading

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch

import interop.tf_plugin as hps
from hps_core import engine as hps_engine
from interop.tf_op import serve

from hps_tf_testing import MAX_BATCH_SIZE, MAX_NNZ, assert_bit_identical, random_sparse, write_deployment

MAX_NORMS = [None, 0.0, 0.1, 10.0]
ITERS = 10


def tf_data_ptr(t: tf.Tensor) -> int:
    """Address of an eager tensor's buffer, read through TF's own DLPack export."""
    return torch.from_dlpack(tf.experimental.dlpack.to_dlpack(t)).data_ptr()


def max_norm_arg(value):
    return None if value is None else tf.Variable(value, dtype=tf.float32)


@pytest.fixture(scope="class")
def dep32(tmp_path_factory):
    hps.shutdown()
    dep = write_deployment(tmp_path_factory.mktemp("hps32"), key_dtype="int32", fmt="json")
    status = hps.Init(global_batch_size=MAX_BATCH_SIZE, ps_config_file=str(dep.config_path))
    assert status == "OK"
    yield dep
    hps.shutdown()


@pytest.fixture(scope="class")
def dep64(tmp_path_factory):
    hps.shutdown()
    dep = write_deployment(tmp_path_factory.mktemp("hps64"), key_dtype="int64", fmt="yaml", seed=1)
    status = hps.Init(global_batch_size=MAX_BATCH_SIZE, ps_config_file=str(dep.config_path))
    assert status.numpy() == b"OK"
    yield dep
    hps.shutdown()


@pytest.mark.usefixtures("dep32")
class TestInt32Keys:
    """HPS's unit-test setting: int32 keys, supportlonglong false, HPS JSON config, explicit Init."""

    def test_init_is_once_per_process(self, dep32):
        server = hps_engine.default_server()
        assert hps.Init(global_batch_size=16, ps_config_file=str(dep32.config_path)) == "OK"
        assert hps_engine.default_server() is server

    @pytest.mark.parametrize("table_index", [0, 1, 2])
    @pytest.mark.parametrize("max_norm", MAX_NORMS)
    def test_lookup_layer_matches_embedding_lookup(self, dep32, table_index, max_norm):
        t = dep32.tables[table_index]
        layer = hps.LookupLayer(model_name=t.model, table_id=t.table_id, emb_vec_size=t.dim,
                                emb_vec_dtype=tf.float32)
        rng = np.random.default_rng(table_index)
        for _ in range(ITERS):
            ids = tf.constant(rng.integers(0, t.rows, (MAX_BATCH_SIZE, MAX_NNZ)), tf.int32)
            out = layer(ids, max_norm=max_norm_arg(max_norm))
            ref = tf.nn.embedding_lookup(t.vectors, ids, max_norm=max_norm_arg(max_norm))
            assert out.shape == (MAX_BATCH_SIZE, MAX_NNZ, t.dim)
            assert_bit_identical(out, ref)

    def test_max_norm_as_python_float(self, dep32):
        t = dep32.tables[1]
        ids = tf.constant(np.random.default_rng(5).integers(0, t.rows, (64, 3)), tf.int32)
        out = hps.LookupLayer(t.model, t.table_id, t.dim, tf.float32)(ids, max_norm=0.5)
        assert_bit_identical(out, tf.nn.embedding_lookup(t.vectors, ids, max_norm=0.5))

    @pytest.mark.parametrize("table_index", [0, 1, 2])
    @pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
    @pytest.mark.parametrize("max_norm", MAX_NORMS)
    def test_sparse_lookup_layer_matches_embedding_lookup_sparse(self, dep32, table_index, combiner, max_norm):
        t = dep32.tables[table_index]
        layer = hps.SparseLookupLayer(model_name=t.model, table_id=t.table_id, emb_vec_size=t.dim,
                                      emb_vec_dtype=tf.float32)
        rng = np.random.default_rng(100 + table_index)
        for _ in range(ITERS // 2):
            sp_ids = random_sparse(rng, MAX_BATCH_SIZE, MAX_NNZ, t.rows, tf.int32)
            out = layer(sp_ids, None, combiner=combiner, max_norm=max_norm_arg(max_norm))
            ref = tf.nn.embedding_lookup_sparse(t.vectors, sp_ids, None, combiner=combiner,
                                                max_norm=max_norm_arg(max_norm))
            assert out.shape == (MAX_BATCH_SIZE, t.dim)
            assert_bit_identical(out, ref)

    @pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
    @pytest.mark.parametrize("max_norm", [None, 0.3])
    def test_weighted_sparse_lookup(self, dep32, combiner, max_norm):
        t = dep32.tables[2]
        layer = hps.SparseLookupLayer(t.model, t.table_id, t.dim, tf.float32)
        rng = np.random.default_rng(7)
        for _ in range(3):
            sp_ids = random_sparse(rng, 256, MAX_NNZ, t.rows, tf.int32)
            weights = tf.SparseTensor(sp_ids.indices, rng.uniform(-2, 2, sp_ids.values.shape[0]).astype(np.float32),
                                      sp_ids.dense_shape)
            out = layer(sp_ids, weights, combiner=combiner, max_norm=max_norm)
            ref = tf.nn.embedding_lookup_sparse(t.vectors, sp_ids, weights, combiner=combiner, max_norm=max_norm)
            assert_bit_identical(out, ref)

    def test_sparse_default_combiner_is_mean_and_empty_rows_match_tf(self, dep32):
        t = dep32.tables[0]
        # Row 1 is empty in the middle (zeros, as TF), trailing row 3 is empty (absent, as TF's segment ops).
        sp_ids = tf.SparseTensor([[0, 0], [0, 1], [2, 0]], tf.constant([3, 3, 9], tf.int32), [4, 2])
        out = hps.SparseLookupLayer(t.model, t.table_id, t.dim, tf.float32)(sp_ids, None)
        assert_bit_identical(out, tf.nn.embedding_lookup_sparse(t.vectors, sp_ids, None))
        assert out.shape == (3, t.dim)

    @pytest.mark.parametrize("shape", [(), (7,), (4, 5), (2, 3, 4)])
    def test_ids_of_any_rank(self, dep32, shape):
        t = dep32.tables[0]
        ids = tf.constant(np.random.default_rng(3).integers(0, t.rows, shape), tf.int32)
        for max_norm in (None, 0.2):
            out = hps.LookupLayer(t.model, t.table_id, t.dim, tf.float32)(ids, max_norm=max_norm)
            assert out.shape == shape + (t.dim,)
            assert_bit_identical(out, tf.nn.embedding_lookup(t.vectors, ids, max_norm=max_norm))

    def test_duplicates_and_empty_batches(self, dep32):
        t = dep32.tables[2]
        layer = hps.LookupLayer(t.model, t.table_id, t.dim, tf.float32)
        ids = tf.constant([[5, 5, 5], [0, 5, 0]], tf.int32)
        assert_bit_identical(layer(ids), tf.nn.embedding_lookup(t.vectors, ids))
        empty = layer(tf.zeros([0, 4], tf.int32))
        assert empty.shape == (0, 4, t.dim)

    def test_the_op_shares_buffers_with_the_engine(self, dep32, monkeypatch):
        """The callback path (tables without a native route): DLPack both ways inside HpsLookup - the engine reads
        TF's id buffer, TF's output is the engine's buffer."""
        serve.set_native(False)
        try:
            self._shares_buffers(dep32, monkeypatch)
        finally:
            serve.set_native(True)

    def test_the_native_route_skips_python(self, dep32, monkeypatch):
        """Tables with a CPU pipeline: after the first call routes the op, lookups reach the engine's native call
        without the Python callback (and survive a server restart: the stale route is routed again)."""
        t = dep32.tables[1]
        ids = tf.constant(np.random.default_rng(9).integers(0, t.rows, (64, MAX_NNZ)), tf.int32)
        layer = hps.LookupLayer(t.model, t.table_id, t.dim, tf.float32)
        fn = tf.function(lambda x: layer(x))
        assert_bit_identical(fn(ids), tf.nn.embedding_lookup(t.vectors, ids))  # routes the op
        calls = []
        server = hps_engine.default_server()
        # The callback serves through server.lookup: a call of it here means a lookup took Python.
        monkeypatch.setattr(server, "lookup", lambda *a: calls.append(a) or pytest.fail("the Python lookup ran"))
        name = server.table(t.model, t.table_id).name
        keys_before = server.stats()["models"][t.model][name]["cpu"]["keys"]
        for _ in range(3):
            assert_bit_identical(fn(ids), tf.nn.embedding_lookup(t.vectors, ids))
        assert calls == []
        assert server.stats()["models"][t.model][name]["cpu"]["keys"] == keys_before + 3 * ids.shape.num_elements()
        monkeypatch.undo()
        # A new server: the op's cached route names a closed pipeline; the kernel routes again.
        hps.shutdown()
        hps.Init(global_batch_size=MAX_BATCH_SIZE, ps_config_file=str(dep32.config_path))
        fresh = hps_engine.default_server()
        assert fresh is not server
        assert_bit_identical(fn(ids), tf.nn.embedding_lookup(t.vectors, ids))
        assert fresh.stats()["models"][t.model][name]["cpu"]["keys"] == ids.shape.num_elements()

    def _shares_buffers(self, dep32, monkeypatch):
        server = hps_engine.default_server()
        real_lookup = server.lookup
        seen = {}

        def spy(model, table, keys):  # the real lookup, pointers recorded
            out = real_lookup(model, table, keys)
            seen.update(keys=keys.data_ptr(), out=out.data_ptr())
            return out

        monkeypatch.setattr(server, "lookup", spy)
        t = dep32.tables[1]
        ids = tf.constant(np.random.default_rng(8).integers(0, t.rows, (256, MAX_NNZ)), tf.int32)
        out = hps.lookup(ids, t.model, t.table_id, t.dim)
        assert seen["keys"] == tf_data_ptr(ids)
        assert seen["out"] == tf_data_ptr(out)
        assert_bit_identical(out, tf.nn.embedding_lookup(t.vectors, ids))

    def test_unknown_keys_get_the_tables_default_value(self, dep32):
        for t in dep32.tables:
            layer = hps.LookupLayer(t.model, t.table_id, t.dim, tf.float32)
            ids = np.array([[0, t.rows, 2**31 - 1], [-5, 1, t.rows + 17]], dtype=np.int32)
            out = layer(tf.constant(ids)).numpy()
            known = (ids >= 0) & (ids < t.rows)
            np.testing.assert_array_equal(out[known], t.vectors[ids[known]])
            np.testing.assert_array_equal(out[~known], np.full((int((~known).sum()), t.dim), t.default_value,
                                                               np.float32))

    def test_errors_raise_in_eager_mode(self, dep32):
        t = dep32.tables[0]
        ids = tf.constant([[1, 2]], tf.int32)
        with pytest.raises(TypeError, match="int32"):
            hps.LookupLayer(t.model, 0, t.dim, tf.float32)(tf.constant([[1, 2]], tf.int64))
        with pytest.raises(ValueError, match="emb_vec_size = 8 .* dimension 16"):
            hps.LookupLayer(t.model, 0, 8, tf.float32)(ids)
        with pytest.raises(KeyError, match="unknown model 'nope'"):
            hps.LookupLayer("nope", 0, t.dim, tf.float32)(ids)
        with pytest.raises(KeyError, match="no table id 3"):
            hps.LookupLayer("bar", 3, 32, tf.float32)(ids)
        too_many = tf.zeros([MAX_BATCH_SIZE + 1, MAX_NNZ], tf.int32)
        with pytest.raises(ValueError, match=f"{(MAX_BATCH_SIZE + 1) * MAX_NNZ} ids .* {MAX_BATCH_SIZE * MAX_NNZ}"):
            hps.LookupLayer(t.model, 0, t.dim, tf.float32)(too_many)
        with pytest.raises(TypeError, match="ids must be int32 or int64"):
            hps.LookupLayer(t.model, 0, t.dim, tf.float32)(tf.constant([1.0]))
        sparse = hps.SparseLookupLayer(t.model, 0, t.dim, tf.float32)
        with pytest.raises(TypeError, match="SparseTensor"):
            sparse(ids, None)
        with pytest.raises(ValueError, match="combiner"):
            sparse(tf.sparse.from_dense(ids), None, combiner="max")
        with pytest.raises(TypeError, match="emb_vec_dtype"):
            hps.LookupLayer(t.model, 0, t.dim, tf.float16)
        with pytest.raises(ValueError, match="table_id"):
            hps.LookupLayer(t.model, -1, t.dim, tf.float32)
        with pytest.raises(ValueError, match="global_batch_size"):
            hps.Init(global_batch_size=MAX_BATCH_SIZE + 1, ps_config_file=str(dep32.config_path))
        with pytest.raises(TypeError, match="unexpected"):
            hps.Init(global_batch_size=1, ps_config_file=str(dep32.config_path), visible_devices=[0])

    def test_errors_raise_in_graph_mode(self, dep32):
        t = dep32.tables[0]
        layer = hps.LookupLayer(t.model, 0, t.dim, tf.float32)

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32)])
        def f(ids):
            return layer(ids)

        # Static checks still raise at trace time; the batch size is only known at run time -> a TF error.
        with pytest.raises(tf.errors.InvalidArgumentError, match="exceed max_batch_size"):
            f(tf.zeros([MAX_BATCH_SIZE + 1, MAX_NNZ], tf.int32))
        with pytest.raises(KeyError):
            tf.function(lambda x: hps.LookupLayer("nope", 0, t.dim, tf.float32)(x))(tf.constant([1], tf.int32))
        ids = tf.constant(np.arange(20).reshape(2, 10), tf.int32)  # the function still works afterwards
        assert_bit_identical(f(ids), tf.nn.embedding_lookup(t.vectors, ids))

    def test_tf_function_with_unknown_shapes(self, dep32):
        t = dep32.tables[1]
        layer = hps.LookupLayer(t.model, t.table_id, t.dim, tf.float32)
        sparse = hps.SparseLookupLayer(t.model, t.table_id, t.dim, tf.float32)
        max_norm = tf.Variable(0.1)

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32)])
        def dense_fn(ids):
            return layer(ids, max_norm=max_norm)

        @tf.function(input_signature=[tf.SparseTensorSpec([None, None], tf.int32)])
        def sparse_fn(sp_ids):
            return sparse(sp_ids, None, combiner="sqrtn", max_norm=max_norm)

        rng = np.random.default_rng(11)
        for batch in (1, 100, MAX_BATCH_SIZE):
            ids = tf.constant(rng.integers(0, t.rows, (batch, MAX_NNZ)), tf.int32)
            assert_bit_identical(dense_fn(ids), tf.nn.embedding_lookup(t.vectors, ids, max_norm=max_norm))
            sp_ids = random_sparse(rng, batch, MAX_NNZ, t.rows, tf.int32)
            assert_bit_identical(sparse_fn(sp_ids), tf.nn.embedding_lookup_sparse(
                t.vectors, sp_ids, None, combiner="sqrtn", max_norm=max_norm))
        assert dense_fn.get_concrete_function().structured_outputs.shape.as_list() == [None, None, t.dim]
        graph_ops = {op.type for op in dense_fn.get_concrete_function().graph.get_operations()}
        assert "HpsLookup" in graph_ops and "PyFunc" not in graph_ops and "EagerPyFunc" not in graph_ops

    def test_model_predict(self, dep32):
        t = dep32.tables[0]
        inputs = keras.Input(shape=(MAX_NNZ,), dtype="int32")
        emb = hps.LookupLayer(t.model, t.table_id, t.dim, tf.float32, name="hps_emb")(inputs)
        model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Flatten()(emb)))
        x = np.random.default_rng(2).integers(0, t.rows, (300, MAX_NNZ)).astype(np.int32)
        got = model.predict(x, batch_size=128, verbose=0)
        dense = model.layers[-1]
        ref = dense(tf.reshape(tf.nn.embedding_lookup(t.vectors, x), [300, -1])).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
        embedder = keras.Model(inputs, emb)
        assert_bit_identical(embedder.predict(x, batch_size=128, verbose=0), tf.nn.embedding_lookup(t.vectors, x))

    def test_fit_trains_the_other_layers_exactly_like_a_frozen_native_embedding(self, dep32):
        """Transfer learning: frozen HPS embeddings + a trainable head. The head must learn exactly what it learns
        over a frozen keras Embedding holding the same table (no broken or zeroed gradients)."""
        t = dep32.tables[2]
        rng = np.random.default_rng(4)
        x = rng.integers(0, t.rows, (512, 3)).astype(np.int32)
        y = rng.standard_normal((512, 1)).astype(np.float32)

        def build(embedding_layer):
            inputs = keras.Input(shape=(3,), dtype="int32")
            h = keras.layers.Flatten()(embedding_layer(inputs))
            h = keras.layers.Dense(16, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(1))(h)
            out = keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(2))(h)
            model = keras.Model(inputs, out)
            model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
            return model

        hps_model = build(hps.LookupLayer(t.model, t.table_id, t.dim, tf.float32))
        native = keras.layers.Embedding(t.rows, t.dim, trainable=False)
        native_model = build(native)
        native.set_weights([t.vectors])
        before = [w.copy() for w in hps_model.get_weights()]
        h1 = hps_model.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0)
        h2 = native_model.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0)
        after = hps_model.get_weights()
        assert all(not np.array_equal(a, b) for a, b in zip(before, after)), "some head weight did not train"
        assert h1.history["loss"][-1] < h1.history["loss"][0]
        np.testing.assert_allclose(h1.history["loss"], h2.history["loss"], rtol=1e-5)
        for a, b in zip(after, [w for w in native_model.get_weights() if w.shape != t.vectors.shape]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert not hps_model.layers[1].trainable_weights

    def test_concurrent_calls_from_threads(self, dep32):
        tables = dep32.tables

        @tf.function(input_signature=[tf.TensorSpec([None, MAX_NNZ], tf.int32)] * 3)
        def three_lookups(a, b, c):  # independent ops: TF may run them on several inter-op threads at once
            return [hps.LookupLayer(t.model, t.table_id, t.dim, tf.float32)(ids) for t, ids in zip(tables, (a, b, c))]

        failures = []

        def worker(seed):
            rng = np.random.default_rng(seed)
            try:
                for _ in range(5):
                    ids = [tf.constant(rng.integers(0, t.rows, (200, MAX_NNZ)), tf.int32) for t in tables]
                    for t, i, out in zip(tables, ids, three_lookups(*ids)):
                        assert_bit_identical(out, tf.nn.embedding_lookup(t.vectors, i))
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not failures, failures

    def test_layer_config_round_trip(self, dep32):
        layer = hps.SparseLookupLayer("bar", 1, 32, tf.float32, ps_config_file="x.json", global_batch_size=8,
                                      name="sp")
        config = layer.get_config()
        assert config["emb_vec_dtype"] == "float32" and config["ps_config_file"] == "x.json"
        clone = hps.SparseLookupLayer.from_config(config)
        assert (clone.model_name, clone.table_id, clone.emb_vec_size, clone.global_batch_size, clone.name) == (
            "bar", 1, 32, 8, "sp")
        restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
        assert isinstance(restored, hps.SparseLookupLayer)


@pytest.mark.usefixtures("dep64")
class TestInt64Keys:
    """supportlonglong true, our YAML config format."""

    @pytest.mark.parametrize("max_norm", [None, 0.1])
    def test_dense_and_sparse_exact(self, dep64, max_norm):
        rng = np.random.default_rng(9)
        for t in dep64.tables:
            ids = tf.constant(rng.integers(0, t.rows, (MAX_BATCH_SIZE, 4)), tf.int64)
            out = hps.LookupLayer(t.model, t.table_id, t.dim, tf.float32)(ids, max_norm=max_norm)
            assert_bit_identical(out, tf.nn.embedding_lookup(t.vectors, ids, max_norm=max_norm))
            sp_ids = random_sparse(rng, 300, MAX_NNZ, t.rows, tf.int64)
            for combiner in ("sum", "mean", "sqrtn"):
                out = hps.SparseLookupLayer(t.model, t.table_id, t.dim, tf.float32)(
                    sp_ids, None, combiner=combiner, max_norm=max_norm)
                assert_bit_identical(out, tf.nn.embedding_lookup_sparse(t.vectors, sp_ids, None, combiner=combiner,
                                                                        max_norm=max_norm))

    def test_large_unknown_keys_and_key_dtype_check(self, dep64):
        t = dep64.tables[1]
        layer = hps.LookupLayer(t.model, t.table_id, t.dim, tf.float32)
        ids = np.array([3, 2**40, -(2**62), 2**63 - 2], dtype=np.int64)
        out = layer(tf.constant(ids)).numpy()
        np.testing.assert_array_equal(out[0], t.vectors[3])
        np.testing.assert_array_equal(out[1:], np.full((3, t.dim), t.default_value, np.float32))
        with pytest.raises(TypeError, match="int64"):
            layer(tf.constant([1], tf.int32))


class TestImplicitInit:
    """Layers built with ps_config_file + global_batch_size start the server on first use (HPS lazy init)."""

    def test_not_initialised_without_config_raises(self, tmp_path):
        hps.shutdown()
        with pytest.raises(RuntimeError, match="not initialised"):
            hps.LookupLayer("foo", 0, 16, tf.float32)(tf.constant([1], tf.int32))

        @tf.function
        def f(ids):
            return hps.LookupLayer("foo", 0, 16, tf.float32)(ids)

        with pytest.raises(tf.errors.FailedPreconditionError, match="not initialised"):
            f(tf.constant([1], tf.int32))

    def test_first_use_inside_a_graph_initialises(self, tmp_path):
        hps.shutdown()
        dep = write_deployment(tmp_path, key_dtype="int32", fmt="json", seed=3)
        t = dep.tables[1]
        layer = hps.LookupLayer(t.model, t.table_id, t.dim, tf.float32, ps_config_file=str(dep.config_path),
                                global_batch_size=MAX_BATCH_SIZE)
        try:
            ids = tf.constant(np.arange(30).reshape(3, 10), tf.int32)
            out = tf.function(lambda x: layer(x))(ids)  # the server starts inside the kernel's callback
            assert_bit_identical(out, tf.nn.embedding_lookup(t.vectors, ids))
            assert hps_engine.default_server() is not None
        finally:
            hps.shutdown()


def test_tables_without_a_cache_are_routed_natively_too(tmp_path, monkeypatch):
    """gpucache false: the op reaches the table's pass-through pipeline (host map, then defaults) without
    Python, with the same rows and the table's default for unknown ids."""
    hps.shutdown()
    dep = write_deployment(tmp_path / "nocache", key_dtype="int32", fmt="json", gpucache=False)
    hps.Init(global_batch_size=MAX_BATCH_SIZE, ps_config_file=str(dep.config_path))
    try:
        t = dep.tables[0]
        ids = np.random.default_rng(4).integers(0, t.rows, (32, MAX_NNZ)).astype(np.int32)
        ids[0, :3] = [t.rows, t.rows + 5, -7]  # unknown: the table's default
        want = np.where((ids >= 0)[..., None] & (ids < t.rows)[..., None],
                        t.vectors[np.clip(ids, 0, t.rows - 1)], np.float32(t.default_value))
        layer = hps.LookupLayer(t.model, t.table_id, t.dim, tf.float32)
        fn = tf.function(lambda x: layer(x))
        np.testing.assert_array_equal(fn(tf.constant(ids)).numpy(), want)  # routes the op
        server = hps_engine.default_server()
        monkeypatch.setattr(server, "lookup", lambda *a: pytest.fail("the Python lookup ran"))
        for _ in range(2):
            np.testing.assert_array_equal(fn(tf.constant(ids)).numpy(), want)
        monkeypatch.undo()
        name = server.table(t.model, t.table_id).name
        s = server.stats()["models"][t.model][name]["cpu"]
        assert s["kind"] == "pass_through" and s["keys"] == 3 * ids.size and s["defaults_served"] == 9
    finally:
        hps.shutdown()
