"""partserve: cut a PyTorch model into balanced stages and serve them as a pipeline on Ray Serve.

The public API, in data-path order (names resolve on first use, so ``import partserve`` stays light)::

    import partserve
    source = partserve.load_model("demo-transformer", {"layers": 12})     # or "pkg.mod:factory", an HF dir
    plan = partserve.plan(source, "plans/t12", stages=4)                   # plan.json + one shard per stage
    report = partserve.verify("plans/t12")                                  # stages in sequence vs the model
    config = partserve.serve_config("plans/t12", autoscale=True)            # for `serve deploy`

The command line is ``partserve`` (or ``python -m partserve``); the packages below it form a strict stack:
``partitions`` <- ``serve_app`` <- ``cluster`` <- ``partserve``.
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from partitions.plan import Plan
    from partitions.source import ModelSource
    from partitions.verify import Report

try:
    __version__ = metadata.version("partserve")
except metadata.PackageNotFoundError:  # run from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = ["__version__", "load_model", "plan", "serve_config", "verify"]


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
