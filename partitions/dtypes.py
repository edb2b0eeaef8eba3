"""Element types in one table: torch <-> numpy <-> Open Inference Protocol datatype <-> Arrow.

A dtype is named as numpy names it (``float32``, ``bfloat16``, ``int64``): torch's name without ``torch.``,
the name plan.json records. numpy has no bfloat16; :mod:`ml_dtypes` gives it one whose items are the same
16-bit words as torch's, so a bf16 tensor goes into numpy, through Ray's object store and onto the wire (raw
little-endian words, as Triton's clients send them) with no detour through float32. Importing this module
registers that dtype: ``np.dtype("bfloat16")`` works in every process that reads a plan.

Formats without a bfloat16 type (``.npy`` files, Arrow, Parquet) carry it as float32, which holds every bf16
value exactly, or as its raw words in ``uint16`` when asked (:func:`wire_array`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

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
    "bfloat16": "BF16",
    "float32": "FP32",
    "float64": "FP64",
}
"""dtype name -> Open Inference Protocol (KServe v2, Triton) datatype: every dtype a plan's tensors may have."""
FROM_OIP: dict[str, str] = {v: k for k, v in OIP_DATATYPES.items()}
BYTES = "BYTES"
"""OIP strings (not a tensor dtype of plans): numpy object arrays of ``bytes`` in requests; ``str`` or object
arrays in answers."""
FLOATS = ("float16", "bfloat16", "float32", "float64")
PLAN_DTYPES = ("float32", "float16", "bfloat16")
"""What ``partserve plan --dtype`` takes: the dtype of the weights and float activations."""
NO_FILE_TYPE = ("bfloat16",)
"""dtypes ``.npy``, Arrow and Parquet have no type for: carried as float32, or as raw ``uint16`` words."""
EPS: dict[str, float] = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}
"""Machine epsilon: the gap between 1 and the next value (ml_dtypes.finfo / np.finfo)."""


def name_of(dtype: object) -> str:
    """The name of a torch dtype, numpy dtype or dtype name: ``torch.bfloat16`` -> ``bfloat16``."""
    text = str(dtype)
    if text.startswith("torch."):
        return text.removeprefix("torch.")
    return np.dtype(dtype).name  # type: ignore[call-overload]


def np_dtype(name: str) -> np.dtype:
    """The numpy dtype of ``name`` (``bfloat16``: ml_dtypes')."""
    return np.dtype(name)


def is_float(name: str) -> bool:
    """Whether ``name`` is a floating-point dtype (numpy's ``issubdtype`` says no for bfloat16)."""
    return name in FLOATS


def oip_datatype(dtype: object) -> str:
    """The OIP datatype of a dtype or dtype name (``bfloat16`` -> ``BF16``; strings and objects ->
    :data:`BYTES`); ValueError when it has none."""
    name = name_of(dtype)
    if name == "object" or name.startswith(("str", "bytes")):
        return BYTES
    if name not in OIP_DATATYPES:
        raise ValueError(f"dtype {name} has no Open Inference Protocol datatype")
    return OIP_DATATYPES[name]


def from_oip(datatype: str) -> str:
    """The dtype name of an OIP datatype (``FP16`` -> ``float16``, ``BYTES`` -> ``object``); ValueError naming
    the known ones."""
    if datatype == BYTES:
        return "object"
    if datatype not in FROM_OIP:
        raise ValueError(f"unknown datatype {datatype!r}; known: {', '.join(FROM_OIP)}")
    return FROM_OIP[datatype]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of ``name`` (``bfloat16`` -> ``torch.bfloat16``)."""
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"torch has no dtype {name!r}")
    return dtype


_WORDS = {"bfloat16": np.dtype(np.int16)}
"""Same-sized integers that torch and numpy both have, to move a dtype numpy lacks as its raw words."""


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A contiguous numpy copy (or view, for a contiguous CPU tensor) of ``t``, bit for bit, bfloat16 included."""
    t = t.detach().cpu().contiguous()
    name = name_of(t.dtype)
    if name in _WORDS:
        return t.view(torch_dtype(_WORDS[name].name)).numpy().view(np_dtype(name))
    return t.numpy()


def to_torch(a: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing ``a``'s memory, bit for bit, bfloat16 included (``a`` must be contiguous)."""
    import torch

    name = a.dtype.name
    if name in _WORDS:
        return torch.from_numpy(a.view(_WORDS[name])).view(torch_dtype(name))
    return torch.from_numpy(a)


def words(a: np.ndarray) -> np.ndarray:
    """A bfloat16 array's raw 16-bit words as ``uint16`` (the same memory)."""
    return a.view(np.uint16)


def from_words(a: np.ndarray, name: str) -> np.ndarray | None:
    """``a`` read as raw words of dtype ``name`` when it holds them (``uint16`` or 2-byte void, as ``np.save``
    writes ml_dtypes' bfloat16), else None."""
    want = np_dtype(name)
    if name in NO_FILE_TYPE and a.dtype != want and a.dtype.itemsize == want.itemsize and a.dtype.kind in "uV":
        return np.ascontiguousarray(a).view(want)
    return None


def accept(a: np.ndarray, name: str) -> np.ndarray | None:
    """``a`` as an input of dtype ``name``: as it is when it has that dtype; cast when ``name`` is a float
    dtype and ``a`` is float32 (what clients have for half-precision inputs); read as raw words when ``name`` is
    bfloat16 and ``a`` holds them (:func:`from_words`); None when it fits none of these."""
    if a.dtype == np_dtype(name):
        return a
    if is_float(name) and a.dtype == np.float32:
        return a.astype(np_dtype(name))
    return from_words(a, name)


def accepted_datatypes(name: str) -> list[str]:
    """The OIP datatypes an input of dtype ``name`` takes (see :func:`accept`): its own, and FP32 for floats."""
    own = oip_datatype(name)
    return [own, "FP32"] if is_float(name) and own != "FP32" else [own]


def wire_array(a: np.ndarray, raw: bool) -> np.ndarray:
    """``a`` for a format without its dtype (:data:`NO_FILE_TYPE`): its raw words (``uint16``) when ``raw``,
    else float32 (exact for bfloat16); other arrays as they are."""
    if a.dtype.name not in NO_FILE_TYPE:
        return a
    return words(a) if raw else a.astype(np.float32)


def arrow_type(name: str) -> pa.DataType:
    """The Arrow type that carries dtype ``name`` in Parquet and Arrow files: its own, float32 for bfloat16."""
    import pyarrow as pa

    return pa.float32() if name in NO_FILE_TYPE else pa.from_numpy_dtype(np_dtype(name))
