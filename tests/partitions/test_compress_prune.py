"""Structured pruning: exact parameter counts, physically smaller tensors, refusals, importance vs random."""

from __future__ import annotations

import statistics

import pytest
import torch
from torch import nn

from partitions.compress.api import calibration_inputs
from partitions.compress.graph import analyze
from partitions.compress.measure import layer_params, outputs
from partitions.compress.prune import prune, resolve_targets
from partitions.errors import PartserveError
from partitions.source import load_model


def _formula(m: nn.Module) -> tuple[int, int]:
    """(weights, weights + bias) from the layer formulas: conv c_in*c_out*k^2 (+c_out), linear n_in*n_out (+n_out)."""
    if isinstance(m, nn.Conv2d):
        w = m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1]
        return w, w + m.out_channels
    return m.in_features * m.out_features, m.in_features * m.out_features + m.out_features


@pytest.fixture(scope="module")
def cnn():
    source = load_model("demo-cnn", {}, 8)
    return source, analyze(source.module, source.example_inputs), calibration_inputs(source, None, 32, 0)


def test_demo_cnn_groups(cnn) -> None:
    _, structure, _ = cnn
    assert list(structure.groups) == ["conv1", "conv2", "fc1"]
    assert structure.groups["conv2"].norms == ["bn2"]
    assert [(c.name, c.spread) for c in structure.groups["conv2"].consumers] == [("fc1", 64)]
    assert "model output" in structure.refused["fc2"]


def test_keep_counts_match_formulas_and_state_dict(cnn) -> None:
    source, structure, calib = cnn
    targets = resolve_targets(structure, None, {"conv1": 12, "conv2": 20, "fc1": 96})
    model = prune(source.module, structure, targets, calib, "l1").model
    sd = model.state_dict()
    assert sd["conv1.weight"].shape == (12, 3, 3, 3) and sd["bn1.running_var"].shape == (12,)
    assert sd["conv2.weight"].shape == (20, 12, 3, 3) and sd["fc1.weight"].shape == (96, 20 * 64)
    assert sd["fc2.weight"].shape == (10, 96)
    for row in layer_params(model):
        m = model.get_submodule(row.name)
        with_bias = sd[f"{row.name}.weight"].numel() + sd[f"{row.name}.bias"].numel()
        assert (row.weights, row.with_bias) == _formula(m) and row.with_bias == with_bias
    assert outputs(model, calib).shape == (32, 10)


def test_mlp_ratio_prunes_every_hidden_layer() -> None:
    source = load_model("demo-mlp", {"depth": 3, "width": 64, "features": 16}, 4)
    structure = analyze(source.module, source.example_inputs)
    targets = resolve_targets(structure, 0.5, None)
    assert targets == {"0": 32, "2": 32, "4": 32}
    model = prune(source.module, structure, targets, source.example_inputs, "activation", steps=2).model
    assert [r.shape for r in layer_params(model)] == ["16->32", "32->32", "32->32", "32->10"]


def test_residual_layers_are_refused() -> None:
    source = load_model("demo-resnet", {"blocks": 1, "width": 8}, 2)
    structure = analyze(source.module, source.example_inputs)
    assert "layers.0.conv1" in structure.groups
    with pytest.raises(PartserveError, match=r"cannot prune layers\.0\.conv2: .*residual add"):
        resolve_targets(structure, None, {"layers.0.conv2": 4})
    with pytest.raises(PartserveError, match="no prunable layer 'nope'"):
        resolve_targets(structure, {"nope": 0.5}, None)


def test_tolerance_undoes_the_step_that_breaks_it(cnn) -> None:
    source, structure, calib = cnn
    targets = resolve_targets(structure, 0.9, None)
    result = prune(source.module, structure, targets, calib, "l1", steps=3, tolerance=1e-6)
    assert result.stopped == "tolerance" and result.steps == []
    assert layer_params(result.model)[0].shape == "3->16 3x3"


def test_finetune_hook_runs_each_step(cnn) -> None:
    source, structure, calib = cnn
    seen: list[int] = []
    hook = lambda model, inputs: seen.append(model.conv1.out_channels)
    prune(source.module, structure, resolve_targets(structure, 0.5, None), calib, "l1", steps=2, finetune=hook)
    assert seen == [12, 8]


@pytest.mark.slow  # ten prunings of demo-cnn, each with 128 calibration samples
def test_taylor_importance_beats_random_at_25_percent(cnn) -> None:
    source, structure, _ = cnn
    targets = resolve_targets(structure, 0.25, None)
    results: dict[str, list[tuple[float, float]]] = {"taylor": [], "random": []}
    for seed in range(5):
        calib = calibration_inputs(source, None, 128, seed)
        for method in results:
            fid = prune(source.module, structure, targets, calib, method, seed=seed).steps[-1].fidelity
            results[method].append((fid.cosine, fid.top1_agreement))
    mean = {m: [statistics.mean(col) for col in zip(*rows)] for m, rows in results.items()}
    assert mean["taylor"][0] > mean["random"][0] and mean["taylor"][1] > mean["random"][1]
    assert torch.isfinite(torch.tensor(mean["taylor"])).all()
