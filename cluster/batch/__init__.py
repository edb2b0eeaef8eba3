"""Offline batch inference through a plan, on Ray Data: Parquet in, the plan's stages, Parquet out.

The pipeline: read tasks (one per row group) turn the mapped columns into the plan's inputs and mark the rows
that do not fit; then one ``map_batches`` actor pool per stage, each actor loading only its stage's shard,
once (on fewer CPUs than stages, a pool per run of consecutive stages, run back to back in one actor). Pool
sizes follow the plan's measured stage times so the stages keep pace, and the CPU (with ``gpus``, GPU)
requests are fractions sized so that every pool fits the cluster at once. Activations move between the
pools as Arrow blocks through Ray's object store.

* :mod:`cluster.batch.files`: Parquet inputs and outputs, Arrow columns <-> numpy batches (no Ray, no torch).
* :mod:`cluster.batch.pools`: pool sizes and resource requests (pure).
* :mod:`cluster.batch.steps`: the row layout, the read step and the stage actors.
* :mod:`cluster.batch.job`: :func:`prepare`, :func:`dataset`, :func:`run_job` and the :class:`JobReport`.
"""

from cluster.batch.job import DEFAULT_BATCH, JobReport, Prepared, StepReport, batch_dataset, dataset, prepare, run_job

__all__ = ["DEFAULT_BATCH", "JobReport", "Prepared", "StepReport", "batch_dataset", "dataset", "prepare", "run_job"]
