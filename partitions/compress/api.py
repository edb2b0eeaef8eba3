"""One call from a model to a compressed model, its report, and optionally its directory."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from partitions.compress.archive import save_compressed
from partitions.compress.graph import analyze
from partitions.compress.measure import Fidelity, Inputs, LayerParams, fidelity, layer_params, median_ms, outputs
from partitions.compress.options import Method, Mode
from partitions.compress.prune import FineTune, Step, prune, resolve_targets
from partitions.compress.quantize import exportable, quantize
from partitions.dtypes import name_of, to_torch
from partitions.errors import PartserveError
from partitions.inputs import random_inputs
from partitions.runtime import pick_device
from partitions.source import ModelSource
from partitions.types import BATCH, TensorSpec

SUPPORT = {
    "none": "plan, verify and serve like any model",
    "weight-int8": "plan, verify and serve like any model (int8 weights dequantized in the graph)",
    "fp16": "plan, verify and serve on CUDA (the graph casts inputs to fp16 and outputs to fp32)",
    "bf16": "plan, verify and serve (the graph casts inputs to bf16 and outputs to fp32)",
    "dynamic-int8": "saved as weight-int8 (same int8 weights, float activations) since torch.export cannot "
    "capture fbgemm kernels: plan, verify and serve run that; the measured speed-up is fbgemm's, in process",
}


def calibration_inputs(source: ModelSource, path: str | None, samples: int = 64, seed: int = 0) -> Inputs:
    """Inputs from an ``.npz`` of arrays named like the model's inputs, else ``samples`` random ones."""
    if path is not None:
        arrays = dict(np.load(path, allow_pickle=False))
        missing = [k for k in source.example_inputs if k not in arrays]
        if missing:
            raise PartserveError(f"{path} lacks inputs {missing}", f"store arrays named {list(source.example_inputs)}")
    else:
        specs = [TensorSpec(k, (BATCH, *v.shape[1:]), name_of(v.dtype)) for k, v in source.example_inputs.items()]
        arrays = random_inputs(specs, samples, seed, source.int_ranges)
    return {k: to_torch(np.ascontiguousarray(arrays[k])).to(v.dtype) for k, v in source.example_inputs.items()}


@dataclass
class LayerChange:
    name: str
    kind: str
    shape: str
    shape_compressed: str
    weights: int
    weights_compressed: int
    with_bias: int
    with_bias_compressed: int


@dataclass
class Report:
    model: str
    batch_size: int
    device: str
    quantize: str
    support: str
    importance: str
    targets: dict[str, int]
    steps: list[Step]
    stopped: str
    layers: list[LayerChange]
    params: int
    """W: weights and biases of all Conv2d / Linear layers."""
    params_compressed: int
    latency_ms: float
    latency_ms_compressed: float
    weight_bytes: int
    """Size on disk of the weights (safetensors), before."""
    weight_bytes_compressed: int
    fidelity: Fidelity
    output: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def compression_ratio(self) -> float:
        """C_r = (W - W_p) / W."""
        return (self.params - self.params_compressed) / self.params if self.params else 0.0

    @property
    def speedup(self) -> float:
        """S_r = T / T_p at the batch size."""
        return self.latency_ms / self.latency_ms_compressed

    def to_json(self) -> dict:
        data = asdict(self)
        data["steps"] = [s.to_json() for s in self.steps]
        data["compression_ratio"] = self.compression_ratio
        data["speedup"] = self.speedup
        return data


def compress(
    source: ModelSource,
    calib: Inputs,
    *,
    prune_ratio: float | dict[str, float] | None = None,
    keep: dict[str, int] | None = None,
    importance: Method = "taylor",
    steps: int = 1,
    finetune: FineTune | None = None,
    tolerance: float | None = None,
    quantization: Mode = "none",
    seed: int = 0,
    device: str | None = "cpu",
    repeats: int = 7,
    output: str | None = None,
) -> tuple[nn.Module, Report]:
    """Prune (if a ratio or counts are given), then quantize; measure; write ``output`` if given."""
    original = source.module
    model, targets, done, stopped = original, {}, [], "target"
    if prune_ratio is not None or keep:
        structure = analyze(original, source.example_inputs)
        targets = resolve_targets(structure, prune_ratio, keep)
        result = prune(original, structure, targets, calib, importance, steps, finetune, tolerance, seed)
        model, done, stopped = result.model, result.steps, result.stopped
    dev = pick_device(device)
    compressed = quantize(model, quantization, dev)
    original_dev, compressed_dev = _on(original, dev), _on(compressed, dev)
    calib_dev = {k: v.to(dev) for k, v in calib.items()}
    fid = fidelity(outputs(original_dev, calib_dev), outputs(compressed_dev, calib_dev))
    example = {k: v.to(dev) for k, v in source.example_inputs.items()}
    t, t_p = [], []
    for _ in range(3):  # interleaved rounds, so drift in machine load hits both alike
        t.append(median_ms(original_dev, example, repeats))
        t_p.append(median_ms(compressed_dev, example, repeats))
    before, after = layer_params(original), layer_params(compressed)
    report = Report(
        model=source.spec,
        batch_size=next(iter(example.values())).shape[0],
        device=str(dev),
        quantize=quantization,
        support=SUPPORT[quantization],
        importance=importance if targets else "-",
        targets=targets,
        steps=done,
        stopped=stopped,
        layers=_changes(before, after),
        params=sum(r.with_bias for r in before),
        params_compressed=sum(r.with_bias for r in after),
        latency_ms=statistics.median(t),
        latency_ms_compressed=statistics.median(t_p),
        weight_bytes=_disk_bytes(original),
        weight_bytes_compressed=_disk_bytes(compressed),
        fidelity=fid,
        output=output,
    )
    if output is not None:
        manifest = {"source": {"spec": source.spec, "options": source.options}, "report": report.to_json()}
        save_compressed(output, compressed.cpu(), source.example_inputs, manifest)
        original.cpu()
    return compressed, report


def _on(model: nn.Module, device: torch.device) -> nn.Module:
    return model.to(device) if device.type != "cpu" else model


def _changes(before: list[LayerParams], after: list[LayerParams]) -> list[LayerChange]:
    by_name = {r.name.removeprefix("inner."): r for r in after}
    rows = []
    for b in before:
        a = by_name.get(b.name, b)
        rows.append(LayerChange(b.name, b.kind, b.shape, a.shape, b.weights, a.weights, b.with_bias, a.with_bias))
    return rows


def _disk_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights saved as safetensors (quantized layers in their int8 form)."""
    state = exportable(model).state_dict()
    return len(safetensors_bytes({k: v.detach().cpu().clone().contiguous() for k, v in state.items()}))
