"""DLRM's dot interaction as one Triton kernel (GPU only): [d, d·e_j (j < S), e_i·e_j (i < j < S)] per sample.

Why: with torch ops the interaction is two batched GEMMs on S x dim matrices (tiny, so cuBLAS runs them far below
bandwidth) plus a dtype cast and an index_select: 3.7 ms of a 5.9 ms bf16 MLP at batch 131072 on the H200
(`python -m benchmarks.dlrm_breakdown`). One pass that reads each sample's [d; e_1..e_S] once and writes its
dim + S + S(S-1)/2 outputs is bandwidth-bound: ~1.7 GB at that batch.

Each program takes one sample: the (S + 1) x dim rows padded to a power of two, one `tl.dot` with its own transpose
(fp32 inputs: TF32 products; bf16 / fp16 inputs - a lookup that returns bf16 - their tensor-core products, float32
sums), and the wanted entries of the Gram matrix stored straight to their output columns, in the inputs' dtype.
The output row can be padded with zero columns (479 -> 480 for HPS's DLRM): the top MLP's GEMM then reads rows
that start on 16-byte boundaries, which cuBLAS needs for its fast bf16 kernels.
`interaction(d, emb)` falls back to the torch formulation when Triton or a GPU is missing; the two agree to TF32
rounding (checked in tests/benchmarks with Triton's interpreter).
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; a CPU-only install has none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def interaction_torch(d: torch.Tensor, emb: torch.Tensor, pair_index: torch.Tensor) -> torch.Tensor:
    """(B, dim), (B, S, dim) -> (B, dim + S + S(S-1)/2): the reference formulation (any device)."""
    gram = torch.bmm(emb, emb.transpose(1, 2)).flatten(1)  # (B, S*S)
    with_dense = torch.bmm(emb, d.unsqueeze(2)).squeeze(2)  # (B, S)
    return torch.cat([d, with_dense, gram.index_select(1, pair_index)], dim=1)


if triton is not None:

    @triton.jit
    def _interaction_kernel(d_ptr, emb_ptr, out_ptr, S: tl.constexpr, DIM: tl.constexpr, ROWS: tl.constexpr,
                            OUT: tl.constexpr, USED: tl.constexpr, PAD: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        r = tl.arange(0, ROWS)
        c = tl.arange(0, DIM)
        # X row 0 = d, rows 1..S = the sample's embeddings, the rest zero padding; all in the embeddings' dtype
        # (float32: TF32 products; bfloat16 / float16: their tensor-core products; float32 sums either way).
        d_row = tl.load(d_ptr + b * DIM + c).to(emb_ptr.dtype.element_ty)
        e_rows = tl.load(emb_ptr + b * S * DIM + (r[:, None] - 1) * DIM + c[None, :],
                         mask=(r[:, None] >= 1) & (r[:, None] <= S), other=0.0)
        x = tl.where(r[:, None] == 0, d_row[None, :], e_rows)
        g = tl.dot(x, tl.trans(x))  # (ROWS, ROWS) Gram matrix of [d; e_1..e_S]
        out_row = out_ptr + b * OUT
        tl.store(out_row + c, d_row.to(out_ptr.dtype.element_ty))
        # Output column of Gram entry (i, j), i < j: row 0 (d with e_j) -> dim + j - 1; embeddings i, j (1-based)
        # -> dim + S + index of (i-1, j-1) in the row-major strict upper triangle of S x S.
        i = r[:, None]
        j = r[None, :]
        tri = (i - 1) * S - ((i - 1) * i) // 2 + (j - i - 1)
        col = tl.where(i == 0, DIM + j - 1, DIM + S + tri)
        keep = (i < j) & (j <= S)
        tl.store(out_row + col, g.to(out_ptr.dtype.element_ty), mask=keep)
        if OUT > USED:  # the padding columns (a row stride the GEMM after it reads fast) are zero
            p = tl.arange(0, PAD)
            tl.store(out_row + USED + p, tl.zeros((PAD,), dtype=out_ptr.dtype.element_ty), mask=p < OUT - USED)


def interaction(d: torch.Tensor, emb: torch.Tensor, pair_index: torch.Tensor, pad_to: int = 1) -> torch.Tensor:
    """The fused kernel for CUDA float32 / bfloat16 / float16 embeddings with a power-of-two dim >= 16 (its
    output in the embeddings' dtype, columns padded with zeros to a multiple of `pad_to`); the torch formulation
    otherwise (no padding)."""
    batch, slots, dim = emb.shape
    fused = (triton is not None and emb.is_cuda and d.is_cuda and emb.dtype in FUSED_DTYPES
             and d.dtype in FUSED_DTYPES and dim >= 16 and dim & (dim - 1) == 0)
    if not fused:
        return interaction_torch(d, emb, pair_index)
    return interaction_fused(d, emb, pad_to)


FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interaction_fused(d: torch.Tensor, emb: torch.Tensor, pad_to: int = 1) -> torch.Tensor:
    """The Triton kernel (also runs under TRITON_INTERPRET=1 on CPU tensors, for tests): (B, dim + S + S(S-1)/2)
    in emb's dtype, then zero columns up to a multiple of pad_to."""
    batch, slots, dim = emb.shape
    rows = max(16, triton.next_power_of_2(slots + 1))
    used = dim + slots + slots * (slots - 1) // 2
    out_cols = -(-used // pad_to) * pad_to
    d, emb = d.contiguous(), emb.contiguous()
    out = torch.empty((batch, out_cols), dtype=emb.dtype, device=emb.device)
    if batch:
        _interaction_kernel[(batch,)](d, emb, out, S=slots, DIM=dim, ROWS=rows, OUT=out_cols, USED=used,
                                      PAD=max(1, triton.next_power_of_2(out_cols - used)))
    return out
