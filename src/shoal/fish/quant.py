"""Optional int8 weights for the CPU (`SHOAL_QUANTIZE=int8`).

`quantize_int8` swaps every `nn.Linear` of the slow and fast transformers (attention, feed-forward,
`fast_project_in`, `fast_output`, and the slow output head when it is not tied to the embeddings) for torch's
dynamic-quantized int8 Linear: weights int8 per output channel (symmetric), activations quantized per call,
int32 accumulation in fbgemm on x86. At batch 1 a decode step is bound by reading weights, and int8 reads a
quarter of float32's bytes. The kernel was chosen by measurement (`bench/int8_kernels.py`, one 8192x1024 linear
at batch 1 on this project's 2-core AMD EPYC): the dynamic Linear 3-5x faster than float32, ATen's
`_weight_int8pack_mm` 2-4x slower.

The embeddings (and so a tied output head, which reads the embedding table), the norms, RoPE, the KV caches and
the codec stay float32. Output is close to float32's, not identical: the parity guarantee is for float32.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from .dual_ar import DualARTransformer


def quantize_int8(model: DualARTransformer) -> DualARTransformer:
    """Convert `model`'s linear layers to int8 weights in place and return it.

    The model must be a float32 one on the CPU (torch's quantized kernels are CPU kernels that take float32
    activations); anything else is a ValueError.
    """
    weight = model.embeddings.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        raise ValueError(f"int8 weights need a float32 model on the CPU, not {weight.dtype} on {weight.device}")
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which shoal does not depend on; these kernels
        # are still what torch ships for x86 (the module-level warnings fire once per process, nothing to act on).
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*quantize_per_(tensor|channel).*deprecated", category=UserWarning)
        with torch.no_grad():
            quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    return model


def is_quantized(model: nn.Module) -> bool:
    """Whether any of `model`'s linear layers runs with int8 weights."""
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    return any(isinstance(m, Int8Linear) for m in model.modules())


def weight_bytes(module: nn.Module) -> int:
    """Bytes of weights one forward pass through `module` reads: its parameters, plus the int8 weights, their
    per-channel scales and float32 biases of quantized linear layers (packed, so not parameters)."""
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    total = sum(p.numel() * p.element_size() for p in module.parameters())
    for m in module.modules():
        if isinstance(m, Int8Linear):
            w, b = m.weight(), m.bias()
            total += w.numel() * w.element_size() + w.shape[0] * 4 + (0 if b is None else b.numel() * 4)
    return total
