"""Request/response bodies and input checks, without Ray."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest

from partitions.types import TensorSpec
from serve_app import codecs
from serve_app.batching import concat, split
from serve_app.tensors import BadRequest, check_inputs

SPECS = [TensorSpec("x", (-1, 3, 2), "float32")]
TWO = [TensorSpec("a", (-1, 4), "int64"), TensorSpec("b", (-1,), "float32")]


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_json_nested_or_flat_and_binary_extension() -> None:
    x = np.arange(12, dtype=np.float32).reshape(2, 3, 2)
    for data in (x.ravel().tolist(), x.tolist()):
        body = json.dumps({"inputs": [{"name": "x", "shape": [2, 3, 2], "datatype": "FP32", "data": data}]})
        assert (codecs.decode(body.encode(), None, None, SPECS).arrays["x"] == x).all()
    header = json.dumps(
        {
            "inputs": [{"name": "x", "shape": [2, 3, 2], "datatype": "FP32", "parameters": {"binary_data_size": 48}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    req = codecs.decode(header + x.tobytes(), codecs.OCTET, str(len(header)), SPECS)
    assert (req.arrays["x"] == x).all() and req.fmt == "json"
    out = codecs.encode(req, {"y": x[:, 0]}, "m")
    size = int(out.headers[codecs.HEADER_LENGTH])
    doc = json.loads(out.body[:size])
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == 2 * 2 * 4
    assert (np.frombuffer(out.body[size:], np.float32).reshape(2, 2) == x[:, 0]).all()


def test_npy_and_arrow_round_trip() -> None:
    x = np.random.default_rng(0).standard_normal((4, 3, 2)).astype(np.float32)
    req = codecs.decode(npy(x), "application/x-npy", None, SPECS)
    assert (req.arrays["x"] == x).all()
    assert (np.load(io.BytesIO(codecs.encode(req, {"y": x}, "m").body)) == x).all()
    arrays = {"a": np.arange(8).reshape(2, 4), "b": np.array([0.5, 1.5], np.float32)}
    req = codecs.decode(codecs.encode_arrow(arrays), codecs.ARROW + "; charset=binary", None, TWO)
    assert req.fmt == "arrow"
    assert all((req.arrays[k] == v).all() for k, v in arrays.items())
    schema = pa.ipc.open_stream(codecs.encode_arrow(arrays)).schema
    assert isinstance(schema.field("a").type, pa.FixedShapeTensorType)


def test_a_damaged_tensor_header_is_a_bad_request() -> None:
    # Found by the HTTP fuzz: one flipped bit in the stream's metadata length leaves a fixed-shape tensor that
    # pyarrow reads with a permutation and then cannot convert (NotImplementedError): a 400, not a 500.
    body = bytearray(codecs.encode_arrow({"x": np.zeros((1, 2, 128), np.float32)}))
    body[5] ^= 2
    with pytest.raises(BadRequest, match="not a readable Arrow IPC stream"):
        codecs.decode(bytes(body), codecs.ARROW, None, SPECS)


@pytest.mark.parametrize(
    ("body", "content_type", "match"),
    [
        (b"{", None, "not valid JSON"),
        (b"[]", None, "no 'inputs'"),
        (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP99", "data": [1, 2]}]}', None, "unknown datatype"),
        (b'{"inputs": [{"name": "x", "shape": [5], "datatype": "FP32", "data": [1, 2]}]}', None, "2 values"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}', None, "neither"),
        (npy(np.zeros((2, 3, 2), np.float32))[:-1], codecs.NPY, "truncated"),
        (npy(np.array([{}], dtype=object)), codecs.NPY, "objects"),
        (b"not an array", codecs.NPY, "not a .npy"),
        (b"\x93NUMPY\x07\x00", codecs.NPY, "version"),
        (b"garbage", codecs.ARROW, "Arrow"),
    ],
)
def test_undecodable_bodies_name_the_expected_tensors(body: bytes, content_type: str | None, match: str) -> None:
    with pytest.raises(BadRequest, match=match) as info:
        codecs.decode(body, content_type, None, SPECS)
    assert info.value.status == 400
    assert "x: shape [-1, 3, 2] FP32 (float32)" in str(info.value)


def test_binary_size_is_checked_against_the_body() -> None:
    header = b'{"inputs": [{"name": "x", "shape": [1000000, 3, 2], "datatype": "FP32", '
    header += b'"parameters": {"binary_data_size": 24000000}}]}'
    with pytest.raises(BadRequest, match="binary_data_size"):
        codecs.decode(header + b"\0" * 24, None, str(len(header)), SPECS)
    with pytest.raises(BadRequest, match="does not fit"):
        codecs.decode(header, None, "99999", SPECS)


def test_check_inputs() -> None:
    good = {"a": np.zeros((2, 4), np.int64), "b": np.zeros(2, np.float32)}
    assert check_inputs(TWO, good).keys() == {"a", "b"}
    for bad, match in [
        ({"a": good["a"]}, "missing \\['b'\\]"),
        ({**good, "c": good["b"]}, "unknown \\['c'\\]"),
        ({**good, "a": np.zeros((2, 5), np.int64)}, "shape \\[2, 5\\] int64"),
        ({**good, "a": np.zeros((2, 4), np.int32)}, "int32"),
        ({**good, "b": np.zeros(3, np.float32)}, "different batch sizes"),
        ({"a": np.zeros((0, 4), np.int64), "b": np.zeros(0, np.float32)}, "batch >= 1"),
    ]:
        with pytest.raises(BadRequest, match=match) as info:
            check_inputs(TWO, bad)
        assert "a: shape [-1, 4] INT64 (int64); b: shape [-1] FP32 (float32)" in str(info.value)


def test_unknown_content_type_is_415() -> None:
    with pytest.raises(BadRequest) as info:
        codecs.decode(b"1,2", "text/csv", None, SPECS)
    assert info.value.status == 415


def test_concat_and_split_by_request_batch() -> None:
    payloads = [{"v": np.full((n, 2), n), "w": np.arange(n)} for n in (1, 3, 2)]
    merged, sizes = concat(payloads)
    assert sizes == [1, 3, 2] and merged["v"].shape == (6, 2)
    for part, original in zip(split(merged, sizes), payloads):
        assert all((part[k] == original[k]).all() for k in original)


TEXT = [TensorSpec("text", (-1,), "object")]


def test_bytes_inputs_from_json_strings_and_tritons_binary_layout() -> None:
    from tritonclient.utils import serialize_byte_tensor

    texts = ["héllo", "", "a longer text"]
    body = json.dumps({"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": texts}]}).encode()
    want = [t.encode() for t in texts]
    assert codecs.decode(body, None, None, TEXT).arrays["text"].tolist() == want
    blob = serialize_byte_tensor(np.array(want, dtype=object)).item()  # 4-byte little-endian length, then bytes
    size = {"binary_data_size": len(blob)}
    header = json.dumps({"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "parameters": size}]}).encode()
    got = codecs.decode(header + blob, codecs.OCTET, str(len(header)), TEXT).arrays["text"]
    assert got.dtype == object and got.tolist() == want


@pytest.mark.parametrize(
    ("data", "blob", "match"),
    [
        ([1, 2], None, "must be 2 strings"),
        (["one"], None, "must be 2 strings"),
        (None, (5).to_bytes(4, "little") + b"abc", "runs past binary_data_size"),
        (None, (1).to_bytes(4, "little") + b"a" + (1).to_bytes(4, "little") + b"bX", "1 bytes left after"),
        (None, b"\x01\x00", "runs past"),
    ],
)
def test_malformed_bytes_inputs_are_400(data: list | None, blob: bytes | None, match: str) -> None:
    item: dict = {"name": "text", "shape": [2], "datatype": "BYTES"}
    if blob is None:
        body = json.dumps({"inputs": [{**item, "data": data}]}).encode()
        header_length = None
    else:
        header = json.dumps({"inputs": [{**item, "parameters": {"binary_data_size": len(blob)}}]}).encode()
        body, header_length = header + blob, str(len(header))
    with pytest.raises(BadRequest, match=match) as info:
        codecs.decode(body, None, header_length, TEXT)
    assert info.value.status == 400


def test_string_outputs_as_json_strings_and_length_prefixed_binary() -> None:
    from tritonclient.utils import deserialize_bytes_tensor

    labels = np.array(["positive", "négative"])
    req = codecs.InferRequest({}, "json")
    doc = json.loads(codecs.encode(req, {"label": labels}, "m").body)
    assert doc["outputs"][0] == {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["positive", "négative"]}
    req.binary = {"*"}
    out = codecs.encode(req, {"label": labels}, "m")
    split_at = int(out.headers[codecs.HEADER_LENGTH])
    assert deserialize_bytes_tensor(out.body[split_at:]).tolist() == [b"positive", "négative".encode()]


def test_ids_outside_an_embedding_are_400_naming_the_range() -> None:
    specs = [TensorSpec("input_ids", (-1, 3), "int64"), TensorSpec("attention_mask", (-1, 3), "int64")]
    limits = {"input_ids": (0, 100)}
    ok = {"input_ids": np.array([[0, 5, 99]]), "attention_mask": np.array([[1, 1, 7]])}  # the mask has no limit
    check_inputs(specs, ok, limits)
    for bad in (100, -1, 2**40):
        ids = {**ok, "input_ids": np.array([[0, bad, 1]])}
        with pytest.raises(BadRequest, match=r"values must be in \[0, 100\)") as info:
            check_inputs(specs, ids, limits)
        assert info.value.status == 400
