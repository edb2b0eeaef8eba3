"""``partserve simulate --compare``: every policy on the same observation model and delays, and a report that
says what each saw."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from partserve.cli.simulate import simulate


def run(*args: str) -> dict:
    result = CliRunner().invoke(
        simulate,
        ["--service-ms", "170,250,210,130", "--duration-s", "60", "--change-s", "20", "--compare", "--json", *args],
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_compare_reports_what_each_policy_saw_and_its_delays() -> None:
    policies = run("--upscale-delay-s", "5", "--downscale-delay-s", "90")["policies"]
    assert list(policies) == ["coordinated", "ray-default", "whole-model"]
    for name, p in policies.items():
        seen = p["observation"]
        # Serve's path at its defaults: records every min(0.2 x 30, 10) = 6 s, pushed every 10 s
        assert (seen["model"], seen["record_interval_s"], seen["push_interval_s"]) == ("serve", 6.0, 10.0), name
        assert (p["upscale_delay_s"], p["downscale_delay_s"]) == (5.0, 90.0), name  # Ray's default: the same
        assert p["gpu_seconds"] >= 0 and "recovery_s" in p
    whole = policies["whole-model"]
    assert whole["gpu_seconds"] == pytest.approx(4 * whole["replica_seconds"])  # the four stages' GPU shares


def test_ray_delays_and_the_oracle_view_only_when_asked() -> None:
    policies = run("--metrics", "exact", "--ray-upscale-delay-s", "30")["policies"]
    assert {p["observation"]["model"] for p in policies.values()} == {"exact"}
    assert policies["ray-default"]["upscale_delay_s"] == 30.0
    assert policies["coordinated"]["upscale_delay_s"] == 0.0


def test_startup_slots_slow_the_start_ups_that_share_them() -> None:
    """Replicas that start together on 1 slot take longer than on machines of their own: recovery after the
    step comes no sooner, and the report names the start-up model."""
    alone, shared = run("--startup-s", "10"), run("--startup-s", "10", "--startup-slots", "1")
    assert (alone["startup_slots"], shared["startup_slots"], shared["startup_s"]) == (0.0, 1.0, 10.0)
    for name in ("coordinated", "ray-default"):
        a, s = alone["policies"][name]["recovery_s"], shared["policies"][name]["recovery_s"]
        assert s is None or (a is not None and s >= a), (name, a, s)
    assert shared["policies"]["coordinated"] != alone["policies"]["coordinated"]
