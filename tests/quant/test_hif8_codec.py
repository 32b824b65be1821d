"""HiF8 codec vs the specification: code table, golden vectors, exhaustive FP16/BF16 sweeps, specials."""

import math

import pytest
import torch

from policies.quant.hif8 import hif8_decode, hif8_encode, hif8_round, hif8_value_table

INF, NAN = math.inf, math.nan

# The reference's value table of the positive codes 0x00-0x7F, row by row (hi nibble 0..7).
_POSITIVE_TABLE = [
    [0, 2**-22, 2**-21, 2**-20, 2**-19, 2**-18, 2**-17, 2**-16, 1, 1.125, 1.25, 1.375, 1.5, 1.625, 1.75, 1.875],
    [2, 2.25, 2.5, 2.75, 3, 3.25, 3.5, 3.75, 0.5, 0.5625, 0.625, 0.6875, 0.75, 0.8125, 0.875, 0.9375],
    [4, 4.5, 5, 5.5, 6, 6.5, 7, 7.5, 8, 9, 10, 11, 12, 13, 14, 15],
    [0.25, 0.28125, 0.3125, 0.34375, 0.375, 0.40625, 0.4375, 0.46875,
     0.125, 0.140625, 0.15625, 0.171875, 0.1875, 0.203125, 0.21875, 0.234375],
    [16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224],
    [0.0625, 0.078125, 0.09375, 0.109375, 0.03125, 0.0390625, 0.046875, 0.0546875,
     0.015625, 0.01953125, 0.0234375, 0.02734375, 0.0078125, 0.009765625, 0.01171875, 0.013671875],
    [256, 384, 512, 768, 1024, 1536, 2**11, 1.5 * 2**11, 2**12, 1.5 * 2**12, 2**13, 1.5 * 2**13,
     2**14, 1.5 * 2**14, 2**15, INF],
    [2**-8, 1.5 * 2**-8, 2**-9, 1.5 * 2**-9, 2**-10, 1.5 * 2**-10, 2**-11, 1.5 * 2**-11,
     2**-12, 1.5 * 2**-12, 2**-13, 1.5 * 2**-13, 2**-14, 1.5 * 2**-14, 2**-15, 1.5 * 2**-15],
]

# (FP32 bits, TA code) from the reference's encode table (non-saturating).
_TA_FP32_VECTORS = [
    (0x00000000, 0x00), (0x80000000, 0x00), (0x3F800000, 0x08), (0xBF800000, 0x88), (0x3F880000, 0x09),
    (0xBF880000, 0x89), (0x3F83D70A, 0x08), (0x3FF80000, 0x10), (0x41700000, 0x2F), (0x4177D70A, 0x2F),
    (0x41780000, 0x40), (0x418F3333, 0x40), (0x41900000, 0x41), (0xC1900000, 0xC1), (0x41B00000, 0x42),
    (0x42C80000, 0x4A), (0xC0533333, 0x95), (0x3DCCCCCD, 0x52), (0x3F400000, 0x1C), (0x43600000, 0x4F),
    (0x447A0000, 0x64), (0x47000000, 0x6E), (0x470CA000, 0x6E), (0x471FFFFF, 0x6E), (0x47200000, 0x6F),
    (0x47400000, 0x6F), (0x477FE000, 0x6F), (0x38000000, 0x7E), (0x38200000, 0x7F), (0x37C00000, 0x7E),
    (0x37800000, 0x07), (0x35B33333, 0x03), (0x35C00000, 0x04), (0x34800000, 0x01), (0x34000000, 0x01),
    (0x33FFFFFF, 0x00), (0x3089705F, 0x00), (0x7F800000, 0x6F), (0xFF800000, 0xEF), (0x7FC00000, 0x80),
    # Huawei GE unit-test goldens.
    (0x3638C290, 0x04), (0x3698AEB6, 0x05), (0x36E515DD, 0x06), (0x371C2FF8, 0x06), (0x358B4F67, 0x03),
    (0x3F48849E, 0x1D), (0x3CFDC7CD, 0x54), (0x3F112A2C, 0x19), (0x3F655965, 0x1E), (0x3E2040ED, 0x3A),
    (0x43411383, 0x4E), (0x438E0E21, 0x60), (0x42356389, 0x46), (0x43B308DB, 0x61), (0x42536B25, 0x47),
    (0x4686C7E7, 0x6C), (0x46E1CA4A, 0x6E), (0x453D6D1B, 0x67), (0x462B0BBF, 0x6B), (0x4743505E, 0x6F),
]
_TA_FP16_VECTORS = [
    (0x0005, 0x01), (0x0008, 0x02), (0x002C, 0x04), (0x0033, 0x05), (0x008D, 0x06), (0x289B, 0x55),
    (0x3716, 0x36), (0x2E79, 0x52), (0x3B69, 0x1F), (0x38FC, 0x1A), (0x67DF, 0x66), (0x64F3, 0x64),
    (0x658D, 0x65), (0x6070, 0x62), (0x691F, 0x67), (0x7871, 0x6E), (0x77AE, 0x6E), (0x746E, 0x6C),
    (0x711B, 0x6B), (0x79EA, 0x6F),
]
# (FP32 bits, HR code): derived from the Ascend pseudocode by the reference, not hardware-verified.
_HR_FP32_VECTORS = [
    (0x3F880000, 0x09), (0x41800000, 0x41), (0x41880000, 0x41), (0x42C80000, 0x4B), (0x3DCCCCCD, 0x53),
    (0x3D75C28F, 0x50), (0x37800000, 0x7E), (0x44800000, 0x65), (0x471C4000, 0x6F),
]


def _fp32(bits_list):
    return torch.tensor(bits_list, dtype=torch.int64).to(torch.int32).view(torch.float32)


def _same(a, b):
    """Bitwise-equal float32 tensors, except that any NaN equals any NaN: dtype casts choose NaN payloads
    (fp32 NaN -> bf16 gives 0xFFFF here), and HiF8 has a single NaN. +0 and -0 still differ."""
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    return torch.equal(a.view(torch.int32)[~nan], b.view(torch.int32)[~nan])


def _all_patterns(dtype):
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def test_all_256_codes_decode_as_the_reference_table():
    positive = torch.tensor(_POSITIVE_TABLE, dtype=torch.float64).flatten().float()
    expected = torch.cat([positive, -positive])
    expected[0x80] = NAN
    got = hif8_decode(torch.arange(256, dtype=torch.int32).to(torch.uint8))
    assert torch.equal(got.isnan(), expected.isnan())
    keep = ~expected.isnan()
    assert torch.equal(got[keep], expected[keep])
    assert got.dtype == torch.float32 and got[0].item() == 0.0 and not math.copysign(1, got[0].item()) < 0


def test_decode_keeps_shape_and_rejects_non_uint8():
    codes = torch.tensor([[0x08, 0x88], [0x6F, 0x80]], dtype=torch.uint8)
    out = hif8_decode(codes)
    assert out.shape == (2, 2) and out[0, 1] == -1 and out[1, 0] == INF and out[1, 1].isnan()
    with pytest.raises(ValueError, match="uint8"):
        hif8_decode(codes.to(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_golden_fp32_vectors_encode_and_round(dtype):
    bits, codes = zip(*_TA_FP32_VECTORS)
    x = _fp32(list(bits))
    if dtype == torch.bfloat16:  # only the vectors exactly representable in bf16 test the bf16 path
        keep = (x.to(dtype).float() == x) | x.isnan()
        x, codes = x[keep], [c for c, k in zip(codes, keep.tolist()) if k]
        x = x.to(dtype)
    assert hif8_encode(x).tolist() == list(codes)
    assert _same(hif8_round(x).float(), hif8_decode(torch.tensor(codes, dtype=torch.uint8)))


def test_golden_fp16_vectors():
    bits, codes = zip(*_TA_FP16_VECTORS)
    x = torch.tensor(bits, dtype=torch.int32).to(torch.int16).view(torch.float16)
    assert hif8_encode(x).tolist() == list(codes)
    rounded = hif8_round(x)
    assert rounded.dtype == torch.float16
    assert torch.equal(rounded.float(), hif8_decode(torch.tensor(codes, dtype=torch.uint8)))


def test_hybrid_rounding_vectors():
    bits, codes = zip(*_HR_FP32_VECTORS)
    x = _fp32(list(bits))
    assert hif8_encode(x, mode="hr").tolist() == list(codes)
    assert torch.equal(hif8_round(x, mode="hr"), hif8_decode(torch.tensor(codes, dtype=torch.uint8)))
    # |E| <= 3 is plain TA in both modes; exact inputs with |E| >= 4 get bumped (a documented quirk).
    assert hif8_round(torch.tensor([1.0625, 3.3]), mode="hr").tolist() == [1.125, 3.25]
    assert hif8_round(torch.tensor([16.0, -1024.0]), mode="hr").tolist() == [20.0, -1536.0]


def test_hybrid_rounding_fp16_source_uses_lsb_threshold():
    # 17 = 1.0001b * 2^4 in fp16 (lsb 0, thr = 1): first 2 discarded bits after 2 kept = 01 >= 1 -> up.
    x = torch.tensor([17.0, 16.0], dtype=torch.float16)
    assert hif8_round(x, mode="hr").tolist() == [20.0, 16.0]
    # The same values from fp32 (thr = 0 from the zero low bits) both go up.
    assert hif8_round(x.float(), mode="hr").tolist() == [20.0, 20.0]


def _grid_neighbours(a_f64):
    """For |x| >= 0: the finite HiF8 grid points lo <= |x| < hi (a virtual 49152 stands in for Inf)."""
    vals = hif8_value_table()[:0x80]
    vals = torch.cat([vals[:0x6F], torch.tensor([49152.0]), vals[0x70:]]).sort().values.double()
    idx = torch.searchsorted(vals, a_f64, right=True).clamp(1, len(vals) - 1)
    return vals[idx - 1], vals[idx], vals[-1]


def _signed(x_f32, mag_f64):
    mag = torch.where(mag_f64 == 49152.0, INF, mag_f64).float()
    out = torch.where(x_f32 < 0, -mag, mag)
    out = torch.where(out == 0, 0.0, out)
    return torch.where(x_f32.isnan(), NAN, out)


def _nearest_by_search(x_f32):
    """Brute-force TA: nearest element of the finite set plus a virtual Inf at 49152, ties to larger magnitude."""
    a = x_f32.abs().double()
    lo, hi, top = _grid_neighbours(a)
    pick = torch.where(a - lo >= hi - a, hi, lo)
    return _signed(x_f32, torch.where(a >= top, top, pick))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("saturate", [False, True])
def test_every_bit_pattern_round_equals_decode_of_encode(dtype, saturate):
    x = _all_patterns(dtype)
    rounded = hif8_round(x, saturate=saturate)
    assert rounded.dtype == dtype
    decoded = hif8_decode(hif8_encode(x, saturate=saturate))
    assert _same(rounded.float(), decoded)  # includes NaN/Inf/zero sign handling
    expected = _nearest_by_search(x.float())
    if saturate:
        expected = torch.nan_to_num(expected, nan=0.0, posinf=32768.0, neginf=-32768.0)
    assert _same(decoded, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_bit_pattern_hybrid_round_is_consistent(dtype):
    x = _all_patterns(dtype)
    rounded = hif8_round(x, mode="hr")
    decoded = hif8_decode(hif8_encode(x, mode="hr"))
    assert _same(rounded.float(), decoded)
    ta = hif8_round(x)
    a = x.float().abs()
    finite = x.isfinite()
    # HR is TA wherever |E| <= 3, and elsewhere one of the two grid points around |x| (below the Inf slot).
    small = finite & (a >= 0.125) & (a < 15.5)
    assert torch.equal(rounded[small], ta[small])
    lo, hi, _ = _grid_neighbours(a.double())
    inside = finite & (a >= 2.0**-22) & (a < 32768)
    down, up = _signed(x.float(), lo), _signed(x.float(), hi)
    hr = rounded.float()
    assert bool(((hr == down) | (hr == up))[inside].all())
    assert bool((hr != ta.float())[inside & ~small].any())  # HR really differs from TA somewhere


def test_specials_overflow_underflow_and_saturation():
    x = torch.tensor([NAN, INF, -INF, 40960.0, -40960.0, 40959.99, 1e30, 2.0**-23, -(2.0**-23), 2.0**-24, -1e-30, -0.0])
    assert hif8_encode(x).tolist() == [0x80, 0x6F, 0xEF, 0x6F, 0xEF, 0x6E, 0x6F, 0x01, 0x81, 0x00, 0x00, 0x00]
    assert hif8_encode(x, saturate=True).tolist() == [0x00, 0x6E, 0xEE, 0x6E, 0xEE, 0x6E, 0x6E, 0x01, 0x81, 0, 0, 0]
    r = hif8_round(x)
    assert r[0].isnan() and r[1:3].tolist() == [INF, -INF] and r[3].item() == INF
    assert r[5].item() == 32768.0 and r[7].item() == 2.0**-22 and r[8].item() == -(2.0**-22)
    zeros = r[9:]
    assert torch.equal(zeros.view(torch.int32), torch.zeros(3, dtype=torch.int32))  # +0, never -0
    rs = hif8_round(x, saturate=True)
    assert rs[:5].tolist() == [0.0, 32768.0, -32768.0, 32768.0, -32768.0]


def test_fp32_subnormal_inputs_flush_to_zero():
    tiny = torch.tensor([1e-40, -1e-42, 1.17e-38], dtype=torch.float32)
    assert hif8_encode(tiny).tolist() == [0, 0, 0]
    assert hif8_round(tiny).tolist() == [0.0, 0.0, 0.0]


def test_random_fp32_round_matches_search_and_keeps_shape():
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (50_000,), generator=g, dtype=torch.int64).to(torch.int32)
    scaled = torch.randn(4, 10_000, generator=g) * torch.logspace(-8, 5, 10_000)
    for x in (bits.view(torch.float32), scaled):
        r = hif8_round(x)
        assert r.shape == x.shape
        assert _same(r, hif8_decode(hif8_encode(x)))
        assert _same(r.flatten(), _nearest_by_search(x.flatten()))


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        hif8_round(torch.arange(3))
    with pytest.raises(ValueError, match="mode must be one of"):
        hif8_encode(torch.ones(2), mode="nearest")
