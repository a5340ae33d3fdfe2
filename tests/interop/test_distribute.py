"""hps.Init and the layers under tf.distribute, as HPS runs them: a MirroredStrategy over several replicas (here
logical CPU devices, in a fresh process because TF fixes its devices at start) - one server per process, one "OK"
per replica, the batch checked per replica, each replica's lookups exact; other strategies refused."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from hps_tf_testing import MAX_BATCH_SIZE, run_python, write_deployment

CHILD = textwrap.dedent('''
    import sys
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import interop.tf_plugin as hps

    config, max_batch, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    results = {}
    with strategy.scope():
        try:  # per replica 2 * max_batch / 2 + 1 samples: too many
            hps.Init(global_batch_size=2 * max_batch + 2, ps_config_file=config)
            results["too_big"] = "accepted"
        except ValueError as e:
            results["too_big"] = str(e)
        status = hps.Init(global_batch_size=2 * max_batch, ps_config_file=config)  # max_batch per replica: fine
        results["status"] = [s.numpy().decode() for s in status]
        layer = hps.LookupLayer("foo", 0, 16, tf.float32)

    def ids_for(ctx):
        r = ctx.replica_id_in_sync_group
        return tf.constant(np.arange(40, dtype=np.int32).reshape(4, 10) + 1000 * r + 7)

    ids = strategy.experimental_distribute_values_from_function(ids_for)

    @tf.function
    def step(x):
        return strategy.run(lambda i: layer(i), args=(x,))

    per_replica = strategy.experimental_local_results(step(ids))
    np.savez(out, *[t.numpy() for t in per_replica])
    with strategy.scope():
        again = strategy.run(lambda: hps.Init(global_batch_size=max_batch, ps_config_file=config))
        results["in_replica"] = [s.numpy().decode() for s in strategy.experimental_local_results(again)]
    try:
        with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
            hps.Init(global_batch_size=1, ps_config_file=config)
        results["one_device"] = "accepted"
    except RuntimeError as e:
        results["one_device"] = str(e)
    print(repr(results))
''')


def test_mirrored_strategy_init_and_lookups_per_replica(tmp_path):
    dep = write_deployment(tmp_path / "dep")
    out = tmp_path / "replicas.npz"
    proc = run_python(["-c", CHILD, str(dep.config_path), str(MAX_BATCH_SIZE), str(out)])
    results = eval(proc.stdout.strip().splitlines()[-1])  # noqa: S307 - our own child's repr of str/list values
    assert "exceeds models.foo.max_batch_size" in results["too_big"] and "2 replicas" in results["too_big"]
    assert results["status"] == ["OK", "OK"]
    assert results["in_replica"] == ["OK", "OK"]
    assert "This strategy type is not supported yet" in results["one_device"]
    got = np.load(out)
    table = dep.tables[0]
    for r in range(2):
        ids = np.arange(40).reshape(4, 10) + 1000 * r + 7
        np.testing.assert_array_equal(got[f"arr_{r}"], table.vectors[ids])


HOROVOD_CHILD = textwrap.dedent('''
    import sys
    import types
    import numpy as np
    import tensorflow as tf

    # Horovod itself does not install here (it builds against TF from source); this stand-in has the two calls
    # HPS's Init reads - it is what `import horovod.tensorflow as hvd; hvd.init()` leaves in sys.modules for a
    # job of 4 processes, this one local rank 1.
    hvd = types.ModuleType("horovod.tensorflow")
    hvd.initialized = False
    def size():
        if not hvd.initialized:
            raise ValueError("Horovod has not been initialized; use hvd.init().")
        return 4
    hvd.size = size
    hvd.local_rank = lambda: 1
    sys.modules["horovod.tensorflow"] = hvd
    import interop.tf_plugin as hps

    config, max_batch = sys.argv[1], int(sys.argv[2])
    results = {}
    try:
        hps.Init(global_batch_size=max_batch, ps_config_file=config)
        results["before_init"] = "accepted"
    except RuntimeError as e:
        results["before_init"] = str(e)
    hvd.initialized = True
    try:  # per process 4 * max_batch / 4 + 1 samples: too many
        hps.Init(global_batch_size=4 * max_batch + 4, ps_config_file=config)
        results["too_big"] = "accepted"
    except ValueError as e:
        results["too_big"] = str(e)
    status = hps.Init(global_batch_size=4 * max_batch, ps_config_file=config)
    results["status"] = status.numpy().decode()
    layer = hps.LookupLayer("foo", 0, 16, tf.float32)
    ids = np.arange(40, dtype=np.int32).reshape(4, 10) + 3
    results["exact"] = bool(np.array_equal(layer(tf.constant(ids)).numpy(), np.load(sys.argv[3])[ids]))
    print(repr(results))
''')


def test_horovod_style_init_checks_the_batch_per_process(tmp_path):
    dep = write_deployment(tmp_path / "dep")
    table = tmp_path / "foo.npy"
    np.save(table, dep.tables[0].vectors)
    proc = run_python(["-c", HOROVOD_CHILD, str(dep.config_path), str(MAX_BATCH_SIZE), str(table)])
    results = eval(proc.stdout.strip().splitlines()[-1])  # noqa: S307 - our own child's repr of str/bool values
    assert "needs hvd.init() first" in results["before_init"]
    assert "exceeds models.foo.max_batch_size" in results["too_big"] and "4 replicas" in results["too_big"]
    assert results["status"] == "OK"
    assert results["exact"] is True
