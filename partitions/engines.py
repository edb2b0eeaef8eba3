"""Stage engines: what runs a stage program, each behind one signature (numpy arrays in, numpy arrays out).

* ``eager``: the exported program in PyTorch (the shard itself).
* ``onnxruntime``: the exported program converted once at plan time to ONNX (``torch.onnx.export`` of the
  exported program, its dynamic batch dimension kept), run by ONNX Runtime. The ONNX file loads without
  executing code and is hashed in plan.json like the shard. Needs ``pip install 'partserve[onnx]'``.
* ``inductor``: the exported program compiled by ``torch.compile`` (dynamic shapes) when the stage loads;
  no artifact of its own. Needs a C++ compiler on CPU.
* ``tensorrt``: the same ONNX file run by ONNX Runtime's TensorRT execution provider (CUDA as its fallback for
  the nodes TensorRT does not take), fp32 (TensorRT may use TF32 on Ampere and later GPUs: the check against
  eager at plan time keeps it only within the fp32 tolerance); TensorRT builds its engine when the stage
  loads, for the shapes it meets. Needs a CUDA device and ``pip install 'partserve[gpu]'`` (onnxruntime-gpu, TensorRT).
* ``cudagraphs``: the exported program compiled by ``torch.compile`` (``mode="reduce-overhead"``, static
  shapes), so that each batch bucket of :data:`BUCKETS` replays one captured CUDA graph: a batch runs at the
  smallest bucket that holds it, padded with copies of its last row that are dropped from the outputs, and
  a batch above the largest bucket runs eager. A graph is captured on a bucket's first batch. Needs a CUDA
  device; pays where a stage's kernels are short and their launches dominate (small batches).

An engine is tied to the target it was built and timed on (:func:`current_target`): a stage loaded
elsewhere runs eager and says so.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import platform
import shutil
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import numpy as np
import torch
from torch import nn

from partitions.dtypes import to_numpy, to_torch
from partitions.plan import (
    AUTO,
    CUDAGRAPHS,
    EAGER,
    ENGINE_CHOICES,
    ENGINES,
    INDUCTOR,
    ONNX_ENGINES,
    ONNX_FORMAT,
    ONNXRUNTIME,
    TENSORRT,
)

__all__ = [
    "AUTO",
    "BUCKETS",
    "CUDAGRAPHS",
    "EAGER",
    "ENGINES",
    "ENGINE_CHOICES",
    "INDUCTOR",
    "ONNXRUNTIME",
    "ONNX_ENGINES",
    "ONNX_FORMAT",
    "TENSORRT",
    "Runner",
]

ISA_FLAGS: tuple[str, ...] = (
    *("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni"),
    *("amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2"),
)
"""CPU feature flags that select kernels in PyTorch and ONNX Runtime (``/proc/cpuinfo`` names)."""

Runner = Callable[[Sequence[np.ndarray]], list[np.ndarray]]
"""A loaded stage: its program's inputs, in order, to its outputs, in order (batch on dimension 0)."""

BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
"""Batch sizes (samples) the ``cudagraphs`` engine captures a graph for."""


@cache
def _cpu_flags() -> tuple[str, ...]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        line = ""
    present = set(line.partition(":")[2].split())
    return tuple(flag for flag in ISA_FLAGS if flag in present)


def current_target(device: torch.device) -> str:
    """The instruction set or GPU architecture engines are built for here: ``cpu x86_64 avx,avx2,...`` (the
    flags of :data:`ISA_FLAGS` present) or ``cuda sm_90``."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda sm_{major}{minor}"
    return f"cpu {platform.machine()} {','.join(_cpu_flags())}"


def unavailable(engine: str, device: torch.device, converting: bool = False) -> str:
    """Why ``engine`` cannot run on ``device`` here, or (``converting``) be converted to at plan time: a
    one-line reason with the fix; ``""`` if it can."""
    if engine in (TENSORRT, CUDAGRAPHS) and device.type != "cuda":
        return f"{engine} needs a CUDA device"
    if engine in ONNX_ENGINES:
        extra = "gpu" if engine == TENSORRT else "onnx"
        needed = ("onnxruntime", "onnx", "onnxscript") if converting else ("onnxruntime",)
        missing = [m for m in needed if importlib.util.find_spec(m) is None]
        if missing:
            return f"{', '.join(missing)} not installed (pip install 'partserve[{extra}]')"
        import onnxruntime as ort

        provider = _providers(engine, device)[0]
        if provider not in ort.get_available_providers():
            return f"onnxruntime has no {provider} here (pip install 'partserve[gpu]' on a GPU machine)"
    if engine == INDUCTOR and device.type == "cpu" and not shutil.which(os.environ.get("CXX", "c++")):
        return "inductor needs a C++ compiler on CPU (none found as $CXX or c++)"
    return ""


def _providers(engine: str, device: torch.device) -> list[str]:
    """ONNX Runtime's execution providers for ``engine`` on ``device``, first choice first: each takes the
    nodes the ones before it cannot (CPU last)."""
    wanted = ["TensorrtExecutionProvider"] if engine == TENSORRT else []
    wanted += ["CUDAExecutionProvider"] if device.type == "cuda" else []
    return [*wanted, "CPUExecutionProvider"]


def one_line(exc: BaseException, limit: int = 240) -> str:
    """``Type: first line of the message`` of the root cause of ``exc`` (and the type of ``exc`` when it
    differs), at most ``limit`` characters: a reason for plan.json."""
    first = lambda e: f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    root = exc
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    text = first(exc) if root is exc else f"{first(root)} (in {type(exc).__name__})"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def max_errors(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> tuple[float, float]:
    """``(max |got - want|, max |want|)`` over all outputs, paired in order, in float64."""
    err = max((float(np.max(np.abs(g.astype(np.float64) - w), initial=0)) for g, w in zip(got, want)), default=0.0)
    scale = max((float(np.max(np.abs(w.astype(np.float64)), initial=0)) for w in want), default=0.0)
    return err, scale


def rel_error(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> float:
    """max |got - want| / max |want| over all outputs (inf when the shapes or counts differ)."""
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        return float("inf")
    err, scale = max_errors(got, want)
    return err / scale if scale else err


def convert(engine: str, program: torch.export.ExportedProgram) -> bytes | None:
    """The artifact ``engine`` runs, converted from ``program`` (None: it runs the shard itself)."""
    if engine not in ONNX_ENGINES:
        return None
    quiet, exporter_log = io.StringIO(), logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # its warnings name optional op libraries it skipped (torchvision)
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            onnx_program = torch.onnx.export(program, (), dynamo=True, verbose=False, optimize=True)
    finally:
        exporter_log.setLevel(level)
    assert onnx_program is not None
    return onnx_program.model_proto.SerializeToString()


def load(engine: str, module: nn.Module | None, artifact: bytes | None, device: torch.device, threads: int) -> Runner:
    """A runner of the stage on ``engine``: ``module`` is the exported program (eager, inductor), ``artifact``
    the converted file (onnxruntime, tensorrt); ``threads``: intra-op threads (ONNX Runtime's; torch's are
    global)."""
    if engine in ONNX_ENGINES:
        assert artifact is not None
        return _ort_runner(artifact, _providers(engine, device), threads)
    assert module is not None
    if engine == INDUCTOR:  # compiles on the first call of each shape class (batch 1 is one of its own)
        return _torch_runner(torch.compile(module, dynamic=True), device)
    if engine == CUDAGRAPHS:
        graphs = _torch_runner(torch.compile(module, mode="reduce-overhead", dynamic=False), device)
        return padded(graphs, BUCKETS, above=_torch_runner(module, device))
    return _torch_runner(module, device)


def padded(run: Runner, buckets: Sequence[int], above: Runner) -> Runner:
    """A runner that runs each batch on ``run`` at the smallest of ``buckets`` (ascending) that holds it,
    padded with copies of its last row, and returns the batch's own rows; batches larger than every bucket
    (and empty ones) run on ``above``. For programs whose rows do not depend on each other, as a served
    stage's must not: the entrance batches unrelated requests."""

    def call(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        n = len(arrays[0])
        size = next((b for b in buckets if b >= n), None)
        if n == 0 or size is None:
            return above(arrays)
        if size == n:
            return run(arrays)
        rows = [np.concatenate([a, np.repeat(a[-1:], size - n, axis=0)]) for a in arrays]
        return [out[:n] for out in run(rows)]

    return call


def by_batch(small: Runner, large: Runner, up_to: int) -> Runner:
    """A runner that runs batches of at most ``up_to`` samples on ``small`` and larger ones on ``large``."""

    def run(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        return (small if len(arrays[0]) <= up_to else large)(arrays)

    return run


def stages_engine(names: Sequence[str]) -> str | None:
    """The first of ``names`` (the stages' engines) that is not eager: the engine a whole-model baseline runs
    on to be on equal terms with those stages; None if every stage runs eager."""
    return next((n for n in names if n != EAGER), None)


def whole_model(
    module: nn.Module,
    args: tuple,
    kwargs: dict[str, torch.Tensor],
    device: torch.device,
    threads: int,
    engine: str = ONNXRUNTIME,
) -> Runner:
    """The whole model exported as a plan's stages are (dynamic batch) and run on ``engine``: the baseline on
    equal terms with stages on that engine. Its inputs, in order: ``args``, then ``kwargs``' values."""
    batch = torch.export.Dim("batch")
    dynamic = {k: {0: batch} for k in kwargs} if kwargs else tuple({0: batch} for _ in args)
    program = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic)
    return load(engine, program.module(), convert(engine, program), device, threads)


def _torch_runner(module: Callable[..., Any], device: torch.device) -> Runner:
    def run(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        args = [_to_device(a, device) for a in arrays]
        with torch.inference_mode():
            out = module(*args)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        return [np.ascontiguousarray(to_numpy(t)) for t in outs]

    return run


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    if not array.flags.writeable:  # a zero-copy view of Ray's object store: programs may write inputs
        array = array.copy()
    t = to_torch(np.ascontiguousarray(array))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def _ort_runner(data: bytes, providers: list[str], threads: int) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: its warnings name internal graph nodes
    # Idle pool threads sleep instead of spinning: stages share the cores with each other when served.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(data, options, providers=providers)
    names = [i.name for i in session.get_inputs()]

    def run(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        feeds = {name: np.ascontiguousarray(a) for name, a in zip(names, arrays)}
        return [np.ascontiguousarray(o) for o in session.run(None, feeds)]

    return run
