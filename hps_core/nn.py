"""torch front end: `LookupLayer` (like nn.Embedding) and `BagLookupLayer` (like nn.EmbeddingBag) over the engine.

LookupLayer calls the table's native lookup pipeline directly, through the op `torch.ops.hps.lookup(handle, keys)`
(hps_core.pipeline): no Python between the module call and the native call beyond one dict lookup. The op's fake
kernel knows the output shape, so models using the layers can be traced by torch.compile / torch.export (the lookup
stays one opaque call).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from hps_core import pipeline_ops
from hps_core.engine import LOOKUP_DTYPES, HierarchicalParameterServer, default_server

_lookup = torch.ops.hps.lookup.default


@torch.compiler.disable
def _lookup_uncached(server: HierarchicalParameterServer, model: str, table: str, keys: torch.Tensor,
                     dtype: Optional[torch.dtype]) -> torch.Tensor:
    return server.lookup(model, table, keys, dtype)


_MODES = {"sum": 0, "mean": 1, "sqrtn": 2}


class LookupLayer(nn.Module):
    """Embedding lookup of one (model, table) of a deployed server, like `nn.Embedding` but keyed by any int.

    Args:
        model: model name in the deployment config.
        table: table id (int) or name (str).
        server: the server to use; default: the one made by `hps_core.init(config)`.
        dtype: what forward returns: torch.float32 (default), or torch.bfloat16 / torch.float16 for a model that
            runs in them - the lookup writes its rows rounded (to nearest even), no conversion pass after it.

    forward(keys): int32/int64 tensor of any shape (CPU or a deployed CUDA device) ->
        `keys.shape + (dim,)` in `dtype` on the same device. Not trainable.

    Example:
        >>> hps_core.init("my_hps_config.json")
        >>> layer = hps_core.LookupLayer("demo", "user")
        >>> layer(torch.tensor([[1, 2, 3]])).shape
        torch.Size([1, 3, 16])
    """

    def __init__(self, model: str, table: int | str, server: Optional[HierarchicalParameterServer] = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if dtype not in LOOKUP_DTYPES:
            raise TypeError(f"dtype must be one of {[str(d) for d in LOOKUP_DTYPES]}, found {dtype}")
        self.dtype = dtype
        self.server = server if server is not None else default_server()
        rt = self.server.table(model, table)
        self.model, self.table, self.dim = rt.model, rt.name, rt.dim
        self._cached = rt.cache_config.enabled
        self._handles: dict[torch.device, int] = {}  # the table's pipeline on each device keys came from

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        handle = self._handles.get(keys.device)
        if handle is None:
            if not self._cached or not isinstance(keys, torch.Tensor):
                return _lookup_uncached(self.server, self.model, self.table, keys, self.dtype)
            handle = self._handles[keys.device] = self.server.pipeline(self.model, self.table, keys.device).handle
        return _lookup(handle, keys, self.dtype)

    def extra_repr(self) -> str:
        extra = "" if self.dtype == torch.float32 else f", dtype={self.dtype}"
        return f"model={self.model!r}, table={self.table!r}, dim={self.dim}{extra}"


class BagLookupLayer(nn.Module):
    """Pooled lookup, like `nn.EmbeddingBag`: sum / mean / sqrtn of each bag's rows, optional per-key weights.

    forward(input, offsets=None, per_sample_weights=None):
      * input 2-D (B, L): B bags of L keys each (offsets must be None);
      * input 1-D (n,) with offsets (B,) int64: bag b holds input[offsets[b]:offsets[b+1]] (the last runs to n),
        offsets[0] == 0 and non-decreasing, as in nn.EmbeddingBag;
      * per_sample_weights: float32 of input's shape, or None (all ones).
    Returns float32 (B, dim); an empty bag gives zeros. mean = sum(w·v)/sum(w); sqrtn = sum(w·v)/sqrt(sum(w²))
    (TensorFlow's embedding_lookup_sparse combiners).

    Example:
        >>> bag = hps_core.BagLookupLayer("demo", "user", mode="sqrtn")
        >>> bag(torch.tensor([1, 2, 3, 4]), offsets=torch.tensor([0, 3])).shape
        torch.Size([2, 16])
    """

    def __init__(self, model: str, table: int | str, mode: str = "mean",
                 server: Optional[HierarchicalParameterServer] = None) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {sorted(_MODES)}, found {mode!r}")
        self.mode = mode
        self.lookup = LookupLayer(model, table, server)

    def forward(self, input: torch.Tensor, offsets: Optional[torch.Tensor] = None,
                per_sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        return pooled_lookup(self.lookup, input, offsets, per_sample_weights, self.mode)

    def extra_repr(self) -> str:
        return f"{self.lookup.extra_repr()}, mode={self.mode!r}"


def pooled_lookup(lookup: Callable[[torch.Tensor], torch.Tensor], input: torch.Tensor,
                  offsets: Optional[torch.Tensor] = None, per_sample_weights: Optional[torch.Tensor] = None,
                  mode: str = "mean") -> torch.Tensor:
    """BagLookupLayer's forward over any `lookup(keys) -> rows` (a layer, or a server's lookup of one table):
    the input / offsets / weights checks, then one lookup of every key and the native bag reduction."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {sorted(_MODES)}, found {mode!r}")
    if input.dim() == 2:
        if offsets is not None:
            raise ValueError("offsets must be None when input is 2-D (B, L)")
        bags, length = input.shape
        flat = input.reshape(-1)
        full_offsets = torch.arange(0, bags * length + 1, max(length, 1), device=input.device)
        if length == 0:
            full_offsets = torch.zeros(bags + 1, dtype=torch.int64, device=input.device)
    elif input.dim() == 1:
        if offsets is None:
            raise ValueError("offsets are required when input is 1-D")
        if offsets.dim() != 1 or offsets.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"offsets must be a 1-D int tensor, found {offsets.dtype} of shape {tuple(offsets.shape)}")
        flat = input
        off = offsets.to(device=input.device, dtype=torch.int64)
        if off.numel() and int(off[0]) != 0:
            raise ValueError(f"offsets[0] must be 0, found {int(off[0])}")
        if off.numel() > 1 and bool((off[1:] < off[:-1]).any()):
            raise ValueError("offsets must be non-decreasing")
        if off.numel() and int(off[-1]) > flat.numel():
            raise ValueError(f"offsets[-1] = {int(off[-1])} exceeds the {flat.numel()} keys of input")
        full_offsets = torch.cat([off, off.new_tensor([flat.numel()])])
    else:
        raise ValueError(f"input must be 1-D (with offsets) or 2-D (B, L), found shape {tuple(input.shape)}")
    weights = None
    if per_sample_weights is not None:
        if per_sample_weights.shape != input.shape:
            raise ValueError(
                f"per_sample_weights must have input's shape {tuple(input.shape)}, "
                f"found {tuple(per_sample_weights.shape)}"
            )
        if per_sample_weights.dtype != torch.float32:
            raise TypeError(f"per_sample_weights must be float32, found {per_sample_weights.dtype}")
        weights = per_sample_weights.reshape(-1).contiguous()
    rows = lookup(flat)
    return pipeline_ops.bag_reduce(rows, full_offsets.contiguous(), weights, _MODES[mode])
