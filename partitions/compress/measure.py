"""Run a model on named inputs; compare outputs (fidelity); time it; count parameters per layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree

from partitions.costs import measure_ms
from partitions.source import call_forward

Inputs = dict[str, torch.Tensor]


def call(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """Run ``model`` and return its outputs flattened and concatenated into one float32 [batch, n] tensor."""
    out = call_forward(model, inputs)
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return torch.cat([t.reshape(t.shape[0], -1).float() for t in leaves], dim=1)


def outputs(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    with torch.inference_mode():
        return call(model, inputs)


@dataclass
class Fidelity:
    max_abs_error: float
    rel_error: float
    """||y - y_ref|| / ||y_ref|| over the whole calibration set."""
    cosine: float
    """Mean over samples of the cosine similarity between the output vectors."""
    top1_agreement: float
    """Fraction of samples whose argmax output matches the reference's (1.0 for single-output models)."""


def fidelity(reference: torch.Tensor, got: torch.Tensor) -> Fidelity:
    """Compare ``got`` with ``reference``, both [batch, n] as returned by :func:`call`."""
    ref, got = reference.double(), got.double()
    diff = got - ref
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=1, eps=1e-12).mean()
    top1 = (got.argmax(1) == ref.argmax(1)).double().mean() if ref.shape[1] > 1 else torch.tensor(1.0)
    return Fidelity(
        max_abs_error=float(diff.abs().max()),
        rel_error=float(diff.norm() / ref.norm().clamp_min(1e-30)),
        cosine=float(cos),
        top1_agreement=float(top1),
    )


def median_ms(model: nn.Module, inputs: Inputs, repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of one forward pass (ms), synchronised with the inputs' CUDA device if any."""
    device = next((t.device for t in inputs.values() if t.is_cuda), torch.device("cpu"))
    return measure_ms(lambda: call(model, inputs), device, repeats, warmup)


@dataclass
class LayerParams:
    name: str
    kind: str
    shape: str
    """``c_in->c_out kxk`` or ``n_in->n_out``."""
    weights: int
    with_bias: int


def layer_params(model: nn.Module) -> list[LayerParams]:
    """Weights-only and weights+bias parameter counts of each Conv2d / Linear (quantized ones included)."""
    rows = []
    for name, m in model.named_modules():
        w = _weight(m)
        if w is None:
            continue
        bias = getattr(m, "bias", None)
        bias = bias() if callable(bias) else bias
        n_bias = bias.numel() if isinstance(bias, torch.Tensor) else 0
        if w.dim() == 4:
            shape = f"{w.shape[1] * getattr(m, 'groups', 1)}->{w.shape[0]} {w.shape[2]}x{w.shape[3]}"
        else:
            shape = f"{w.shape[1]}->{w.shape[0]}"
        rows.append(LayerParams(name, type(m).__name__, shape, w.numel(), w.numel() + n_bias))
    return rows


def _weight(m: nn.Module) -> torch.Tensor | None:
    """The weight matrix of a conv / linear layer, float, quantized or int8-with-scales."""
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        return m.weight
    w = getattr(m, "weight", None)
    if callable(w) and "quantized" in type(m).__module__:
        return w()
    qweight = getattr(m, "qweight", None)
    return qweight if isinstance(qweight, torch.Tensor) else None
