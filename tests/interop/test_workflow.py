"""The seed's workflow examples run as scripts, each in its own interpreter, as a user would run them.

- examples/tf_workflow.py: train with native TF embeddings -> dissect (HPS table files + the dense part) -> build
  the inference model with hps layers -> save -> a fresh process Inits, loads and predicts -> embeddings and logits
  match the trained model (MSE <= 1e-6), for the SavedModel and the .keras file.
- examples/tf_transfer_learning.py: a new dense head trained with Model.fit on frozen HPS embeddings learns.
"""

from __future__ import annotations

import re

from hps_tf_testing import REPO, run_python


def test_tf_workflow_example(tmp_path):
    proc = run_python([str(REPO / "examples" / "tf_workflow.py"), "--workdir", str(tmp_path), "--samples", "4096",
                       "--epochs", "2"])
    compares = re.findall(r"\[compare\] (\w+)\s+(\w+)\s+MSE (\S+) (OK|FAIL)", proc.stdout)
    assert len(compares) == 6, proc.stdout
    for form, name, mse, verdict in compares:
        assert verdict == "OK" and float(mse) <= 1e-6, (form, name, mse)
    assert "[workflow] PASSED" in proc.stdout
    # What the dissect step wrote is a real HPS table: 8 bytes per key, 4 x dim bytes per vector.
    assert (tmp_path / "tables" / "field" / "key").stat().st_size == 10000 * 8
    assert (tmp_path / "tables" / "field" / "emb_vector").stat().st_size == 10000 * 16 * 4
    assert (tmp_path / "inference_savedmodel" / "saved_model.pb").exists()


def test_tf_transfer_learning_example(tmp_path):
    proc = run_python([str(REPO / "examples" / "tf_transfer_learning.py"), "--workdir", str(tmp_path), "--samples",
                       "8192", "--epochs", "5"])
    assert "[transfer] PASSED" in proc.stdout, proc.stdout
    assert "HPS layer: 0)" in proc.stdout  # the HPS layer has no trainable weights
