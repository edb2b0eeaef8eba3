"""Ray Serve's decorators as they are at run time, for the type checker.

mypy keeps a decorated class's own type, so it does not see that ``@serve.deployment`` turns a class into a
:class:`~ray.serve.Deployment` (``.options``, ``.bind``); and Ray types a ``@serve.batch`` method as a plain
callable, without the setters its wrapper has. These helpers check or state what each really is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, cast

from ray.serve import Deployment


def as_deployment(decorated: object) -> Deployment:
    """``decorated`` (a ``@serve.deployment`` class) as the :class:`Deployment` it is; ``TypeError`` if it is not."""
    if not isinstance(decorated, Deployment):
        raise TypeError(f"{decorated!r} is not a Serve deployment: decorate it with @serve.deployment")
    return decorated


class _BatchSettings(Protocol):
    """The setters of a ``@serve.batch`` wrapper (``ray.serve.batching``)."""

    def set_max_batch_size(self, new_max_batch_size: int) -> None: ...

    def set_batch_wait_timeout_s(self, new_batch_wait_timeout_s: float) -> None: ...


def set_batching(method: Callable[..., Any], max_batch_size: int, batch_wait_timeout_s: float) -> None:
    """Set a replica's ``@serve.batch`` ``method`` (bound, ``self.method``) to batches of ``max_batch_size``
    waiting at most ``batch_wait_timeout_s`` seconds for more requests after the first."""
    settings = cast(_BatchSettings, method)  # Ray's stub for serve.batch returns a plain Callable
    settings.set_max_batch_size(max_batch_size)
    settings.set_batch_wait_timeout_s(batch_wait_timeout_s)
