"""Perplexity in the two conventions of pruning papers, forward throughput, parameter counts, and
loading one model at a time for them.

Perplexity of a token stream at chunk length L: the stream is cut into non-overlapping L-token
chunks (a trailing partial chunk is dropped), each chunk is one forward pass from an empty context,
and  ppl = exp(sum of NLL / number of predicted tokens), where every token of a chunk except its
first is predicted, i.e. n_chunks * (L - 1) tokens.
- L = 128: LLM-Pruner, FLAP.
- L = the model's context length or 2048, whichever is smaller: SparseGPT, Wanda, SliceGPT.
A family whose models expect BOS at every sequence start (Gemma: PTB test ppl@128 of Gemma-3-270M
measured 1175 without it, 176 with it) gets BOS in front of each chunk; it is context, never scored.
"""
from __future__ import annotations

import gc
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from maskprune.families import family_of


class EvaluationError(ValueError):
    """An evaluation that cannot be run as configured; the message names the setting and the fix."""


def load_model(path: str):
    """One model for evaluation, in the dtype it was saved in. On GPU accelerate spreads it over the
    node's GPUs (a 70B in bf16 is 140 GB, more than one GPU holds); on CPU it sits in host memory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    placement = {"device_map": "auto"} if torch.cuda.is_available() else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", **placement).eval()
    return model, AutoTokenizer.from_pretrained(path)


def release_memory() -> None:
    """After the last reference to a model is gone: collect the reference cycles that keep its
    tensors alive (modules, hooks, lm-eval's wrapper) and hand cached GPU blocks back."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def input_device(model: torch.nn.Module) -> torch.device:
    """Where inputs go: the device of the embedding (under device_map="auto", the first GPU)."""
    return model.get_input_embeddings().weight.device


def convention(chunk_len: int, requested: int, max_positions: int) -> str:
    """Which papers' numbers a chunk length is comparable with (written into the report)."""
    if requested == 128:
        return "non-overlapping 128-token chunks (LLM-Pruner, FLAP)"
    asked = f"; asked {requested}, capped by the context length" if chunk_len < requested else ""
    return (f"non-overlapping {chunk_len}-token chunks (SparseGPT, Wanda, SliceGPT: the context "
            f"length or 2048{asked})")


def chunk_lengths(requested: list[int], max_positions: int) -> dict[int, str]:
    """{effective chunk length: convention}, each length capped by max_position_embeddings."""
    out: dict[int, str] = {}
    for length in requested:
        effective = min(length, max_positions)
        out.setdefault(effective, convention(effective, length, max_positions))
    return out


def text_tokens(tokenizer, documents: Iterable[str], max_tokens: int) -> torch.Tensor:
    """One token stream: documents joined by "\\n" into one string, tokenized without special
    tokens (no BOS; tokenizers differ on it), cut at `max_tokens` (0 = all). Only as much text as the
    cap needs is tokenized, in growing prefixes, so a large file is not tokenized whole."""
    docs: Iterator[str] = iter(documents)
    pieces: list[str] = []
    chars, budget, exhausted = 0, 8 * max_tokens, False
    while True:
        while not exhausted and (max_tokens == 0 or chars < budget):
            doc = next(docs, None)
            if doc is None:
                exhausted = True
            else:
                pieces.append(doc)
                chars += len(doc) + 1
        ids = tokenizer("\n".join(pieces), add_special_tokens=False).input_ids
        if exhausted or len(ids) >= max_tokens:
            break
        budget *= 2
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


def shard_tokens(data_dir: str | Path, max_tokens: int) -> torch.Tensor:
    """The validation token shards as one stream: sequences concatenated in order (documents are
    already EOS-separated inside them), cut at `max_tokens` (0 = all)."""
    from maskprune.data import TokenShards

    shards = TokenShards(data_dir, "valid")
    parts, total = [], 0
    for i in range(len(shards)):
        parts.append(torch.from_numpy(shards.text(i)).long())
        total += parts[-1].numel()
        if max_tokens and total >= max_tokens:
            break
    if not parts:
        raise EvaluationError(f"{data_dir}: the validation split is empty; raise data.valid_fraction")
    stream = torch.cat(parts)
    return stream[:max_tokens] if max_tokens else stream


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokens: torch.Tensor, chunk_len: int,
               batch_size: int) -> dict[str, float]:
    """ppl of a 1-D token stream at one chunk length (see the module docstring)."""
    n_chunks = tokens.numel() // chunk_len
    if n_chunks == 0:
        raise EvaluationError(f"{tokens.numel()} tokens are fewer than one {chunk_len}-token chunk; "
                              "raise evaluate.eval_text_max_tokens or give more text")
    chunks = tokens[: n_chunks * chunk_len].view(n_chunks, chunk_len)
    nll = sum(sum(window_nll(model, chunks[start:start + batch_size]))
              for start in range(0, n_chunks, batch_size))
    predicted = n_chunks * (chunk_len - 1)
    return {"ppl": math.exp(nll / predicted), "nll_sum": nll, "predicted_tokens": predicted,
            "chunks": n_chunks}


@torch.no_grad()
def window_nll(model: torch.nn.Module, batch: torch.Tensor) -> list[float]:
    """Each row's summed next-token NLL (its first token is not predicted). `model` may be a
    DeepSpeed engine: it passes `config` and `get_input_embeddings` through to the HF model."""
    # A family trained with BOS opening every sequence (Gemma) gets it in front of each chunk, unscored:
    # the same tokens are predicted from the same context, only the start is the one it knows.
    bos = model.config.bos_token_id if family_of(model.config).bos_first else None
    inputs = batch if bos is None else torch.cat([batch.new_full((len(batch), 1), bos), batch], 1)
    logits = model(input_ids=inputs.to(input_device(model))).logits[:, (bos is not None):-1]
    targets = batch[:, 1:].to(logits.device)  # a model spread over GPUs may end on another one
    # One sequence at a time in fp32: at 8 x 2048 tokens and Llama-3's 128,256-token vocabulary a
    # whole-batch fp32 copy and its log-softmax would add 17 GB to one GPU.
    return [F.cross_entropy(row.float(), target, reduction="sum").item() for row, target in zip(logits, targets)]


def param_count(model: torch.nn.Module) -> int:
    """Unique parameters (tied input/output embeddings count once, as model.parameters() yields)."""
    return sum(p.numel() for p in model.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # every GPU: a model spread over them runs its layers on each
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)


@torch.no_grad()
def forward_tokens_per_s(model: torch.nn.Module, vocab_size: int, seq_len: int, batch_size: int,
                         steps: int, seed: int = 0) -> float:
    """Forward tokens/s on a random batch that depends only on the arguments, so every model of a
    run is timed on the same batch (one after the other: only one model fits at a time)."""
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    device = input_device(model)
    inputs = batch.to(device)
    model(input_ids=inputs)  # warm-up: allocator, kernels, lazy init
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        model(input_ids=inputs)
    _sync(device)
    return steps * batch.numel() / (time.perf_counter() - start)
