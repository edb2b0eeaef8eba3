"""Structured pruning: physically remove output channels and the matching inputs of their consumers."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from partitions.compress.graph import PruneGroup, Structure, norm, prunable
from partitions.compress.importance import scores
from partitions.compress.measure import Fidelity, Inputs, fidelity, outputs
from partitions.compress.options import Method
from partitions.errors import PartserveError
from partitions.source import import_callable

FineTune = Callable[[nn.Module, Inputs], None]


def shrink(model: nn.Module, group: PruneGroup, keep: torch.Tensor) -> None:
    """Keep only output channels ``keep`` (sorted indices) of ``group.producer``, in place."""
    keep = keep.sort().values
    producer = prunable(model, group.producer)
    producer.weight = nn.Parameter(producer.weight.detach()[keep].clone())
    if producer.bias is not None:
        producer.bias = nn.Parameter(producer.bias.detach()[keep].clone())
    if isinstance(producer, nn.Conv2d):
        producer.out_channels = len(keep)
    else:
        producer.out_features = len(keep)
    for name in group.norms:
        bn = norm(model, name)
        for attr in ("weight", "bias"):
            if getattr(bn, attr) is not None:
                setattr(bn, attr, nn.Parameter(getattr(bn, attr).detach()[keep].clone()))
        for attr in ("running_mean", "running_var"):
            if getattr(bn, attr) is not None:
                setattr(bn, attr, getattr(bn, attr)[keep].clone())
        bn.num_features = len(keep)
    for c in group.consumers:
        consumer = prunable(model, c.name)
        cols = (keep[:, None] * c.spread + torch.arange(c.spread)).flatten()
        consumer.weight = nn.Parameter(consumer.weight.detach()[:, cols].clone())
        if isinstance(consumer, nn.Conv2d):
            consumer.in_channels = len(keep)
        else:
            consumer.in_features = len(cols)


def top(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores (ties broken by index)."""
    return torch.argsort(score, descending=True, stable=True)[:k]


def resolve_targets(
    structure: Structure, ratio: float | dict[str, float] | None, keep: dict[str, int] | None
) -> dict[str, int]:
    """Output channels to keep per producer, from a global ratio, per-layer ratios and explicit counts."""
    groups = structure.groups
    if not groups:
        reasons = "; ".join(f"{k}: {v}" for k, v in structure.refused.items()) or "no Conv2d or Linear layers"
        raise PartserveError(f"no layer can be pruned ({reasons})", "quantize the model instead (--quantize)")
    ratios = {n: ratio for n in groups} if isinstance(ratio, (int, float)) else dict(ratio or {})
    targets: dict[str, int] = {}
    for name, value in ratios.items():
        _check_name(structure, name)
        if not 0 <= value < 1:
            raise PartserveError(f"prune ratio {value} for {name} is outside [0, 1)", "pass e.g. 0.25")
        targets[name] = max(1, round(groups[name].channels * (1 - value)))
    for name, count in (keep or {}).items():
        _check_name(structure, name)
        if not 1 <= count <= groups[name].channels:
            raise PartserveError(
                f"cannot keep {count} of {groups[name].channels} channels of {name}",
                f"pass 1..{groups[name].channels}",
            )
        targets[name] = count
    return targets


def _check_name(structure: Structure, name: str) -> None:
    if name in structure.refused:
        raise PartserveError(f"cannot prune {name}: {structure.refused[name]}", "leave it out of the targets")
    if name not in structure.groups:
        raise PartserveError(f"no prunable layer {name!r}", f"prunable layers: {', '.join(structure.groups)}")


def load_hook(spec: str) -> FineTune:
    """``package.module:function`` -> the function, called as ``fn(model, calibration_inputs)``."""
    return import_callable(
        spec,
        PartserveError,
        "check --finetune and PYTHONPATH",
        "{spec} is not a callable",
        "pass --finetune package.module:function",
    )


@dataclass
class Step:
    step: int
    channels: dict[str, int]
    fidelity: Fidelity

    def to_json(self) -> dict:
        return {"step": self.step, "channels": self.channels, "fidelity": asdict(self.fidelity)}


@dataclass
class Pruned:
    model: nn.Module
    steps: list[Step]
    stopped: str
    """``target`` (all targets reached) or ``tolerance`` (the last step was undone: fidelity fell too far)."""


def prune(
    model: nn.Module,
    structure: Structure,
    targets: dict[str, int],
    calib: Inputs,
    importance: Method = "l1",
    steps: int = 1,
    finetune: FineTune | None = None,
    tolerance: float | None = None,
    seed: int = 0,
) -> Pruned:
    """Prune ``model`` (a copy) towards ``targets`` in ``steps`` equal steps, re-scoring channels each step.

    After each step ``finetune(model, calib)`` runs if given, and fidelity is measured against the unpruned
    model on ``calib``. If 1 - cosine exceeds ``tolerance``, that step is undone and pruning stops.
    """
    reference = outputs(model, calib)
    groups = {n: structure.groups[n] for n in targets}
    current = copy.deepcopy(model)
    done: list[Step] = []
    for step in range(1, steps + 1):
        previous = copy.deepcopy(current)
        counts = {n: round(g.channels - (g.channels - targets[n]) * step / steps) for n, g in groups.items()}
        ranked = scores(current, groups, importance, calib, seed + step)
        for name, group in groups.items():
            shrink(current, group, top(ranked[name], counts[name]))
        if finetune is not None:
            finetune(current, calib)
            current.eval()
        fid = fidelity(reference, outputs(current, calib))
        if tolerance is not None and 1 - fid.cosine > tolerance:
            return Pruned(previous, done, "tolerance")
        done.append(Step(step, counts, fid))
    return Pruned(current, done, "target")
