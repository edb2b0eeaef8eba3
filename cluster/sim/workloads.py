"""Arrival processes: a rate curve (step, ramp, diurnal, constant) times a renewal process with a chosen CV.

One code path for every kind: draw Gamma inter-arrivals with mean 1 and coefficient of variation ``cv``
(``cv = 1`` is Poisson, ``cv = 4`` very bursty) in operational time, then map them to wall time through the
inverse of the cumulative rate ``Lambda(t) = integral of rate``. For a constant rate this is a plain Gamma
renewal process; for a varying rate with ``cv = 1``, a non-homogeneous Poisson process.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cluster.errors import check

KINDS = ("step", "ramp", "diurnal", "bursty")


@dataclass(frozen=True)
class Workload:
    """``kind`` picks the rate curve: ``step`` (``rate_per_s`` until ``change_s``, then ``peak_rate_per_s``),
    ``ramp`` (linear between them from ``change_s`` over ``ramp_s``), ``diurnal`` (sinusoid between them with
    ``period_s``), ``bursty`` (constant ``rate_per_s``). ``cv`` shapes the inter-arrivals of every kind."""

    kind: str
    rate_per_s: float
    peak_rate_per_s: float | None = None
    change_s: float = 60.0
    ramp_s: float = 60.0
    period_s: float = 300.0
    cv: float = 1.0

    def __post_init__(self) -> None:
        check(self.kind in KINDS, f"workload kind {self.kind!r} is not one of {', '.join(KINDS)}")
        check(self.rate_per_s > 0, f"rate_per_s ({self.rate_per_s}) must be > 0")
        check(self.peak >= 0, f"peak_rate_per_s ({self.peak_rate_per_s}) must be >= 0")
        check(0 < self.cv <= 10, f"cv ({self.cv}) must be in (0, 10]")
        check(self.ramp_s > 0, f"ramp_s ({self.ramp_s}) must be > 0")
        check(self.period_s > 0, f"period_s ({self.period_s}) must be > 0")

    @property
    def peak(self) -> float:
        return self.rate_per_s if self.peak_rate_per_s is None else self.peak_rate_per_s

    def rate_at(self, t_s: np.ndarray) -> np.ndarray:
        """Arrival rate (requests/s) at times ``t_s``."""
        low, high = self.rate_per_s, self.peak
        if self.kind == "step":
            return np.where(t_s < self.change_s, low, high)
        if self.kind == "ramp":
            return low + (high - low) * np.clip((t_s - self.change_s) / self.ramp_s, 0.0, 1.0)
        if self.kind == "diurnal":
            return low + (high - low) * 0.5 * (1 - np.cos(2 * np.pi * t_s / self.period_s))
        return np.full_like(t_s, low, dtype=float)


def arrivals(workload: Workload, duration_s: float, seed: int) -> np.ndarray:
    """Sorted arrival times (s) in ``[0, duration_s)``."""
    check(duration_s > 0, f"duration_s ({duration_s}) must be > 0")
    rng = np.random.default_rng(seed)
    grid = np.linspace(0.0, duration_s, max(2, int(duration_s * 20) + 1))
    rate = workload.rate_at(grid)
    cumulative = np.concatenate([[0.0], np.cumsum(0.5 * (rate[1:] + rate[:-1]) * np.diff(grid))])
    total = cumulative[-1]
    shape = 1.0 / workload.cv**2
    n = int(total + 10 * np.sqrt(total) * workload.cv + 20)
    gaps = rng.gamma(shape, 1.0 / shape, size=n)
    operational = np.cumsum(gaps) + rng.uniform(0.0, 1.0) * gaps[0]  # random phase: no arrival pinned at 0
    operational = operational[operational < total]
    return np.interp(operational, cumulative, grid)
