"""HiFloat8 (HiF8) codec: elementwise rounding, encoding to bytes, decoding from bytes.

Bit-exact to the HiF8 format as implemented by Huawei's host converters (GE ``hif8_t.cc``) and the
Ascend C ``Cast`` pseudocode; see the team reference notes on HiF8 for the layout, the TA rule and the
golden vectors the tests check.

Layout (bit 7 = sign S, then a prefix-coded "Dot" field choosing the exponent width D):

    Dot 11   -> D=4, |E| in [8, 15], 1 mantissa bit     S 1 1 Es e e e M
    Dot 10   -> D=3, |E| in [4, 7],  2 mantissa bits    S 1 0 Es e e M M
    Dot 01   -> D=2, |E| in [2, 3],  3 mantissa bits    S 0 1 Es e M M M
    Dot 001  -> D=1, |E| = 1,        3 mantissa bits    S 0 0 1 Es M M M
    Dot 0001 -> E = 0,               3 mantissa bits    S 0 0 0 1 M M M
    Dot 0000 -> denormal 2^(M-23), M = 1..7             S 0 0 0 0 M M M

The exponent is sign-magnitude with an implicit leading 1 of |E|. 0x00 is zero, 0x80 is NaN,
0x6F / 0xEF are +-Inf, the largest finite magnitude is 2^15.

Rounding modes:
- ``"ta"`` (default, Ascend ``CAST_ROUND``): round to nearest, ties away from zero. Non-saturating:
  |x| >= 40960 (= 1.25 * 2^15, the midpoint to the Inf slot) becomes +-Inf, NaN stays NaN.
  Saturating: overflow and +-Inf become +-32768, NaN becomes 0.
- ``"hr"`` (Ascend ``CAST_HYBRID``): TA where |E| <= 3; elsewhere round up iff the 14 discarded
  bits after the kept mantissa are >= the input's own low 14 mantissa bits (FP32 source), or, for an
  FP16 source, iff the first 2 discarded bits are >= {fp16 lsb, 1}. Transcribed from the Ascend C
  pseudocode; NOT verified on hardware (it bumps exact values up, e.g. 16 -> 20). Use TA for training.

Implementation: everything works on the exact FP32 image of the input (FP16 and BF16 upcast exactly),
with integer arithmetic on the FP32 bit pattern, so it is fully vectorised and identical on CPU and GPU.
``hif8_round`` (TA) relies on IEEE carry propagation (add half an ulp of the target grid, clear the
discarded bits), while ``hif8_encode`` extracts sign/exponent/mantissa fields and carries explicitly;
the tests check the two independent routes against each other on every FP16 and BF16 bit pattern.
"""

from __future__ import annotations

import torch

__all__ = [
    "HIF8_MAX",
    "HIF8_OVERFLOW_THRESHOLD",
    "HIF8_MIN_SUBNORMAL",
    "HIF8_NAN_CODE",
    "HIF8_POS_INF_CODE",
    "HIF8_NEG_INF_CODE",
    "ROUNDING_MODES",
    "hif8_round",
    "hif8_round_fp32_bits",
    "hif8_encode",
    "hif8_decode",
    "hif8_value_table",
]

HIF8_MAX = 32768.0
HIF8_OVERFLOW_THRESHOLD = 40960.0  # 1.25 * 2^15: TA rounds this tie away, into the Inf slot
HIF8_MIN_SUBNORMAL = 2.0**-22
HIF8_NAN_CODE = 0x80
HIF8_POS_INF_CODE = 0x6F
HIF8_NEG_INF_CODE = 0xEF
ROUNDING_MODES = ("ta", "hr")

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FP32_MAX_BITS = 0x47000000  # bits of 32768.0
_FP32_INF_BITS = 0x7F800000
_FP32_MIN_SUBNORMAL_BITS = (127 - 22) << 23  # bits of 2^-22
_MANTISSA_MASK = (1 << 23) - 1


def _check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in _SUPPORTED_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"{name} must be a float32, float16 or bfloat16 tensor, got {got}; convert it with .float() first"
        )


def _check_mode(mode: str) -> None:
    if mode not in ROUNDING_MODES:
        raise ValueError(f"mode must be one of {ROUNDING_MODES}, got {mode!r}; use 'ta' (round half away) for training")


def _fp32_bits(x: torch.Tensor) -> torch.Tensor:
    """Int32 bit pattern of the exact FP32 image of ``x`` (FP16/BF16 -> FP32 is exact)."""
    return x.to(torch.float32).contiguous().view(torch.int32)


def _mantissa_bits_for_exponent(e: torch.Tensor) -> torch.Tensor:
    """Kept mantissa bits mb for unbiased exponent e: 3 for |e|<=3, 2 for |e|<=7, 1 for |e|<=15, else 0."""
    ae = e.abs()
    return 3 - (ae > 3).to(torch.int32) - (ae > 7).to(torch.int32) - (ae > 15).to(torch.int32)


def hif8_round_fp32_bits(bits: torch.Tensor, *, saturate: bool) -> torch.Tensor:
    """TA-round FP32 bit patterns (int32) to the bit patterns of the nearest HiF8 values (int32).

    This is the whole TA rule in integer ops; the Triton kernel transcribes exactly these steps.
    Adding half a grid step and clearing the discarded bits rounds ties away from zero, and the carry
    into the exponent field moves the value into the next binade (or from denormal to normal) by itself.
    """
    sign = bits & ~0x7FFFFFFF  # int32 with only the sign bit (the literal is not representable as +int32)
    abits = bits & 0x7FFFFFFF
    e = (abits >> 23) - 127
    shift = 23 - _mantissa_bits_for_exponent(e)
    one = torch.ones_like(abits)
    rounded = (abits + (one << (shift - 1))) & ~((one << shift) - 1)
    # [2^-23, 2^-22): the nearest grid points are 0 and 2^-22, the tie at 2^-23 goes away from zero.
    rounded = torch.where(e == -23, torch.full_like(abits, _FP32_MIN_SUBNORMAL_BITS), rounded)
    rounded = torch.where(e < -23, torch.zeros_like(abits), rounded)
    over = rounded > _FP32_MAX_BITS  # covers inputs >= 40960 and +-Inf (NaN handled below)
    rounded = torch.where(over, torch.full_like(abits, _FP32_MAX_BITS if saturate else _FP32_INF_BITS), rounded)
    # No negative zero in HiF8: a value that rounds to 0 is +0.
    out = torch.where(rounded == 0, rounded, rounded | sign)
    is_nan = abits > _FP32_INF_BITS
    nan_out = torch.zeros_like(abits) if saturate else torch.full_like(abits, 0x7FC00000)
    return torch.where(is_nan, nan_out, out)


def hif8_round(x: torch.Tensor, *, saturate: bool = False, mode: str = "ta") -> torch.Tensor:
    """Elementwise nearest HiF8 value of ``x``, returned in ``x.dtype`` (every HiF8 value is exact there).

    Args:
        x: float32, float16 or bfloat16 tensor, any shape.
        saturate: map overflow and +-Inf to +-32768 and NaN to 0 instead of +-Inf / NaN.
        mode: ``"ta"`` (nearest, ties away) or ``"hr"`` (hybrid; unverified on hardware, see module doc).
    """
    _check_float(x, "x")
    _check_mode(mode)
    if mode == "hr":
        return hif8_decode(hif8_encode(x, saturate=saturate, mode="hr")).to(x.dtype)
    rounded = hif8_round_fp32_bits(_fp32_bits(x), saturate=saturate)
    return rounded.view(torch.float32).to(x.dtype).view_as(x)


def _round_up_decision(
    abits: torch.Tensor, e: torch.Tensor, mb: torch.Tensor, mode: str, fp16_lsb: torch.Tensor | None
) -> torch.Tensor:
    """Bool: does the kept mantissa get +1 ulp? ``abits`` are |x| FP32 bits, e >= -22 assumed."""
    m = abits & _MANTISSA_MASK
    ta_bit = ((m >> (22 - mb)) & 1) == 1
    if mode == "ta":
        return ta_bit
    if fp16_lsb is None:
        # FP32 source: the 14 bits after the kept ones against the input's own low 14 bits.
        frac = (m >> (9 - mb)) & 0x3FFF
        thr = m & 0x3FFF
    else:
        # FP16 source: the first 2 discarded bits against {lsb, 1}.
        frac = (m >> (21 - mb)) & 0x3
        thr = (fp16_lsb << 1) | 1
    return torch.where(e.abs() <= 3, ta_bit, frac >= thr)


def _pack_code(e: torch.Tensor, mant: torch.Tensor, mb: torch.Tensor) -> torch.Tensor:
    """Pack a positive finite HiF8 value 2^e * (1 + mant / 2^mb) (or 2^e if denormal) into its 7-bit code."""
    ae = e.abs()
    d = torch.where(ae >= 8, 4, torch.where(ae >= 4, 3, torch.where(ae >= 2, 2, torch.where(ae >= 1, 1, 0))))
    prefix = torch.where(d == 4, 0x60, torch.where(d == 3, 0x40, torch.where(d == 2, 0x20, 0x10)))
    es = (e < 0).to(torch.int32)
    dm1 = (d - 1).clamp_min(0)
    low = ae - (torch.ones_like(ae) << dm1)
    code = prefix | (es << (dm1 + mb)) | (low << mb) | mant
    code = torch.where(d == 0, 0x08 | mant, code)
    return torch.where(e <= -16, e + 23, code)


def hif8_encode(x: torch.Tensor, *, saturate: bool = False, mode: str = "ta") -> torch.Tensor:
    """Encode ``x`` to HiF8 bytes (uint8, same shape). FP16 inputs use the FP16-source HR rule in ``"hr"``.

    Args:
        x: float32, float16 or bfloat16 tensor.
        saturate: overflow and +-Inf -> 0x6E / 0xEE (+-32768), NaN -> 0x00.
        mode: ``"ta"`` or ``"hr"`` (see module doc).
    """
    _check_float(x, "x")
    _check_mode(mode)
    fp16_lsb = None
    if mode == "hr" and x.dtype == torch.float16:
        fp16_lsb = x.contiguous().view(torch.int16).to(torch.int32) & 1
    bits = _fp32_bits(x)
    negative = bits < 0
    abits = bits & 0x7FFFFFFF
    e = (abits >> 23) - 127
    mb = _mantissa_bits_for_exponent(e)
    m = abits & _MANTISSA_MASK
    # Denormal range keeps no mantissa; its grid spacing is 2^e itself.
    mant = m >> (23 - mb)
    up = _round_up_decision(abits, e.clamp_min(-22), mb, mode, fp16_lsb)
    mant = mant + up.to(torch.int32)
    carry = mant >> mb  # 1 when the mantissa overflowed: value is 2^(e+1) exactly
    e_r = e + carry
    mant = torch.where(carry == 1, torch.zeros_like(mant), mant)
    # E = -23: round to 2^-22 (TA always; HR iff {1, m[22:10]} >= the low 14 bits).
    if mode == "ta":
        up23 = torch.ones_like(negative)
    elif fp16_lsb is None:
        up23 = ((1 << 13) | (m >> 10)) >= (m & 0x3FFF)
    else:
        # Not in the pseudocode (it omits FP16 subnormals): the FP16 rule applied to the 2-bit {1, m[22]}.
        up23 = ((2 | (m >> 22)) & 0x3) >= ((fp16_lsb << 1) | 1)
    mb_r = _mantissa_bits_for_exponent(e_r)
    finite_in_range = (e_r <= 15) & ~((e_r == 15) & (mant > 0))
    code = _pack_code(e_r.clamp(-22, 15), mant, mb_r)
    code = torch.where(e == -23, up23.to(torch.int32), code)
    code = torch.where(e < -23, torch.zeros_like(code), code)
    over = ~finite_in_range & (e >= -22)  # includes +-Inf inputs (e = 128, mantissa 0)
    code = torch.where(over, torch.full_like(code, 0x6E if saturate else HIF8_POS_INF_CODE), code)
    code = torch.where(negative & (code != 0), code | 0x80, code)
    is_nan = abits > _FP32_INF_BITS
    code = torch.where(is_nan, torch.full_like(code, 0x00 if saturate else HIF8_NAN_CODE), code)
    return code.to(torch.uint8)


def hif8_value_table(device: torch.device | str | None = None) -> torch.Tensor:
    """float32 ``[256]``: the value of every HiF8 code, decoded field by field from the bit layout."""
    c = torch.arange(256, dtype=torch.int32, device=device)
    sign = torch.where(c >= 0x80, -1.0, 1.0)
    b = c & 0x7F
    # Dot width from the prefix, then D stored exponent bits and mb = 8 - 1 - dot_width - D.
    d = torch.where(b >= 0x60, 4, torch.where(b >= 0x40, 3, torch.where(b >= 0x20, 2, torch.where(b >= 0x10, 1, 0))))
    mb = torch.where(d == 4, 1, torch.where(d == 3, 2, 3))
    exp_field = (b >> mb) & ((torch.ones_like(d) << d) - 1)
    es = (exp_field >> (d - 1).clamp_min(0)) & 1
    low = exp_field & ((torch.ones_like(d) << (d - 1).clamp_min(0)) - 1)
    mag = torch.where(d == 0, 0, (torch.ones_like(d) << (d - 1).clamp_min(0)) + low)
    e = torch.where(es == 1, -mag, mag)
    mant = b & ((torch.ones_like(mb) << mb) - 1)
    normal = torch.ldexp(1.0 + mant.double() / (1 << mb).double(), e.double())
    denormal = torch.ldexp(torch.ones_like(normal), (b & 7).double() - 23)
    is_dml = b < 0x08
    value = torch.where(is_dml, denormal, normal)
    value = torch.where(b == 0, 0.0, value)
    value = torch.where(b == 0x6F, torch.inf, value) * sign
    value = torch.where(c == 0x80, torch.nan, value)
    return value.to(torch.float32)


_TABLE_CACHE: dict[torch.device, torch.Tensor] = {}


def hif8_decode(codes: torch.Tensor) -> torch.Tensor:
    """Decode HiF8 bytes (uint8 tensor, any shape) to float32 values (0x80 -> NaN, 0x6F/0xEF -> +-Inf)."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ValueError(f"codes must be a uint8 tensor (from hif8_encode), got {got}")
    table = _TABLE_CACHE.get(codes.device)
    if table is None:
        table = _TABLE_CACHE.setdefault(codes.device, hif8_value_table(codes.device))
    return table[codes.long()]
