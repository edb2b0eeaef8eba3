"""``partserve compress``: prune and quantize a model before partitioning, with a sensitivity analysis."""

from __future__ import annotations

from typing import Any

import click

from partitions.compress.options import METHODS, MODES
from partserve.cli.output import console, domain_errors, emit_json, human_bytes, json_option, parse_pairs, table


def _pairs(text: str | None, cast: type, option: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, raw = item.partition("=")
        try:
            out[key.strip()] = cast(raw)
        except ValueError:
            sep = ""
        if not sep:
            raise click.BadParameter(f"{item!r} is not LAYER=VALUE", param_hint=option)
    return out


def _ratio(text: str | None) -> float | dict[str, float] | None:
    if text is None or "=" in text:
        return _pairs(text, float, "--prune-ratio") or None
    try:
        return float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a ratio or LAYER=RATIO list", param_hint="--prune-ratio") from None


@click.command("compress")
@click.argument("model")
@click.option("-o", "--output", "out", help="Directory for the compressed model (a MODEL for plan/serve).")
@click.option(
    "--prune-ratio", help="Fraction of output channels to remove: 0.25 for every prunable layer, or conv1=0.5,fc1=0.25."
)
@click.option("--keep", help="Output channels to keep per layer, e.g. conv1=12,fc1=96.")
@click.option("--importance", type=click.Choice(METHODS), default="taylor", show_default=True)
@click.option(
    "--steps", type=click.IntRange(min=1), default=1, show_default=True, help="Pruning steps towards the target."
)
@click.option(
    "--quantize",
    "quantization",
    type=click.Choice(MODES),
    default="none",
    show_default=True,
)
@click.option(
    "--calibration", type=click.Path(exists=True, dir_okay=False), help="An .npz of input arrays (default: random)."
)
@click.option(
    "--calibration-samples",
    type=click.IntRange(min=2),
    default=64,
    show_default=True,
    help="Random calibration samples.",
)
@click.option("--finetune", help="package.module:function called as fn(model, calibration_inputs) after each step.")
@click.option(
    "--tolerance", type=click.FloatRange(min=0), help="Stop pruning before 1 - cosine similarity exceeds this."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Batch the speed-up is timed at."
)
@click.option("--device", default="cpu", show_default=True, help="Device to quantize for and time on: cpu, cuda, auto.")
@click.option("--repeats", type=click.IntRange(min=1), default=7, show_default=True, help="Timed repeats per round.")
@click.option("--sensitivity", is_flag=True, help="Only run and print the sensitivity analysis.")
@click.option("-O", "--model-option", "model_opts", multiple=True, help="Model option KEY=VALUE (repeatable).")
@json_option
@domain_errors
def compress(
    model: str,
    out: str | None,
    prune_ratio: str | None,
    keep: str | None,
    importance: str,
    steps: int,
    quantization: str,
    calibration: str | None,
    calibration_samples: int,
    finetune: str | None,
    tolerance: float | None,
    seed: int,
    batch_size: int,
    device: str,
    repeats: int,
    sensitivity: bool,
    model_opts: tuple[str, ...],
    as_json: bool,
) -> None:
    """Prune and/or quantize MODEL and report size, speed and fidelity; with -o, write a MODEL directory."""
    from partitions.compress.api import calibration_inputs
    from partitions.compress.api import compress as run
    from partitions.compress.prune import load_hook
    from partitions.source import load_model

    source = load_model(model, parse_pairs(model_opts, "-O"), batch_size)
    calib = calibration_inputs(source, calibration, calibration_samples, seed)
    if sensitivity:
        _sensitivity(source, calib, importance, seed, as_json)  # type: ignore[arg-type]
        return
    if out is None:
        raise click.UsageError("pass -o DIR (or --sensitivity to only analyse)")
    hook = load_hook(finetune) if finetune else None
    _, report = run(
        source, calib, prune_ratio=_ratio(prune_ratio), keep=_pairs(keep, int, "--keep") or None,
        importance=importance, steps=steps, finetune=hook, tolerance=tolerance,  # type: ignore[arg-type]
        quantization=quantization, seed=seed, device=device, repeats=repeats, output=out,  # type: ignore[arg-type]
    )  # fmt: skip
    if as_json:
        emit_json(report.to_json())
        return
    rows = [
        [c.name, c.kind, c.shape, c.shape_compressed, c.weights, c.weights_compressed, c.with_bias,
         c.with_bias_compressed]
        for c in report.layers
    ]  # fmt: skip
    columns = ["layer", "kind", "shape", "after", "weights", "after", "+bias", "after"]
    console.print(table(f"compress {model}: prune {report.importance}, quantize {report.quantize}", columns, rows))
    f = report.fidelity
    console.print(
        f"W {report.params:,} -> W_p {report.params_compressed:,} (C_r {report.compression_ratio:.3f}); "
        f"S_r {report.speedup:.2f} ({report.latency_ms:.2f} -> {report.latency_ms_compressed:.2f} ms at batch "
        f"{report.batch_size} on {report.device}); weights {human_bytes(report.weight_bytes)} -> "
        f"{human_bytes(report.weight_bytes_compressed)}; fidelity: cosine {f.cosine:.5f}, top-1 "
        f"{f.top1_agreement:.3f}, max abs error {f.max_abs_error:.3g}; pruning stopped at {report.stopped}; "
        f"wrote {out} ({report.support})",
        highlight=False,
    )


def _sensitivity(source, calib, importance: str, seed: int, as_json: bool) -> None:
    from partitions.compress.graph import analyze
    from partitions.compress.sensitivity import analyze_sensitivity, summary_rows

    structure = analyze(source.module, source.example_inputs)
    layers = analyze_sensitivity(source.module, structure, calib, importance, seed=seed)  # type: ignore[arg-type]
    if as_json:
        emit_json({"layers": [x.to_json() for x in layers], "refused": structure.refused})
        return
    columns, rows = summary_rows(layers)
    console.print(
        table(f"{source.spec}: mean importance; output cosine when pruned alone by {importance}", columns, rows)
    )
    for name, why in structure.refused.items():
        console.print(f"not prunable: {name}: {why}", highlight=False)
