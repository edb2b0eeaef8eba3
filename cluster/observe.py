"""What Ray Serve 2.60 shows an application-level autoscaling policy, without Ray types, and the coordinated
policy's :class:`~cluster.policy.PipelineObservation` built from it. Pure: no Ray, no clock.

Serve's metrics path (``ray/serve/_private/router.py``, ``replica.py``, ``autoscaling_state.py``):

* Every handle that calls a deployment records, every ``min(0.2 x look_back_period_s, metrics_interval_s)``
  seconds (6 s at the defaults), the requests queued at it and the requests it has sent to each replica and
  not yet got back; it pushes the points of the last ``look_back_period_s`` to the controller every
  ``metrics_interval_s`` (10 s). The controller merges them and hands a policy only a window aggregate
  (time-weighted mean by default, the last point held until now): ``total_num_requests`` and
  ``total_queued_requests``. A policy never sees the count of now, nor completions.
* Every running replica of a deployment with an ``autoscaling_config`` calls ``record_autoscaling_stats``
  on the same cadence and pushes the same way; a policy gets those custom metrics both aggregated and raw
  (``raw_metrics``: one time series per replica). The newest raw point is the freshest figure Serve gives.
* Only deployments with an ``autoscaling_config`` appear in the policy's contexts: the entrance needs one
  (``min_replicas = max_replicas``) for its arrival counter to be seen.

:class:`DeploymentMetrics` is one context's content; :func:`pipeline_observation` reads the stages' queues
(newest raw points of :data:`~serve_app.names.QUEUED_METRIC` and :data:`~serve_app.names.RUNNING_METRIC`,
with their time), their service time, and the arrival rate from the entrance's counter
(:data:`~serve_app.names.ARRIVED_METRIC`: over its window of points while the newest interval agrees with the
ones before it, else over the newest interval alone, :func:`counter_rate`; 0 until it has two points, so the
first seconds size stages from their queues alone). Where a stage's custom metrics are missing it falls
back to Serve's window aggregates, as Ray's own policy reads them; without an entrance the policy estimates the
rate from the first stage's flow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from cluster.policy import PipelineObservation, StageObservation
from serve_app.names import ARRIVED_METRIC, FULL_BATCH_METRIC, QUEUED_METRIC, RUNNING_METRIC

Series = Sequence[tuple[float, float]]
"""``(timestamp_s, value)`` points, oldest first."""
CHANGE_SIGMAS = 3.0
"""How far (in Poisson standard deviations) a counter's newest interval must be from its window's rate to
be read as a change of load (:func:`counter_rate`)."""


@dataclass(frozen=True)
class DeploymentMetrics:
    """One deployment as an application-level policy sees it (an ``AutoscalingContext``'s content)."""

    name: str
    current_replicas: int
    """Running replicas."""
    target_replicas: int
    total_requests: float
    """Queued + running requests, aggregated over the look-back window (Serve: ``total_num_requests``)."""
    queued_requests: float = 0.0
    """Requests queued at the handles, aggregated likewise (Serve: ``total_queued_requests``)."""
    raw: Mapping[str, Sequence[Series]] = field(default_factory=dict)
    """Custom metric -> one series per running replica (Serve: ``raw_metrics``)."""


def newest(series: Sequence[Series]) -> tuple[float, float] | None:
    """The sum over replicas of each one's newest value, and the mean time of those points; None: no points."""
    points = [s[-1] for s in series if s]
    if not points:
        return None
    return sum(v for _, v in points), sum(t for t, _ in points) / len(points)


class CounterRate(NamedTuple):
    rate_per_s: float
    """Summed over replicas."""
    sampled_at_s: float
    """The newest point's time."""
    events: float
    """The counts the rate is taken over (its Poisson noise is ``1 / sqrt(events)`` of it)."""


def counter_rate(series: Sequence[Series], band_sigmas: float = CHANGE_SIGMAS) -> CounterRate | None:
    """Rate of a per-replica counter, summed over replicas, the newest point's time and the counts it is over.
    None: no replica has two points. A counter that went down (a restarted replica) counts from 0.

    Per replica, the rate over all its points since it last restarted (Serve keeps a look-back window of
    them), unless the newest interval's count lies more than ``band_sigmas`` standard deviations from what
    the interval before it predicts (their rate over that time, the counts taken as Poisson events in the
    counter's own units): then the load has changed and the newest interval's rate is taken alone. So a
    step is seen in one interval, while a steady load is read over the whole window instead of from the
    noise of its newest interval."""
    rates, times, events = [], [], []
    for s in series:
        if len(s) < 2:
            continue
        (t0, v0), (t1, v1) = s[-2], s[-1]
        if t1 <= t0:
            continue
        newest_count = v1 - v0 if v1 >= v0 else v1
        rate, counted = newest_count / (t1 - t0), newest_count
        start = len(s) - 2  # the oldest point of the run of points since the last restart
        while start > 0 and s[start - 1][1] <= s[start][1] and s[start - 1][0] < s[start][0]:
            start -= 1
        ta, va = s[start]
        if start < len(s) - 2 and v1 >= v0:
            expected = (v0 - va) / (t0 - ta) * (t1 - t0)
            if abs(newest_count - expected) <= band_sigmas * math.sqrt(max(expected, 1.0)):
                rate, counted = (v1 - va) / (t1 - ta), v1 - va
        rates.append(rate)
        times.append(t1)
        events.append(counted)
    return CounterRate(sum(rates), max(times), sum(events)) if rates else None


def stage_observation(m: DeploymentMetrics) -> StageObservation:
    """A stage from its replicas' newest queue points (plus the handles' queued window mean), or, without
    them, from Serve's window aggregates."""
    queued, running = newest(m.raw.get(QUEUED_METRIC, ())), newest(m.raw.get(RUNNING_METRIC, ()))
    service = newest(m.raw.get(FULL_BATCH_METRIC, ()))
    reporting = len([s for s in m.raw.get(FULL_BATCH_METRIC, ()) if s])
    service_ms = service[0] / reporting if service is not None else None
    if queued is None or running is None:
        return StageObservation(
            queued=m.queued_requests,
            running=max(0.0, m.total_requests - m.queued_requests),
            target_replicas=m.target_replicas,
            service_ms=service_ms,
            ready_replicas=m.current_replicas,
        )
    return StageObservation(
        queued=queued[0] + m.queued_requests,
        running=running[0],
        target_replicas=m.target_replicas,
        service_ms=service_ms,
        ready_replicas=m.current_replicas,
        sampled_at_s=min(queued[1], running[1]),
    )


def pipeline_observation(
    time_s: float, stages: Sequence[DeploymentMetrics], entrance: DeploymentMetrics | None = None
) -> PipelineObservation:
    """The policy's view at ``time_s``: every stage (in pipeline order), and the entrance's arrival rate and
    queue when it reports them."""
    counted = entrance.raw.get(ARRIVED_METRIC, ()) if entrance is not None else ()
    rate = counter_rate(counted)
    waiting = newest(entrance.raw.get(QUEUED_METRIC, ())) if entrance is not None else None
    return PipelineObservation(
        time_s=time_s,
        stages=tuple(stage_observation(m) for m in stages),
        # no rate yet (under two points) with an entrance: 0, none guessed from the stages
        arrival_rate_per_s=(0.0 if entrance is not None else None) if rate is None else rate.rate_per_s,
        rate_sampled_at_s=None if rate is None else rate.sampled_at_s,
        arrival_events=None if rate is None else rate.events,
        entrance_queued=0.0 if waiting is None else waiting[0],
    )
