"""Texts of concurrent requests tokenized together: :class:`serve_app.batching.Coalescer`, without Ray."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from serve_app.batching import Coalescer


def test_items_arriving_during_a_call_go_together_in_the_next() -> None:
    calls: list[list[str]] = []
    release = threading.Event()

    def lengths(items: list[str]) -> dict[str, np.ndarray]:
        calls.append(list(items))
        if len(calls) == 1:
            release.wait(5)  # the first call runs while the others arrive
        return {"n": np.array([len(x) for x in items])}

    async def main() -> list[list[int]]:
        coalesce = Coalescer(lengths)
        first = asyncio.create_task(coalesce(["a"]))
        await asyncio.sleep(0.05)
        rest = [asyncio.create_task(coalesce(items)) for items in (["bb", "ccc"], ["dddd"])]
        await asyncio.sleep(0.05)
        release.set()
        return [(await t)["n"].tolist() for t in (first, *rest)]

    assert asyncio.run(main()) == [[1], [2, 3], [4]]
    assert calls == [["a"], ["bb", "ccc", "dddd"]]  # two calls for three requests


def test_a_failing_call_fails_its_callers_only() -> None:
    def fn(items: list[str]) -> dict[str, np.ndarray]:
        if "bad" in items:
            raise ValueError("cannot")
        return {"n": np.array([len(x) for x in items])}

    async def main() -> None:
        coalesce = Coalescer(fn)
        with pytest.raises(ValueError, match="cannot"):
            await coalesce(["bad"])
        assert (await coalesce(["ok"]))["n"].tolist() == [2]

    asyncio.run(main())
