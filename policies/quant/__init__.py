"""HiF8 quantization: the bit-exact codec, per-tensor scaling, fake-quant autograd functions, apply_hif8.

The Triton kernel (``policies.quant.triton_hif8``) is imported lazily, only for CUDA tensors.
"""

from policies.quant.apply import (
    HiF8Config,
    HiF8Linear,
    HiF8Summary,
    apply_hif8,
    hif8_scaling_state_dict,
    load_hif8_scaling_state_dict,
    remove_hif8,
    share_amax,
)
from policies.quant.fake_quant import HiF8QKVHook, hif8_fake_quant, hif8_linear, quantize_dequantize
from policies.quant.hif8 import hif8_decode, hif8_encode, hif8_round
from policies.quant.scaling import CurrentScaler, DelayedScaler, amax_to_scale, tensor_amax

__all__ = [
    "CurrentScaler",
    "DelayedScaler",
    "HiF8Config",
    "HiF8Linear",
    "HiF8QKVHook",
    "HiF8Summary",
    "amax_to_scale",
    "apply_hif8",
    "hif8_decode",
    "hif8_encode",
    "hif8_fake_quant",
    "hif8_linear",
    "hif8_round",
    "hif8_scaling_state_dict",
    "load_hif8_scaling_state_dict",
    "quantize_dequantize",
    "remove_hif8",
    "share_amax",
    "tensor_amax",
]
