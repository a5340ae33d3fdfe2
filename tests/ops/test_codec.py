"""The row codecs (hps::encode_rows / hps::decode_rows, hps_core.storage): each storage's error against the float32
row stays inside its stated bound, the element formats agree with torch's own conversions, the stored layout is what
row_codec.h says, bad arguments raise naming the field, and CPU and CUDA give the same bits."""

from __future__ import annotations

import pytest
import torch

from hps_core import storage as st

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
SCALED = ("int8", "fp8_e4m3")


def rows_over_magnitudes(n: int = 600, dim: int = 64, seed: int = 0) -> torch.Tensor:
    """Rows whose scales span 1e-4 .. 1e4, with constant, one-hot and negative rows mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g) * torch.logspace(-4, 4, n).unsqueeze(1)
    x[0] = 0.0
    x[1] = 3.25
    x[2] = 0.0
    x[2, 5] = -7.0
    x[3] = -torch.rand(dim, generator=g)
    return x


@pytest.mark.parametrize("storage", st.STORAGE_NAMES)
def test_round_trip_within_stated_bound(storage):
    x = rows_over_magnitudes()
    stored = st.encode_rows(x, storage)
    assert stored.dtype == st.STORAGE_DTYPES[storage]
    assert stored.shape == (x.shape[0], st.stored_width(storage, x.shape[1]))
    back = st.decode_rows(stored)
    assert back.dtype == torch.float32 and back.shape == x.shape
    err = (back.double() - x.double()).abs()
    bound = st.error_bound(x, storage)
    worst = int((err - bound).flatten().argmax())
    assert bool((err <= bound).all()), (
        f"{storage}: element {divmod(worst, x.shape[1])} off by {float(err.flatten()[worst])} "
        f"> bound {float(bound.flatten()[worst])}")
    if storage != "float32":
        # The bound is not loose: the codec uses most of it somewhere.
        assert float((err / bound.clamp_min(1e-30)).max()) > 0.4


def test_float32_is_exact_and_half_formats_match_torch():
    x = rows_over_magnitudes()
    assert torch.equal(st.encode_rows(x, "float32"), x)
    edge = torch.tensor([[2.0**-24 * 1.5, 2.0**-25, 65519.0, 65520.0, -1e-8, 6e-5, 1e-7, -0.0]])
    for name, ref in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        for t in (x, edge):
            assert torch.equal(st.encode_rows(t, name), t.to(ref)), name


def test_fp8_codes_match_torch_and_decode_every_code():
    x = rows_over_magnitudes(dim=16)
    stored = st.encode_rows(x, "fp8_e4m3")
    scale = x.abs().amax(dim=1, keepdim=True) / 448.0
    ref = torch.where(scale > 0, x / scale, torch.zeros_like(x)).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(stored[:, :16].view(torch.uint8), ref.view(torch.uint8))
    assert torch.equal(stored[:, 16:].contiguous().view(torch.float32).flatten(), scale.flatten())
    # Every one of the 256 codes decodes as torch reads it (scale 1; NaN codes compared as NaN).
    row = torch.zeros(1, 256 + 4, dtype=torch.uint8)
    row[0, :256] = torch.arange(256, dtype=torch.uint8)
    row[0, 256:] = torch.tensor([1.0]).view(torch.uint8)
    got = st.decode_rows(row.view(torch.float8_e4m3fn))[0]
    want = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))


def test_int8_layout_keeps_min_exact_and_uses_the_full_range():
    x = rows_over_magnitudes(dim=32)
    stored = st.encode_rows(x, "int8")
    tail = stored[:, 32:].contiguous().view(torch.float32)
    lo, hi = x.amin(dim=1), x.amax(dim=1)
    assert torch.equal(tail[:, 1], lo)  # bias = the row's minimum
    assert torch.equal(tail[:, 0], (hi - lo) / 255.0)  # scale, one correctly rounded division
    q = stored[:, :32].to(torch.int32) + 128
    varying = hi > lo
    assert bool((q[varying].amin(dim=1) == 0).all()) and bool((q[varying].amax(dim=1) == 255).all())
    back = st.decode_rows(stored)
    assert torch.equal(back.amin(dim=1), lo)  # q = 0 decodes to the bias exactly
    assert torch.equal(back[1], x[1])  # a constant row comes back exactly (scale 0)


@pytest.mark.parametrize("storage", st.STORAGE_NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_to_half_formats_rounds_the_float32_decode(storage, dtype):
    x = rows_over_magnitudes(dim=8)
    stored = st.encode_rows(x, storage)
    assert torch.equal(st.decode_rows(stored, dtype), st.decode_rows(stored).to(dtype))


def test_empty_and_zero_rows():
    for name in st.STORAGE_NAMES:
        e = st.encode_rows(torch.zeros(0, 8), name)
        assert e.shape == (0, st.stored_width(name, 8))
        assert st.decode_rows(e).shape == (0, 8)
        assert torch.equal(st.decode_rows(st.encode_rows(torch.zeros(3, 8), name)), torch.zeros(3, 8))


def test_bad_arguments_raise_naming_the_field():
    with pytest.raises(ValueError, match="storage must be 0"):
        torch.ops.hps.encode_rows(torch.zeros(2, 4), 9)
    with pytest.raises(TypeError, match="rows must have dtype Float"):
        torch.ops.hps.encode_rows(torch.zeros(2, 4, dtype=torch.float64), 1)
    with pytest.raises(ValueError, match="dim must be a multiple of 4 for int8"):
        st.encode_rows(torch.zeros(2, 6), "int8")
    with pytest.raises(ValueError, match="dim must be a multiple of 4 for fp8_e4m3"):
        st.encode_rows(torch.zeros(2, 6), "fp8")
    with pytest.raises(TypeError, match="stored must hold stored rows"):
        st.decode_rows(torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="tail bytes"):
        st.decode_rows(torch.zeros(2, 3, dtype=torch.float8_e4m3fn))
    with pytest.raises(TypeError, match="dtype: a lookup returns"):
        st.decode_rows(torch.zeros(2, 4), torch.int64)
    with pytest.raises(ValueError, match="storage must be one of"):
        st.storage_name("int4")
    assert st.storage_name("BF16") == "bfloat16" and st.storage_name(torch.float8_e4m3fn) == "fp8_e4m3"


def test_check_encodable_names_row_and_value():
    x = torch.zeros(3, 8)
    x[2, 5] = float("inf")
    with pytest.raises(ValueError, match=r"row 2 holds inf at column 5; int8"):
        st.check_encodable(x, "int8")
    st.check_encodable(x, "bfloat16")  # bf16 keeps inf as inf
    y = torch.zeros(2, 4)
    y[1, 0] = 1e5
    with pytest.raises(ValueError, match="beyond float16's range"):
        st.check_encodable(y, "float16")


@pytest.mark.parametrize("storage", [1, 3, 4])
def test_opcheck(storage):
    rows = rows_over_magnitudes(n=8, dim=8)
    # torch cannot compare float8 outputs in its schema check (no float8 mul on the CPU): the others still run.
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic") if storage == 4 else None
    kw = {"test_utils": utils} if utils else {}
    torch.library.opcheck(torch.ops.hps.encode_rows.default, (rows, storage), **kw)
    torch.library.opcheck(torch.ops.hps.decode_rows.default, (torch.ops.hps.encode_rows(rows, storage), None), **kw)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("storage", st.STORAGE_NAMES)
def test_cuda_bits_equal_cpu(storage):
    x = rows_over_magnitudes(n=3000, dim=128)
    cpu = st.encode_rows(x, storage)
    gpu = st.encode_rows(x.cuda(), storage)
    assert torch.equal(gpu.cpu().view(torch.uint8), cpu.view(torch.uint8))
    for dtype in (None, torch.bfloat16, torch.float16):
        assert torch.equal(st.decode_rows(cpu.cuda(), dtype).cpu(), st.decode_rows(cpu, dtype))
