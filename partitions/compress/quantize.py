"""Quantization: dynamic int8 (fbgemm, CPU), weight-only int8, and fp16 / bf16 casts.

What each format supports once saved (see :mod:`partitions.compress.archive`):

* ``weight-int8``, ``fp16``, ``bf16``: pure ATen graphs; they export, plan, verify and serve like any model.
* ``dynamic-int8``: fbgemm's packed int8 kernels, which ``torch.export`` cannot capture. The archive stores the
  same per-channel int8 weights in ``weight-int8`` form, so ``load_model``, ``plan``, ``verify`` and ``serve``
  run them with float activations (weight-only int8 numerics); the fbgemm speed-up is what the report measures
  in process (:func:`quantize`).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from partitions.compress.options import Mode
from partitions.errors import PartserveError


class Int8Linear(nn.Module):
    """Linear layer with int8 weights and one float32 scale per output neuron (symmetric, zero point 0)."""

    qweight: torch.Tensor
    """int8 weights, ``(out_features, in_features)`` (a buffer)."""
    scale: torch.Tensor
    """float32 scale per output neuron (a buffer)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight.to(torch.int8))
        self.register_buffer("scale", scale.float())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        qweight = torch.round(w / scale[:, None]).clamp(-127, 127)
        return cls(qweight, scale, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.qweight.to(x.dtype) * self.scale.to(x.dtype)[:, None]
        return F.linear(x, weight, self.bias)


class Cast(nn.Module):
    """Run ``inner`` in ``dtype``: floating inputs are cast to it, floating outputs back to float32."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = inner.to(dtype)
        self.dtype = dtype

    def forward(self, *args: torch.Tensor) -> object:
        cast = [a.to(self.dtype) if a.is_floating_point() else a for a in args]
        out = self.inner(*cast)
        return torch.utils._pytree.tree_map(
            lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, out
        )


def quantize(model: nn.Module, mode: Mode, device: torch.device) -> nn.Module:
    """A quantized copy of ``model`` (float32, eval mode) for ``device``; ``model`` itself is left alone."""
    if mode == "none":
        return model
    if mode == "fp16" and device.type != "cuda":
        raise PartserveError("fp16 needs a CUDA device (CPU fp16 kernels are slow or missing)", "use --quantize bf16")
    if mode == "dynamic-int8" and device.type != "cpu":
        raise PartserveError(f"dynamic-int8 runs on CPU only, not {device}", "use --device cpu or --quantize fp16")
    import copy

    model = copy.deepcopy(model).eval()
    if mode in ("fp16", "bf16"):
        return Cast(model, torch.float16 if mode == "fp16" else torch.bfloat16)
    if mode == "weight-int8":
        return _replace_linears(model, Int8Linear.from_linear)
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao, not installed here
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


def exportable(model: nn.Module) -> nn.Module:
    """``model`` with fbgemm dynamic int8 Linear layers swapped for :class:`Int8Linear` (same int8 weights)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    def convert(m: DynamicLinear) -> Int8Linear:
        w = m.weight()
        return Int8Linear(w.int_repr(), w.q_per_channel_scales().float(), m.bias())

    import copy

    return _replace_linears(copy.deepcopy(model), convert, DynamicLinear)


def _replace_linears(model: nn.Module, make, kind: type = nn.Linear) -> nn.Module:
    for name, child in list(model.named_children()):
        if isinstance(child, kind):
            setattr(model, name, make(child))
        else:
            _replace_linears(child, make, kind)
    return model
