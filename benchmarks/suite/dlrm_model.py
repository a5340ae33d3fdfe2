"""The DLRM of HPS's DLRM benchmark, in torch: dense features -> bottom MLP; categorical slots -> embeddings
(supplied from outside: the engine, or a native gather); pairwise dot interaction of the 1 + slots vectors;
[dense vector, interactions] -> top MLP -> sigmoid.

Shapes (HPS's benchmark): 13 dense features, bottom MLP 512-256-128, 26 slots x dim 128, 27 choose 2 = 351
interactions, top MLP input 128 + 351 = 479, top MLP 1024-1024-512-256-1.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.suite import dlrm_interaction


def _mlp(sizes: list[int], last_relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or last_relu:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    """DLRM forward with externally supplied embeddings.

    Args:
        dense_features: dense inputs per sample (13). dim: embedding width, also the bottom MLP's output (128).
        slots: categorical slots per sample (26). bottom_mlp / top_mlp: hidden sizes; top ends in 1.

    forward(dense (B, dense_features) float32, emb (B, slots, dim) float32) -> (B, 1) click probability, on the
    inputs' device.

    Example:
        >>> m = DLRM(13, 128, 26, [512, 256, 128], [1024, 1024, 512, 256, 1])
        >>> m(torch.randn(4, 13), torch.randn(4, 26, 128)).shape
        torch.Size([4, 1])
    """

    def __init__(self, dense_features: int, dim: int, slots: int, bottom_mlp: list[int], top_mlp: list[int]) -> None:
        super().__init__()
        if bottom_mlp[-1] != dim:
            raise ValueError(f"bottom_mlp must end in dim {dim}, got {bottom_mlp}")
        self.slots, self.dim = slots, dim
        self.bottom = _mlp([dense_features, *bottom_mlp], last_relu=True)
        pairs = (slots + 1) * slots // 2
        self.top = _mlp([dim + pairs, *top_mlp], last_relu=False)
        # The interaction is the strict upper triangle of the Gram matrix of [dense vector; slot vectors]. Neither
        # formulation materialises the (B, 27, dim) concatenation (a full extra pass over 1.7 GB at batch 131072).
        i, j = torch.triu_indices(slots, slots, offset=1)
        self.register_buffer("pair_index", i * slots + j, persistent=False)  # into the flattened (S, S) Gram

    def interaction(self, d: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """(B, dim), (B, S, dim) -> (B, dim + (S + 1) S / 2): dense vector, its dots with the slots, slot pairs.

        On a GPU: one fused Triton kernel (dlrm_interaction.py) in the embeddings' dtype (float32 embeddings take
        the bottom MLP's output in float32, whatever autocast made of it; bfloat16 ones, from a lookup that returns
        bfloat16, take it in bfloat16), its columns padded with zeros to a multiple of 8 (the top MLP's first layer
        reads them through zero weight columns); elsewhere the torch formulation, unpadded."""
        if emb.is_cuda:
            d = d.to(emb.dtype)
        return dlrm_interaction.interaction(d, emb, self.pair_index, pad_to=8)

    def forward(self, dense: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        d = self._mlp(self.bottom, dense)
        return torch.sigmoid(self._mlp(self.top, self.interaction(d, emb)).float())

    def _mlp(self, seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        """seq(x), with each Linear + ReLU pair on a GPU as one GEMM whose epilogue adds the bias and applies the
        ReLU (cuBLASLt, torch._addmm_activation): the activations are written once instead of three times (GEMM,
        bias, ReLU). Under CUDA autocast the GEMMs run in the autocast dtype with weights cast once and kept."""
        if not x.is_cuda:
            return seq(x)
        lowp = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        mods = list(seq)
        with torch.autocast("cuda", enabled=False):
            i = 0
            while i < len(mods):
                lin = mods[i]
                relu = i + 1 < len(mods) and isinstance(mods[i + 1], nn.ReLU)
                w, b = self._weights(lin, lowp, x.shape[1])
                x = x.to(w.dtype)
                if relu:
                    x = torch._addmm_activation(b, x, w.t())
                    i += 2
                else:
                    x = F.linear(x, w, b)
                    i += 1
        return x

    def _weights(self, lin: nn.Linear, dtype: torch.dtype | None, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's weight and bias in `dtype` (None: as they are) for inputs `width` wide (zero weight columns
        past in_features: a padded interaction), made once per weight version."""
        dtype = dtype or lin.weight.dtype
        if lin.weight.dtype == dtype and width == lin.in_features:
            return lin.weight, lin.bias
        cache = self.__dict__.setdefault("_cast_cache", {})
        key = (id(lin), dtype, width)
        version = (lin.weight._version, lin.bias._version, lin.weight.device)
        hit = cache.get(key)
        if hit is None or hit[0] != version:
            w = lin.weight.detach().to(dtype)
            if width > lin.in_features:
                w = torch.nn.functional.pad(w, (0, width - lin.in_features))
            hit = cache[key] = (version, w.contiguous(), lin.bias.detach().to(dtype))
        return hit[1], hit[2]

    def numpy_weights(self) -> list[tuple[object, object]]:
        """[(W (in, out), b (out,)) float32 numpy] of bottom then top layers, for the TF twin."""
        return [(m.weight.detach().float().cpu().numpy().T.copy(), m.bias.detach().float().cpu().numpy().copy())
                for m in (*self.bottom, *self.top) if isinstance(m, nn.Linear)]
