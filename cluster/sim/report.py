"""Figures of a simulated run: latency percentiles, SLO attainment, cost, scale actions, recovery; a PNG plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cluster.sim.engine import SimResult


def percentile_ms(latency_ms: np.ndarray, q: float) -> float:
    """The ``q``-th percentile without interpolation (unfinished requests count as infinite latency)."""
    return float(np.percentile(latency_ms, q, method="inverted_cdf")) if len(latency_ms) else 0.0


def rolling_p99_ms(result: SimResult, window_s: float) -> tuple[np.ndarray, np.ndarray]:
    """(window start times, p99 latency of the requests arriving in each window); NaN for empty windows."""
    edges = np.arange(0.0, result.duration_s + window_s, window_s)
    bins = np.digitize(result.arrivals_s, edges) - 1
    latency = result.latency_ms
    order = np.lexsort((latency, bins))
    counts = np.bincount(bins, minlength=len(edges))[: len(edges) - 1]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    p99 = np.full(len(counts), np.nan)
    full = counts > 0
    index = starts[full] + np.ceil(0.99 * counts[full]).astype(int) - 1
    p99[full] = latency[order][index]
    return edges[:-1], p99


def recovery_s(result: SimResult, slo_ms: float, step_s: float, window_s: float, hold: int = 3) -> float | None:
    """Seconds from ``step_s`` until the rolling p99 is back under the SLO: the start of the first window after a
    violation that begins ``hold`` windows in a row under it (0: never violated; None: never back)."""
    starts, p99 = rolling_p99_ms(result, window_s)
    keep = (starts >= step_s) & ~np.isnan(p99)
    starts, over = starts[keep], p99[keep] > slo_ms
    if not over.any():
        return 0.0
    for k in range(int(np.argmax(over)), len(over)):
        if not over[k : k + hold].any():
            return float(starts[k] - step_s)
    return None


def summarize(result: SimResult, slo_ms: float, step_s: float | None = None, window_s: float = 10.0) -> dict[str, Any]:
    """The report of one run as a JSON-ready dict."""
    latency = result.latency_ms
    return {
        "requests": len(latency),
        "unfinished": int(np.isinf(latency).sum()),
        "p50_ms": percentile_ms(latency, 50),
        "p99_ms": percentile_ms(latency, 99),
        "slo_attainment": float(np.mean(latency <= slo_ms)) if len(latency) else 1.0,
        "replica_seconds": result.replica_seconds,
        "gpu_seconds": result.gpu_seconds,
        "scale_actions": result.scale_actions,
        "max_replicas": int(result.replicas.sum(axis=1).max()) if len(result.replicas) else 0,
        "final_replicas": result.replicas[-1].tolist() if len(result.replicas) else [],
        "recovery_s": None if step_s is None else recovery_s(result, slo_ms, step_s, window_s),
    }


def plot(results: Sequence[tuple[str, SimResult]], slo_ms: float, path: Path, window_s: float = 10.0) -> None:
    """Replicas (total and per stage) and rolling p99 latency over time, one colour per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 7))
    for (label, r), colour in zip(results, ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        top.plot(r.tick_s, r.replicas.sum(axis=1), color=colour, label=f"{label} (total)")
        for k in range(r.replicas.shape[1]):
            top.plot(r.tick_s, r.replicas[:, k], color=colour, alpha=0.3, linewidth=0.8)
        starts, p99 = rolling_p99_ms(r, window_s)
        bottom.step(starts, np.minimum(p99, 1e7), where="post", color=colour, label=label)
    bottom.axhline(slo_ms, color="black", linestyle="--", label=f"SLO {slo_ms:g} ms")
    top.set_ylabel("replicas (thin: per stage)")
    bottom.set_ylabel(f"p99 latency over {window_s:g} s (ms)")
    bottom.set_yscale("log")
    bottom.set_xlabel("time (s)")
    top.legend()
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
