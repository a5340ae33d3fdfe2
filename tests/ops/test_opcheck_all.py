"""torch.library.opcheck over EVERY op of the `hps` library registered in this process, on the CPU and on CUDA.

The ops come from the dispatcher, not from a list kept here, so an op added to hps_ops.cpp without a case in CASES
fails test_opcheck by name. Ops that opcheck cannot check meaningfully are in CASES too, with the reason, and are
called once instead. Per-op modules keep their own opchecks over other axes (storages, bag modes, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import pytest
import torch
from torch import Tensor

from hps_core import ops, pipeline_ops
from hps_core.pipeline import TablePipeline
from hps_core.storage import storage_code
from hps_core.testing import KEY_DTYPES

from op_builders import filled, make_bags, resident, rows

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

# torch's schema check compares outputs with a float8 mul, which the CPU lacks: a float8 output keeps the other checks.
NO_SCHEMA_CHECK = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")

ArgsBuilder = Callable[[str, torch.dtype], tuple]  # (device, key dtype) -> the op's arguments on that device


@dataclass(frozen=True)
class Case:
    """One way to call op `hps::<op>`: opcheck on args(device, key_dtype) for each of key_dtypes, or - where
    `why_not` says opcheck cannot check the op - run(device) calls it once instead."""

    op: str
    args: ArgsBuilder | None = None
    key_dtypes: tuple[torch.dtype, ...] = (torch.int64,)
    test_utils: tuple[str, ...] | None = None  # None: every opcheck test
    run: Callable[[str], None] | None = None
    why_not: str = ""

    def __post_init__(self) -> None:
        assert (self.args is None) != (self.run is None), f"{self.op}: give args (opcheck) or run (called once)"
        assert (self.run is None) == (not self.why_not), f"{self.op}: a run case says why_not, an args case does not"


KEYED = tuple(KEY_DTYPES)


# ------------------------------------------------------------------------------------------------ input builders


class _Cache(NamedTuple):
    """A cache holding keys 0..39, a query with hits, misses and duplicates, and new rows for the query."""

    slot_keys: Tensor
    digests: Tensor
    scores: Tensor
    values: Tensor
    clock: Tensor
    keys: Tensor
    new_rows: Tensor

    @property
    def state(self) -> tuple[Tensor, ...]:
        return self.slot_keys, self.digests, self.scores, self.values, self.clock


def _cache(device: str, dtype: torch.dtype) -> _Cache:
    s = filled(device).state()
    q = torch.tensor([1, 2, 1, 1000, -5, 39, 2], dtype=dtype, device=device)
    return _Cache(s["slot_keys"], s["digests"], s["scores"], s["values"], s["clock"], q,
                  rows(q.numel(), 4, seed=1).to(device))


def on_cache(make: Callable[[_Cache], tuple]) -> ArgsBuilder:
    return lambda device, dtype: make(_cache(device, dtype))


def _sketch(device: str) -> Tensor:
    return torch.arange(ops.SKETCH_DEPTH * 16, dtype=torch.int32, device=device) % 5


def _found(c: _Cache) -> Tensor:
    return ops.cache_contains(c.slot_keys, c.digests, c.keys)


def _insert_grouped(c: _Cache) -> tuple:
    # The op's precondition: keys in non-decreasing bucket order (stable, so duplicates keep their order).
    bucket, _ = ops.hash_keys(c.keys, c.slot_keys.numel() // ops.bucket_size())
    order = torch.sort(bucket, stable=True).indices
    counts = torch.zeros(4, dtype=torch.int64, device=c.keys.device)
    return (*c.state, c.keys[order], c.new_rows[order], counts, ops.POLICY_LRU)


def _scatter_rows(c: _Cache) -> tuple:
    _, positions, inverse, counts = pipeline_ops.compact_misses(c.keys, _found(c))
    return torch.zeros_like(c.new_rows), positions, inverse, c.new_rows, counts


def _bag_reduce(weighted: bool, mode: int) -> ArgsBuilder:
    def build(device: str, dtype: torch.dtype) -> tuple:
        values, offsets, weights = make_bags(np.random.default_rng(mode), 6, 8, weighted)
        return values.to(device), offsets.to(device), None if weights is None else weights.to(device), mode

    return build


def _resident_find(device: str, dtype: torch.dtype) -> tuple:
    index, table = resident(device, np.arange(100, dtype=np.int64), 4, np.random.default_rng(2))
    keys = torch.tensor([0, 99, 5, 5, 100, -1], dtype=dtype, device=device)  # hits, a duplicate, misses
    return (*index, table, keys, 0.5)


def _encode_rows(storage: str) -> ArgsBuilder:
    return lambda device, dtype: (rows(8, 8).to(device), storage_code(storage))


def _decode_rows(storage: str, out: torch.dtype | None = None) -> ArgsBuilder:
    return lambda device, dtype: (torch.ops.hps.encode_rows(rows(8, 8).to(device), storage_code(storage)), out)


def _constant(op: str, check: Callable[[int], bool], *args: int) -> Case:
    def run(device: str) -> None:
        value = getattr(torch.ops.hps, op)(*args)
        assert isinstance(value, int) and check(value), f"hps::{op}{args} gave {value!r}"

    return Case(op, run=run, why_not="an int from no tensors: nothing for the fake or autograd checks to see")


def _run_lookup(device: str) -> None:
    pipe = TablePipeline.dynamic_cache(device, dim=4, capacity=64, policy="lru", default_value=0.5, max_keys=0,
                                       tag="opcheck")
    try:
        out = torch.ops.hps.lookup(pipe.handle, torch.tensor([[1, 2, 1]], device=device))
        assert out.shape == (1, 3, 4) and bool((out == 0.5).all())  # all misses: the default vector
    finally:
        pipe.close()


# ------------------------------------------------------------------------------------------------ the case table

CASES: dict[str, Case] = {
    "bucket_size": _constant("bucket_size", lambda v: v > 0),
    "clock_limit": _constant("clock_limit", lambda v: v > 0),
    "sketch_width": _constant("sketch_width", lambda v: v > 0 and v & (v - 1) == 0, 1000),
    "hash_keys": Case("hash_keys", on_cache(lambda c: (c.keys, 2)), KEYED),
    "cache_find_lru": Case("cache_find", on_cache(lambda c: (*c.state, c.keys, ops.POLICY_LRU)), KEYED),
    "cache_find_lfu": Case("cache_find", on_cache(lambda c: (*c.state, c.keys, ops.POLICY_LFU)), KEYED),
    "cache_contains": Case("cache_contains", on_cache(lambda c: (c.slot_keys, c.digests, c.keys)), KEYED),
    "cache_insert_or_assign": Case(
        "cache_insert_or_assign", on_cache(lambda c: (*c.state, c.keys, c.new_rows, ops.POLICY_LRU)), KEYED),
    "cache_insert_or_assign_admission": Case(
        "cache_insert_or_assign",
        on_cache(lambda c: (*c.state, c.keys, c.new_rows, ops.POLICY_LFU, _sketch(c.keys.device))), KEYED),
    "cache_insert_grouped": Case("cache_insert_grouped", on_cache(_insert_grouped), KEYED),
    "sketch_add": Case("sketch_add", on_cache(lambda c: (_sketch(c.keys.device), c.keys, c.keys > 1)), KEYED),
    "cache_assign": Case(
        "cache_assign", on_cache(lambda c: (c.slot_keys, c.digests, c.values, c.keys, c.new_rows)), KEYED),
    "cache_erase": Case("cache_erase", on_cache(lambda c: (c.slot_keys, c.digests, c.scores, c.keys)), KEYED),
    "cache_export_batch": Case("cache_export_batch", on_cache(lambda c: (c.slot_keys, c.digests, c.values, 3, 45))),
    "cache_clear": Case("cache_clear", on_cache(lambda c: (c.digests, c.scores, c.clock))),
    "cache_size": Case("cache_size", on_cache(lambda c: (c.digests,))),
    "cache_decay_lru": Case("cache_decay", on_cache(lambda c: (c.scores, c.clock, ops.POLICY_LRU))),
    "cache_decay_lfu": Case("cache_decay", on_cache(lambda c: (c.scores, c.clock, ops.POLICY_LFU))),
    "compact_misses": Case("compact_misses", on_cache(lambda c: (c.keys, _found(c))), KEYED),
    "scatter_rows": Case("scatter_rows", on_cache(_scatter_rows), KEYED),
    "bag_reduce_mean": Case("bag_reduce", _bag_reduce(weighted=False, mode=1)),
    "bag_reduce_sqrtn_weighted": Case("bag_reduce", _bag_reduce(weighted=True, mode=2)),
    "gather_rows": Case(
        "gather_rows", lambda device, dtype: (rows(6, 3).to(device), torch.tensor([0, 5, -1, 6, 2, 2], device=device))),
    "cache_find_misses": Case(
        "cache_find_misses", on_cache(lambda c: (*c.state, c.keys, ops.POLICY_LRU, -1.5)), KEYED),
    "resident_find": Case("resident_find", _resident_find, KEYED),
    "resident_index_build": Case(
        "resident_index_build", lambda device, dtype: (torch.tensor([5, -7, 5, 1 << 40], device=device),)),
    "encode_rows_int8": Case("encode_rows", _encode_rows("int8")),
    "encode_rows_fp8": Case("encode_rows", _encode_rows("fp8_e4m3"), test_utils=NO_SCHEMA_CHECK),
    "decode_rows_int8": Case("decode_rows", _decode_rows("int8")),
    "decode_rows_fp8_to_bfloat16": Case("decode_rows", _decode_rows("fp8_e4m3", torch.bfloat16),
                                        test_utils=NO_SCHEMA_CHECK),
    "lookup": Case("lookup", run=_run_lookup,
                   why_not="reads and changes a live pipeline's state behind an int handle, which the schema cannot "
                           "show; its fake kernel is traced by the compile tests in tests/engine"),
}


# ------------------------------------------------------------------------------------------------ tests


def registered_ops() -> list[str]:
    """The ops of the hps library in this process (hps_core.ops and pipeline_ops imported above register all)."""
    return sorted(name.removeprefix("hps::") for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("hps::"))


def _params() -> list:
    params = []
    for op in registered_ops():
        ids = [case_id for case_id, case in CASES.items() if case.op == op]
        if not ids:
            params.append(pytest.param(op, None, None, id=f"{op}-NO-CASE"))
        for case_id in ids:
            params += [pytest.param(op, case_id, dtype, id=f"{case_id}-{str(dtype).removeprefix('torch.')}")
                       for dtype in CASES[case_id].key_dtypes]
    return params


def check(op: str, case_id: str | None, dtype: torch.dtype | None, device: str) -> None:
    if case_id is None:
        pytest.fail(f"hps::{op} is registered but has no case in CASES (tests/ops/test_opcheck_all.py): add one "
                    f"with example inputs, or one with run= and why_not= if opcheck cannot check it")
    case = CASES[case_id]
    if case.run is not None:
        case.run(device)
        return
    kwargs = {} if case.test_utils is None else {"test_utils": case.test_utils}
    torch.library.opcheck(getattr(torch.ops.hps, op).default, case.args(device, dtype), **kwargs)


def test_every_case_names_a_registered_op():
    stale = sorted({case.op for case in CASES.values()} - set(registered_ops()))
    assert not stale, f"CASES holds ops that are not registered: {stale}"


@pytest.mark.parametrize("op, case_id, dtype", _params())
def test_opcheck(op, case_id, dtype):
    check(op, case_id, dtype, "cpu")


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("op, case_id, dtype", _params())
def test_opcheck_cuda(op, case_id, dtype):
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"hps::{op}", "CUDA"):
        pytest.skip(f"hps::{op} has no CUDA kernel")
    check(op, case_id, dtype, "cuda")
