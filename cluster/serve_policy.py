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
``{DeploymentID: AutoscalingContext}`` for every deployment that has an ``autoscaling_config``. Ray still
applies each deployment's ``upscale_delay_s``, ``downscale_delay_s`` and scaling factors on top of the returned
numbers, so set those to 0 / 1 in the stage deployments' ``autoscaling_config``: the delays and hysteresis of
:class:`~cluster.policy.PolicyConfig` govern. Deployments not named in ``stages`` get no decision and keep
their own settings; the entrance (``min_replicas = max_replicas``, as :func:`cluster.deploy.app_section`
writes it) is read for its arrival counter. What is read from each context is :mod:`cluster.observe`'s: the
stage and entrance replicas' custom metrics (``record_autoscaling_stats``: newest raw points), Serve's window
aggregates where those are missing.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve.config import AutoscalingContext, DeploymentID

from cluster.observe import DeploymentMetrics, pipeline_observation
from cluster.policy import PolicyConfig, StageSpec, initial_state, step
from serve_app.names import ENTRANCE, POLICY_IMPORT_PATH

logger = logging.getLogger("ray.serve")


def policy_section(stages: list[dict[str, Any]], gpu_budget: float | None = None, **config: Any) -> dict[str, Any]:
    """The app config's ``autoscaling_policy`` entry: this policy with ``stages`` (:class:`StageSpec` fields:
    name, service_ms, batch_size, gpu_fraction, min_replicas, max_replicas) and :class:`PolicyConfig` fields."""
    kwargs: dict[str, Any] = {"stages": stages, **config}
    if gpu_budget is not None:
        kwargs["gpu_budget"] = gpu_budget
    PolicyConfig(stages=tuple(StageSpec(**s) for s in stages), **{k: v for k, v in kwargs.items() if k != "stages"})
    return {"policy_function": POLICY_IMPORT_PATH, "policy_kwargs": kwargs}


def deployment_metrics(ctx: AutoscalingContext) -> DeploymentMetrics:
    """A context's content without Ray types: counts, window aggregates, raw custom metrics per replica."""
    raw = {
        key: [[(p.timestamp, float(p.value)) for p in series] for series in by_replica.values()]
        for key, by_replica in (ctx.raw_metrics or {}).items()
    }
    return DeploymentMetrics(
        name=ctx.deployment_name,
        current_replicas=ctx.current_num_replicas,
        target_replicas=ctx.target_num_replicas,
        total_requests=ctx.total_num_requests,
        queued_requests=ctx.total_queued_requests or 0.0,
        raw=raw,
    )


class PipelineAutoscalingPolicy:
    """Class-callable application policy keeping the :class:`~cluster.policy.PolicyState` between ticks."""

    def __init__(self, stages: list[dict[str, Any]], **config: Any) -> None:
        self.config = PolicyConfig(stages=tuple(StageSpec(**s) for s in stages), **config)
        self.state = initial_state(self.config)
        self.last: dict[str, int] = {}

    def __call__(
        self, contexts: dict[DeploymentID, AutoscalingContext]
    ) -> tuple[dict[DeploymentID, int], dict[DeploymentID, dict]]:
        by_name = {dep.name: (dep, ctx) for dep, ctx in contexts.items()}
        missing = [s.name for s in self.config.stages if s.name not in by_name]
        if missing:  # a stage is being deployed or deleted: leave every deployment as it is this tick
            return {}, {}
        ordered = [by_name[s.name] for s in self.config.stages]
        now_s = max(ctx.current_time or 0.0 for _, ctx in ordered)
        entrance = deployment_metrics(by_name[ENTRANCE][1]) if ENTRANCE in by_name else None
        observation = pipeline_observation(now_s, [deployment_metrics(ctx) for _, ctx in ordered], entrance)
        decision, self.state = step(observation, self.config, self.state)
        if decision != self.last:  # the controller's log: what the policy saw when it changed its mind
            queues = [(round(s.queued, 1), round(s.running, 1)) for s in observation.stages]
            logger.info(
                f"pipeline policy: {decision} at arrival rate {self.state.arrival_rate_per_s:.2f}/s"
                f" (measured {observation.arrival_rate_per_s}), stage queued/running {queues}"
            )
            self.last = decision
        return {dep: decision[dep.name] for dep, _ in ordered}, {}
