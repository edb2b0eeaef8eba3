"""Small Hugging Face model directories as users save them (``save_pretrained``), built offline: random
weights from a fixed seed, a word-level tokenizer made with the ``tokenizers`` library."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

SEQ_LEN = 16
WORDS = [
    *("the", "a", "movie", "film", "was", "is", "good", "bad", "great", "terrible"),
    *("i", "liked", "loved", "hated", "it", "not", "very", "plot", "actors"),
]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = len(SPECIAL) + len(WORDS) + 11
"""Rows of the embedding: more than the tokenizer's words (ids the tokenizer never makes are still valid)."""
TEXTS = ["the movie was very good", "i hated the plot", "Great actors, terrible film!", "it"]
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
BERT = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2}


def save_tokenizer(directory: Path) -> None:
    """A lower-casing word-level tokenizer with BERT's special tokens (``[CLS] text [SEP]``), saved as a
    ``PreTrainedTokenizerFast`` (tokenizer.json, tokenizer_config.json)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIAL, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=SEQ_LEN,
    )
    fast.save_pretrained(directory)


def _seeded(build: Any) -> Any:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build()


def bert_classifier_dir(directory: Path) -> Path:
    """A ``BertForSequenceClassification`` with three labels and its tokenizer."""
    import transformers

    config = transformers.BertConfig(**BERT, intermediate_size=64, num_labels=3, id2label=LABELS)
    _seeded(lambda: transformers.BertForSequenceClassification(config)).save_pretrained(directory)
    save_tokenizer(directory)
    return directory


def bert_encoder_dir(directory: Path, pooling: str = "mean") -> Path:
    """A bare ``BertModel`` laid out as a sentence-transformers directory (modules.json, 1_Pooling)."""
    import transformers

    config = transformers.BertConfig(**BERT, intermediate_size=64)
    _seeded(lambda: transformers.BertModel(config)).save_pretrained(directory)
    save_tokenizer(directory)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir()
    modes = {f"pooling_mode_{m}": pooling == key for m, key in (("mean_tokens", "mean"), ("cls_token", "cls"))}
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **modes}))
    return directory


def vit_classifier_dir(directory: Path, image_size: int = 32) -> Path:
    """A ``ViTForImageClassification`` (two labels) with a preprocessor config giving its input size."""
    import transformers

    config = transformers.ViTConfig(
        image_size=image_size,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=2,
        id2label={0: "cat", 1: "dog"},
    )
    _seeded(lambda: transformers.ViTForImageClassification(config)).save_pretrained(directory)
    size = {"height": image_size, "width": image_size}
    (directory / "preprocessor_config.json").write_text(json.dumps({"do_resize": True, "size": size}))
    return directory


def reference(directory: Path, texts: list[str]) -> dict[str, np.ndarray]:
    """The saved model run in this process on ``texts``, tokenized as the entrance does (padded and
    truncated to :data:`SEQ_LEN`): its outputs, and ``inputs`` (the tokens)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(directory)
    enc = tok(texts, padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="pt")
    config = transformers.AutoConfig.from_pretrained(directory)
    model = getattr(transformers, config.architectures[0]).from_pretrained(directory).eval()
    with torch.inference_mode():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    result = {k: v.numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}
    result["attention_mask"] = enc["attention_mask"].numpy()
    result["input_ids"] = enc["input_ids"].numpy()
    return result
