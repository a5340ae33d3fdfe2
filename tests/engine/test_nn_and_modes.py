"""torch API (LookupLayer, BagLookupLayer, torch.ops.hps.lookup) and the static / host-mapped table modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hps_core.engine import HierarchicalParameterServer
from hps_core.nn import BagLookupLayer, LookupLayer

from engine_refs import Reference, make_table

pytestmark = pytest.mark.filterwarnings("ignore:no CUDA device:RuntimeWarning")


def server(tmp_path, rng, mode="dynamic", rows=1500, dim=8, default=0.25):
    path = tmp_path / "t"
    keys, vectors = make_table(path, rows, dim, rng)
    cfg = {
        "key_dtype": "int64",
        "models": {"m": {"tables": [{"name": "t", "path": str(path), "dim": dim, "max_keys_per_sample": 64,
                                     "default_value": default}],
                         "max_batch_size": 256,
                         "cache": {"ratio": 0.2, "type": mode, "hit_rate_threshold": 1.1}}},
        "tiers": {"host_memory": {"enabled": True, "num_partitions": 2}},
    }
    return HierarchicalParameterServer(cfg, progress=False), Reference(keys, vectors, default)


def mixed_keys(ref, rng, n):
    known = np.array(list(ref.rows), dtype=np.int64)
    keys = rng.choice(known, n)
    keys[::7] = rng.integers(-(1 << 60), 1 << 60, size=keys[::7].size)
    return keys


@pytest.mark.parametrize("mode", ["dynamic", "static", "uvm"])
def test_table_modes_match_reference(tmp_path, rng, mode):
    hps, ref = server(tmp_path, rng, mode)
    with hps:
        for _ in range(5):
            keys = torch.from_numpy(mixed_keys(ref, rng, 300)).reshape(30, 10)
            np.testing.assert_array_equal(hps.lookup("m", 0, keys).numpy(), ref.lookup(keys.numpy()))
        known = torch.tensor(list(ref.rows)[:20])
        new = torch.randn(20, ref.dim)
        hps.update("m", 0, known, new)
        torch.testing.assert_close(hps.lookup("m", 0, known), new, rtol=0, atol=0)
        assert hps.stats()["models"]["m"]["t"]["cpu"]["mode"] == mode


def test_lookup_layer(tmp_path, rng):
    hps, ref = server(tmp_path, rng)
    with hps:
        layer = LookupLayer("m", "t", server=hps)
        keys = torch.from_numpy(mixed_keys(ref, rng, 96)).reshape(4, 24).to(torch.int32 if False else torch.int64)
        out = layer(keys)
        assert out.shape == (4, 24, ref.dim)
        np.testing.assert_array_equal(out.numpy(), ref.lookup(keys.numpy()))
        assert "dim=8" in repr(layer)
        with pytest.raises(KeyError, match="no table 'zz'"):
            LookupLayer("m", "zz", server=hps)


def _bag_reference(rows: np.ndarray, offsets: list[int], weights: np.ndarray | None, mode: str) -> np.ndarray:
    out = []
    bounds = offsets + [rows.shape[0]]
    for b in range(len(offsets)):
        seg = rows[bounds[b]:bounds[b + 1]].astype(np.float64)
        w = np.ones(seg.shape[0]) if weights is None else weights[bounds[b]:bounds[b + 1]].astype(np.float64)
        total = (seg * w[:, None]).sum(axis=0)
        if mode == "mean":
            total = total / w.sum() if w.sum() != 0 else total * 0
        elif mode == "sqrtn":
            norm = np.sqrt((w * w).sum())
            total = total / norm if norm != 0 else total * 0
        out.append(total)
    return np.array(out)


@pytest.mark.parametrize("mode", ["sum", "mean", "sqrtn"])
@pytest.mark.parametrize("weighted", [False, True])
def test_bag_layer_offsets(tmp_path, rng, mode, weighted):
    hps, ref = server(tmp_path, rng)
    with hps:
        bag = BagLookupLayer("m", 0, mode=mode, server=hps)
        keys = torch.from_numpy(mixed_keys(ref, rng, 40))
        offsets = [0, 3, 3, 10, 25]  # includes an empty bag
        weights = torch.rand(40) if weighted else None
        out = bag(keys, offsets=torch.tensor(offsets), per_sample_weights=weights)
        want = _bag_reference(ref.lookup(keys.numpy()), offsets, None if weights is None else weights.numpy(), mode)
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-6)
        assert torch.all(out[1] == 0)


def test_bag_layer_2d_and_errors(tmp_path, rng):
    hps, ref = server(tmp_path, rng)
    with hps:
        bag = BagLookupLayer("m", 0, mode="sum", server=hps)
        keys = torch.from_numpy(mixed_keys(ref, rng, 24)).reshape(6, 4)
        want = ref.lookup(keys.numpy()).astype(np.float64).sum(axis=1)
        np.testing.assert_allclose(bag(keys).numpy(), want, rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="offsets must be None"):
            bag(keys, offsets=torch.tensor([0]))
        with pytest.raises(ValueError, match="offsets are required"):
            bag(keys.reshape(-1))
        with pytest.raises(ValueError, match="offsets\\[0\\] must be 0"):
            bag(keys.reshape(-1), offsets=torch.tensor([1, 2]))
        with pytest.raises(ValueError, match="non-decreasing"):
            bag(keys.reshape(-1), offsets=torch.tensor([0, 5, 2]))
        with pytest.raises(ValueError, match="per_sample_weights must have input's shape"):
            bag(keys, per_sample_weights=torch.ones(3))
        with pytest.raises(ValueError, match="mode must be one of"):
            BagLookupLayer("m", 0, mode="max", server=hps)


def test_layer_compiles_with_custom_op(tmp_path, rng):
    """The lookup is an opaque custom op with a fake kernel: a model using it traces and compiles."""
    hps, ref = server(tmp_path, rng)
    with hps:
        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = LookupLayer("m", "t", server=hps)
                self.fc = torch.nn.Linear(ref.dim, 1)

            def forward(self, keys):
                return self.fc(self.emb(keys).sum(dim=1))

        model = Model()
        keys = torch.from_numpy(mixed_keys(ref, rng, 32)).reshape(8, 4)
        eager = model(keys)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(keys), eager)
        exported = torch.export.export(model, (keys,))
        assert any("hps.lookup" in str(n.target) for n in exported.graph.nodes)
        torch.testing.assert_close(exported.module()(keys), eager)


def test_export_torch_model_then_serve(tmp_path):
    from hps_core.offline import export_embeddings, load_tables

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"user": torch.nn.Embedding(300, 8),
                                 "bags": torch.nn.ModuleDict({"item": torch.nn.EmbeddingBag(200, 4)})})
    tables = export_embeddings(model, tmp_path / "export")
    assert set(tables) == {"user", "bags.item"}
    cfg = {"models": {"m": {"tables": [
        {"name": "user", "path": str(tables["user"].path), "dim": 8, "max_keys_per_sample": 10},
        {"name": "item", "path": str(tables["bags.item"].path), "dim": 4, "max_keys_per_sample": 10}]}},
        "tiers": {"host_memory": {"enabled": False},
                  "rocksdb": {"enabled": True, "path": str(tmp_path / "rdb")}}}
    sizes = load_tables(cfg, progress=False)
    assert sizes == {"hps_et.m.user": {"rocksdb": 300}, "hps_et.m.item": {"rocksdb": 200}}
    with HierarchicalParameterServer(cfg, load=False, progress=False) as hps:
        ids = torch.tensor([[0, 5, 299], [7, 7, 1]])
        torch.testing.assert_close(hps.lookup("m", "user", ids), model["user"](ids).detach(), rtol=0, atol=0)
        bag = BagLookupLayer("m", "item", mode="mean", server=hps)
        torch.testing.assert_close(bag(ids % 200), model["bags"]["item"](ids % 200).detach())
    with pytest.raises(ValueError, match="holds no nn.Embedding"):
        export_embeddings(torch.nn.Linear(2, 2), tmp_path / "none")
