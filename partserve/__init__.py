"""partserve: cut a PyTorch model into balanced stages and serve them as a pipeline on Ray Serve.

The public API, in data-path order (names resolve on first use, so ``import partserve`` stays light)::

    import partserve
    source = partserve.load_model("demo-transformer", {"layers": 12})     # or "pkg.mod:factory", an HF dir
    plan = partserve.plan(source, "plans/t12", stages=4)                   # plan.json + one shard per stage
    report = partserve.verify("plans/t12")                                  # stages in sequence vs the model
    config = partserve.serve_config("plans/t12", autoscale=True)            # for `serve deploy`
    ds = partserve.batch("plans/t12", "data/*.parquet")                     # a Ray Dataset of outputs

The command line is ``partserve`` (or ``python -m partserve``); the packages below it form a strict stack:
``partitions`` <- ``serve_app`` <- ``cluster`` <- ``partserve``.
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ray.data

    from partitions.plan import Plan
    from partitions.source import ModelSource
    from partitions.verify import Report

try:
    __version__ = metadata.version("partserve")
except metadata.PackageNotFoundError:  # run from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = ["__version__", "batch", "load_model", "plan", "serve_config", "verify"]


def load_model(spec: str, options: dict[str, Any] | None = None, batch_size: int = 8) -> ModelSource:
    """A model with example inputs of ``batch_size`` samples: a zoo name, ``package.module:factory`` (called
    with ``options``) or a Hugging Face model directory."""
    from partitions.source import load_model as load

    return load(spec, options, batch_size)


def plan(model: ModelSource | str, out: str, **options: Any) -> Plan:
    """Capture, profile and partition ``model`` (a :class:`ModelSource`, or a spec for :func:`load_model`),
    writing plan.json and one weight shard per stage to ``out`` (a path or an s3://, gs:// URI).

    ``options``: :class:`partitions.partition.PlanOptions` fields (``stages``, ``max_stage_bytes``,
    ``objective``, ``device``, ...)."""
    from partitions.partition import PlanOptions, build_plan

    source = load_model(model) if isinstance(model, str) else model
    return build_plan(source, out, PlanOptions(**options))


def verify(plan_dir: str, **options: Any) -> Report:
    """Run the plan's stages in sequence against the original model (see :func:`partitions.verify.verify`)."""
    from partitions.verify import verify as run

    return run(plan_dir, **options)


def serve_config(plan_dir: str, **options: Any) -> dict[str, Any]:
    """The Serve config for ``serve deploy`` (see :func:`cluster.deploy.serve_config`)."""
    from cluster.deploy import serve_config as build

    return build(plan_dir, **options)


def batch(plan_dir: str, input: str, **options: Any) -> ray.data.Dataset:
    """The plan's stages over the Parquet rows at ``input`` (a file, a directory or a glob) as a lazy Ray
    Dataset: per row the key columns, the model outputs, ``_input``, ``_row`` and ``_reason`` (null, or why
    the row was rejected). Needs ``pip install 'partserve[batch]'``; ``partserve batch`` runs the same
    pipeline and writes one file per input file.

    ``options`` (see :func:`cluster.batch.prepare`): ``mapping`` (column -> model input), ``keys``,
    ``batch_size``, ``gpus``, ``cpus``, ``output_uri`` (skip inputs whose output there is complete),
    ``share_actors`` (consecutive stages share an actor on fewer CPUs than stages; default True)."""
    from cluster.batch import batch_dataset

    return batch_dataset(plan_dir, input, **options)
