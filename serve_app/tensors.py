"""Tensor datatypes of the Open Inference Protocol and checks of request tensors against a plan's inputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from partitions.types import BATCH, Payload, TensorSpec

OIP_DATATYPES: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}
"""numpy dtype name -> Open Inference Protocol datatype."""
NUMPY_DTYPES: dict[str, str] = {v: k for k, v in OIP_DATATYPES.items()}


class BadRequest(ValueError):
    """A request the client must fix; ``status`` is the HTTP status code to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def oip_datatype(dtype: str | np.dtype) -> str:
    """The OIP datatype (``FP32``) of a numpy dtype."""
    name = np.dtype(dtype).name
    if name not in OIP_DATATYPES:
        raise BadRequest(f"dtype {name} has no Open Inference Protocol datatype")
    return OIP_DATATYPES[name]


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of an OIP datatype (``FP32`` -> float32)."""
    if datatype not in NUMPY_DTYPES:
        raise BadRequest(f"unknown datatype {datatype!r}; known: {', '.join(NUMPY_DTYPES)}")
    return np.dtype(NUMPY_DTYPES[datatype])


def describe(specs: Sequence[TensorSpec]) -> str:
    """What the model expects, for error messages: ``features: shape [-1, 256] FP32 (float32)``."""
    return "; ".join(f"{s.name}: shape {list(s.shape)} {oip_datatype(s.dtype)} ({s.dtype})" for s in specs)


def check_inputs(specs: Sequence[TensorSpec], arrays: Mapping[str, np.ndarray]) -> Payload:
    """The request tensors, checked against ``specs``: names, dtypes and shapes (dim 0 is the batch, the same
    for every input and >= 1)."""
    expected = f"expected {describe(specs)}"
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    unknown = [n for n in arrays if n not in names]
    if missing or unknown:
        raise BadRequest(f"inputs {sorted(arrays)} given, missing {missing}, unknown {unknown}; {expected}")
    batches: set[int] = set()
    for spec in specs:
        a = arrays[spec.name]
        fits = a.ndim == len(spec.shape) and all(want == BATCH or got == want for got, want in zip(a.shape, spec.shape))
        if a.dtype != np.dtype(spec.dtype) or not fits or a.shape[0] < 1:
            raise BadRequest(f"input {spec.name!r} has shape {list(a.shape)} {a.dtype.name}; {expected} (batch >= 1)")
        batches.add(a.shape[0])
    if len(batches) > 1:
        raise BadRequest(f"inputs have different batch sizes {sorted(batches)}; {expected}")
    return {spec.name: np.ascontiguousarray(arrays[spec.name]) for spec in specs}
