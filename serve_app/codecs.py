"""Request and response bodies of the infer endpoint, chosen by Content-Type.

* Open Inference Protocol (KServe v2) JSON, ``application/json`` (the default), including the binary tensor
  extension: a JSON header of ``Inference-Header-Content-Length`` bytes followed by raw tensors, as sent and
  read by ``tritonclient.http``. ``BYTES`` tensors are strings in JSON and, in binary, elements each
  preceded by their length as a 4-byte little-endian integer (Triton's layout); they decode to numpy object
  arrays of ``bytes``.
* ``application/x-npy`` or ``application/octet-stream``: one ``.npy`` array, for single-input models; the
  answer is ``.npy`` (one output) or ``.npz`` (several).
* ``application/vnd.apache.arrow.stream``: an Arrow IPC stream, one column per tensor, one row per sample;
  columns use the fixed-shape tensor extension type (plain columns for tensors of shape ``[-1]``).

Datatypes (:mod:`partitions.dtypes`): OIP carries every one by name, ``BF16`` as raw little-endian 16-bit
words in binary tensors (as Triton's clients send it) and as numbers in JSON. ``.npy`` and Arrow have no
bfloat16: a bf16 input is sent as float32 (cast at the entrance) or as its raw words in ``uint16``; a bf16
output comes as float32 unless the request asks for ``BF16`` (header ``X-Output-Datatype: BF16``), then as its
raw words in ``uint16`` (``np.load(f).view(ml_dtypes.bfloat16)``). Any request may ask for ``FP32`` outputs
(OIP ``"parameters": {"output_datatype": "FP32"}`` or the header).

Decoding never trusts sizes in a header: every byte count is checked against the body, and every declared
tensor size against ``max_tensor_bytes``, before allocating; compressed Arrow streams (whose decoded size
the body does not bound) are refused. Nothing a client sends is unpickled: ``.npy`` is read with
``allow_pickle=False`` and object dtypes are refused, Arrow columns must be numbers or fixed-shape tensors
of numbers, and JSON is plain ``json``. Any malformed body is a :class:`BadRequest` (4xx), never a crash.

:func:`decode_async` and :func:`encode_async` do the same work off the caller's event loop for bodies and
outputs of :data:`OFFLOAD_BYTES` or more, so that parsing a large body does not hold up other requests and
health probes: in a thread, except text JSON bodies of :data:`JSON_PROCESS_BYTES` or more, parsed in a worker
process because ``json.loads`` holds the GIL throughout. (Encoding large outputs as JSON text holds the GIL
too; ask for binary outputs, ``.npy`` or Arrow, for large ones.)
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import multiprocessing
import tokenize
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from partitions.dtypes import from_oip, is_float, np_dtype, oip_datatype, wire_array
from partitions.types import Payload, TensorSpec
from serve_app.tensors import BadRequest, describe

JSON = "application/json"
NPY = "application/x-npy"
NPZ = "application/x-npz"
OCTET = "application/octet-stream"
ARROW = "application/vnd.apache.arrow.stream"
HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_EXPANSION = 4
"""A body of n bytes carries tensors of at most ``4 n`` bytes (JSON ``0,``: 2 bytes of text, 8 of FP64);
a tensor declaring more cannot be a valid request, whatever its body."""
OFFLOAD_BYTES = 256 * 2**10
"""Bodies (and outputs) of this many bytes or more are decoded (encoded) in a thread: below it, the hand-off
to a thread costs more than the work."""
JSON_PROCESS_BYTES = 4 * 2**20
"""Text JSON bodies of this many bytes or more are parsed in a worker process (:func:`json_workers`):
``json.loads`` holds the GIL for the whole parse (seconds for tens of MB), so in a thread it would still
stall the event loop. The binary formats decode in a thread: their large copies run without the GIL."""
JSON_WORKERS = 1
"""Worker processes for large JSON bodies, per process that decodes (an entrance replica): one parse at a
time, on one core, whatever the number of such bodies in flight."""
TIMEOUT_PARAMETER = "timeout_ms"
"""OIP request ``parameters`` key: the client's deadline for the request, in milliseconds."""
OUTPUT_DATATYPE_PARAMETER = "output_datatype"
"""OIP request ``parameters`` key: the datatype of the float outputs, ``FP32`` or the model's (see
:func:`output_array`)."""
OUTPUT_DATATYPE_HEADER = "X-Output-Datatype"
"""HTTP header, for every format: the same as :data:`OUTPUT_DATATYPE_PARAMETER` (the parameter wins)."""
MALFORMED = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError)
"""What parsing a malformed body raises, deep inside json, numpy or pyarrow: the client's fault."""


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
    timeout_ms: int | None = None
    """OIP: the request's ``parameters.timeout_ms``, the client's deadline (None: not given)."""
    output_datatype: str | None = None
    """The datatype asked for the float outputs (``parameters.output_datatype`` or the ``X-Output-Datatype``
    header): ``FP32`` or the model's own; None: the format's default (:func:`output_array`)."""


@dataclass
class Encoded:
    body: bytes
    media_type: str
    headers: dict[str, str] = field(default_factory=dict)


def media_type(content_type: str | None) -> str:
    """``application/json; charset=utf-8`` -> ``application/json``; empty -> JSON."""
    return (content_type or JSON).split(";")[0].strip().lower() or JSON


def is_count(text: str) -> bool:
    """Whether a header value is a plain decimal byte count (ASCII digits only: ``int`` also takes ``٣``)."""
    return 0 < len(text) <= 20 and text.isascii() and text.isdigit()


def decode(
    body: bytes,
    content_type: str | None,
    header_length: str | None,
    specs: Sequence[TensorSpec],
    max_tensor_bytes: int | None = None,
) -> InferRequest:
    """Decode an infer body; raises :class:`BadRequest` naming what ``specs`` expect (413 for a tensor
    declaring more than ``max_tensor_bytes`` bytes; None: no such limit)."""
    kind = media_type(content_type)
    try:
        if header_length is not None or kind == JSON:
            return decode_oip(body, header_length, specs, max_tensor_bytes)
        if kind in (NPY, OCTET):
            return InferRequest(decode_npy(body, specs, max_tensor_bytes), "npy")
        if kind == ARROW:
            return InferRequest(decode_arrow(body, specs, max_tensor_bytes), "arrow")
    except BadRequest:
        raise
    except MALFORMED as exc:
        raise BadRequest(
            f"malformed {kind} body ({type(exc).__name__}: {str(exc)[:200]}); expected {describe(specs)}"
        ) from exc
    raise BadRequest(
        f"unsupported Content-Type {kind!r}: send {JSON}, {NPY} or {ARROW}; expected {describe(specs)}", 415
    )


_json_workers: ProcessPoolExecutor | None = None


def json_workers() -> ProcessPoolExecutor:
    """The processes that parse large JSON bodies (:data:`JSON_WORKERS`), started on first use with ``spawn``
    (a fresh interpreter: nothing of the caller's threads or state); :func:`stop_json_workers` stops them."""
    global _json_workers
    if _json_workers is None:
        _json_workers = ProcessPoolExecutor(JSON_WORKERS, mp_context=multiprocessing.get_context("spawn"))
    return _json_workers


def stop_json_workers() -> None:
    """Stop the processes of :func:`json_workers` (a later large JSON body starts new ones)."""
    global _json_workers
    workers, _json_workers = _json_workers, None
    if workers is not None:
        workers.shutdown(wait=True, cancel_futures=True)


async def decode_async(
    body: bytes,
    content_type: str | None,
    header_length: str | None,
    specs: Sequence[TensorSpec],
    max_tensor_bytes: int | None = None,
) -> InferRequest:
    """:func:`decode`, off the caller's event loop for a body of :data:`OFFLOAD_BYTES` or more: in a thread,
    or, for a text JSON body of :data:`JSON_PROCESS_BYTES` or more, in a worker process."""
    args = (body, content_type, header_length, list(specs), max_tensor_bytes)
    if len(body) < OFFLOAD_BYTES:
        return decode(*args)
    if header_length is None and media_type(content_type) == JSON and len(body) >= JSON_PROCESS_BYTES:
        try:
            return await asyncio.wrap_future(json_workers().submit(decode, *args))
        except BrokenProcessPool:  # a worker died (out of memory?): new ones next time, a thread now
            stop_json_workers()
    return await asyncio.to_thread(decode, *args)


async def encode_async(req: InferRequest, outputs: Mapping[str, np.ndarray], model_name: str) -> Encoded:
    """:func:`encode`, in a thread for outputs of :data:`OFFLOAD_BYTES` or more."""
    if sum(a.nbytes for a in outputs.values()) < OFFLOAD_BYTES:
        return encode(req, outputs, model_name)
    return await asyncio.to_thread(encode, req, outputs, model_name)


def check_declared(name: str, shape: Sequence[int], dtype: np.dtype, max_tensor_bytes: int | None) -> None:
    """413 when a tensor's declared shape and dtype come to more than ``max_tensor_bytes`` bytes."""
    size = math.prod(shape) * dtype.itemsize
    if max_tensor_bytes is not None and size > max_tensor_bytes:
        raise BadRequest(
            f"input {name!r} declares shape {list(shape)[:8]} {dtype.name}: {size} bytes, over the "
            f"{max_tensor_bytes}-byte limit",
            413,
        )


def output_datatypes(specs: Sequence[TensorSpec]) -> list[str]:
    """What a request may ask for the float outputs of a model with outputs ``specs``: FP32, and the outputs'
    own datatypes."""
    own = [oip_datatype(s.dtype) for s in specs if is_float(s.dtype)]
    return list(dict.fromkeys(["FP32", *own]))


def check_output_datatype(req: InferRequest, specs: Sequence[TensorSpec]) -> None:
    """400 unless ``req`` asks for a datatype of :func:`output_datatypes` (or none)."""
    choices = output_datatypes(specs)
    if req.output_datatype is not None and req.output_datatype not in choices:
        raise BadRequest(
            f"output datatype {req.output_datatype[:20]!r} cannot be given; ask for one of {', '.join(choices)}"
        )


def output_array(a: np.ndarray, fmt: str, asked: str | None) -> np.ndarray:
    """An output as it is sent. Float outputs: float32 when ``asked`` is ``FP32``; else in the model's dtype,
    except where the format has no type for it (bfloat16 in ``.npy`` and Arrow): float32 by default, its raw
    16-bit words (``uint16``) when asked for by name (``BF16``)."""
    if not is_float(a.dtype.name):
        return a
    if asked == "FP32":
        return a.astype(np.float32, copy=False)
    return a if fmt == "json" else wire_array(a, raw=asked is not None)


def encode(req: InferRequest, outputs: Mapping[str, np.ndarray], model_name: str) -> Encoded:
    """The answer to ``req`` in the format it came in, outputs in the datatype asked (:func:`output_array`)."""
    outputs = {k: output_array(a, req.fmt, req.output_datatype) for k, a in outputs.items()}
    if req.fmt == "npy":
        return encode_npy(outputs)
    if req.fmt == "arrow":
        return Encoded(encode_arrow(outputs), ARROW)
    return encode_oip(req, outputs, model_name)


# Open Inference Protocol ------------------------------------------------------------------------------


def decode_oip(
    body: bytes, header_length: str | None, specs: Sequence[TensorSpec], max_tensor_bytes: int | None = None
) -> InferRequest:
    expected = f'expected {{"inputs": [{{"name", "shape", "datatype", "data"}}]}} with {describe(specs)}'
    split = len(body)
    if header_length is not None:
        if not is_count(header_length) or int(header_length) > len(body):
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
        array, used = _oip_tensor(item, raw, expected, max_tensor_bytes)
        raw = raw[used:]
        if item["name"] in arrays:
            raise BadRequest(f"input {item['name']!r} is given twice; {expected}")
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
                raise BadRequest(f"each requested output needs a 'name', got {str(out)[:200]}")
            outputs.append(out["name"])
            if _parameters(out).get("binary_data", binary_default):
                binary.add(out["name"])
    elif binary_default:
        binary = {"*"}
    request_id = doc.get("id")
    timeout_ms = params.get(TIMEOUT_PARAMETER) if isinstance(params, dict) else None
    if timeout_ms is not None and not (type(timeout_ms) is int and timeout_ms > 0):
        raise BadRequest(
            f"parameters.{TIMEOUT_PARAMETER} must be a positive integer (milliseconds), got {str(timeout_ms)[:50]}"
        )
    request_id = str(request_id) if request_id is not None else None
    asked = params.get(OUTPUT_DATATYPE_PARAMETER) if isinstance(params, dict) else None
    if asked is not None and not isinstance(asked, str):
        raise BadRequest(f"parameters.{OUTPUT_DATATYPE_PARAMETER} must be a datatype name, got {str(asked)[:50]}")
    return InferRequest(arrays, "json", request_id, outputs, binary, timeout_ms, asked)


def _parameters(item: dict[str, Any]) -> dict[str, Any]:
    """An OIP object's ``parameters`` (absent: empty); 400 unless it is an object."""
    params = item.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadRequest(f"'parameters' must be an object, got {type(params).__name__}")
    return params


def _oip_tensor(item: Any, raw: memoryview, expected: str, max_tensor_bytes: int | None) -> tuple[np.ndarray, int]:
    """One request tensor and the number of binary bytes it used."""
    if not isinstance(item, dict) or not all(k in item for k in ("name", "shape", "datatype")):
        raise BadRequest(f"each input needs 'name', 'shape' and 'datatype', got {str(item)[:200]}; {expected}")
    name, shape = item["name"], item["shape"]
    if not isinstance(name, str):
        raise BadRequest(f"input name {str(name)[:100]} is not a string; {expected}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise BadRequest(f"input {name!r}: shape {shape!r} is not a list of sizes; {expected}")
    if not isinstance(item["datatype"], str):
        raise BadRequest(f"input {name!r}: datatype {item['datatype']!r} is not a string; {expected}")
    try:
        dtype = np_dtype(from_oip(item["datatype"]))
    except ValueError as exc:
        raise BadRequest(f"input {name!r}: {exc}; {expected}") from exc
    check_declared(name, shape, dtype, max_tensor_bytes)
    count = math.prod(shape)
    size = _parameters(item).get("binary_data_size")
    if dtype.kind == "O":
        return _bytes_tensor(name, item.get("data"), shape, size, raw, expected)
    try:
        if size is not None:
            if type(size) is not int or size != count * dtype.itemsize or size > len(raw):
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


def _bytes_tensor(
    name: str, data: object, shape: list[int], size: object, raw: memoryview, expected: str
) -> tuple[np.ndarray, int]:
    """A ``BYTES`` request tensor (an object array of ``bytes``) and the binary bytes it used: from JSON
    strings, or from ``size`` bytes of length-prefixed elements."""
    count = math.prod(shape)
    out = np.empty(count, dtype=object)
    if size is not None:
        if type(size) is not int or size > len(raw):
            raise BadRequest(f"input {name!r}: binary_data_size {size} does not fit the {len(raw)} bytes left")
        pos = 0
        for i in range(count):
            length = int.from_bytes(raw[pos : pos + 4], "little") if pos + 4 <= size else -1
            if length < 0 or pos + 4 + length > size:
                raise BadRequest(
                    f"input {name!r}: BYTES element {i} of {count} runs past binary_data_size {size} "
                    f"(each element: a 4-byte little-endian length, then its bytes); {expected}"
                )
            out[i] = bytes(raw[pos + 4 : pos + 4 + length])
            pos += 4 + length
        if pos != size:
            raise BadRequest(f"input {name!r}: {size - pos} bytes left after {count} BYTES elements; {expected}")
        return out.reshape(shape), size
    flat = data
    for _ in range(len(shape) - 1):  # nested lists, one level per dimension, or flat
        if isinstance(flat, list) and all(isinstance(x, list) for x in flat):
            flat = [x for row in flat for x in row]
    if not isinstance(flat, list) or len(flat) != count or not all(isinstance(x, str) for x in flat):
        raise BadRequest(f"input {name!r}: BYTES data must be {count} strings for shape {shape}; {expected}")
    for i, x in enumerate(flat):
        out[i] = x.encode()
    return out.reshape(shape), 0


def _as_bytes(x: object) -> bytes:
    return x if isinstance(x, bytes) else str(x).encode()


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
        strings = a.dtype.kind in "OUS"
        if name in req.binary or "*" in req.binary:
            if strings:
                blob = b"".join(len(b).to_bytes(4, "little") + b for b in map(_as_bytes, a.ravel().tolist()))
            else:
                blob = np.ascontiguousarray(a).tobytes()
            t["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif strings:
            t["data"] = [x.decode(errors="replace") if isinstance(x, bytes) else str(x) for x in a.ravel().tolist()]
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


def decode_npy(body: bytes, specs: Sequence[TensorSpec], max_tensor_bytes: int | None = None) -> Payload:
    expected = f"expected {describe(specs)}"
    if len(specs) != 1:
        raise BadRequest(
            f"a .npy body carries one tensor but the model takes {len(specs)}; send JSON or Arrow; {expected}"
        )
    fp = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise BadRequest(f".npy format version {version} is not supported (1.0 and 2.0 are); {expected}")
    except (ValueError, TypeError, SyntaxError, tokenize.TokenError) as exc:  # numpy tokenizes the header
        if isinstance(exc, BadRequest):
            raise
        raise BadRequest(f"body is not a .npy array ({exc}); {expected}") from exc
    if dtype.hasobject:
        raise BadRequest(f".npy arrays of Python objects are refused; {expected}")
    check_declared(specs[0].name, shape, dtype, max_tensor_bytes)
    need, have = math.prod(shape) * dtype.itemsize, len(body) - fp.tell()
    if need != have:
        raise BadRequest(
            f".npy header says shape {list(shape)} {dtype.name} ({need} bytes) but {have} bytes "
            f"follow it (truncated?); {expected}"
        )
    # A view of the body, not a copy (np.load would copy): a large request holds its bytes once.
    flat = np.frombuffer(body, dtype=dtype, count=math.prod(shape), offset=fp.tell())
    return {specs[0].name: flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)}


def encode_npy(outputs: Mapping[str, np.ndarray]) -> Encoded:
    buf = io.BytesIO()
    if len(outputs) == 1:
        np.save(buf, next(iter(outputs.values())), allow_pickle=False)
        return Encoded(buf.getvalue(), NPY)
    # mypy: a key could be savez's own ``allow_pickle`` keyword; an output with that name is not supported.
    np.savez(buf, **outputs)  # type: ignore[arg-type]
    return Encoded(buf.getvalue(), NPZ)


# Arrow IPC --------------------------------------------------------------------------------------------


def decode_arrow(body: bytes, specs: Sequence[TensorSpec], max_tensor_bytes: int | None = None) -> Payload:
    expected = f"expected one column per input, one row per sample: {describe(specs)}"
    try:
        check_arrow_stream(body, max_tensor_bytes)
        return read_arrow(body)
    # a short stream: OSError; metadata that asks for what pyarrow cannot convert (a tensor permutation in a
    # damaged header): NotImplementedError
    except (pa.ArrowException, ValueError, TypeError, OSError, NotImplementedError) as exc:
        if isinstance(exc, BadRequest):
            raise
        raise BadRequest(f"body is not a readable Arrow IPC stream of tensors ({exc}); {expected}") from exc


def check_arrow_stream(body: bytes, max_tensor_bytes: int | None) -> None:
    """Look at an Arrow IPC stream's messages before decoding any data: the schema must hold only numbers
    and fixed-shape tensors of numbers, no batch may be compressed (its decoded size is not bounded by the
    body) and the rows times the bytes per row must stay within ``max_tensor_bytes`` (413)."""
    row_bytes: int | None = None
    rows = 0
    for message in pa.ipc.MessageReader.open_stream(pa.py_buffer(body)):
        if message.type == "schema" and row_bytes is None:
            row_bytes = sum(_row_bytes(f) for f in pa.ipc.read_schema(message))
        elif message.type == "record batch" and row_bytes is not None:
            length, compressed = _batch_header(bytes(message.metadata))
            if compressed:
                raise ValueError("compressed record batches are refused: send the stream uncompressed")
            rows += length
        else:
            raise ValueError(f"unexpected {message.type} message: expected a schema, then record batches")
    if max_tensor_bytes is not None and row_bytes is not None and rows * row_bytes > max_tensor_bytes:
        raise BadRequest(
            f"Arrow stream declares {rows} rows of {row_bytes} bytes, over the {max_tensor_bytes}-byte limit", 413
        )


def _row_bytes(f: pa.Field) -> int:
    """Bytes of one row of a column as a numpy array; TypeError unless it holds numbers."""
    t = f.type
    if isinstance(t, pa.FixedShapeTensorType) and _is_number(t.value_type):
        if math.prod(t.shape) != t.storage_type.list_size:
            raise ValueError(f"column {f.name!r}: tensor shape {t.shape} does not hold {t.storage_type.list_size}")
        return math.prod(t.shape) * np.dtype(t.value_type.to_pandas_dtype()).itemsize
    if not _is_number(t):
        raise TypeError(f"column {f.name!r} of type {t} is neither a fixed-shape tensor nor a number")
    return np.dtype(t.to_pandas_dtype()).itemsize


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _batch_header(metadata: bytes) -> tuple[int, bool]:
    """Rows and compression of a record batch message, from its flatbuffer metadata (``Message.header`` is
    field 2; ``RecordBatch.length`` field 0, ``RecordBatch.compression`` field 3)."""
    message = _uint(metadata, 0, 4)
    header = _fb_field(metadata, message, 2)
    if header is None:
        raise ValueError("record batch message without a header")
    batch = header + _uint(metadata, header, 4)
    length = _fb_field(metadata, batch, 0)
    rows = 0 if length is None else _uint(metadata, length, 8, signed=True)
    if rows < 0:
        raise ValueError(f"record batch of {rows} rows")
    return rows, _fb_field(metadata, batch, 3) is not None


def _fb_field(buf: bytes, table: int, index: int) -> int | None:
    """Position of field ``index`` of the flatbuffer table at ``table``; None when absent."""
    vtable = table - _uint(buf, table, 4, signed=True)
    slot = 4 + 2 * index
    if slot + 2 > _uint(buf, vtable, 2):
        return None
    offset = _uint(buf, vtable + slot, 2)
    return table + offset if offset else None


def _uint(buf: bytes, pos: int, size: int, signed: bool = False) -> int:
    if pos < 0 or pos + size > len(buf):
        raise ValueError("Arrow message metadata points outside itself")
    return int.from_bytes(buf[pos : pos + size], "little", signed=signed)


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
    if isinstance(array.type, pa.ExtensionType) or not _is_number(array.type):
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
