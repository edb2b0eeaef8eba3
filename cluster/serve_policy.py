"""Ray Serve 2.60 application-level adapter for :func:`cluster.policy.step` (the only module here importing Ray).

Serve config (one policy for the whole application; it overrides the per-deployment policies)::

    applications:
      - name: partserve
        import_path: serve_app.app:build_app
        autoscaling_policy:
          policy_function: cluster.serve_policy:PipelineAutoscalingPolicy
          policy_kwargs: {stages: [{name: stage-0, service_ms: 170, batch_size: 8, gpu_fraction: 0.5}, ...],
                          gpu_budget: 4}

Ray instantiates the class once with ``policy_kwargs`` and calls it every control-loop tick with
``{DeploymentID: AutoscalingContext}``. Ray still applies each deployment's ``upscale_delay_s``,
``downscale_delay_s`` and scaling factors on top of the returned numbers, so set those to 0 / 1 in the stage
deployments' ``autoscaling_config``: the delays and hysteresis of :class:`~cluster.policy.PolicyConfig` govern.
Deployments not named in ``stages`` (the entrance) get no decision and keep their own settings. A stage replica
that reports ``{"full_batch_ms": ...}`` from ``record_autoscaling_stats`` feeds the live service-time EWMA.
"""

from __future__ import annotations

from typing import Any

from ray.serve.config import AutoscalingContext, DeploymentID

from cluster.policy import PipelineObservation, PolicyConfig, StageObservation, StageSpec, initial_state, step
from serve_app.names import FULL_BATCH_METRIC, POLICY_IMPORT_PATH


def policy_section(stages: list[dict[str, Any]], gpu_budget: float | None = None, **config: Any) -> dict[str, Any]:
    """The app config's ``autoscaling_policy`` entry: this policy with ``stages`` (:class:`StageSpec` fields:
    name, service_ms, batch_size, gpu_fraction, min_replicas, max_replicas) and :class:`PolicyConfig` fields."""
    kwargs: dict[str, Any] = {"stages": stages, **config}
    if gpu_budget is not None:
        kwargs["gpu_budget"] = gpu_budget
    PolicyConfig(stages=tuple(StageSpec(**s) for s in stages), **{k: v for k, v in kwargs.items() if k != "stages"})
    return {"policy_function": POLICY_IMPORT_PATH, "policy_kwargs": kwargs}


def stage_observation(ctx: AutoscalingContext) -> StageObservation:
    """A deployment's context as the policy's view of one stage."""
    samples = list((ctx.aggregated_metrics or {}).get(FULL_BATCH_METRIC, {}).values())
    return StageObservation(
        queued=ctx.total_queued_requests or 0.0,
        running=ctx.total_running_requests,
        target_replicas=ctx.target_num_replicas,
        service_ms=sum(samples) / len(samples) if samples else None,
    )


class PipelineAutoscalingPolicy:
    """Class-callable application policy keeping the :class:`~cluster.policy.PolicyState` between ticks."""

    def __init__(self, stages: list[dict[str, Any]], **config: Any) -> None:
        self.config = PolicyConfig(stages=tuple(StageSpec(**s) for s in stages), **config)
        self.state = initial_state(self.config)

    def __call__(
        self, contexts: dict[DeploymentID, AutoscalingContext]
    ) -> tuple[dict[DeploymentID, int], dict[DeploymentID, dict]]:
        by_name = {dep.name: (dep, ctx) for dep, ctx in contexts.items()}
        missing = [s.name for s in self.config.stages if s.name not in by_name]
        if missing:  # a stage is being deployed or deleted: leave every deployment as it is this tick
            return {}, {}
        ordered = [by_name[s.name] for s in self.config.stages]
        now_s = max(ctx.current_time or 0.0 for _, ctx in ordered)
        observation = PipelineObservation(now_s, tuple(stage_observation(ctx) for _, ctx in ordered))
        decision, self.state = step(observation, self.config, self.state)
        return {dep: decision[dep.name] for dep, _ in ordered}, {}
