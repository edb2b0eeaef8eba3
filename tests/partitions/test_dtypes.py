"""The dtype table: torch <-> numpy bit for bit (bfloat16 included), names, and what an input takes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from partitions import dtypes
from partitions.types import TensorSpec
from tests import REPO


@pytest.mark.parametrize("name", list(dtypes.OIP_DATATYPES))
def test_torch_numpy_round_trip_is_bit_exact(name: str) -> None:
    t = (torch.arange(-6, 6).reshape(3, 4) * 3).to(dtypes.torch_dtype(name))
    a = dtypes.to_numpy(t)
    assert a.dtype == dtypes.np_dtype(name) and a.shape == (3, 4)
    back = dtypes.to_torch(a)
    assert back.dtype == t.dtype and dtypes.to_numpy(back).tobytes() == a.tobytes()
    assert dtypes.name_of(t.dtype) == dtypes.name_of(a.dtype) == name
    assert dtypes.from_oip(dtypes.oip_datatype(name)) == name


def test_bf16_words_are_torch_words() -> None:
    t = torch.tensor([1.0, -2.5, 3.140625, float("inf")], dtype=torch.bfloat16)
    a = dtypes.to_numpy(t)
    assert dtypes.words(a).tolist() == t.view(torch.int16).numpy().view(np.uint16).tolist()
    assert a.astype(np.float32).tolist() == t.float().tolist()  # float32 holds every bf16 value exactly
    assert dtypes.to_numpy(t[::2]).tolist() == a[::2].tolist()  # non-contiguous tensors too


def test_accept() -> None:
    x32 = np.array([[0.1, 3.0]], np.float32)
    assert dtypes.accept(x32, "float32") is x32
    assert dtypes.accept(x32, "bfloat16").dtype == dtypes.BFLOAT16
    assert dtypes.accept(x32, "float16").dtype == np.float16
    assert dtypes.accept(x32, "int64") is None and dtypes.accept(x32.astype(np.float64), "bfloat16") is None
    words = dtypes.words(x32.astype(dtypes.BFLOAT16))
    assert dtypes.accept(words, "bfloat16").tobytes() == words.tobytes()
    assert dtypes.accept(words, "float16") is None  # only bfloat16 is taken as raw words
    assert dtypes.accepted_datatypes("bfloat16") == ["BF16", "FP32"] and dtypes.accepted_datatypes("int64") == ["INT64"]


def test_file_formats_carry_bf16_as_float32_or_words() -> None:
    x = np.array([1.5, -2.0], dtypes.BFLOAT16)
    assert dtypes.wire_array(x, raw=False).dtype == np.float32
    assert dtypes.wire_array(x, raw=True).dtype == np.uint16
    assert dtypes.wire_array(np.float16([1]), raw=False).dtype == np.float16
    assert str(dtypes.arrow_type("bfloat16")) == "float" and str(dtypes.arrow_type("float16")) == "halffloat"


def test_plan_specs_work_in_a_fresh_process() -> None:
    # tritonclient and onnx import ml_dtypes, after which np.dtype("bfloat16") works in this process: a fresh
    # interpreter is what the CLI and a stage replica start as.
    code = "from partitions.types import TensorSpec;print(TensorSpec('x', (-1, 4), 'bfloat16').sample_bytes())"
    env = {"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "8"
    assert TensorSpec("x", (-1, 4), "bfloat16").np_dtype == dtypes.BFLOAT16
