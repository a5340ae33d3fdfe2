"""Where a DLRM forward's time goes on a GPU (a diagnostic for the dlrm suite bench, not a recorded benchmark):
the MLP part alone (fp32 / tf32 / bf16, batch 131072; bf16 also with bf16 embeddings), its bottom MLP + interaction
alone, and the engine's all-hit lookup alone at batch 32 and 131072 (x 26 slots), float32 and bfloat16 output.

    python -m benchmarks.dlrm_breakdown
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch

from benchmarks.bench_gpu import _engine
from benchmarks.common import cuda_time_ms
from benchmarks.suite.dlrm_model import DLRM

SLOTS, DIM = 26, 128


def main() -> int:
    model = DLRM(13, DIM, SLOTS, [512, 256, 128], [1024, 1024, 512, 256, 1]).cuda().eval()
    for batch in (32, 131072):
        dense = torch.randn(batch, 13, device="cuda")
        emb = torch.randn(batch, SLOTS, DIM, device="cuda")
        for name in ("fp32", "tf32", "bf16"):
            torch.backends.cuda.matmul.allow_tf32 = name == "tf32"

            def mlp():
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=name == "bf16"):
                    return model(dense, emb)
            print(f"batch {batch} MLP {name}: {cuda_time_ms(mlp, repeat=20)['median_ms']:.3f} ms")

        def bottom_interaction():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                return model.interaction(model.bottom(dense), emb)
        print(f"batch {batch} bottom MLP + interaction bf16: {cuda_time_ms(bottom_interaction, repeat=20)['median_ms']:.3f} ms")
        emb16 = emb.bfloat16()  # what a lookup with dtype=torch.bfloat16 hands the model

        def mlp_bf16_emb():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                return model(dense, emb16)

        def bottom_interaction_bf16_emb():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                return model.interaction(model.bottom(dense), emb16)
        print(f"batch {batch} MLP bf16, bf16 embeddings: {cuda_time_ms(mlp_bf16_emb, repeat=20)['median_ms']:.3f} ms")
        print(f"batch {batch} bottom MLP + interaction bf16, bf16 embeddings: "
              f"{cuda_time_ms(bottom_interaction_bf16_emb, repeat=20)['median_ms']:.3f} ms")
    with tempfile.TemporaryDirectory() as tmp:
        # 1 M rows, a cache of all of them; queries from 400 k of the keys, so every one is resident (all hits)
        hps, keys, _ = _engine(tmp, 1_000_000, DIM, 1.0, 131072 * SLOTS)
        rng = np.random.default_rng(0)
        for batch in (32, 131072):
            q = torch.from_numpy(keys[rng.integers(0, 400_000, batch * SLOTS)]).cuda()
            for _ in range(3):
                hps.lookup("m", "t", q)
            before = hps.stats()["models"]["m"]["t"]["cuda:0"]
            t = cuda_time_ms(lambda: hps.lookup("m", "t", q), repeat=50)
            after = hps.stats()["models"]["m"]["t"]["cuda:0"]
            hits = (after["cache_hits"] - before["cache_hits"]) / max(after["keys"] - before["keys"], 1)
            print(f"batch {batch} engine lookup ({batch * SLOTS} keys): {t['median_ms']:.3f} ms, hit rate {hits:.4f}")
            t16 = cuda_time_ms(lambda: hps.lookup("m", "t", q, dtype=torch.bfloat16), repeat=50)
            print(f"batch {batch} engine lookup, bf16 output: {t16['median_ms']:.3f} ms")
        hps.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
