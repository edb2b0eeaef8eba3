"""Request and response bodies of the infer endpoint, chosen by Content-Type.

* Open Inference Protocol (KServe v2) JSON, ``application/json`` (the default), including the binary tensor
  extension: a JSON header of ``Inference-Header-Content-Length`` bytes followed by raw tensors, as sent and
  read by ``tritonclient.http``.
* ``application/x-npy`` or ``application/octet-stream``: one ``.npy`` array, for single-input models; the
  answer is ``.npy`` (one output) or ``.npz`` (several).
* ``application/vnd.apache.arrow.stream``: an Arrow IPC stream, one column per tensor, one row per sample;
  columns use the fixed-shape tensor extension type (plain columns for tensors of shape ``[-1]``).

Decoding never trusts sizes in a header: every byte count is checked against the body before allocating.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from partitions.types import TensorSpec
from serve_app.tensors import BadRequest, Payload, describe, numpy_dtype, oip_datatype

JSON = "application/json"
NPY = "application/x-npy"
NPZ = "application/x-npz"
OCTET = "application/octet-stream"
ARROW = "application/vnd.apache.arrow.stream"
HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass
class InferRequest:
    """Decoded tensors plus how to answer: ``fmt`` is ``json``, ``npy`` or ``arrow``."""

    arrays: Payload
    fmt: str
    request_id: str | None = None
    outputs: list[str] | None = None
    """OIP: the outputs asked for (None: all)."""
    binary: set[str] = field(default_factory=set)
    """OIP: outputs to send as raw bytes after the JSON header (``"*"``: all of them)."""


@dataclass
class Encoded:
    body: bytes
    media_type: str
    headers: dict[str, str] = field(default_factory=dict)


def media_type(content_type: str | None) -> str:
    """``application/json; charset=utf-8`` -> ``application/json``; empty -> JSON."""
    return (content_type or JSON).split(";")[0].strip().lower() or JSON


def decode(
    body: bytes, content_type: str | None, header_length: str | None, specs: Sequence[TensorSpec]
) -> InferRequest:
    """Decode an infer body; raises :class:`BadRequest` naming what ``specs`` expect."""
    kind = media_type(content_type)
    if header_length is not None or kind == JSON:
        return decode_oip(body, header_length, specs)
    if kind in (NPY, OCTET):
        return InferRequest(decode_npy(body, specs), "npy")
    if kind == ARROW:
        return InferRequest(decode_arrow(body, specs), "arrow")
    raise BadRequest(
        f"unsupported Content-Type {kind!r}: send {JSON}, {NPY} or {ARROW}; expected {describe(specs)}", 415
    )


def encode(req: InferRequest, outputs: Mapping[str, np.ndarray], model_name: str) -> Encoded:
    """The answer to ``req`` in the format it came in."""
    if req.fmt == "npy":
        return encode_npy(outputs)
    if req.fmt == "arrow":
        return Encoded(encode_arrow(outputs), ARROW)
    return encode_oip(req, outputs, model_name)


# Open Inference Protocol ------------------------------------------------------------------------------


def decode_oip(body: bytes, header_length: str | None, specs: Sequence[TensorSpec]) -> InferRequest:
    expected = f'expected {{"inputs": [{{"name", "shape", "datatype", "data"}}]}} with {describe(specs)}'
    split = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise BadRequest(f"{HEADER_LENGTH} {header_length!r} does not fit the {len(body)}-byte body")
        split = int(header_length)
    try:
        doc = json.loads(body[:split])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON ({exc}); {expected}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise BadRequest(f"no 'inputs' list in the request; {expected}")
    raw = memoryview(body)[split:]
    arrays: Payload = {}
    for item in doc["inputs"]:
        array, used = _oip_tensor(item, raw, expected)
        raw = raw[used:]
        arrays[item["name"]] = array
    if len(raw):
        raise BadRequest(f"{len(raw)} bytes of binary data left over after the last input; {expected}")
    params = doc.get("parameters") or {}
    binary_default = bool(isinstance(params, dict) and params.get("binary_data_output"))
    outputs, binary = None, set()
    if isinstance(doc.get("outputs"), list):
        outputs = []
        for out in doc["outputs"]:
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise BadRequest(f"each requested output needs a 'name', got {out!r}")
            outputs.append(out["name"])
            if (out.get("parameters") or {}).get("binary_data", binary_default):
                binary.add(out["name"])
    elif binary_default:
        binary = {"*"}
    request_id = doc.get("id")
    return InferRequest(arrays, "json", str(request_id) if request_id is not None else None, outputs, binary)


def _oip_tensor(item: Any, raw: memoryview, expected: str) -> tuple[np.ndarray, int]:
    """One request tensor and the number of binary bytes it used."""
    if not isinstance(item, dict) or not all(k in item for k in ("name", "shape", "datatype")):
        raise BadRequest(f"each input needs 'name', 'shape' and 'datatype', got {str(item)[:200]}; {expected}")
    name, shape = item["name"], item["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise BadRequest(f"input {name!r}: shape {shape!r} is not a list of sizes; {expected}")
    if not isinstance(item["datatype"], str):
        raise BadRequest(f"input {name!r}: datatype {item['datatype']!r} is not a string; {expected}")
    try:
        dtype = numpy_dtype(item["datatype"])
    except BadRequest as exc:
        raise BadRequest(f"input {name!r}: {exc}; {expected}") from exc
    count = math.prod(shape)
    size = (item.get("parameters") or {}).get("binary_data_size")
    try:
        if size is not None:
            if size != count * dtype.itemsize or size > len(raw):
                raise BadRequest(
                    f"input {name!r}: binary_data_size {size} does not match shape {shape} "
                    f"{item['datatype']} or the {len(raw)} bytes left; {expected}"
                )
            return np.frombuffer(raw[:size], dtype=dtype).reshape(shape), size
        if not isinstance(item.get("data"), list):
            raise BadRequest(f"input {name!r} has neither a 'data' list nor a binary_data_size; {expected}")
        data = np.asarray(item["data"], dtype=dtype)
        if data.size != count:
            raise BadRequest(f"input {name!r}: {data.size} values for shape {shape}; {expected}")
        return data.reshape(shape), 0
    except (ValueError, TypeError, OverflowError) as exc:
        if isinstance(exc, BadRequest):
            raise
        raise BadRequest(f"input {name!r}: data does not fit {item['datatype']} ({exc}); {expected}") from exc


def encode_oip(req: InferRequest, outputs: Mapping[str, np.ndarray], model_name: str) -> Encoded:
    names = req.outputs if req.outputs is not None else list(outputs)
    unknown = [n for n in names if n not in outputs]
    if unknown:
        raise BadRequest(f"unknown outputs {unknown}; the model has {list(outputs)}")
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name in names:
        a = outputs[name]
        t: dict[str, Any] = {"name": name, "datatype": oip_datatype(a.dtype), "shape": list(a.shape)}
        if name in req.binary or "*" in req.binary:
            blob = np.ascontiguousarray(a).tobytes()
            t["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            t["data"] = a.ravel().tolist()
        tensors.append(t)
    doc: dict[str, Any] = {"model_name": model_name, "outputs": tensors}
    if req.request_id is not None:
        doc["id"] = req.request_id
    header = json.dumps(doc).encode()
    if not blobs:
        return Encoded(header, JSON)
    return Encoded(header + b"".join(blobs), OCTET, {HEADER_LENGTH: str(len(header))})


# .npy -------------------------------------------------------------------------------------------------


def decode_npy(body: bytes, specs: Sequence[TensorSpec]) -> Payload:
    expected = f"expected {describe(specs)}"
    if len(specs) != 1:
        raise BadRequest(
            f"a .npy body carries one tensor but the model takes {len(specs)}; send JSON or Arrow; {expected}"
        )
    fp = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise BadRequest(f".npy format version {version} is not supported (1.0 and 2.0 are); {expected}")
    except ValueError as exc:
        if isinstance(exc, BadRequest):
            raise
        raise BadRequest(f"body is not a .npy array ({exc}); {expected}") from exc
    if dtype.hasobject:
        raise BadRequest(f".npy arrays of Python objects are refused; {expected}")
    need, have = math.prod(shape) * dtype.itemsize, len(body) - fp.tell()
    if need != have:
        raise BadRequest(
            f".npy header says shape {list(shape)} {dtype.name} ({need} bytes) but {have} bytes "
            f"follow it (truncated?); {expected}"
        )
    return {specs[0].name: np.load(io.BytesIO(body), allow_pickle=False)}


def encode_npy(outputs: Mapping[str, np.ndarray]) -> Encoded:
    buf = io.BytesIO()
    if len(outputs) == 1:
        np.save(buf, next(iter(outputs.values())), allow_pickle=False)
        return Encoded(buf.getvalue(), NPY)
    np.savez(buf, **outputs)
    return Encoded(buf.getvalue(), NPZ)


# Arrow IPC --------------------------------------------------------------------------------------------


def decode_arrow(body: bytes, specs: Sequence[TensorSpec]) -> Payload:
    expected = f"expected one column per input, one row per sample: {describe(specs)}"
    try:
        return read_arrow(body)
    except (pa.ArrowException, ValueError, TypeError) as exc:
        raise BadRequest(f"body is not a readable Arrow IPC stream of tensors ({exc}); {expected}") from exc


def read_arrow(body: bytes) -> Payload:
    """Every column of an Arrow IPC stream as a numpy array (dim 0: the rows)."""
    table = pa.ipc.open_stream(pa.py_buffer(body)).read_all()
    table.validate(full=True)
    arrays: Payload = {}
    for name in table.column_names:
        column = table.column(name)
        if column.null_count:
            raise ValueError(f"column {name!r} has {column.null_count} nulls")
        arrays[name] = _column_to_numpy(column.combine_chunks())
    return arrays


def _column_to_numpy(array: pa.Array) -> np.ndarray:
    if isinstance(array, pa.FixedShapeTensorArray):
        return array.to_numpy_ndarray()
    if isinstance(array.type, pa.ExtensionType) or not (
        pa.types.is_integer(array.type) or pa.types.is_floating(array.type) or pa.types.is_boolean(array.type)
    ):
        raise TypeError(f"column type {array.type} is neither a fixed-shape tensor nor a number")
    return array.to_numpy(zero_copy_only=False)


def encode_arrow(outputs: Mapping[str, np.ndarray]) -> bytes:
    """An Arrow IPC stream with one column per tensor: fixed-shape tensors, or plain for shape ``[-1]``."""
    columns = [
        pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(a)) if a.ndim > 1 else pa.array(a)
        for a in outputs.values()
    ]
    table = pa.table(columns, names=list(outputs))
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()
