"""Sensitivity analysis: how much each prunable layer matters, and what pruning it alone costs."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from partitions.compress.graph import Structure
from partitions.compress.importance import scores
from partitions.compress.measure import Fidelity, Inputs, fidelity, outputs
from partitions.compress.options import Method
from partitions.compress.prune import shrink, top

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class LayerSensitivity:
    name: str
    kind: str
    channels: int
    importance: dict[str, list[float]]
    """Per-channel scores by method (``l1``, ``activation``, ``taylor``)."""
    deviation: dict[float, Fidelity]
    """Prune ratio -> fidelity against the unpruned model when only this layer is pruned."""

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "channels": self.channels,
            "importance": self.importance,
            "deviation": {f"{r:g}": asdict(f) for r, f in self.deviation.items()},
        }


def analyze_sensitivity(
    model: nn.Module, structure: Structure, calib: Inputs, rank_by: Method = "taylor", ratios=RATIOS, seed: int = 0
) -> list[LayerSensitivity]:
    """Importance statistics of every prunable layer, and its output deviation when pruned alone.

    Channels are removed in the order of ``rank_by`` (lowest first).
    """
    reference = outputs(model, calib)
    by_method = {m: scores(model, structure.groups, m, calib, seed) for m in ("l1", "activation", "taylor")}
    ranking = by_method[rank_by] if rank_by in by_method else scores(model, structure.groups, rank_by, calib, seed)
    result = []
    for name, group in structure.groups.items():
        deviation = {}
        for ratio in ratios:
            pruned = copy.deepcopy(model)
            shrink(pruned, group, top(ranking[name], max(1, round(group.channels * (1 - ratio)))))
            deviation[ratio] = fidelity(reference, outputs(pruned, calib))
        importance = {m: [float(x) for x in s[name]] for m, s in by_method.items()}
        kind = type(model.get_submodule(name)).__name__
        result.append(LayerSensitivity(name, kind, group.channels, importance, deviation))
    return result


def summary_rows(layers: list[LayerSensitivity]) -> tuple[list[str], list[list[str]]]:
    """Table columns and rows: mean importance per method, then cosine similarity at every other prune ratio."""
    ratios = list(layers[0].deviation)[::2] if layers else []
    columns = ["layer", "ch", "l1", "act", "taylor", *(f"{r:.0%}" for r in ratios)]
    rows = []
    for layer in layers:
        means = [float(torch.tensor(layer.importance[m]).mean()) for m in ("l1", "activation", "taylor")]
        rows.append(
            [layer.name, str(layer.channels), *(f"{m:.3g}" for m in means)]
            + [f"{layer.deviation[r].cosine:.3f}" for r in ratios]
        )
    return columns, rows
