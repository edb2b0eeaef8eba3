"""Every dtype a plan can hold, through every format both ways (OIP JSON, binary OIP, ``.npy``, Arrow), without
Ray; half-precision inputs also as float32 and bf16 also as raw words."""

from __future__ import annotations

import io
import json
import pickle

import ml_dtypes
import numpy as np
import pyarrow as pa
import pytest

from partitions.dtypes import BFLOAT16, OIP_DATATYPES, from_oip, np_dtype, oip_datatype
from partitions.types import TensorSpec
from serve_app import codecs
from serve_app.tensors import BadRequest, check_inputs, from_wire, to_wire

DTYPES = list(OIP_DATATYPES)
ARROW_DTYPES = [n for n in DTYPES if n != "bool"]
"""Arrow's fixed-shape tensors hold no bool (a bool input of shape ``[-1]`` is a plain column)."""


def sample(name: str) -> np.ndarray:
    """A ``[2, 3, 2]`` array of dtype ``name`` holding values it can represent exactly (-5..6, or bools)."""
    values = np.arange(-5, 7).reshape(2, 3, 2)
    if name == "bool":
        return values % 2 == 0
    if name.startswith("uint"):
        values = values + 5
    return values.astype(np_dtype(name))


def spec(name: str) -> list[TensorSpec]:
    return [TensorSpec("x", (-1, 3, 2), name)]


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def same(got: np.ndarray, want: np.ndarray) -> bool:
    """Same dtype, shape and bits."""
    return got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()


def decoded(body: bytes, content_type: str | None, header: str | None, name: str) -> codecs.InferRequest:
    req = codecs.decode(body, content_type, header, spec(name))
    req.arrays = check_inputs(spec(name), req.arrays)
    return req


@pytest.mark.parametrize("name", DTYPES)
def test_oip_json_both_ways(name: str) -> None:
    x = sample(name)
    item = {"name": "x", "shape": [2, 3, 2], "datatype": oip_datatype(name), "data": x.ravel().tolist()}
    req = decoded(json.dumps({"inputs": [item]}).encode(), None, None, name)
    assert same(req.arrays["x"], x)
    doc = json.loads(codecs.encode(req, {"y": x}, "m").body)
    (out,) = doc["outputs"]
    assert out["datatype"] == oip_datatype(name)
    assert same(np.asarray(out["data"], np_dtype(from_oip(out["datatype"]))).reshape(out["shape"]), x)


@pytest.mark.parametrize("name", DTYPES)
def test_binary_oip_both_ways(name: str) -> None:
    x = sample(name)
    item = {"name": "x", "shape": [2, 3, 2], "datatype": oip_datatype(name)}
    item["parameters"] = {"binary_data_size": x.nbytes}
    header = json.dumps({"inputs": [item], "parameters": {"binary_data_output": True}}).encode()
    req = decoded(header + x.tobytes(), codecs.OCTET, str(len(header)), name)
    assert same(req.arrays["x"], x)
    out = codecs.encode(req, {"y": x}, "m")
    size = int(out.headers[codecs.HEADER_LENGTH])
    (meta,) = json.loads(out.body[:size])["outputs"]
    assert meta["datatype"] == oip_datatype(name) and meta["parameters"]["binary_data_size"] == x.nbytes
    assert same(np.frombuffer(out.body[size:], np_dtype(from_oip(meta["datatype"]))).reshape(meta["shape"]), x)


def test_bf16_binary_is_raw_little_endian_words() -> None:
    x = np.array([[1.0, -2.5, 3.140625]], BFLOAT16)  # 3.140625 is a bf16 value: exact
    words = np.array([[0x3F80, 0xC020, 0x4049]], "<u2")
    assert x.view("<u2").tolist() == words.tolist()
    item = {"name": "x", "shape": [1, 3], "datatype": "BF16", "parameters": {"binary_data_size": 6}}
    header = json.dumps({"inputs": [item]}).encode()
    specs = [TensorSpec("x", (-1, 3), "bfloat16")]
    got = check_inputs(specs, codecs.decode(header + words.tobytes(), codecs.OCTET, str(len(header)), specs).arrays)
    assert same(got["x"], x)


@pytest.mark.parametrize("name", DTYPES)
def test_npy_both_ways(name: str) -> None:
    x = sample(name)
    req = decoded(npy(x), codecs.NPY, None, name)  # ml_dtypes' bfloat16 saves as 2-byte void: its raw words
    assert same(req.arrays["x"], x)
    got = np.load(io.BytesIO(codecs.encode(req, {"y": x}, "m").body), allow_pickle=False)
    want = x.astype(np.float32) if name == "bfloat16" else x  # .npy has no bfloat16: float32, exact
    assert same(got, want)


@pytest.mark.parametrize("name", ARROW_DTYPES)
def test_arrow_both_ways(name: str) -> None:
    x = sample(name)
    sent = x.view(np.uint16) if name == "bfloat16" else x  # Arrow has no bfloat16: raw words (or float32)
    req = decoded(codecs.encode_arrow({"x": sent}), codecs.ARROW, None, name)
    assert same(req.arrays["x"], x)
    got = codecs.read_arrow(codecs.encode(req, {"y": x}, "m").body)["y"]
    assert same(got, x.astype(np.float32) if name == "bfloat16" else x)


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
@pytest.mark.parametrize("fmt", ["json", "npy", "arrow"])
def test_half_inputs_take_float32_cast_at_the_entrance(name: str, fmt: str) -> None:
    x32 = np.array([[[0.1, 1e4], [-3.3, 0.0], [7.0, 1 / 3]]] * 2, np.float32)
    bodies = {
        "json": (
            json.dumps(
                {"inputs": [{"name": "x", "shape": [2, 3, 2], "datatype": "FP32", "data": x32.tolist()}]}
            ).encode(),
            None,
        ),
        "npy": (npy(x32), codecs.NPY),
        "arrow": (codecs.encode_arrow({"x": x32}), codecs.ARROW),
    }
    body, content_type = bodies[fmt]
    assert same(decoded(body, content_type, None, name).arrays["x"], x32.astype(np_dtype(name)))


def test_other_dtypes_are_refused_naming_what_is_taken() -> None:
    specs = [TensorSpec("x", (-1, 2), "bfloat16")]
    with pytest.raises(BadRequest, match=r"BF16 \(bfloat16; FP32 taken\)"):
        check_inputs(specs, {"x": np.zeros((1, 2), np.float64)})
    with pytest.raises(BadRequest, match="FP32 \\(float32\\)"):
        check_inputs([TensorSpec("x", (-1, 2), "float32")], {"x": np.zeros((1, 2), np.float16)})


@pytest.mark.parametrize("fmt", ["json", "npy", "arrow"])
def test_output_datatype_asked(fmt: str) -> None:
    y = np.array([[1.5, -2.0]], BFLOAT16)
    req = codecs.InferRequest({}, fmt, output_datatype="FP32")
    assert same(codecs.output_array(y, fmt, "FP32"), y.astype(np.float32))
    body = codecs.encode(req, {"y": y}, "m").body
    if fmt == "json":
        assert json.loads(body)["outputs"][0]["datatype"] == "FP32"
    # Asked for by name, bf16 comes as itself in OIP and as its raw words in the formats without bfloat16.
    raw = codecs.output_array(y, fmt, "BF16")
    assert same(raw, y) if fmt == "json" else same(raw.view(ml_dtypes.bfloat16), y)
    assert same(codecs.output_array(np.arange(3), fmt, "FP32"), np.arange(3))  # integers stay


def test_output_datatype_is_checked_against_the_outputs() -> None:
    outputs = [TensorSpec("y", (-1, 2), "bfloat16"), TensorSpec("ids", (-1,), "int64")]
    assert codecs.output_datatypes(outputs) == ["FP32", "BF16"]
    codecs.check_output_datatype(codecs.InferRequest({}, "json", output_datatype="BF16"), outputs)
    with pytest.raises(BadRequest, match="one of FP32, BF16"):
        codecs.check_output_datatype(codecs.InferRequest({}, "json", output_datatype="FP16"), outputs)
    header = json.dumps(
        {
            "inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}],
            "parameters": {"output_datatype": "FP32"},
        }
    ).encode()
    assert codecs.decode(header, None, None, [TensorSpec("x", (-1, 2), "float32")]).output_datatype == "FP32"


def test_arrow_half_columns_are_halffloat() -> None:
    schema = pa.ipc.open_stream(codecs.encode_arrow({"x": sample("float16")})).schema
    assert schema.field("x").type.value_type == pa.float16()


def test_bf16_crosses_the_object_store_as_words() -> None:
    x = sample("bfloat16")
    wire = to_wire({"x": x, "n": np.arange(3)})
    buffers: list[pickle.PickleBuffer] = []
    pickle.dumps(wire, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == 2  # both out of band, as Ray passes numpy arrays without a copy
    assert len(pickle.dumps({"x": x}, protocol=5, buffer_callback=buffers.append)) > x.nbytes  # in-band
    back = from_wire(wire, spec("bfloat16"))
    assert same(back["x"], x) and back["n"] is wire["n"]
