"""Resolve a MODEL spec to a module and example inputs.

A spec is one of:

* a zoo name (``demo-transformer``; see :mod:`partitions.zoo`),
* ``package.module:factory``: a callable taking keyword options and returning ``(module, example_inputs)``,
  where ``example_inputs`` is a tensor, a tuple of tensors (named after ``forward``'s parameters) or a dict,
* a Hugging Face model directory or ``config.json`` (extra ``hf``): the class ``config.architectures`` names
  (its task head included), with the saved weights, else random ones from a fixed seed; inputs from the
  model's main input (``input_ids`` + ``attention_mask``, or ``pixel_values`` at the preprocessor's size).
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from partitions.dtypes import name_of, torch_dtype
from partitions.errors import ModelError, PartserveError
from partitions.plan import Plan
from partitions.processing import ProcessingSource, pooling_of, processing_source
from partitions.zoo import SEED, ZOO

DEFAULT_BATCH = 8


@dataclass
class ModelSource:
    spec: str
    options: dict[str, Any]
    module: nn.Module
    example_inputs: dict[str, torch.Tensor]
    """Example inputs at the plan's batch size, in ``forward``'s order."""
    kind: str
    int_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    """For integer inputs: the [low, high) range random test inputs are drawn from."""
    by_keyword: bool = True
    """Call ``forward`` with keyword arguments (else positionally, in ``example_inputs`` order)."""
    processing: ProcessingSource | None = None
    """Tokenizer, label map and pooling from the model's directory (Hugging Face directories)."""
    notes: list[str] = field(default_factory=list)
    """What the user should know about how the model was loaded (recorded in ``plan.model["notes"]``)."""

    def call_args(self, inputs: dict[str, torch.Tensor]) -> tuple[tuple, dict]:
        """``(args, kwargs)`` for ``forward``."""
        return forward_args(inputs, self.by_keyword)

    def forward(self, inputs: dict[str, torch.Tensor]) -> object:
        args, kwargs = self.call_args(inputs)
        with torch.inference_mode():
            return self.module(*args, **kwargs)

    def output_names(self, count: int) -> list[str]:
        """User-facing names of the flattened outputs."""
        out = self.forward({k: v[:1] for k, v in self.example_inputs.items()})
        if isinstance(out, dict) and len(out) == count:
            return [str(k) for k in out]
        return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]

    @property
    def dtype(self) -> str:
        """The dtype name of most of the module's floating-point weights and buffers (float32 when none)."""
        sizes: dict[str, int] = {}
        for t in [*self.module.parameters(), *self.module.buffers()]:
            if t.is_floating_point():
                sizes[name_of(t.dtype)] = sizes.get(name_of(t.dtype), 0) + t.numel()
        return max(sorted(sizes), key=sizes.__getitem__, default="float32")

    def to_dtype(self, name: str) -> ModelSource:
        """This source with its floating-point weights, buffers and example inputs in dtype ``name``
        (``bfloat16``; the module is converted in place; nothing changes when :attr:`dtype` is ``name``);
        integer inputs stay as they are."""
        if name == self.dtype:
            return self
        dtype = torch_dtype(name)
        self.module.to(dtype)
        self.example_inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.example_inputs.items()}
        return self

    def forward_flat(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Run the whole model and flatten its outputs as the captured graph does."""
        from torch.utils import _pytree as pytree

        return [t for t in pytree.tree_leaves(self.forward(inputs)) if isinstance(t, torch.Tensor)]


def takes_keywords(module: nn.Module, names: Iterable[str]) -> bool:
    """Whether ``module.forward`` has a parameter for every one of ``names``: then inputs go by keyword, else
    positionally in their order."""
    params = inspect.signature(module.forward).parameters
    return all(k in params for k in names)


def forward_args(inputs: Mapping[str, torch.Tensor], by_keyword: bool) -> tuple[tuple, dict]:
    """``(args, kwargs)`` that pass ``inputs`` to ``forward`` by keyword, or positionally in their order."""
    return ((), dict(inputs)) if by_keyword else (tuple(inputs.values()), {})


def call_forward(module: nn.Module, inputs: Mapping[str, torch.Tensor]) -> object:
    """``module(**inputs)`` when ``forward`` takes them by keyword (:func:`takes_keywords`), else
    ``module(*inputs.values())``."""
    args, kwargs = forward_args(inputs, takes_keywords(module, inputs))
    return module(*args, **kwargs)


def load_model(spec: str, options: dict[str, Any] | None = None, batch_size: int = DEFAULT_BATCH) -> ModelSource:
    """Build the model named by ``spec`` with ``options`` and example inputs of ``batch_size`` samples."""
    options = dict(options or {})
    processing: ProcessingSource | None = None
    notes: list[str] = []
    if batch_size < 1:
        raise ModelError(f"batch size ({batch_size}) must be >= 1", "pass --batch-size 1 or more")
    if spec in ZOO:
        module, example, kind = *_call_factory(spec, ZOO[spec], options, batch_size), "zoo"
    elif os.path.isfile(os.path.join(spec, "compressed.json")):
        from partitions.compress.archive import load_compressed

        module, example, kind = *load_compressed(spec, options, batch_size), "compressed"
    elif os.path.isdir(spec) or spec.endswith("config.json"):
        module, example, processing, notes = _hugging_face(spec, options, batch_size)
        kind = "hf"
    elif ":" in spec:
        factory = import_callable(
            spec,
            ModelError,
            "check the module path and PYTHONPATH",
            "{module} has no callable {attr!r}",
            "name a function returning (module, inputs)",
        )
        module, example = _call_factory(spec, factory, options, batch_size)
        kind = "factory"
    else:
        raise ModelError(
            f"unknown model {spec!r}",
            f"use a zoo name ({', '.join(sorted(ZOO))}), package.module:factory, or a Hugging Face directory",
        )
    module.eval()
    named = _name_inputs(module, example)
    named = {k: _resize_batch(v, batch_size) for k, v in named.items()}
    ranges = {k: (int(v.min()), int(v.max()) + 1) for k, v in named.items() if not v.is_floating_point()}
    keywords = takes_keywords(module, named)
    return ModelSource(spec, options, module, named, kind, ranges, keywords, processing, notes)


def plan_model(plan: Plan, batch_size: int | None = None) -> ModelSource:
    """The model of ``plan`` as its stages run it: in the plan's dtype, with example inputs of ``batch_size``
    samples (default: the plan's batch size)."""
    source = load_model(plan.model["spec"], plan.model["options"], batch_size or plan.batch_size)
    return source.to_dtype(plan.dtype)


def import_callable(
    spec: str, error: type[PartserveError], import_fix: str, not_callable: str, not_callable_fix: str
) -> Callable[..., Any]:
    """The callable named by ``package.module:attr``. Failures raise ``error``: ``cannot import ...`` with
    ``import_fix``, or ``not_callable`` (formatted with ``spec``, ``module`` and ``attr``) with ``not_callable_fix``."""
    module_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(module_name)
    except ImportError as exc:
        raise error(f"cannot import {module_name!r} ({exc})", import_fix) from exc
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise error(not_callable.format(spec=spec, module=module_name, attr=attr), not_callable_fix)
    return fn


def _call_factory(
    spec: str, factory: Callable[..., Any], options: dict[str, Any], batch_size: int
) -> tuple[nn.Module, Any]:
    """``factory(**options)`` (and ``batch_size`` when it takes one): ``(module, example inputs)``."""
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = sorted(k for k in options if k not in params and not takes_any)
    if unknown:
        accepted = ", ".join(k for k in params if k != "batch_size") or "none"
        raise ModelError(f"{spec} does not take option(s) {', '.join(unknown)}", f"accepted options: {accepted}")
    kwargs = dict(options)
    if "batch_size" in params:
        kwargs["batch_size"] = batch_size
    try:
        result = factory(**kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        given = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "no options"
        raise ModelError(f"{spec} failed with {given}: {type(exc).__name__}: {exc}", "check the option values") from exc
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise ModelError(f"{spec} returned {type(result).__name__}", "return (module, example_inputs)")
    return result


def _name_inputs(module: nn.Module, example: Any) -> dict[str, torch.Tensor]:
    if isinstance(example, torch.Tensor):
        example = (example,)
    if isinstance(example, dict):
        named = dict(example)
    else:
        names = [
            p.name
            for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if len(names) < len(example):
            raise ModelError(f"forward takes {len(names)} inputs, example has {len(example)}", "fix the example")
        named = dict(zip(names, example))
    bad = [k for k, v in named.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelError(f"example inputs {bad} are not tensors", "pass only tensors as example inputs")
    return named


def _resize_batch(t: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Repeat or truncate dimension 0 to ``batch_size`` samples."""
    if t.shape[0] == batch_size:
        return t
    reps = -(-batch_size // t.shape[0])
    return t.repeat(reps, *([1] * (t.dim() - 1)))[:batch_size].contiguous()


HF_OPTIONS = ("seq_len", "image_size", "pooling")
DEFAULT_SEQ_LEN = 128
"""Tokens per sample of a text model (texts are padded and truncated to it), unless the model's positions
are fewer."""


def _hugging_face(
    path: str, options: dict[str, Any], batch_size: int
) -> tuple[nn.Module, dict[str, torch.Tensor], ProcessingSource, list[str]]:
    """The model saved in a Hugging Face directory, example inputs for its main input, its processing and
    notes. ``options``: ``seq_len`` (tokens, default :data:`DEFAULT_SEQ_LEN`), ``image_size`` (pixels,
    default the preprocessor config's), ``pooling`` (embeddings: mean, cls or max; default the
    sentence-transformers config's, or mean)."""
    try:
        import transformers
    except ImportError as exc:
        raise ModelError("Hugging Face models need transformers", "pip install 'partserve[hf]'") from exc
    directory = os.path.dirname(path) if path.endswith("config.json") else path
    if not os.path.exists(os.path.join(directory, "config.json")):
        raise ModelError(f"no config.json in {directory}", "point MODEL at a Hugging Face model directory")
    unknown = sorted(set(options) - set(HF_OPTIONS))
    if unknown:
        raise ModelError(f"Hugging Face models do not take {unknown}", f"accepted options: {', '.join(HF_OPTIONS)}")
    config = transformers.AutoConfig.from_pretrained(directory)
    cls, notes = _model_class(transformers, config)
    has_weights = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(directory))
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        if has_weights:
            module = cls.from_pretrained(directory, use_safetensors=None)
        else:
            module = cls.from_config(config) if cls is transformers.AutoModel else cls(config)
            notes.append(f"{directory} holds no weights: random ones (seed {SEED})")
    main = getattr(module, "main_input_name", "input_ids")
    gen = torch.Generator().manual_seed(SEED)
    if main == "input_ids":
        longest = int(getattr(config, "max_position_embeddings", None) or DEFAULT_SEQ_LEN)
        seq_len = int(options.setdefault("seq_len", min(DEFAULT_SEQ_LEN, longest)))
        vocab = module.get_input_embeddings().num_embeddings
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
        mask = torch.ones(batch_size, seq_len, dtype=torch.long)
        mask[1::2, seq_len // 2 :] = 0  # every other sample is padded: the mask matters
        example = {"input_ids": ids, "attention_mask": mask}
    elif main == "pixel_values":
        height, width = _image_size(directory, config, options.get("image_size"))
        options.setdefault("image_size", height if height == width else f"{height}x{width}")
        channels = int(getattr(config, "num_channels", 3))
        example = {"pixel_values": torch.randn(batch_size, channels, height, width, generator=gen)}
    else:
        raise ModelError(
            f"{type(module).__name__} takes {main!r} first; directories serve input_ids or pixel_values models",
            "wrap the model in a package.module:factory returning (module, example_inputs)",
        )
    name = type(module).__name__
    task = "classification" if name.endswith(("SequenceClassification", "ImageClassification")) else "none"
    if task == "none" and main == "input_ids" and "For" not in name:
        task = "embedding"  # a bare encoder (BertModel, a sentence-transformers directory): pooled states
    id2label = getattr(config, "id2label", None) or {}
    labels = [str(id2label[k]) for k in sorted(id2label, key=int)] if task == "classification" else []
    pooling = pooling_of(directory, options.get("pooling")) if task == "embedding" else "mean"
    if "pooling" in options and task != "embedding":
        raise ModelError(f"{name} is not an embedding model: pooling does not apply", "drop -O pooling")
    processing = processing_source(directory, task, int(options.get("seq_len", 0)), labels, pooling)
    return module, example, processing, notes


def _model_class(transformers: Any, config: Any) -> tuple[Any, list[str]]:
    """The transformers class ``config.architectures`` names, else ``AutoModel`` with a note saying why."""
    names = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, names[0], None) if names else None
    if isinstance(cls, type) and hasattr(cls, "from_pretrained"):
        return cls, []
    why = f"names {names[0]!r}, which transformers does not have" if names else "names no architecture"
    return transformers.AutoModel, [f"config.json {why}: loaded with AutoModel (no task head)"]


def _image_size(directory: str, config: Any, option: object) -> tuple[int, int]:
    """``(height, width)`` of ``pixel_values``: the ``image_size`` option (``224`` or ``224x192``), else the
    preprocessor config's crop size (when it crops) or size, else ``config.image_size``."""
    import json

    if option is not None:
        text = str(option)
        height, _, width = text.partition("x")
        try:
            return int(height), int(width or height)
        except ValueError as exc:
            raise ModelError(f"image_size {text!r} is not N or HxW", "pass -O image_size=224") from exc
    preprocessor = os.path.join(directory, "preprocessor_config.json")
    size: object = None
    if os.path.isfile(preprocessor):
        with open(preprocessor) as f:
            pre = json.load(f)
        size = pre.get("crop_size") if pre.get("do_center_crop") else None
        size = size or pre.get("size")
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        edge = size.get("shortest_edge") or size.get("longest_edge")
        if edge:
            return int(edge), int(edge)
    if isinstance(size, int):
        return size, size
    image = getattr(config, "image_size", None)
    if isinstance(image, int):
        return image, image
    if isinstance(image, (list, tuple)) and len(image) == 2:
        return int(image[0]), int(image[1])
    raise ModelError("no image size in preprocessor_config.json or config.json", "pass -O image_size=224")
