"""Pre- and post-processing around the stages, from files of a Hugging Face model directory.

At plan time (:func:`write_processing`) the tokenizer, the config (with its label map) and a
sentence-transformers pooling config are copied into the plan directory under ``processing/`` and hashed
like the shards, and what to do with them is recorded in ``plan.json`` (:class:`~partitions.plan.Processing`):
replicas read only the plan directory, which may be in object storage. At serving time a
:class:`Processor` turns texts into the model's token inputs and adds answers beside the raw outputs:

* ``classification``: ``probabilities`` (softmax of the logits) and ``label`` (``id2label`` of the argmax);
* ``embedding``: ``embedding``, the token states pooled over the unpadded tokens (``mean``, ``cls`` or
  ``max``) and L2-normalised.

The math is plain numpy (:func:`softmax`, :func:`pool`, :func:`normalise`); only loading a tokenizer needs
``transformers``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from partitions import storage
from partitions.errors import ModelError
from partitions.plan import Processing, ProcessingFile
from partitions.types import BATCH, Payload, TensorSpec

PROCESSING_DIR = "processing"
TEXT_INPUT = "text"
TASKS = ("classification", "embedding", "none")
POOLINGS = ("mean", "cls", "max")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
"""Files a tokenizer may consist of; any of the first, ``vocab.txt`` or ``vocab.json`` makes one."""
POOLING_CONFIG = "1_Pooling/config.json"
"""A sentence-transformers directory's pooling module."""
COPIED = (*TOKENIZER_FILES, "config.json", "modules.json", POOLING_CONFIG)
NORM_EPS = 1e-12
"""Smallest norm divided by when normalising (an all-zero vector stays zero), as torch's ``F.normalize``."""


@dataclass
class ProcessingSource:
    """What a model directory offers the entrance, before planning (paths are the directory's)."""

    directory: str
    task: str
    files: list[str] = field(default_factory=list)
    """Names relative to ``directory``, copied into the plan."""
    tokenizer: bool = False
    max_length: int = 0
    labels: list[str] = field(default_factory=list)
    pooling: str = "mean"


def has_tokenizer(directory: str) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")
    return any(os.path.isfile(os.path.join(directory, n)) for n in names)


def pooling_of(directory: str, option: str | None) -> str:
    """``option`` when given, else the mode of a sentence-transformers pooling config, else ``mean``."""
    if option is not None:
        if option not in POOLINGS:
            raise ModelError(f"pooling {option!r} is not one of {', '.join(POOLINGS)}", "pass -O pooling=mean")
        return option
    path = os.path.join(directory, POOLING_CONFIG)
    if os.path.isfile(path):
        import json

        with open(path) as f:
            config = json.load(f)
        for mode, key in (("cls", "pooling_mode_cls_token"), ("max", "pooling_mode_max_tokens")):
            if config.get(key):
                return mode
    return "mean"


def processing_source(
    directory: str, task: str, max_length: int, labels: Sequence[str], pooling: str
) -> ProcessingSource:
    """The processing of the model in ``directory``: its files that exist, and whether one is a tokenizer."""
    files = [name for name in COPIED if os.path.isfile(os.path.join(directory, name))]
    tokenizer = has_tokenizer(directory)
    return ProcessingSource(directory, task, files, tokenizer, max_length if tokenizer else 0, list(labels), pooling)


def write_processing(source: ProcessingSource | None, outputs: Sequence[TensorSpec], uri: str) -> Processing | None:
    """Copy ``source``'s files to ``uri``/processing/ and describe them; None when there is nothing to do.
    A task whose output the graph lacks (``logits``, ``last_hidden_state``) becomes ``none``."""
    if source is None:
        return None
    processing = Processing(
        task=source.task,
        tokenizer=source.tokenizer,
        max_length=source.max_length,
        labels=list(source.labels),
        pooling=source.pooling,
    )
    needed = {"classification": processing.logits_output, "embedding": processing.hidden_output}.get(source.task)
    if needed is not None and needed not in {t.name for t in outputs}:
        processing.task = "none"
    if processing.task == "none" and not processing.tokenizer:
        return None
    for name in source.files:
        with open(os.path.join(source.directory, name), "rb") as f:
            data = f.read()
        path = f"{PROCESSING_DIR}/{name}"
        storage.write_file(uri, path, data)
        processing.files.append(ProcessingFile(path, storage.sha256(data), len(data)))
    return processing


# The math ---------------------------------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float32 (computed in float64)."""
    x = logits.astype(np.float64)
    x = np.exp(x - x.max(axis=-1, keepdims=True))
    return (x / x.sum(axis=-1, keepdims=True)).astype(np.float32)


def pool(hidden: np.ndarray, mask: np.ndarray, how: str) -> np.ndarray:
    """``[batch, tokens, width]`` states -> ``[batch, width]`` over the tokens where ``mask`` is not 0:
    their mean, their maximum, or the first token's state (``cls``)."""
    if how == "cls":
        return hidden[:, 0].astype(np.float32)
    keep = (mask != 0)[..., None]
    if how == "max":
        return np.where(keep, hidden, -np.inf).max(axis=1).astype(np.float32)
    total = (hidden.astype(np.float64) * keep).sum(axis=1)
    return (total / np.maximum(keep.sum(axis=1), 1)).astype(np.float32)


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (rows of norm under :data:`NORM_EPS` are divided by it)."""
    norm = np.linalg.norm(x.astype(np.float64), axis=-1, keepdims=True)
    return (x / np.maximum(norm, NORM_EPS)).astype(np.float32)


# Serving ----------------------------------------------------------------------------------------------


class Processor:
    """The entrance's processing for a plan: tokenizing texts and adding answers to the outputs."""

    def __init__(
        self, uri: str, processing: Processing, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
    ) -> None:
        """Reads the processing files from the plan at ``uri`` (each checked against its hash)."""
        self.processing = processing
        self.inputs = list(inputs)
        self.model_outputs = list(outputs)
        self.tokenizer = load_tokenizer(uri, processing.files) if processing.tokenizer else None

    @property
    def task(self) -> str:
        return self.processing.task

    def input_specs(self) -> list[TensorSpec]:
        """What a request may send instead of the model's inputs: ``text``, one string per sample."""
        return [TensorSpec(TEXT_INPUT, (BATCH,), "object")] if self.tokenizer is not None else []

    def output_specs(self) -> list[TensorSpec]:
        """The answers added beside the model's outputs."""
        by_name = {t.name: t for t in self.model_outputs}
        p = self.processing
        if p.task == "classification":
            classes = by_name[p.logits_output].shape[-1]
            return [TensorSpec("probabilities", (BATCH, classes), "float32"), TensorSpec("label", (BATCH,), "object")]
        if p.task == "embedding":
            width = by_name[p.hidden_output].shape[-1]
            return [TensorSpec("embedding", (BATCH, width), "float32")]
        return []

    def tokenize(self, texts: Sequence[str]) -> Payload:
        """The model's token inputs for ``texts``, padded and truncated to the plan's length (``max_length``)
        with the tokenizer's own settings (padding side, special tokens). Runs the tokenizer on all at once."""
        assert self.tokenizer is not None, "the plan has no tokenizer"
        length = self.processing.max_length
        encoded = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=length, return_tensors="np"
        )
        payload: Payload = {}
        for spec in self.inputs:
            if spec.name not in encoded:
                raise ModelError(
                    f"the tokenizer gives {sorted(encoded.keys())}, not the model input {spec.name!r}",
                    "send the model's inputs as tensors",
                )
            payload[spec.name] = np.ascontiguousarray(encoded[spec.name], dtype=spec.dtype)
        return payload

    def finish(self, outputs: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray]) -> Payload:
        """``outputs`` with the answers added (``inputs``: the model inputs they came from, for the mask)."""
        p = self.processing
        answers = dict(outputs)
        if p.task == "classification":
            logits = outputs[p.logits_output]
            answers["probabilities"] = softmax(logits)
            labels = p.labels or [str(i) for i in range(logits.shape[-1])]
            answers["label"] = np.asarray(labels, dtype=str)[logits.argmax(axis=-1)]
        elif p.task == "embedding":
            hidden = outputs[p.hidden_output]
            mask = inputs.get(p.mask_input)
            mask = np.ones(hidden.shape[:2], np.int64) if mask is None else mask
            answers["embedding"] = normalise(pool(hidden, mask, p.pooling))
        return answers


def load_tokenizer(uri: str, files: Sequence[ProcessingFile]) -> Any:
    """The tokenizer saved in a plan's processing files (``transformers.AutoTokenizer``), read from ``uri``
    and checked against the hashes in ``files``; one without a padding token pads with its end token."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ModelError("the plan tokenizes text, which needs transformers", "pip install 'partserve[hf]'") from exc
    scratch = tempfile.mkdtemp(prefix="partserve-tokenizer-")
    try:
        for f in files:
            data = storage.read_checked(uri, f.path, f.sha256)
            local = os.path.join(scratch, f.path.removeprefix(PROCESSING_DIR + "/"))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with open(local, "wb") as out:
                out.write(data)
        tokenizer = AutoTokenizer.from_pretrained(scratch)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # GPT-2 and kin: the mask hides padding whatever its id
        return tokenizer
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
