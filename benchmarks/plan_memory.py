"""Peak memory of `partserve plan` relative to the model's weight bytes.

The baseline is taken after torch.export's own machinery is loaded (by exporting a tiny model), so the
figure counts what planning this model costs: the model itself, plus any copies of its weights.

    python benchmarks/plan_memory.py --layers 12 --width 512     # prints JSON
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from partitions.partition import PlanOptions, build_plan
from partitions.source import load_model


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=PlanOptions.repeats, help="timed runs per node while profiling")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        warm = load_model("demo-transformer", {"layers": 1, "width": 16, "seq_len": 4})
        build_plan(warm, f"{tmp}/warm", PlanOptions(stages=1, repeats=1, warmup=0, refine=0))
        del warm
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current resident size
        baseline = _status("VmRSS")
        source = load_model("demo-transformer", {"layers": args.layers, "width": args.width})
        weights = sum(t.numel() * t.element_size() for t in source.module.state_dict().values())
        plan = build_plan(source, f"{tmp}/plan", PlanOptions(stages=args.stages, repeats=args.repeats))
        peak = _status("VmHWM") - baseline
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "weight_bytes": weights,
                "shard_weight_bytes": plan.summary["shard_weight_bytes"],
                "peak_bytes_over_baseline": peak,
                "peak_over_weights": round(peak / weights, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
