"""The ingress deployment: Open Inference Protocol (KServe v2) over HTTP, and a Python-handle method.

HTTP (the app's route prefix, usually ``/``):

* ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2``: server liveness, readiness, metadata.
* ``GET /v2/models/{name}``, ``GET /v2/models/{name}/ready``: model metadata (inputs/outputs with name,
  datatype such as ``FP32``, shape with -1 for the batch; for a half-precision plan, the datatypes an input
  also takes, ``FP32`` cast here, and those an output comes in) and readiness.
* ``POST /v2/models/{name}/infer``: OIP JSON (and its binary extension), ``.npy`` or Arrow IPC; see
  :mod:`serve_app.codecs`. The answer uses the request's format.

A plan with processing (:mod:`partitions.processing`) also takes, instead of the model's inputs, an OIP
``BYTES`` input ``text`` (one string per sample) that the entrance tokenizes in a thread, the texts of
the requests that arrive meanwhile together in one call (:class:`~serve_app.batching.Coalescer`), and
adds its answers to the outputs (``probabilities`` and ``label``, or ``embedding``). For such plans:

* ``POST /v1/models/{name}:predict`` (KServe v1): ``{"instances": ["text", ...]}`` (or ``[{"text": ...}]``)
  answers ``{"predictions": [{"label": ..., "probabilities": [...]}, ...]}`` (embedding models:
  ``{"embedding": [...]}``).
* ``POST /v1/embeddings`` (OpenAI): ``{"model": name, "input": "text" | ["text", ...], "encoding_format":
  "float" | "base64"}`` answers the OpenAI embeddings object (base64: little-endian float32), for embedding
  models.

Integer inputs that index an embedding (``plan.input_limits``) must hold valid rows: others answer 400
naming the range.

Deadlines: every request has one, ``EntranceConfig.request_timeout_s`` (60 s by default) from its arrival. A
client may shorten it with the header ``X-Request-Timeout-Ms: <ms>`` or, in OIP JSON, the request parameter
``"parameters": {"timeout_ms": <ms>}`` (the smaller counts; a value above the server's is ignored). The
deadline travels with every stage call; a stage refuses a call whose deadline has passed and abandons a
batch still running at it. When it passes, the request leaves its batch (a batch all of whose requests left
is cancelled, with its stage calls, and frees its pipeline slot) and the caller gets **503 with
``Retry-After``** (the server's deadline: try again) or **504** (a deadline the client set).

Errors answer ``{"error": "..."}`` naming the expected shape and dtype: 400 bad input, 401 missing or wrong
bearer token (when a token is set, see :mod:`serve_app.auth`), 404 unknown model, 413 body over
``max_body_bytes`` or a tensor declaring more than ``JSON_EXPANSION`` times that, 415 unknown Content-Type,
503 with ``Retry-After`` when the service cannot answer now (a full queue; stage replicas that kept dying
under the request, see :mod:`serve_app.retry`; the server's deadline passed; or the bytes held by requests
in flight would pass ``max_inflight_bytes``: the same request may be sent again), 504 when the client's own
deadline passed. Serve's proxy itself answers 503 with ``Retry-After`` when the entrance's queue is full
(``AppArgs.entrance_max_queued_requests``). Any other failure (inside the model, or a bug) is **500**
``{"error": "internal error", "id": "<32 hex digits>"}``: the entrance logs the exception with the same
id, and the answer carries no internal text.

Memory: a request holds its body (counted twice while it is read and decoded) and then its tensors against
``max_inflight_bytes`` (default 4 x ``max_body_bytes``); a request that would pass it is refused with 503
before its body is read, and the answer closes the connection (Serve's proxy would otherwise receive the
whole upload). Bodies and answers of :data:`~serve_app.codecs.OFFLOAD_BYTES` or more are decoded and encoded
off the event loop (:func:`~serve_app.codecs.decode_async`), so health probes and other requests are not
held up.

Non-finite values (NaN, ±inf) in float inputs are data, passed to the model as they are (JSON reads and
writes them as ``NaN``, ``Infinity``, ``-Infinity``, as Python's ``json`` does).

Python: ``serve.get_app_handle(app_name).infer.remote(x, timeout_s=None)`` with ``x`` an array (single-input
models) or a dict of arrays by input name; it resolves to a dict of numpy outputs by output name, whatever
their number, or raises :class:`~serve_app.tensors.BadRequest` (fix the input) or, retryable,
:class:`~serve_app.retry.Unavailable` (``retry_after_s``; its subclass
:class:`~serve_app.retry.DeadlineExceeded` when the deadline passed, ``from_client`` when ``timeout_s`` set
it) or Serve's ``BackPressureError`` (the entrance's queue at this handle is full).
(``handle.remote(x)`` itself is the HTTP entry point: Serve gives ``__call__`` to the FastAPI app.)

The stages are chained without awaiting intermediates (``h1.remote(h0.remote(x))``; a stage reading from
several stages, in a DAG plan, gets all their responses), and many requests are in flight at once. A small
batch travels by value over Serve's replica-to-replica gRPC, a large one by reference through Ray's object
store (:mod:`serve_app.transport`). A batch that fails is bisected
(:func:`~serve_app.batching.run_together`): the failing requests get their error, the others their answer.
"""

# No ``from __future__ import annotations``: FastAPI must see ``Request`` itself in the route signatures.

import asyncio
import base64
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from partitions.dtypes import accepted_datatypes, is_float, oip_datatype
from partitions.plan import Plan, Stage
from partitions.processing import TEXT_INPUT, Processor
from partitions.storage import read_plan
from partitions.types import Payload, TensorSpec
from serve_app import codecs
from serve_app.auth import CHALLENGE, authorized, load_token
from serve_app.batching import Coalescer, PipelineBatcher, run_together, samples
from serve_app.cache import ResultCache, input_key, plan_version
from serve_app.config import EntranceConfig
from serve_app.names import ARRIVED_METRIC, QUEUED_METRIC
from serve_app.retry import DeadlineExceeded, Unavailable, call_with_retry, is_deadline
from serve_app.tensors import BadRequest, check_inputs, describe, from_wire, to_wire
from serve_app.transport import StageHandles, too_large

logger = logging.getLogger("ray.serve")
api = FastAPI(title="partserve", docs_url=None, redoc_url=None)

TIMEOUT_HEADER = "X-Request-Timeout-Ms"
"""HTTP header: the client's deadline for the request, in milliseconds (it may only shorten the server's)."""


def _metadata(
    specs: list[TensorSpec], parameters: Callable[[TensorSpec], dict[str, object]]
) -> list[dict[str, object]]:
    """OIP tensor metadata of ``specs``, with ``parameters(spec)`` where it says anything."""
    out: list[dict[str, object]] = []
    for t in specs:
        meta: dict[str, object] = {"name": t.name, "datatype": oip_datatype(t.dtype), "shape": list(t.shape)}
        if params := parameters(t):
            meta["parameters"] = params
        out.append(meta)
    return out


def _input_parameters(spec: TensorSpec) -> dict[str, object]:
    """What a half-precision input also takes: FP32, cast at the entrance."""
    taken = accepted_datatypes(spec.dtype)
    return {"accepted_datatypes": taken, "cast": f"FP32 is cast to {taken[0]} at the entrance"} if taken[1:] else {}


def _output_parameters(spec: TensorSpec) -> dict[str, object]:
    """The datatypes a half-precision output comes in: its own, or FP32 when the request asks for it (OIP
    ``parameters.output_datatype`` or the ``X-Output-Datatype`` header)."""
    own = oip_datatype(spec.dtype)
    return {"output_datatypes": [own, "FP32"]} if is_float(spec.dtype) and own != "FP32" else {}


async def run_stages(
    plan: Plan,
    stages: list[DeploymentHandle],
    payload: Payload,
    deadline_s: float | None = None,
    by_value: bool = False,
) -> dict[str, np.ndarray]:
    """Call every stage at once, each on the (not yet computed) responses of the stages it reads from (a
    first stage: on the model inputs it reads), then await the stages no other stage reads from. By reference,
    intermediates go stage to stage through the object store (bfloat16 as raw words, which it passes without
    a copy: :func:`~serve_app.tensors.to_wire`). ``by_value`` (``stages`` are by-value handles: gRPC), they
    come through this process: each stage's call awaits its sources here and goes out with their values
    (:mod:`serve_app.transport`). Serve would do the same for a response passed on, but in Ray 2.60 a call
    whose by-value source failed (its replica died) never returns: awaited here, the failure comes back.

    ``deadline_s`` (``time.time()`` seconds) goes with every stage call; when it passes first, this raises
    :class:`DeadlineExceeded`. Whatever ends the wait (that, an error, a cancellation), the stage calls
    still under way are cancelled."""
    calls: dict[int, DeploymentResponse | asyncio.Future[Payload]] = {}
    extra = {} if deadline_s is None else {"deadline_s": deadline_s}

    def inputs(stage: Stage) -> Payload:
        return to_wire({name: payload[name] for name in stage.reads})

    async def call_on_values(stage: Stage) -> Payload:
        sources = [await calls[j] for j in stage.after] or [inputs(stage)]
        return await stages[stage.index].remote(*sources, **extra)

    try:
        for stage in plan.stages:
            if by_value:
                calls[stage.index] = asyncio.ensure_future(call_on_values(stage))
                continue
            sources: list[DeploymentResponse | asyncio.Future[Payload] | Payload] = [calls[j] for j in stage.after] or [
                inputs(stage)
            ]
            response = stages[stage.index].remote(*sources, **extra)
            assert isinstance(response, DeploymentResponse)  # not a generator: stage handles do not stream
            calls[stage.index] = response
        sinks = asyncio.gather(*(calls[i] for i in plan.sinks()))
        if deadline_s is None:
            sent = await sinks
        else:
            try:
                sent = await asyncio.wait_for(sinks, max(deadline_s - time.time(), 0.0))
            except asyncio.TimeoutError:
                raise DeadlineExceeded("the request's deadline passed in the pipeline", 0.0) from None
    except BaseException:
        for pending in calls.values():
            pending.cancel()
        raise
    merged: Payload = {}
    for outputs in sent:
        merged.update(outputs)
    return from_wire(plan.named_outputs(merged), plan.outputs)


async def send_batch(handles: StageHandles, payload: Payload, deadline_s: float | None = None) -> dict[str, np.ndarray]:
    """:func:`run_stages` on the handles the batch travels on (:meth:`StageHandles.goes_by_value`); sent again
    by reference when gRPC refused one of its messages as too large (an estimate that fell short)."""
    by_value = handles.goes_by_value(payload, samples(payload))
    stages = handles.by_value if by_value else handles.by_reference
    try:
        return await run_stages(handles.plan, stages, payload, deadline_s, by_value)
    except Exception as exc:
        if not by_value or not too_large(exc):
            raise
        logger.warning("a batch was larger than gRPC takes (%s), sending it by reference", type(exc).__name__)
        return await run_stages(handles.plan, handles.by_reference, payload, deadline_s)


@dataclass(frozen=True)
class Deadline:
    """When a request must be answered by (``time.time()`` seconds), and whether its client chose that."""

    at_s: float
    from_client: bool = False

    @staticmethod
    def of(arrival_s: float, server_s: float, client_s: float | None) -> "Deadline":
        """The deadline of a request arrived at ``arrival_s``: the server's ``server_s`` seconds later, or
        the client's ``client_s`` when shorter."""
        if client_s is not None and client_s < server_s:
            return Deadline(arrival_s + client_s, True)
        return Deadline(arrival_s + server_s)


class InflightBytes:
    """The bytes held by an entrance replica's requests in flight, bounded by ``limit``; each request's share
    is a :class:`Held`."""

    def __init__(self, limit: int, retry_after_s: float) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.used = 0

    def hold(self) -> "Held":
        return Held(self)


class Held:
    """One request's bytes in an :class:`InflightBytes`; :meth:`release` (in a ``finally``) gives them back."""

    def __init__(self, budget: InflightBytes) -> None:
        self.budget = budget
        self.bytes = 0

    def grow(self, n: int) -> None:
        """Hold ``n`` more bytes; :class:`Unavailable` (nothing held more) when that would pass the limit."""
        if n > 0 and self.budget.used + n > self.budget.limit:
            raise Unavailable(
                f"the entrance holds {self.budget.used} bytes of requests in flight; {n} more would pass its "
                f"{self.budget.limit}-byte bound (max_inflight_bytes): try again later",
                self.budget.retry_after_s,
            )
        self.budget.used += n
        self.bytes += n

    def set(self, n: int) -> None:
        """Hold ``n`` bytes in all (fewer: gives the rest back at once)."""
        if n >= self.bytes:
            self.grow(n - self.bytes)
        else:
            self.budget.used -= self.bytes - n
            self.bytes = n

    def release(self) -> None:
        self.set(0)


class Unread(Exception):
    """A request refused (``error``) before its body was read all: the answer closes the connection."""

    def __init__(self, error: BadRequest | Unavailable) -> None:
        super().__init__(error)
        self.error = error


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _unavailable(exc: Unavailable) -> JSONResponse:
    """503 with ``Retry-After`` in whole seconds (rounded up); 504 for a deadline the client set."""
    if isinstance(exc, DeadlineExceeded) and exc.from_client:
        return _error(504, str(exc))
    return _error(503, str(exc), {"Retry-After": str(max(0, math.ceil(exc.retry_after_s)))})


def _internal(exc: BaseException) -> JSONResponse:
    """500 with a fresh error id, the exception logged under that id; nothing internal in the answer."""
    error_id = uuid.uuid4().hex
    logger.error("request failed, error id %s: %s: %s", error_id, type(exc).__name__, exc, exc_info=exc)
    return JSONResponse({"error": "internal error", "id": error_id}, status_code=500)


def _client_timeout_s(header: str | None, parameter_ms: int | None) -> float | None:
    """The client's deadline in seconds from the ``X-Request-Timeout-Ms`` header and the OIP ``timeout_ms``
    parameter (the smaller); None when neither is given; 400 for a header that is not a positive count."""
    given: list[int] = [] if parameter_ms is None else [parameter_ms]
    if header is not None:
        if not codecs.is_count(header) or int(header) <= 0:
            raise BadRequest(f"{TIMEOUT_HEADER} must be a positive whole number of milliseconds, got {header[:50]!r}")
        given.append(int(header))
    return min(given) / 1e3 if given else None


def _texts(array: np.ndarray) -> list[str]:
    """The strings of a ``text`` input: shape ``[n]`` or ``[n, 1]``, UTF-8 (400 otherwise)."""
    if not (array.ndim == 1 or (array.ndim == 2 and array.shape[1] == 1)) or array.shape[0] < 1:
        raise BadRequest(f"input {TEXT_INPUT!r} has shape {list(array.shape)}; expected [-1] BYTES, one text each")
    texts = []
    for x in array.ravel().tolist():
        if isinstance(x, str):
            texts.append(x)
            continue
        if not isinstance(x, bytes):
            raise BadRequest(f"input {TEXT_INPUT!r} must hold strings (BYTES), got {type(x).__name__}")
        try:
            texts.append(x.decode())
        except UnicodeDecodeError as exc:
            raise BadRequest(f"input {TEXT_INPUT!r}: element {len(texts)} is not UTF-8 ({exc})") from exc
    return texts


def _encode_vector(v: np.ndarray, fmt: str) -> list[float] | str:
    """An embedding as OpenAI sends it: a list of floats, or base64 of its little-endian float32 bytes."""
    if fmt == "base64":
        return base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode()
    return v.astype(np.float32).tolist()


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Entrance:
    """Checks requests against the plan's inputs and sends them through the stage deployments."""

    def __init__(self, stages: list[DeploymentHandle], config: EntranceConfig) -> None:
        """``stages``: the stage deployments' handles, by stage index; ``config``: see :class:`EntranceConfig`."""
        self.plan = read_plan(config.plan_uri)
        self.stages = StageHandles(self.plan, stages, config.by_value_max_bytes)
        self.model_name = config.model_name
        self.max_body_bytes = config.max_body_bytes
        self.retry = config.retry
        self.retries = 0
        self.request_timeout_s = config.request_timeout_s
        self.inflight = InflightBytes(config.inflight_bytes(), config.retry.retry_after_s)
        self.token = load_token(config.auth_token_file)
        self.batcher: PipelineBatcher[dict[str, np.ndarray]] = PipelineBatcher(
            self._pipeline,
            config.max_batch_size,
            config.batch_wait_timeout_s,
            config.max_concurrent_batches,
            config.retry.retry_after_s,
        )
        self.cache = ResultCache(config.cache_bytes) if config.cache_bytes else None
        self.version = plan_version(self.plan)
        processing = self.plan.processing
        self.processor = (
            Processor(config.plan_uri, processing, self.plan.inputs, self.plan.outputs) if processing else None
        )
        self.tokenize = Coalescer(self.processor.tokenize) if self.processor and self.processor.tokenizer else None
        self.arrived = 0.0
        """Requests sent towards the pipeline so far, in pipeline batches (samples / ``max_batch_size``)."""

    async def infer(
        self, inputs: np.ndarray | Mapping[str, np.ndarray], timeout_s: float | None = None
    ) -> dict[str, np.ndarray]:
        """Run the model on ``inputs`` (an array for single-input models, or arrays by input name); returns
        the outputs by name. ``timeout_s``: the caller's deadline, if shorter than the server's. Raises
        :class:`BadRequest` for inputs that do not fit the plan and :class:`Unavailable` when the pipeline
        cannot answer now (retryable; :class:`DeadlineExceeded` when the deadline passed)."""
        deadline = Deadline.of(time.time(), self.request_timeout_s, timeout_s)
        if isinstance(inputs, np.ndarray):
            if len(self.plan.inputs) != 1:
                raise BadRequest(f"the model takes inputs {[t.name for t in self.plan.inputs]}: pass a dict")
            inputs = {self.plan.inputs[0].name: inputs}
        payload = await self._model_inputs(inputs)
        return self._finish(await self._serve(payload, deadline), payload)

    async def _model_inputs(self, arrays: Mapping[str, np.ndarray]) -> Payload:
        """The model's inputs, checked against the plan: ``arrays`` themselves, or the tokens of a ``text``
        input (tokenized in a thread)."""
        if self.tokenize is not None and TEXT_INPUT in arrays:
            if len(arrays) != 1:
                raise BadRequest(f"send {TEXT_INPUT!r} alone or the model's inputs, not both: got {sorted(arrays)}")
            arrays = await self.tokenize(_texts(arrays[TEXT_INPUT]))
        return check_inputs(self.plan.inputs, arrays, self.plan.input_limits)

    def _finish(self, outputs: dict[str, np.ndarray], payload: Payload) -> dict[str, np.ndarray]:
        """The model's outputs with the processing's answers added."""
        return outputs if self.processor is None else self.processor.finish(outputs, payload)

    def _input_specs(self) -> list[TensorSpec]:
        extra = self.processor.input_specs() if self.processor is not None else []
        return [*self.plan.inputs, *extra]

    def _output_specs(self) -> list[TensorSpec]:
        extra = self.processor.output_specs() if self.processor is not None else []
        return [*self.plan.outputs, *extra]

    async def _serve(self, payload: Payload, deadline: Deadline) -> dict[str, np.ndarray]:
        """One request: from the cache, or batched with others through the pipeline (a request as large as
        a batch goes alone), answered by ``deadline`` or :class:`DeadlineExceeded`."""
        try:
            return await self._cached(payload, deadline.at_s)
        except (TimeoutError, asyncio.TimeoutError, DeadlineExceeded) as exc:
            raise self._expired(deadline) from exc
        except Exception as exc:
            if is_deadline(exc):
                raise self._expired(deadline) from exc
            raise

    def _expired(self, deadline: Deadline) -> DeadlineExceeded:
        if deadline.from_client:
            return DeadlineExceeded("no answer within the deadline the request set", 0.0, True)
        return DeadlineExceeded(
            f"no answer within the server's {self.request_timeout_s:g} s deadline, try again later",
            self.retry.retry_after_s,
        )

    async def _cached(self, payload: Payload, deadline_s: float) -> dict[str, np.ndarray]:
        cache = self.cache
        if cache is None:
            return await self._batched(payload, deadline_s)
        key = input_key(self.version, payload)
        if (hit := cache.get(key)) is not None:
            return hit
        outputs = await self._batched(payload, deadline_s)
        cache.put(key, outputs)
        return outputs

    async def _batched(self, payload: Payload, deadline_s: float) -> dict[str, np.ndarray]:
        """The batcher's answer to one request, counted as it arrives (see :meth:`record_autoscaling_stats`)."""
        self.arrived += samples(payload) / self.batcher.max_batch_size
        return await self.batcher(payload, deadline_s)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What Serve records for the autoscaling policy (only when the entrance has an ``autoscaling_config``;
        :mod:`cluster.observe` reads it): ``arrived``, the requests sent towards the pipeline so far, and
        ``queued``, those waiting here for a place in it, both in pipeline batches (samples /
        ``max_batch_size``): the stages' unit of work."""
        full = self.batcher.max_batch_size
        return {ARRIVED_METRIC: self.arrived, QUEUED_METRIC: self.batcher.queued_samples / full}

    async def _pipeline(
        self, payloads: list[Payload], deadline_s: float | None
    ) -> list[dict[str, np.ndarray] | Exception]:
        """Send requests through the pipeline as one batch (per-hop costs are paid per batch, not per sample)
        until ``deadline_s``; if the batch fails, bisect it so only the failing requests fail."""
        # Retries spent, overloaded or out of time (Unavailable): running parts again would only add load.
        return await run_together(
            payloads,
            lambda payload, _requests: self._run(payload, deadline_s),
            alone_on=lambda exc: not isinstance(exc, Unavailable),
        )

    async def _run(self, payload: Payload, deadline_s: float | None) -> dict[str, np.ndarray]:
        """The pipeline's outputs, tried again while stage replicas die under it (see :mod:`serve_app.retry`)."""
        return await call_with_retry(
            lambda: send_batch(self.stages, payload, deadline_s), self.retry, on_retry=self._retried
        )

    def _retried(self, exc: BaseException) -> None:
        self.retries += 1
        logger.warning("a stage replica failed under a request, retrying: %s", type(exc).__name__)

    def retry_stats(self) -> dict[str, int]:
        """``retries``: pipeline runs this replica tried again after a stage replica failed."""
        return {"retries": self.retries}

    def inflight_stats(self) -> dict[str, int]:
        """``bytes``: what the requests in flight hold now; ``limit``: the bound (``max_inflight_bytes``)."""
        return {"bytes": self.inflight.used, "limit": self.inflight.limit}

    def cache_stats(self) -> dict[str, int] | None:
        """Hits, misses, entries and bytes of the result cache; None when it is off."""
        return self.cache.stats() if self.cache is not None else None

    # Health probes run on the event loop itself (no hop to a worker thread): they answer as long as it turns.
    @api.get("/v2/health/live")
    async def live(self) -> dict[str, bool]:
        return {"live": True}

    @api.get("/v2/health/ready")
    async def ready(self) -> dict[str, bool]:
        return {"ready": True}

    @api.get("/v2")
    def server_metadata(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        return JSONResponse({"name": "partserve", "version": "1", "extensions": ["binary_tensor_data"]})

    @api.get("/v2/models/{name}")
    def model_metadata(self, name: str, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        if name != self.model_name:
            return self._unknown(name)
        return JSONResponse(
            {
                "name": self.model_name,
                "versions": ["1"],
                "platform": "pytorch_partserve",
                "inputs": _metadata(self._input_specs(), _input_parameters),
                "outputs": _metadata(self._output_specs(), _output_parameters),
                "parameters": {"dtype": self.plan.dtype},
            }
        )

    @api.get("/v2/models/{name}/ready")
    def model_ready(self, name: str, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        return self._unknown(name) if name != self.model_name else JSONResponse({"name": name, "ready": True})

    @api.post("/v2/models/{name}/infer")
    async def infer_http(self, name: str, request: Request) -> Response:
        return await self._guarded(name, request, self._answer)

    @api.post("/v1/models/{name}:predict")
    async def predict_v1(self, name: str, request: Request) -> Response:
        return await self._guarded(name, request, self._predict)

    @api.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        return await self._guarded(None, request, self._embeddings)

    async def _guarded(
        self, name: str | None, request: Request, answer: Callable[[Request, float, "Held"], Awaitable[Response]]
    ) -> Response:
        """``answer(request, arrival_s, held)`` for an authorised request to model ``name`` (None: named in
        the body), its errors turned into 4xx and 5xx answers and its bytes counted in ``held``."""
        arrival_s = time.time()
        if (denied := self._denied(request)) is not None:
            return denied
        if name is not None and name != self.model_name:
            return self._unknown(name)
        held = self.inflight.hold()
        try:
            return await answer(request, arrival_s, held)
        except Unread as unread:
            # Refused before its body was read: closing the connection stops the upload (clients read the
            # answer before the write fails) instead of receiving a body nobody will use.
            refused = (
                _error(unread.error.status, str(unread.error))
                if isinstance(unread.error, BadRequest)
                else (_unavailable(unread.error))
            )
            refused.headers["Connection"] = "close"
            return refused
        except BadRequest as exc:
            return _error(exc.status, str(exc))
        except Unavailable as exc:
            return _unavailable(exc)
        except Exception as exc:
            return _internal(exc)
        finally:
            held.release()

    async def _answer(self, request: Request, arrival_s: float, held: "Held") -> Response:
        """Read, decode, run and encode one infer request; its bytes are counted in ``held``."""
        timeout_header = request.headers.get(TIMEOUT_HEADER)
        _client_timeout_s(timeout_header, None)  # a malformed header is a 400 before the body is read
        body = await self._body(request, held)
        req = await codecs.decode_async(
            body,
            request.headers.get("content-type"),
            request.headers.get(codecs.HEADER_LENGTH),
            self.plan.inputs,
            max_tensor_bytes=codecs.JSON_EXPANSION * self.max_body_bytes,
        )
        del body  # from here the request holds its tensors (a .npy body's tensor is a view of it)
        req.output_datatype = req.output_datatype or request.headers.get(codecs.OUTPUT_DATATYPE_HEADER)
        codecs.check_output_datatype(req, self.plan.outputs)
        payload = await self._model_inputs(req.arrays)
        req.arrays = {}
        held.set(sum(a.nbytes for a in payload.values()))
        deadline = Deadline.of(arrival_s, self.request_timeout_s, _client_timeout_s(timeout_header, req.timeout_ms))
        outputs = self._finish(await self._serve(payload, deadline), payload)
        del payload
        out = await codecs.encode_async(req, outputs, self.model_name)
        return Response(out.body, media_type=out.media_type, headers=out.headers)

    async def _text_answers(
        self, texts: list[str], request: Request, arrival_s: float, held: "Held"
    ) -> tuple[Payload, dict[str, np.ndarray]]:
        """The model's inputs for ``texts`` and the answers to them (model outputs and processing's)."""
        if self.tokenize is None:
            raise BadRequest(f"model {self.model_name!r} takes no text: POST tensors to /v2/models/{{name}}/infer", 404)
        payload = await self._model_inputs({TEXT_INPUT: np.array([t.encode() for t in texts], dtype=object)})
        held.set(sum(a.nbytes for a in payload.values()))
        timeout_s = _client_timeout_s(request.headers.get(TIMEOUT_HEADER), None)
        deadline = Deadline.of(arrival_s, self.request_timeout_s, timeout_s)
        return payload, self._finish(await self._serve(payload, deadline), payload)

    async def _json_body(self, request: Request, held: "Held") -> Any:
        body = await self._body(request, held)
        try:
            if len(body) < codecs.OFFLOAD_BYTES:
                return json.loads(body)
            return await asyncio.to_thread(json.loads, body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise BadRequest(f"body is not valid JSON ({str(exc)[:200]})") from exc

    async def _predict(self, request: Request, arrival_s: float, held: "Held") -> Response:
        """KServe v1: ``{"instances": [text or {"text": text}, ...]}`` -> ``{"predictions": [{output: value}]}``."""
        doc = await self._json_body(request, held)
        instances = doc.get("instances") if isinstance(doc, dict) else None
        if not isinstance(instances, list) or not instances:
            raise BadRequest('expected {"instances": ["text", ...]} (or [{"text": "..."}, ...]) with 1 or more')
        given = [x.get(TEXT_INPUT) if isinstance(x, dict) and len(x) == 1 else x for x in instances]
        texts = [t for t in given if isinstance(t, str)]
        if len(texts) != len(given):
            raise BadRequest('each instance must be a string or {"text": string}')
        _, outputs = await self._text_answers(texts, request, arrival_s, held)
        assert self.processor is not None
        names = [t.name for t in self.processor.output_specs()] or list(outputs)
        predictions = [{n: outputs[n][i].tolist() for n in names} for i in range(len(texts))]
        return JSONResponse({"predictions": predictions})

    async def _embeddings(self, request: Request, arrival_s: float, held: "Held") -> Response:
        """OpenAI ``/v1/embeddings``: ``input`` one text or a list, ``encoding_format`` float or base64."""
        doc = await self._json_body(request, held)
        if not isinstance(doc, dict):
            raise BadRequest('expected {"model": ..., "input": "text" or ["text", ...]}')
        model = doc.get("model")
        if model is not None and model != self.model_name:
            raise BadRequest(f"unknown model {str(model)[:100]!r}; this server has {self.model_name!r}", 404)
        if self.processor is None or self.processor.task != "embedding":
            raise BadRequest(
                f"model {self.model_name!r} is not an embedding model: POST /v1/models/{self.model_name}:predict", 404
            )
        given = doc.get("input")
        texts = [given] if isinstance(given, str) else given
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise BadRequest("'input' must be a string or a non-empty list of strings (token ids are not taken)")
        fmt = doc.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise BadRequest(f"encoding_format {str(fmt)[:50]!r}: use float or base64")
        payload, outputs = await self._text_answers(texts, request, arrival_s, held)
        vectors = outputs["embedding"]
        data = [{"object": "embedding", "index": i, "embedding": _encode_vector(v, fmt)} for i, v in enumerate(vectors)]
        mask = payload.get(self.processor.processing.mask_input)
        tokens = int(mask.sum()) if mask is not None else sum(a.size for a in payload.values())
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": self.model_name, "usage": usage})

    async def _body(self, request: Request, held: "Held") -> bytes:
        """The request body, refusing more than ``max_body_bytes`` (413) before reading it all. Its bytes are
        held twice in ``held`` (the body, then what it decodes to; 503 past ``max_inflight_bytes``): at once
        for a declared ``Content-Length``, else as they come."""
        too_big = BadRequest(f"request body over the {self.max_body_bytes}-byte limit", 413)
        length = request.headers.get("content-length")
        declared = int(length) if length is not None and codecs.is_count(length) else None
        chunks: list[bytes] = []
        size = 0
        try:
            if declared is not None:
                if declared > self.max_body_bytes:
                    raise too_big
                held.grow(2 * declared)
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise too_big
                if 2 * size > held.bytes:
                    held.set(2 * size)
                chunks.append(chunk)
        except (BadRequest, Unavailable) as exc:
            raise Unread(exc) from exc
        held.set(2 * size)
        if size < codecs.OFFLOAD_BYTES:
            return b"".join(chunks)
        return await asyncio.to_thread(b"".join, chunks)  # a large join copies without the GIL, off the loop

    def _denied(self, request: Request) -> JSONResponse | None:
        """401 unless auth is off or the request carries the token; never echoes what was sent."""
        if authorized(request.headers.get("authorization"), self.token):
            return None
        return _error(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'", CHALLENGE)

    def _unknown(self, name: str) -> JSONResponse:
        return _error(
            404, f"unknown model {name!r}; this server has {self.model_name!r}, taking {describe(self.plan.inputs)}"
        )
