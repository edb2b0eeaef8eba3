"""How a batch travels between the stage deployments: by value over Serve's replica-to-replica gRPC, or by
reference through Ray's object store.

Serve sends a handle call either as a Ray actor call whose arguments and result live in the object store
(``_by_reference=True``, its default) or by value on the gRPC channel that every replica opens for
inter-deployment calls (``handle.options(_by_reference=False)``; ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` makes it
the default for every handle). Measured on a 2-core CPU box (``benchmarks/hop_cost.py``), one no-op hop took
5.8 ms by value against 8.2 ms by reference for a 64 KiB array and 10.9 against 14.8 ms at 512 KiB, but 1.6x,
2.8x and 17x as long by value at 2, 8 and 32 MiB: by value pickles the payload into one gRPC message, and a
chained response passes through the caller, where the object store hands a large array over in shared
memory. So a batch goes by value when every message it puts on a hop is estimated under
:data:`BY_VALUE_MAX_BYTES`, by reference otherwise. gRPC refuses a message over its limit (4 MiB by default,
``RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH``); a batch whose estimate fell short is sent again by reference
(:func:`too_large`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import grpc
import numpy as np
from ray.serve.handle import DeploymentHandle

from partitions.plan import Plan
from partitions.types import Bytes, Payload
from serve_app.retry import causes

BY_VALUE_MAX_BYTES: Bytes = 1 << 20
"""Largest estimated message (bytes) of a batch sent by value: by value measured faster at 64 and 512 KiB and
slower from 2 MiB on."""


def hop_sample_bytes(plan: Plan) -> Bytes:
    """The largest message one sample puts on any hop at the plan's shapes, in bytes: what a stage receives
    from the entrance (the model inputs it reads) or what it answers (the values it carries and computes)."""
    specs = {t.name: t for t in plan.inputs}
    for stage in plan.stages:
        specs.update((t.name, t) for t in stage.computed)
    sent = [sum(specs[name].sample_bytes() for name in stage.sends) for stage in plan.stages]
    read = [sum(specs[name].sample_bytes() for name in stage.reads) for stage in plan.stages if not stage.after]
    return max(sent + read, default=0)


def payload_bytes(payload: Mapping[str, np.ndarray]) -> Bytes:
    """Bytes of a payload's arrays."""
    return sum(a.nbytes for a in payload.values())


@dataclass(frozen=True)
class MessageEstimate:
    """What a plan's messages between stages weigh per sample, worked out once per plan."""

    per_sample: Bytes
    """:func:`hop_sample_bytes` of the plan."""
    planned_input: Bytes
    """Bytes of one sample of the model inputs at the plan's shapes."""

    @classmethod
    def of(cls, plan: Plan) -> MessageEstimate:
        return cls(hop_sample_bytes(plan), sum(t.sample_bytes() for t in plan.inputs))

    def largest(self, payload: Mapping[str, np.ndarray], samples: int) -> Bytes:
        """Estimated bytes of the largest message a batch puts on a hop: ``per_sample`` per sample, scaled by
        how much larger than the plan's inputs the batch's inputs are per sample (a longer sequence than the
        plan's makes every activation longer), and never under the inputs themselves."""
        given = payload_bytes(payload)
        scale = max(1.0, given / (samples * self.planned_input)) if samples and self.planned_input else 1.0
        return max(given, int(samples * self.per_sample * scale))


def by_value(estimate: MessageEstimate, payload: Mapping[str, np.ndarray], samples: int, max_bytes: Bytes) -> bool:
    """Whether a batch of ``samples`` goes by value: its :meth:`MessageEstimate.largest` message is at most
    ``max_bytes`` (0: never)."""
    return max_bytes > 0 and estimate.largest(payload, samples) <= max_bytes


def too_large(exc: BaseException) -> bool:
    """Whether ``exc`` is gRPC refusing a message over its size limit (either end of a by-value hop)."""
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    return any(isinstance(e, grpc.aio.AioRpcError) and e.code() == exhausted for e in causes(exc))


class StageHandles:
    """The stage deployments' handles both ways, and which way a batch goes (:meth:`goes_by_value`)."""

    def __init__(self, plan: Plan, stages: list[DeploymentHandle], by_value_max_bytes: Bytes) -> None:
        """``by_value_max_bytes``: see :func:`by_value` (0: every batch by reference)."""
        self.plan = plan
        self.by_reference = stages
        self.by_value = [h.options(_by_reference=False) for h in stages]
        self.max_bytes = by_value_max_bytes
        self.estimate = MessageEstimate.of(plan)

    def goes_by_value(self, payload: Payload, samples: int) -> bool:
        """Whether a batch of ``samples`` travels on :attr:`by_value` (else :attr:`by_reference`)."""
        return by_value(self.estimate, payload, samples, self.max_bytes)
