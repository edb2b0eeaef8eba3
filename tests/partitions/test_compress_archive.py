"""Compressed directories load like any MODEL (no code executed), plan and verify; quantization and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from partitions.compress.api import calibration_inputs, compress
from partitions.compress.measure import outputs
from partitions.compress.quantize import Int8Linear, exportable, quantize
from partitions.errors import PartserveError
from partitions.partition import PlanOptions, build_plan
from partitions.source import load_model
from partitions.verify import verify
from partserve.cli.compress import compress as compress_command


def test_pruned_cnn_plans_and_verifies(tmp_path) -> None:
    source = load_model("demo-cnn", {}, 4)
    calib = calibration_inputs(source, None, 16, 0)
    model, report = compress(source, calib, keep={"conv1": 12, "fc1": 64}, repeats=1, output=str(tmp_path / "c"))
    assert report.params_compressed < report.params and 0 < report.compression_ratio < 1
    loaded = load_model(str(tmp_path / "c"), {}, 4)
    assert loaded.kind == "compressed" and list(loaded.example_inputs) == ["image"]
    assert torch.allclose(outputs(loaded.module, calib), outputs(model, calib), atol=1e-6)
    build_plan(loaded, str(tmp_path / "plan"), PlanOptions(stages=2, repeats=1, warmup=0, refine=0))
    result = verify(str(tmp_path / "plan"))
    assert result.passed and result.max_rel_error <= 1e-6


@pytest.mark.parametrize("mode", ["dynamic-int8", "weight-int8", "bf16"])
def test_quantized_transformer_saves_and_reloads(tmp_path, mode: str) -> None:
    source = load_model("demo-transformer", {"layers": 1, "width": 32, "seq_len": 8}, 4)
    calib = calibration_inputs(source, None, 16, 0)
    model, report = compress(source, calib, quantization=mode, repeats=1, output=str(tmp_path / mode))
    assert report.fidelity.cosine > 0.99 and report.weight_bytes_compressed < report.weight_bytes
    assert report.params_compressed == report.params  # quantization keeps every parameter
    loaded = load_model(str(tmp_path / mode), {}, 4)
    got = outputs(loaded.module, calib)
    want = outputs(exportable(model), calib)  # dynamic-int8 is saved with the same int8 weights, float math
    assert torch.allclose(got, want, atol=1e-5)


def test_int8_linear_matches_formula() -> None:
    linear = torch.nn.Linear(8, 4)
    q = Int8Linear.from_linear(linear)
    assert q.qweight.dtype == torch.int8 and q.scale.shape == (4,)
    x = torch.randn(3, 8)
    assert torch.allclose(q(x), linear(x), atol=2e-2)


def test_fp16_on_cpu_is_refused() -> None:
    with pytest.raises(PartserveError, match="fp16 needs a CUDA device"):
        quantize(torch.nn.Linear(2, 2), "fp16", torch.device("cpu"))


@pytest.mark.slow  # compresses and plans demo-cnn, then sweeps each layer's sensitivity
def test_cli_compress_json_and_sensitivity(tmp_path) -> None:
    runner = CliRunner()
    out = tmp_path / "c"
    args = ["demo-cnn", "--prune-ratio", "conv2=0.5", "--quantize", "weight-int8", "-o", str(out), "--repeats", "1"]
    r = runner.invoke(compress_command, [*args, "--calibration-samples", "8", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["targets"] == {"conv2": 16} and report["compression_ratio"] > 0
    assert json.loads((out / "compressed.json").read_text())["report"]["quantize"] == "weight-int8"
    r = runner.invoke(compress_command, ["demo-cnn", "--sensitivity", "--calibration-samples", "8", "--json"])
    assert r.exit_code == 0, r.output
    layers = json.loads(r.output)["layers"]
    assert [x["name"] for x in layers] == ["conv1", "conv2", "fc1"] and len(layers[0]["deviation"]) == 9
    r = runner.invoke(compress_command, ["demo-cnn", "--keep", "fc2=3", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "cannot prune fc2" in r.output
