"""Serving a SavedModel that holds HPS lookups where no plugin code ran: the op library starts the engine itself.

- A C program built against the TensorFlow wheel's C API (`libtensorflow_cc`) loads the op library and the SavedModel
  made by examples/tf_workflow.py and runs a batch - as Triton's TensorFlow backend and TF Serving do, no Python in
  the process until the op library starts its own. Its outputs equal the Python deployment's.
- A Python process that never imports interop.tf_plugin (only `tf.load_op_library` + `tf.saved_model.load`): the op
  attaches the engine to the running interpreter.
Both start the server from the config path the layers stored in the graph (HPS's lazy initialisation).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from hps_tf_testing import REPO, run_python
from interop.tf_op import build as op_build

BATCH = 1024  # examples/tf_workflow.py's inference batch


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    """The example's artifacts: SavedModel, config, tables, test set and the Python deployment's outputs."""
    workdir = tmp_path_factory.mktemp("workflow")
    run_python([str(REPO / "examples" / "tf_workflow.py"), "--workdir", str(workdir), "--samples", "2048",
                "--epochs", "1"])
    return workdir


def first_batch(workdir):
    """The first inference batch of the test set as the serving signature's inputs (what deploy fed it)."""
    test = np.load(workdir / "test.npz")
    keep = test["indices"][:, 0] < BATCH
    return {"field_indices": test["indices"][keep].astype(np.int64),
            "field_values": test["values"][keep].astype(np.int64),
            "field_shape": np.array([BATCH, test["shape"][1]], np.int64),
            "slot_ids": test["ids"][:BATCH].astype(np.int64)}


def signature(saved_model_dir):
    """serving_default's graph tensor names: {input name: "op:index"}, {output name: "op:index"}."""
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((saved_model_dir / "saved_model.pb").read_bytes())
    sig = proto.meta_graphs[0].signature_def["serving_default"]
    return ({k: v.name for k, v in sig.inputs.items()}, {k: v.name for k, v in sig.outputs.items()})


@pytest.fixture(scope="module")
def loader(tmp_path_factory):
    """serve_savedmodel.c, compiled against the TF wheel's C API."""
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cc is None:
        pytest.fail("a C compiler (gcc) is needed to build the C API loader")
    lib_dir = tf.sysconfig.get_lib()
    exe = tmp_path_factory.mktemp("loader") / "serve_savedmodel"
    cmd = [cc, "-O1", "-Wall", str(REPO / "tests" / "interop" / "serve_savedmodel.c"), "-o", str(exe),
           "-I" + tf.sysconfig.get_include(), "-L" + lib_dir, "-l:libtensorflow_cc.so.2",
           "-l:libtensorflow_framework.so.2", "-Wl,-rpath," + lib_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
    return exe


def no_python_env():
    """The environment of a C++ server: nothing pointing at our Python or the repo."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}


def test_c_api_loader_serves_the_workflow_savedmodel_without_python(workflow, loader, tmp_path):
    inputs, outputs = signature(workflow / "inference_savedmodel")
    batch = first_batch(workflow)
    args = [str(loader), str(op_build.library_path()), str(workflow / "inference_savedmodel"), str(tmp_path / "out")]
    for name, value in batch.items():
        raw = tmp_path / f"{name}.bin"
        value.tofile(raw)
        op, index = inputs[name].split(":")
        args.append(f"in:{op}:{index}:int64:{','.join(str(d) for d in value.shape)}:{raw}")
    names = sorted(outputs)
    for name in names:
        op, index = outputs[name].split(":")
        args.append(f"out:{op}:{index}")
    proc = subprocess.run(args, capture_output=True, text=True, env=no_python_env(), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), f"{proc.stdout}\n{proc.stderr[-6000:]}"

    deployed = np.load(workflow / "deployed.npz")  # the Python deployment of the same SavedModel
    for k, name in enumerate(names):
        want = deployed[f"savedmodel_{name}"][:BATCH]
        got = np.fromfile(tmp_path / f"out{k}.bin", np.float32).reshape(want.shape)
        if name == "logit":  # the dense part may fuse differently in a Session than in an eager function
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
        else:  # the embeddings are the engine's rows and TF's own combiner: bit-identical
            np.testing.assert_array_equal(got, want, err_msg=name)
        assert np.abs(got).sum() > 0, name


CHILD = """
import sys
import numpy as np
import tensorflow as tf
tf.load_op_library(sys.argv[1])  # the op only: interop.tf_plugin is never imported
serve = tf.saved_model.load(sys.argv[2]).signatures["serving_default"]
batch = dict(np.load(sys.argv[3]))
out = serve(**{k: tf.constant(v) for k, v in batch.items()})
assert "interop.tf_plugin" not in sys.modules, "the plugin was imported"
np.savez(sys.argv[4], **{k: v.numpy() for k, v in out.items()})
"""


def test_python_process_without_the_plugin_serves_the_savedmodel(workflow, tmp_path):
    batch = first_batch(workflow)
    np.savez(tmp_path / "batch.npz", **batch)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(op_build.library_path()),
                           str(workflow / "inference_savedmodel"), str(tmp_path / "batch.npz"),
                           str(tmp_path / "out.npz")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    got, deployed = np.load(tmp_path / "out.npz"), np.load(workflow / "deployed.npz")
    for name in ("field_emb", "slot_emb"):
        np.testing.assert_array_equal(got[name], deployed[f"savedmodel_{name}"][:BATCH], err_msg=name)
    np.testing.assert_allclose(got["logit"], deployed["savedmodel_logit"][:BATCH], rtol=1e-5, atol=1e-6)
