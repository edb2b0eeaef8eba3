"""Checks of request tensors against a plan's inputs (datatypes: :mod:`partitions.dtypes`).

An input takes its own dtype and, for a half-precision input, float32 (cast here, at the entrance) or, for a
bfloat16 input, its raw 16-bit words (``uint16``, from a ``.npy`` file or an Arrow column):
:func:`partitions.dtypes.accept`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from partitions.dtypes import BFLOAT16, accept, accepted_datatypes, from_words, oip_datatype, words
from partitions.types import BATCH, Payload, TensorSpec


class BadRequest(ValueError):
    """A request the client must fix; ``status`` is the HTTP status code to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def describe(specs: Sequence[TensorSpec]) -> str:
    """What the model expects, for error messages: ``features: shape [-1, 256] BF16 (bfloat16; FP32 taken)``."""
    return "; ".join(f"{s.name}: shape {list(s.shape)} {oip_datatype(s.dtype)} ({_takes(s.dtype)})" for s in specs)


def _takes(name: str) -> str:
    also = accepted_datatypes(name)[1:]
    return f"{name}; {', '.join(also)} taken" if also else name


def check_inputs(
    specs: Sequence[TensorSpec],
    arrays: Mapping[str, np.ndarray],
    limits: Mapping[str, tuple[int, int]] | None = None,
) -> Payload:
    """The request tensors, checked against ``specs``: names, dtypes and shapes (dim 0 is the batch, the same
    for every input and >= 1), and the values of inputs with ``limits`` (``[low, high)``: ids of an
    embedding's rows) within them."""
    expected = f"expected {describe(specs)}"
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    unknown = [n for n in arrays if n not in names]
    if missing or unknown:
        raise BadRequest(f"inputs {sorted(arrays)} given, missing {missing}, unknown {unknown}; {expected}")
    batches: set[int] = set()
    out: Payload = {}
    for spec in specs:
        a = arrays[spec.name]
        fits = a.ndim == len(spec.shape) and all(want == BATCH or got == want for got, want in zip(a.shape, spec.shape))
        taken = accept(a, spec.dtype) if fits and a.shape[0] >= 1 else None
        if taken is None:
            raise BadRequest(f"input {spec.name!r} has shape {list(a.shape)} {a.dtype.name}; {expected} (batch >= 1)")
        batches.add(a.shape[0])
        out[spec.name] = np.ascontiguousarray(taken)
    if len(batches) > 1:
        raise BadRequest(f"inputs have different batch sizes {sorted(batches)}; {expected}")
    for name, (low, high) in (limits or {}).items():
        ids = out.get(name)
        if ids is not None and ids.size and (int(ids.min()) < low or int(ids.max()) >= high):
            raise BadRequest(
                f"input {name!r} holds values from {int(ids.min())} to {int(ids.max())}; it indexes an embedding "
                f"of {high - low} rows: values must be in [{low}, {high})"
            )
    return out


def to_wire(payload: Payload) -> Payload:
    """``payload`` for Ray's object store: bfloat16 arrays as their raw words (``uint16``, the same memory),
    which Ray passes without a copy (ml_dtypes' arrays it pickles in-band, copying them twice);
    :func:`from_wire` reads them back."""
    return {k: words(v) if v.dtype == BFLOAT16 else v for k, v in payload.items()}


def from_wire(payload: Payload, specs: Sequence[TensorSpec]) -> Payload:
    """``payload`` with the entries that ``specs`` name in their dtypes again (:func:`to_wire`); the others as
    they are (a stage passes on what it carries untouched)."""
    out = dict(payload)
    for spec in specs:
        if spec.name in out and (typed := from_words(out[spec.name], spec.dtype)) is not None:
            out[spec.name] = typed
    return out
