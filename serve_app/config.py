"""What the entrance and each stage replica are constructed with: keyword-only, typed, validated, frozen.

:class:`~serve_app.app.AppArgs` stays the flat set of arguments users write in Serve configs;
:func:`serve_app.app.entrance_config` and :func:`serve_app.app.stage_config` resolve its defaults against
the plan into these. Ray pickles them into the replicas (``.bind(...)`` arguments), so they hold only plain
values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from serve_app.retry import RetryPolicy
from serve_app.transport import BY_VALUE_MAX_BYTES


def _at_least(config: object, name: str, low: float) -> None:
    """Raise ``ValueError`` naming ``config``'s field ``name`` and its value unless it is ``>= low`` (NaN is not)."""
    value = getattr(config, name)
    if not value >= low:
        raise ValueError(f"{type(config).__name__}.{name} ({value!r}) must be >= {low}")


INFLIGHT_BODIES = 4
"""Default bound of the entrance's bytes in flight, in largest bodies (``max_body_bytes``)."""


@dataclass(frozen=True, kw_only=True)
class EntranceConfig:
    """Arguments of the entrance (:class:`serve_app.entrance.Entrance`), besides its stage handles."""

    plan_uri: str
    """Plan directory: a local path or a URI readable from every node (only plan.json is read)."""
    model_name: str
    """Name in ``/v2/models/{name}``."""
    max_body_bytes: int
    """Largest accepted HTTP request body, in bytes (larger: 413)."""
    max_batch_size: int
    """Samples per batch sent through the pipeline (a request this large goes alone)."""
    batch_wait_timeout_s: float
    """Seconds a request waits for others to join its batch while the pipeline is busy (an idle pipeline
    takes it at once: see :class:`~serve_app.batching.PipelineBatcher`)."""
    max_concurrent_batches: int
    """Batches in the pipeline at once, per entrance replica."""
    cache_bytes: int = 0
    """Size of the result cache in bytes (0: off)."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    """How requests whose stage replica died are tried again."""
    auth_token_file: str | None = None
    """File holding the bearer token; None: ``$PARTSERVE_TOKEN`` or no auth (see :func:`serve_app.auth.load_token`)."""
    request_timeout_s: float = 60.0
    """The deadline of a request, in seconds from its arrival (a client may ask for less): past it the
    caller gets 503 with ``Retry-After`` (504 for a deadline the client set) and its batch leaves the
    pipeline."""
    max_inflight_bytes: int | None = None
    """Bytes the requests in flight may hold at once (bodies while read and decoded, then their tensors);
    more: 503 with ``Retry-After``. None: :data:`INFLIGHT_BODIES` x ``max_body_bytes``."""
    by_value_max_bytes: int = BY_VALUE_MAX_BYTES
    """Batches whose largest message between stages is estimated at most this many bytes travel by value over
    Serve's gRPC, larger ones by reference through the object store (:mod:`serve_app.transport`; 0: all by
    reference)."""

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError(f"EntranceConfig.model_name ({self.model_name!r}) must not be empty")
        for name in ("max_body_bytes", "max_batch_size", "max_concurrent_batches"):
            _at_least(self, name, 1)
        for name in ("batch_wait_timeout_s", "cache_bytes", "by_value_max_bytes"):
            _at_least(self, name, 0)
        _at_least(self, "request_timeout_s", 1e-3)
        if self.max_inflight_bytes is not None:
            _at_least(self, "max_inflight_bytes", self.max_body_bytes)

    def inflight_bytes(self) -> int:
        """``max_inflight_bytes`` resolved."""
        return self.max_inflight_bytes or INFLIGHT_BODIES * self.max_body_bytes


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """Arguments of one stage replica (:class:`serve_app.stage.StageDeployment`)."""

    plan_uri: str
    """Plan directory: a local path or a URI readable from every node (the replica loads its shard only)."""
    index: int
    """The stage this deployment runs: ``Stage.index`` in the plan."""
    max_batch_size: int
    """Samples a replica runs at once, merging the requests waiting for it (a request this large runs alone)."""
    batch_wait_timeout_s: float = 0.0
    """Seconds a batch waits for more requests after its first (0: take what is waiting)."""
    torch_threads: int | None = None
    """Intra-op torch threads on CPU; None: Ray's (one per reserved CPU, at least one)."""
    max_batch_s: float | None = None
    """A batch still running after this many seconds fails the replica's health check, so Serve replaces
    the replica (a batch runs in a thread, which cannot be stopped); None: no bound."""

    def __post_init__(self) -> None:
        _at_least(self, "index", 0)
        _at_least(self, "max_batch_size", 1)
        _at_least(self, "batch_wait_timeout_s", 0)
        if self.torch_threads is not None:
            _at_least(self, "torch_threads", 1)
        if self.max_batch_s is not None:
            _at_least(self, "max_batch_s", 1e-3)
