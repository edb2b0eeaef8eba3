"""Errors of the cluster side: invalid autoscaling settings, simulator inputs."""

from __future__ import annotations

from partitions.errors import PartserveError


class ScalingConfigError(PartserveError):
    """An autoscaling or simulation setting is out of range; the message shows the value."""


def check(condition: bool, message: str, fix: str = "") -> None:
    """Raise :class:`ScalingConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ScalingConfigError(message, fix)
