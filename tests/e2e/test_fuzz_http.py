"""Property-based fuzzing of the HTTP infer endpoint on one deployed app: thousands of malformed bodies.

Every request must answer 4xx with an ``{"error": ...}`` message (or 200 where the generator happened to
build a valid request, e.g. NaN inputs, which are data), never 5xx; no replica may restart; the server
answers normally afterwards. The same generators also run against the decoder in-process.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve_app import codecs
from serve_app.app import AppArgs
from serve_app.tensors import BadRequest, check_inputs
from tests.serve_fixtures import PlannedModel, rel_err
from tests.serve_session import replicas, serve_apps

pytestmark = pytest.mark.slow

APP = "fuzz"
MAX_BODY = 256 * 2**10
EXAMPLES_PER_STRATEGY = 220
"""Hypothesis examples per strategy; each example is a group of ``GROUP`` requests sent at once."""
GROUP = 2
MIN_REQUESTS = 2000
WIDTH = 256
"""The MLP's input: features [-1, 256] FP32."""


@dataclass(frozen=True)
class Req:
    body: bytes
    headers: dict[str, str]


# Generators ---------------------------------------------------------------------------------------------

numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.integers(-(2**70), 2**70),
    st.booleans(),
)
json_leaf = st.one_of(st.none(), numbers, st.text(max_size=8))
json_values = st.recursive(
    json_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=20,
)
shapes = st.one_of(
    st.builds(lambda b: [b, WIDTH], st.integers(0, 4)),
    st.lists(st.integers(-3, 10**12), max_size=5),
    st.sampled_from([[10**9, WIDTH], [2**62, 2**62], [1, WIDTH, 1], [WIDTH], [], [1, 0]]),
    json_values,
)
datatypes = st.one_of(
    st.sampled_from(["FP32", "FP64", "FP16", "INT64", "INT8", "BOOL", "BYTES", "fp32", ""]), json_leaf
)


@st.composite
def oip_tensors(draw: st.DrawFn) -> dict[str, object]:
    """An OIP input with each field right, wrong, or missing."""
    shape = draw(shapes)
    count = math.prod(shape) if isinstance(shape, list) and all(type(d) is int for d in shape) else 3
    right_count = 0 <= count <= 4 * WIDTH
    data = draw(
        st.one_of(
            st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=count, max_size=count)
            if right_count
            else st.just([0.0]),
            st.lists(numbers, max_size=8),
            st.lists(st.lists(numbers, max_size=3), max_size=3),
            json_values,
        )
    )
    item: dict[str, object] = {
        "name": draw(st.one_of(st.just("features"), json_leaf, st.lists(st.integers(), max_size=2))),
        "shape": shape,
        "datatype": draw(datatypes),
        "data": data,
    }
    if draw(st.booleans()):
        item["parameters"] = draw(st.one_of(st.fixed_dictionaries({"binary_data_size": json_leaf}), json_values))
    for key in draw(st.sets(st.sampled_from(sorted(item)), max_size=2)):
        del item[key]
    return item


@st.composite
def oip_json(draw: st.DrawFn) -> Req:
    """OIP JSON documents with wrong inputs, outputs, parameters and ids, or any JSON value at all."""
    doc = draw(
        st.one_of(
            st.fixed_dictionaries(
                {"inputs": st.lists(oip_tensors(), max_size=3)},
                optional={"outputs": json_values, "parameters": json_values, "id": json_values},
            ),
            json_values,
        )
    )
    content_type = draw(st.sampled_from([codecs.JSON, "application/json; charset=utf-8", "", "APPLICATION/JSON"]))
    return Req(json.dumps(doc).encode(), {"content-type": content_type} if content_type else {})


@st.composite
def oip_binary(draw: st.DrawFn) -> Req:
    """The binary extension: a JSON header, raw tensor bytes, and a header length that may lie."""
    batch = draw(st.integers(0, 3))
    size = draw(st.one_of(st.just(batch * WIDTH * 4), st.integers(-8, 10**10), json_leaf))
    header = {
        "inputs": [
            {
                "name": "features",
                "shape": draw(shapes),
                "datatype": draw(datatypes),
                "parameters": {"binary_data_size": size},
            }
        ]
    }
    head = json.dumps(header).encode()
    raw = draw(st.binary(max_size=64)) if draw(st.booleans()) else np.ones(batch * WIDTH, np.float32).tobytes()
    length = draw(
        st.one_of(
            st.just(str(len(head))),
            st.integers(-5, 10**12).map(str),
            st.sampled_from(["", "abc", "²", "+1", "0x10", "1e3"]),
        )
    )
    content_type = draw(st.sampled_from([codecs.OCTET, codecs.JSON, "application/x-npy"]))
    return Req(head + raw, {"content-type": content_type, codecs.HEADER_LENGTH: length})


NPY_DTYPES = [
    np.float32,
    np.float64,
    np.int64,
    np.bool_,
    np.complex64,
    "<U3",
    "S2",
    ">f4",
    [("a", "<f4"), ("b", "<i4")],
]


@st.composite
def npy(draw: st.DrawFn) -> Req:
    """``.npy`` bodies: wrong dtypes and shapes, pickled objects, lying headers, truncations."""
    kind = draw(st.sampled_from(["array", "object", "huge", "truncated", "flipped", "garbage"]))
    shape = draw(st.sampled_from([(2, WIDTH), (0, WIDTH), (1, WIDTH - 1), (WIDTH,), (), (1, 2, WIDTH), (3, 5)]))
    buf = io.BytesIO()
    if kind == "object":
        np.save(buf, np.array([{"a": 1}, None, "x"], dtype=object), allow_pickle=True)
    else:
        np.save(buf, np.zeros(shape, dtype=np.dtype(draw(st.sampled_from(NPY_DTYPES)))))
    body = buf.getvalue()
    if kind == "huge":
        body = body.replace(repr(shape).encode(), f"({draw(st.integers(10**6, 10**15))}, {WIDTH})".encode(), 1)
    elif kind == "truncated":
        body = body[: draw(st.integers(0, max(len(body) - 1, 0)))]
    elif kind == "flipped":
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + bytes([body[at] ^ draw(st.integers(1, 255))]) + body[at + 1 :]
    elif kind == "garbage":
        body = b"\x93NUMPY" + draw(st.binary(max_size=200))
    return Req(body, {"content-type": draw(st.sampled_from([codecs.NPY, codecs.OCTET]))})


def arrow_column(kind: str, rows: int, dtype: str) -> pa.Array:
    values = np.zeros((rows, 4), dtype=dtype) if dtype != "bool" else np.zeros((rows, 4), bool)
    if kind == "tensor":
        return pa.FixedShapeTensorArray.from_numpy_ndarray(np.zeros((rows, 2, WIDTH // 2), dtype=dtype))
    if kind == "wrong-tensor":
        return pa.FixedShapeTensorArray.from_numpy_ndarray(values)
    if kind == "plain":
        return pa.array(values[:, 0])
    if kind == "nulls":
        return pa.array([None] * rows, type=pa.float32())
    if kind == "strings":
        return pa.array(["x"] * rows)
    if kind == "struct":
        return pa.array([{"a": 1.0}] * rows)
    if kind == "dictionary":
        return pa.array(["a"] * rows).dictionary_encode()
    return pa.array([[1.0, 2.0]] * rows)


@st.composite
def arrow(draw: st.DrawFn) -> Req:
    """Arrow IPC streams: wrong columns, types and shapes, nulls, compression, truncation, flipped bytes."""
    rows = draw(st.integers(1, 3))
    names = draw(st.lists(st.sampled_from(["features", "x", ""]), min_size=1, max_size=2, unique=True))
    kinds = ["tensor", "wrong-tensor", "plain", "nulls", "strings", "struct", "dictionary", "list"]
    columns = [
        arrow_column(draw(st.sampled_from(kinds)), rows, draw(st.sampled_from(["float32", "float64", "int64"])))
        for _ in names
    ]
    table = pa.table(columns, names=names)
    sink = io.BytesIO()
    options = pa.ipc.IpcWriteOptions(compression=draw(st.sampled_from([None, None, "zstd", "lz4"])))
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    body = sink.getvalue()
    damage = draw(st.sampled_from(["none", "truncate", "flip"]))
    if damage == "truncate":
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif damage == "flip":
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + bytes([body[at] ^ draw(st.integers(1, 255))]) + body[at + 1 :]
    return Req(body, {"content-type": codecs.ARROW})


@st.composite
def odd_bodies(draw: st.DrawFn) -> Req:
    """Deep nesting, over-long numbers, non-UTF-8, over-size bodies and unknown content types."""
    kind = draw(st.sampled_from(["nest", "nest-inputs", "big-int", "latin1", "oversize", "content-type"]))
    depth = draw(st.integers(50, 100_000))
    if kind == "nest":
        return Req(b"[" * depth + b"]" * depth, {"content-type": codecs.JSON})
    if kind == "nest-inputs":
        inner = "[" * min(depth, 5000) + "1.0" + "]" * min(depth, 5000)
        doc = f'{{"inputs": [{{"name": "features", "shape": [1, 256], "datatype": "FP32", "data": {inner}}}]}}'
        return Req(doc.encode(), {"content-type": codecs.JSON})
    if kind == "big-int":
        return Req(b'{"inputs": [], "id": ' + b"9" * draw(st.integers(4000, 20_000)) + b"}", {})
    if kind == "latin1":
        return Req('{"inputs": "é"}'.encode("latin-1") + draw(st.binary(max_size=32)), {"content-type": codecs.JSON})
    if kind == "oversize":
        return Req(b"0" * (MAX_BODY + draw(st.integers(1, 1000))), {"content-type": codecs.NPY})
    content_type = draw(
        st.one_of(
            st.sampled_from(
                ["text/csv", "application/xml", "multipart/form-data", "image/png", ";;;", "application/json/extra"]
            ),
            st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20).map(str.strip),
        )
    )
    return Req(draw(st.binary(max_size=256)), {"content-type": content_type})


STRATEGIES = {"oip-json": oip_json(), "oip-binary": oip_binary(), "npy": npy(), "arrow": arrow(), "odd": odd_bodies()}


# In-process -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_decoder_raises_only_bad_request(name: str, mlp: PlannedModel) -> None:
    """The decoder alone, in this process: only BadRequest with a message, never another exception."""

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(STRATEGIES[name])
    def decode(req: Req) -> None:
        try:
            decoded = codecs.decode(
                req.body,
                req.headers.get("content-type"),
                req.headers.get(codecs.HEADER_LENGTH),
                mlp.plan.inputs,
                max_tensor_bytes=codecs.JSON_EXPANSION * MAX_BODY,
            )
            check_inputs(mlp.plan.inputs, decoded.arrays)
        except BadRequest as exc:
            assert 400 <= exc.status < 500 and str(exc)

    decode()


# Over HTTP ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def url(serve_instance: str, mlp: PlannedModel) -> Iterator[str]:
    args = AppArgs(plan_uri=mlp.uri, model_name="mlp", num_cpus=0, max_body_bytes=MAX_BODY, batch_wait_timeout_s=0.001)
    with serve_apps(serve_instance, {APP: args}) as base:
        yield f"{base}/{APP}"


def send(client: httpx.Client, url: str, req: Req) -> tuple[int, str]:
    """The status and the error message (empty for 2xx)."""
    headers = {k: v.encode("latin-1") for k, v in req.headers.items()}  # httpx encodes str as ASCII only
    r = client.post(f"{url}/v2/models/mlp/infer", content=req.body, headers=headers)
    if r.status_code < 300:
        return r.status_code, ""
    return r.status_code, str(r.json().get("error", "")) if r.headers.get("content-type") == codecs.JSON else r.text


def fuzz_over_http(
    strategy: st.SearchStrategy[Req], send_group: Callable[[list[Req]], list[tuple[int, str]]], failures: list[str]
) -> Counter[int]:
    """Statuses of ``EXAMPLES_PER_STRATEGY`` groups of requests from ``strategy``; each 5xx, or 4xx without an
    error message, goes to ``failures``."""
    statuses: Counter[int] = Counter()

    @settings(max_examples=EXAMPLES_PER_STRATEGY, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(strategy, min_size=GROUP, max_size=GROUP))
    def fuzz(group: list[Req]) -> None:
        for req, (status, message) in zip(group, send_group(group)):
            statuses[status] += 1
            if status >= 500 or (status >= 400 and not message):
                failures.append(f"{status} {message[:300]} for {req.headers} {req.body[:200]!r}")

    fuzz()
    return statuses


def test_http_fuzz_never_answers_5xx(url: str, mlp: PlannedModel) -> None:
    before = replicas(APP)
    counts: dict[str, Counter[int]] = {}
    failures: list[str] = []
    start = time.monotonic()
    with httpx.Client(timeout=60) as client, concurrent.futures.ThreadPoolExecutor(GROUP) as pool:

        def send_group(group: list[Req]) -> list[tuple[int, str]]:
            return list(pool.map(lambda r: send(client, url, r), group))

        for name, strategy in STRATEGIES.items():
            counts[name] = fuzz_over_http(strategy, send_group, failures)
    elapsed = time.monotonic() - start
    total = sum(sum(c.values()) for c in counts.values())
    print(f"\n{total} fuzzed requests in {elapsed:.1f} s")
    print(f"{'strategy':<12} {'requests':>8}  statuses")
    for name, c in counts.items():
        print(f"{name:<12} {sum(c.values()):>8}  {dict(sorted(c.items()))}")
    server_errors = sum(n for c in counts.values() for status, n in c.items() if status >= 500)
    print(f"5xx: {server_errors}")
    assert not failures, "\n".join(failures[:20])
    assert server_errors == 0
    assert total >= MIN_REQUESTS
    assert replicas(APP) == before, "a replica restarted during fuzzing"
    good = mlp.sample(3, seed=5)
    r = httpx.post(
        f"{url}/v2/models/mlp/infer",
        json={
            "inputs": [
                {"name": "features", "shape": [3, WIDTH], "datatype": "FP32", "data": good["features"].ravel().tolist()}
            ]
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(3, 10)
    assert rel_err(got, mlp.reference(good)["output"]) <= 1e-6
