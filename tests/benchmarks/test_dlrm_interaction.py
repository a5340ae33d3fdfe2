"""DLRM's dot interaction: the fused Triton kernel (GPU) against a float64 reference; the CPU fallback exactly."""

from __future__ import annotations

import pytest
import torch

from benchmarks.suite import dlrm_interaction
from benchmarks.suite.dlrm_model import DLRM


def reference(d: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """float64, straight from the definition: [d, d·e_j, e_i·e_j for i < j]."""
    d, emb = d.double().cpu(), emb.double().cpu()
    slots = emb.shape[1]
    cols = [d] + [(emb[:, j] * d).sum(1, keepdim=True) for j in range(slots)]
    cols += [(emb[:, i] * emb[:, j]).sum(1, keepdim=True) for i in range(slots) for j in range(i + 1, slots)]
    return torch.cat(cols, dim=1)


def test_cpu_fallback_is_the_definition():
    torch.manual_seed(0)
    model = DLRM(13, 16, 5, [32, 16], [32, 1])
    d, emb = torch.randn(7, 16), torch.randn(7, 5, 16)
    got = model.interaction(d, emb)
    assert got.shape == (7, 16 + 5 + 10)
    torch.testing.assert_close(got.double(), reference(d, emb), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or dlrm_interaction.triton is None,
                    reason="needs a GPU and Triton")
@pytest.mark.parametrize("batch,slots,dim", [(1, 26, 128), (1000, 26, 128), (33, 5, 16), (7, 31, 64)])
@pytest.mark.parametrize("dtype,pad_to", [(torch.float32, 1), (torch.float32, 8), (torch.bfloat16, 8),
                                          (torch.float16, 1)])
def test_fused_kernel_matches_the_definition(batch, slots, dim, dtype, pad_to):
    torch.manual_seed(batch)
    d = torch.randn(batch, dim, device="cuda").to(dtype)
    emb = torch.randn(batch, slots, dim, device="cuda").to(dtype)
    got = dlrm_interaction.interaction_fused(d, emb, pad_to)
    want = reference(d, emb)  # from the same (rounded) inputs
    used = want.shape[1]
    assert got.dtype == dtype and got.shape == (batch, -(-used // pad_to) * pad_to)
    assert not got[:, used:].any()  # the padding columns are zero
    if dtype == torch.float32:  # TF32 products in tl.dot: ~2^-11 relative error per product, summed over dim terms
        torch.testing.assert_close(got[:, :used].double().cpu(), want, rtol=2e-3, atol=2e-3 * dim)
    else:  # exact products, float32 sums, the result rounded to 8 (bf16) / 11 (fp16) bits
        torch.testing.assert_close(got[:, :used].double().cpu(), want, rtol=8e-3, atol=0.1)
    assert torch.equal(got[:, :dim].cpu(), d.cpu())  # the dense vector is copied, not computed


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("lowp", [None, torch.bfloat16])
def test_fused_mlp_equals_the_plain_layers(lowp):
    """The MLPs' Linear + ReLU pairs as one GEMM with a bias+ReLU epilogue: the same function as nn.Sequential."""
    torch.manual_seed(1)
    model = DLRM(13, 128, 26, [512, 256, 128], [1024, 1024, 512, 256, 1]).cuda().eval()
    x = torch.randn(4096, 13, device="cuda")
    want = model.bottom.double()(x.double())
    model.bottom.float()
    with torch.no_grad(), torch.autocast("cuda", dtype=lowp or torch.float32, enabled=lowp is not None):
        got = model._mlp(model.bottom, x)
    rel = ((got.double() - want).norm() / want.norm()).item()
    assert rel < (2e-2 if lowp is not None else 1e-3), rel
    assert got.dtype == (lowp or torch.float32)
