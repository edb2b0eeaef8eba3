"""The entrance's answers as plain numpy: softmax, pooling over unpadded tokens, normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from partitions.errors import ModelError
from partitions.plan import Processing
from partitions.processing import Processor, normalise, pool, pooling_of, softmax
from partitions.types import TensorSpec

# two samples, three tokens, width 2; the second sample's last token is padding
HIDDEN = np.array([[[1, 2], [3, 4], [5, 0]], [[2, 2], [4, 0], [100, 100]]], np.float32)
MASK = np.array([[1, 1, 1], [1, 1, 0]])


def test_softmax_of_a_literal_row() -> None:
    # exp(0) / (exp(0) + exp(ln 3)) = 1 / 4
    np.testing.assert_allclose(softmax(np.array([[0.0, np.log(3.0)]])), [[0.25, 0.75]], rtol=1e-6)
    assert softmax(np.array([[1000.0, 1000.0]])).tolist() == [[0.5, 0.5]]  # no overflow


@pytest.mark.parametrize(
    ("how", "want"),
    [
        ("mean", [[3, 2], [3, 1]]),  # (1+3+5)/3, (2+4+0)/3; (2+4)/2, (2+0)/2: the pad is left out
        ("max", [[5, 4], [4, 2]]),  # the pad's 100 is left out
        ("cls", [[1, 2], [2, 2]]),
    ],
)
def test_pooling_leaves_padding_out(how: str, want: list) -> None:
    np.testing.assert_allclose(pool(HIDDEN, MASK, how), want)


def test_normalise_to_unit_rows() -> None:
    np.testing.assert_allclose(normalise(np.array([[3.0, 4.0], [0.0, 0.0]])), [[0.6, 0.8], [0.0, 0.0]])


def test_pooling_option_and_sentence_transformers_config(tmp_path) -> None:
    assert pooling_of(str(tmp_path), None) == "mean"
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    assert pooling_of(str(tmp_path), None) == "cls"
    assert pooling_of(str(tmp_path), "max") == "max"
    with pytest.raises(ModelError, match="pooling 'sum'"):
        pooling_of(str(tmp_path), "sum")


def test_finish_adds_labels_probabilities_and_embeddings() -> None:
    logits = TensorSpec("logits", (-1, 2), "float32")
    classify = Processor("unused", Processing("classification", labels=["no", "yes"]), [], [logits])
    out = classify.finish({"logits": np.array([[0.0, 1.0], [2.0, 0.0]], np.float32)}, {})
    assert out["label"].tolist() == ["yes", "no"]  # argmax 1, then 0
    assert [t.name for t in classify.output_specs()] == ["probabilities", "label"]
    hidden = TensorSpec("last_hidden_state", (-1, 3, 2), "float32")
    embed = Processor("unused", Processing("embedding"), [], [hidden])
    out = embed.finish({"last_hidden_state": HIDDEN}, {"attention_mask": MASK})
    np.testing.assert_allclose(out["embedding"], normalise(np.array([[3, 2], [3, 1]], np.float32)), rtol=1e-6)
    assert [(t.name, t.shape) for t in embed.output_specs()] == [("embedding", (-1, 2))]
