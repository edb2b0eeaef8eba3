"""How a batch travels between stages (serve_app/transport.py): the message estimate against the messages the
stages really send, the choice it makes, and the error that sends a batch again by reference."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from ray.exceptions import RayTaskError

from partitions.runtime import StageRunner, stage_payload
from serve_app.tensors import to_wire
from serve_app.transport import BY_VALUE_MAX_BYTES, MessageEstimate, by_value, payload_bytes, too_large
from tests.serve_fixtures import TRANSFORMER, PlannedModel, Planner


@pytest.fixture(scope="module")
def transformer(planned: Planner) -> PlannedModel:
    return planned(TRANSFORMER)


@pytest.mark.parametrize("samples", [1, 5, 32])
def test_estimate_is_the_largest_message_the_stages_send(transformer: PlannedModel, samples: int) -> None:
    """At the plan's shapes the estimate is exact: the largest of what the first stage reads and what each stage
    answers, measured by running the stages here on a batch."""
    plan, inputs = transformer.plan, transformer.sample(samples, seed=1)
    runners = [StageRunner(transformer.uri, s.index) for s in plan.stages]
    sent: dict[int, dict] = {}
    messages = []
    for stage, runner in zip(plan.stages, runners):
        payload = stage_payload(stage.after, sent, inputs, stage.reads)
        if not stage.after:
            messages.append(payload_bytes(to_wire(payload)))
        sent[stage.index] = runner(payload)
        messages.append(payload_bytes(to_wire(sent[stage.index])))
    assert MessageEstimate.of(plan).largest(inputs, samples) == max(messages)


def test_a_batch_goes_by_value_up_to_the_bound(transformer: PlannedModel) -> None:
    estimate = MessageEstimate.of(transformer.plan)
    one = estimate.largest(transformer.sample(1), 1)
    fits = BY_VALUE_MAX_BYTES // one
    assert by_value(estimate, transformer.sample(fits), fits, BY_VALUE_MAX_BYTES)
    assert not by_value(estimate, transformer.sample(fits + 1), fits + 1, BY_VALUE_MAX_BYTES)
    assert not by_value(estimate, transformer.sample(1), 1, 0), "0 sends every batch by reference"


@given(samples=st.integers(1, 64), bound=st.integers(0, 1 << 24))
def test_by_value_is_monotone_in_samples_and_bound(transformer: PlannedModel, samples: int, bound: int) -> None:
    estimate = MessageEstimate.of(transformer.plan)
    if by_value(estimate, transformer.sample(samples), samples, bound):
        assert by_value(estimate, transformer.sample(samples), samples, bound + 1)
        if samples > 1:
            assert by_value(estimate, transformer.sample(samples - 1), samples - 1, bound)


def wrapped(error: BaseException) -> BaseException:
    """``error`` as a caller sees a failure inside a replica: a ``RayTaskError`` whose cause it is."""
    try:
        raise RuntimeError("outer") from error
    except RuntimeError as exc:
        return RayTaskError("fn", "traceback", exc)


def test_only_a_refused_size_means_too_large() -> None:
    exhausted = grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, details="Received message larger than max")
    assert too_large(exhausted) and too_large(wrapped(exhausted))
    assert not too_large(grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE))
    assert not too_large(ValueError("bad input"))


def test_bench_default_is_the_transport_default() -> None:
    """``partserve bench`` spells the bound out (importing Serve would slow every command's start)."""
    from partserve.cli.bench import bench

    (option,) = [p for p in bench.params if p.name == "by_value_max_bytes"]
    assert option.default == BY_VALUE_MAX_BYTES
