"""Per-output-channel importance of each prunable layer; higher means keep."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from partitions.compress.graph import PruneGroup, prunable
from partitions.compress.measure import Inputs, call
from partitions.compress.options import Method


def scores(
    model: nn.Module, groups: dict[str, PruneGroup], method: Method, calib: Inputs, seed: int = 0
) -> dict[str, torch.Tensor]:
    """One float64 score per current output channel of each group's producer.

    * ``l1``: sum of |weight| of the channel's filter or neuron.
    * ``activation``: mean |activation| of the channel where its consumers read it (after BatchNorm, the
      nonlinearity and pooling), over the calibration set, via forward pre-hooks.
    * ``taylor``: first-order Taylor estimate sum |w * dL/dw| over the channel's weights, with the pseudo-loss
      L = cross-entropy against the model's own top-1 (or 0.5 ||y||^2 for single-output models).
    * ``random``: uniform noise from ``seed`` (the baseline).
    """
    if method == "l1":
        return {n: _weight(model, n).detach().abs().flatten(1).sum(1).double() for n in groups}
    if method == "activation":
        return _activation(model, groups, calib)
    if method == "taylor":
        return _taylor(model, groups, calib)
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(_weight(model, n).shape[0], generator=gen, dtype=torch.float64) for n in groups}


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    return prunable(model, name).weight


def _activation(model: nn.Module, groups: dict[str, PruneGroup], calib: Inputs) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def hook(group: str, spread: int, is_conv: bool):
        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().abs().double()
            per = x.transpose(0, 1).flatten(1).mean(1) if is_conv else x.unflatten(-1, (-1, spread)).mean(-1)
            per = per if is_conv else per.flatten(0, -2).mean(0)
            sums[group] = sums.get(group, 0) + per

        return record

    for name, g in groups.items():
        for c in g.consumers:
            consumer = model.get_submodule(c.name)
            handles.append(consumer.register_forward_pre_hook(hook(name, c.spread, isinstance(consumer, nn.Conv2d))))
    try:
        with torch.inference_mode():
            call(model, calib)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / len(groups[n].consumers) for n in groups}


def _taylor(model: nn.Module, groups: dict[str, PruneGroup], calib: Inputs) -> dict[str, torch.Tensor]:
    weights = [_weight(model, n) for n in groups]
    flags = [w.requires_grad for w in weights]
    try:
        with torch.enable_grad():
            for w in weights:
                w.requires_grad_(True)
            out = call(model, calib)
            loss = F.cross_entropy(out, out.argmax(1).detach()) if out.shape[1] > 1 else 0.5 * out.pow(2).sum()
            grads = torch.autograd.grad(loss, weights)
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
    return {n: (w.detach() * g).abs().flatten(1).sum(1).double() for n, w, g in zip(groups, weights, grads)}
