"""How long replicas take to start when they start together, and that model fitted to measured start-ups.

Replica start-ups that share a machine (its cores, or the link their weights come over) progress at an equal
share of ``slots`` each, at most full speed (:func:`startup_rate`): one start-up alone takes ``startup_s``,
``n`` at once take ``startup_s * n / slots`` when ``n > slots``. The simulator (:mod:`cluster.sim.engine`)
runs this model; :func:`fit_startup_s` finds the ``startup_s`` at which it reproduces a live run's start-ups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from cluster.errors import check


def startup_rate(starting: int, slots: float) -> float:
    """Progress per second of each of ``starting`` replica start-ups that share ``slots`` (0: no limit): each
    gets an equal share, at most one slot."""
    return 1.0 if slots <= 0 or starting <= slots else slots / starting


def shared_startups_s(begins_s: Sequence[float], startup_s: float, slots: float) -> list[float]:
    """Seconds each start-up takes, begun at ``begins_s`` (s, any order), when each needs ``startup_s`` alone
    and all share ``slots`` (:func:`startup_rate`)."""
    order = sorted(range(len(begins_s)), key=lambda k: begins_s[k])
    left: dict[int, float] = {}
    took = [0.0] * len(begins_s)
    t, nxt = 0.0, 0
    while nxt < len(order) or left:
        rate = startup_rate(len(left), slots)
        begin = begins_s[order[nxt]] if nxt < len(order) else math.inf
        end = t + min(left.values()) / rate if left else math.inf
        now = min(begin, end)
        for k in left:
            left[k] -= (now - t) * rate
        t = now
        for k in [k for k, v in left.items() if v <= 1e-9]:
            took[k] = t - begins_s[k]
            del left[k]
        while nxt < len(order) and begins_s[order[nxt]] <= t:
            left[order[nxt]] = startup_s
            nxt += 1
    return took


def fit_startup_s(begins_s: Sequence[float], took_s: Sequence[float], slots: float, step_s: float = 0.05) -> float:
    """The start-up alone (s, to ``step_s``) at which :func:`shared_startups_s` comes closest to the measured
    start-ups (began at ``begins_s``, took ``took_s``): least mean absolute log ratio, so a start-up off by a
    factor counts the same at 5 s as at 20 s. A grid at ``10 * step_s``, then ``step_s`` around its best (each
    start-up lengthens with the start-up alone, so the error has one valley in practice)."""
    check(len(begins_s) == len(took_s) > 0, "fit_startup_s needs one measured duration per start-up, at least one")
    check(min(took_s) > 0, "measured start-ups must take more than 0 s")
    logs = [math.log(v) for v in took_s]

    def error(alone: float) -> float:
        got = shared_startups_s(begins_s, alone, slots)
        return sum(abs(math.log(g) - m) for g, m in zip(got, logs))

    coarse = min((10 * step_s * k for k in range(1, int(max(took_s) / (10 * step_s)) + 2)), key=error)
    return min((max(step_s, coarse + step_s * k) for k in range(-10, 11)), key=error)
