"""The stage count ``partserve run`` and ``bench`` plan a MODEL into when none is asked."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from partserve.cli.serving import MAX_DEFAULT_STAGES, MIN_DEFAULT_STAGES, default_stages, stages_for_devices


@given(st.integers(min_value=0, max_value=1024))
def test_one_stage_per_device_within_bounds(devices: int) -> None:
    n = stages_for_devices(devices)
    assert MIN_DEFAULT_STAGES <= n <= MAX_DEFAULT_STAGES
    if MIN_DEFAULT_STAGES <= devices <= MAX_DEFAULT_STAGES:
        assert n == devices  # never more stages than devices can run at once, while a pipeline is possible
    assert stages_for_devices(devices + 1) >= n


def test_this_machine_gets_a_pipeline() -> None:
    assert MIN_DEFAULT_STAGES <= default_stages() <= MAX_DEFAULT_STAGES
