"""The plan: plain, versioned data (``plan.json``), validated before anything loads it.

Versions: a reader takes plans of :data:`SCHEMA_VERSION` and older (fields added since are optional, with
defaults, so older plans load as they are) and refuses a newer one, naming both versions. Version 2 added
``input_limits`` and ``processing``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

from partitions.errors import ArtifactError
from partitions.types import Bytes, Ms, TensorSpec

T = TypeVar("T")

SCHEMA_VERSION = 2
"""The version this partserve writes; it reads 1 to this one."""
OLDEST_VERSION = 1
PLAN_FILE = "plan.json"

EAGER = "eager"
ONNXRUNTIME = "onnxruntime"
INDUCTOR = "inductor"
TENSORRT = "tensorrt"
CUDAGRAPHS = "cudagraphs"
ENGINES = (EAGER, ONNXRUNTIME, INDUCTOR, TENSORRT, CUDAGRAPHS)
"""What can run a stage (:mod:`partitions.engines`)."""
ONNX_ENGINES = (ONNXRUNTIME, TENSORRT)
"""The engines that run the stage's ONNX file (ONNX Runtime, on its CPU/CUDA or its TensorRT provider)."""
AUTO = "auto"
ENGINE_CHOICES = (*ENGINES, AUTO)
ONNX_FORMAT = "onnx"


@dataclass
class Artifact:
    """One stage's shard: an exported program (``.pt2``) or the weights of module children (safetensors)."""

    path: str
    """Relative to the plan directory."""
    format: str
    """``exported-program`` or ``module-weights``."""
    sha256: str
    size_bytes: Bytes
    children: list[str] = field(default_factory=list)
    """For ``module-weights``: the ``nn.Sequential`` children the stage runs, in order."""


@dataclass
class ProcessingFile:
    """A file of the model directory the entrance reads (tokenizer, config with the label map, pooling)."""

    path: str
    """Relative to the plan directory (``processing/tokenizer.json``)."""
    sha256: str
    size_bytes: Bytes


@dataclass
class Processing:
    """What the entrance runs around the stages: text in (a tokenizer), answers out (labels, embeddings)."""

    task: str
    """``classification`` (``probabilities`` and ``label`` from ``logits_output``), ``embedding`` (a pooled,
    L2-normalised ``embedding`` from ``hidden_output``) or ``none`` (the model's outputs only)."""
    files: list[ProcessingFile] = field(default_factory=list)
    """Copied from the model directory, checked against their hashes when loaded."""
    tokenizer: bool = False
    """The model also takes an OIP ``BYTES`` input ``text``, tokenized at the entrance."""
    max_length: int = 0
    """Tokens per text (padded and truncated to it): the plan's sequence length."""
    labels: list[str] = field(default_factory=list)
    """Label of each class index (``id2label``), for ``classification``."""
    logits_output: str = "logits"
    hidden_output: str = "last_hidden_state"
    mask_input: str = "attention_mask"
    """The input whose zeros mark padding (pooling ignores those positions)."""
    pooling: str = "mean"
    """``mean``, ``cls`` or ``max`` over the tokens, for ``embedding``."""


@dataclass
class StageEngine:
    """What runs a stage: its engine, the artifact converted for it at plan time, and why it was chosen.

    Plans written before engines existed have none: their stages run eager."""

    name: str = EAGER
    """``eager`` (the exported program in PyTorch), ``onnxruntime`` or ``inductor``."""
    artifact: Artifact | None = None
    """The converted program (``onnx`` for onnxruntime), hashed like the shard; None: the shard itself."""
    target: str = ""
    """Where the engine was built and timed (:func:`partitions.engines.current_target`); a replica elsewhere
    runs eager."""
    reason: str = ""
    """One line: why this engine (the others' failures, or how much faster it was)."""
    batches: list[int] = field(default_factory=list)
    """Batch sizes the stage was timed at (samples)."""
    ms: dict[str, list[float]] = field(default_factory=dict)
    """Median ms per engine tried, one per entry of ``batches``."""
    threads: int | None = None
    """Intra-op threads the engine runs with when served (``partserve tune``); None: the replica's."""
    up_to: int | None = None
    """Largest batch (samples) the engine runs; larger batches run eager, which was faster there (``auto``
    keeps an engine for small batches only when it loses at the plan's batch). None: every batch."""

    def ms_at(self, k: int) -> float:
        """The stage's time at ``batches[k]`` on what runs that batch (ms)."""
        runs = self.name if self.up_to is None or self.batches[k] <= self.up_to else EAGER
        return self.ms[runs][k]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StageEngine:
        artifact = d.get("artifact")
        return _known(cls, {**d, "artifact": _known(Artifact, artifact) if artifact else None})


@dataclass
class Stage:
    index: int
    node_range: tuple[int, int]
    """Nodes ``[start, end)`` of ``Plan.nodes``."""
    inputs: list[TensorSpec]
    """What the stage program reads, in its positional order."""
    computed: list[TensorSpec]
    """What the stage program returns, in order."""
    carried: list[str]
    """Payload entries passed through untouched."""
    artifact: Artifact
    params: int
    weight_bytes: Bytes
    memory_bytes: Bytes
    compute_ms: Ms
    transfer_bytes: Bytes
    """Bytes sent to the next stage per batch (0 for the last stage)."""
    cost_ms: Ms
    """compute_ms + transfer_bytes / bandwidth: the planner's figure."""
    measured_ms: Ms
    """Median wall time of the stage program alone at the plan's batch size."""
    gpu_fraction: float
    after: list[int] = field(default_factory=list)
    """Stages whose outputs this stage receives, merged in this order; empty: the model inputs."""
    engine: StageEngine = field(default_factory=StageEngine)

    @property
    def run_ms(self) -> Ms:
        """The stage's time at the plan's batch on its engine (ms): as timed when the engine was chosen, else
        ``measured_ms`` (eager)."""
        return self.engine.ms_at(-1) if self.engine.ms.get(self.engine.name) else self.measured_ms

    @property
    def sends(self) -> list[str]:
        return self.carried + [t.name for t in self.computed]

    @property
    def reads(self) -> list[str]:
        """The payload entries the stage uses: its program's inputs and what it carries."""
        return list(dict.fromkeys([t.name for t in self.inputs] + self.carried))


def check_version(version: object) -> None:
    """Raise :class:`ArtifactError` unless this partserve reads plans of schema ``version``."""
    if type(version) is int and OLDEST_VERSION <= version <= SCHEMA_VERSION:
        return
    if type(version) is int and version > SCHEMA_VERSION:
        raise ArtifactError(
            f"plan.json has schema version {version}, newer than this partserve reads "
            f"({OLDEST_VERSION} to {SCHEMA_VERSION})",
            "upgrade partserve, or re-run partserve plan with this version",
        )
    raise ArtifactError(
        f"plan.json has schema version {version!r}; this partserve reads {OLDEST_VERSION} to {SCHEMA_VERSION}",
        "re-run partserve plan",
    )


def _known(cls: type, d: dict[str, Any]) -> Any:
    """``cls(**d)`` with only the keys ``cls`` has: a plan written by a build with more optional fields of
    the same version still loads (its extra fields are ignored); a missing field takes its default."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Plan:
    model: dict[str, Any]
    """spec, options, kind, capture method and the reason for it."""
    device: str
    batch_size: int
    bandwidth_bytes_per_ms: float
    max_stage_bytes: Bytes | None
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    output_values: list[str]
    """Payload key of each output after the last stage."""
    input_ranges: dict[str, tuple[int, int]]
    """[low, high) of integer inputs, for random test inputs."""
    nodes: list[dict[str, Any]]
    stages: list[Stage]
    summary: dict[str, Any]
    objective: str = "throughput"
    """What the planner optimised: ``throughput`` (bottleneck) or ``latency`` (critical path)."""
    dtype: str = "float32"
    """dtype name of the weights and float activations (``partserve plan --dtype``; :mod:`partitions.dtypes`)."""
    input_limits: dict[str, tuple[int, int]] = field(default_factory=dict)
    """[low, high) of integer inputs that index an embedding (its rows): the entrance answers 400 outside it.
    Unlike ``input_ranges`` (what the example inputs held), these are limits. Since version 2."""
    processing: Processing | None = None
    """Pre- and post-processing at the entrance (files in ``processing/``); None: tensors in and out.
    Since version 2."""
    engine: str = EAGER
    """The engine asked for at plan time (``auto``: the fastest per stage); each stage's is in ``Stage.engine``."""
    tuning: dict[str, Any] = field(default_factory=dict)
    """What ``partserve tune`` measured and chose (:func:`partitions.tune.tuned`): ``batch_size``, the batch the
    entrance forms; ``cores``; ``samples_per_s`` and ``before_samples_per_s``. Empty: not tuned."""
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        d = {"schema_version": d.pop("schema_version"), **d}
        return json.dumps(d, indent=1, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"plan.json is not valid JSON ({exc})", "re-run partserve plan") from exc
        if not isinstance(d, dict):
            raise ArtifactError("plan.json is not a JSON object", "re-run partserve plan")
        check_version(d.get("schema_version"))
        specs = lambda xs: [TensorSpec.from_json(x) for x in xs]
        ranges = lambda r: {k: (int(v[0]), int(v[1])) for k, v in r.items()}
        try:
            stages = [
                _known(
                    Stage,
                    {
                        **s,
                        "node_range": tuple(s["node_range"]),
                        "inputs": specs(s["inputs"]),
                        "computed": specs(s["computed"]),
                        "artifact": _known(Artifact, s["artifact"]),
                        **({"engine": StageEngine.from_json(s["engine"])} if "engine" in s else {}),
                    },
                )
                for s in d["stages"]
            ]
            processing = d.get("processing")
            if processing is not None:
                files = [_known(ProcessingFile, f) for f in processing.get("files", [])]
                processing = _known(Processing, {**processing, "files": files})
            plan = _known(
                cls,
                {
                    **d,
                    "inputs": specs(d["inputs"]),
                    "outputs": specs(d["outputs"]),
                    "input_ranges": ranges(d["input_ranges"]),
                    "input_limits": ranges(d.get("input_limits", {})),
                    "processing": processing,
                    "stages": stages,
                },
            )
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise ArtifactError(
                f"plan.json does not hold a plan ({type(exc).__name__}: {exc})", "re-run partserve plan"
            ) from exc
        problems = plan.problems()
        if problems:
            raise ArtifactError("plan.json is inconsistent: " + "; ".join(problems), "re-run partserve plan")
        return plan

    @property
    def serve_batch_size(self) -> int:
        """Samples per batch the entrance forms by default: the tuned batch, else the plan's."""
        return int(self.tuning.get("batch_size") or self.batch_size)

    def named_outputs(self, payload: Mapping[str, T]) -> dict[str, T]:
        """The model outputs, under their user-facing names, from the sink stages' merged payload."""
        return {spec.name: payload[value] for spec, value in zip(self.outputs, self.output_values)}

    def sinks(self) -> list[int]:
        """Stages no other stage reads from: their outputs, merged, hold the model outputs."""
        read = {j for s in self.stages for j in s.after}
        return [s.index for s in self.stages if s.index not in read]

    @property
    def is_chain(self) -> bool:
        return all(s.after == ([s.index - 1] if s.index else []) for s in self.stages)

    def problems(self) -> list[str]:
        """Everything inconsistent in the plan (empty when it is sound)."""
        out: list[str] = []
        sends: dict[int, set[str]] = {}
        model_inputs = {t.name for t in self.inputs}
        covered = []
        for i, s in enumerate(self.stages):
            if s.index != i:
                out.append(f"stage {i} has index {s.index}")
            start, end = s.node_range
            if end <= start:
                out.append(f"stage {i} covers no nodes ({start}:{end})")
            covered.append((start, end))
            bad = [j for j in s.after if not 0 <= j < i]
            if bad:
                out.append(f"stage {i} reads from stages {bad}, which do not run before it")
            available = set().union(*(sends.get(j, set()) for j in s.after)) if s.after else model_inputs
            missing = [t.name for t in s.inputs if t.name not in available]
            missing += [c for c in s.carried if c not in available]
            if missing:
                out.append(f"stage {i} needs {missing}, which no stage it reads from sends")
            sends[i] = set(s.sends)
        covered.sort()
        position = 0
        for start, end in covered:
            if start != position:
                out.append(f"nodes {position}:{start} belong to no stage or to two")
            position = max(position, end)
        if position != len(self.nodes):
            out.append(f"stages cover {position} of {len(self.nodes)} nodes")
        final = set().union(*(sends.get(j, set()) for j in self.sinks()))
        lost = [v for v in self.output_values if v not in final]
        if lost:
            out.append(f"outputs {lost} are not sent by the last stages")
        unknown = sorted(set(self.input_limits) - model_inputs)
        if unknown:
            out.append(f"input_limits name {unknown}, which are no model inputs")
        p = self.processing
        if p is not None:
            needed = {"classification": p.logits_output, "embedding": p.hidden_output}.get(p.task, "")
            if p.task not in ("classification", "embedding", "none"):
                out.append(f"processing task {p.task!r} is not classification, embedding or none")
            elif needed and needed not in {t.name for t in self.outputs}:
                out.append(f"processing task {p.task} reads output {needed!r}, which the model does not have")
        if len(self.outputs) != len(self.output_values):
            out.append(f"{len(self.outputs)} outputs but {len(self.output_values)} output values")
        return out
