"""Dev texts while training: general-domain perplexity at every eval step, and the checkpoint that
`continued_pretrain.select = "best_dev"` hands to export.

    [[continued_pretrain.dev_texts]]
    kind = "corpus"
    path = "britannica"
    split = "dev"

Each text is cut as the evaluate stage cuts its held-out texts (maskprune.heldout: one token stream,
`dev_tokens // seq_len` windows spread through it) at the training context, tokenized with the
tokenize stage's own tokenizer.json, and scored as the evaluate stage scores a window
(evaluation.window_nll), so a step's dev figure is the evaluate stage's perplexity of that
checkpoint at data.seq_len. The windows are dealt out over the ranks, and every rank runs the same
number of forwards (ZeRO-3 gathers each layer's parameters collectively), padding with a row it
does not count: a 70B's dev pass costs a few forwards per GPU.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from maskprune.config import TrainingStageConfig
from maskprune.data import TokenShards
from maskprune.dist import DistInfo, log
from maskprune.evaluation import window_nll
from maskprune.heldout import geometric_mean, spread_windows, training_token_streams
from maskprune.overlap import NGRAM, windows_in_training
from maskprune.watchdog import WATCHDOG


def dev_windows(stage: str, cfg: TrainingStageConfig, data_dir: str | Path, seq_len: int,
                dist: DistInfo) -> dict[str, torch.Tensor]:
    """{label: [n, seq_len] windows} for each of the stage's dev texts ({} when it has none), cut
    from the texts as tokenized by the tokenize stage's tokenizer in `data_dir`. Every rank calls
    it: the ranks share the check of the windows against the training text (maskprune.overlap)."""
    from maskprune.text_corpora import require_on_disk

    if not cfg.dev_texts:
        return {}
    require_on_disk(cfg.dev_texts)
    windows = {label: spread_windows(ids, seq_len, cfg.dev_tokens, f"{stage}.dev_tokens").view(-1, seq_len)
               for label, ids in training_token_streams(data_dir, cfg.dev_texts).items()}
    log(f"{stage}: dev texts " + ", ".join(f"{label} ({len(w)} x {seq_len} tokens)" for label, w in windows.items()))
    shared = windows_in_training(windows, TokenShards(data_dir, "train"), dist.rank, dist.world_size, dist.device)
    for label, count in shared.items():
        if count:
            log(f"{stage}: WARNING: dev text {label}: {count} of {len(windows[label])} windows share a {NGRAM}-token "
                "run with the training text, so its dev figure rewards memorising it; drop those documents "
                "from data.sources or choose another dev text")
    if not any(shared.values()):
        log(f"{stage}: no dev window shares a {NGRAM}-token run with the training text")
    return windows


@torch.no_grad()
def dev_perplexity(engine: Any, windows: dict[str, torch.Tensor], batch_size: int, rank: int,
                   world_size: int, device: torch.device) -> dict[str, float]:
    """Perplexity of each dev text and their geometric mean ("geomean"); every rank returns the same."""
    labels = list(windows)
    rows = [(i, window) for i, label in enumerate(labels) for window in windows[label]]
    mine = rows[rank::world_size]
    per_rank = -(-len(rows) // world_size)  # the most any rank holds: every rank runs this many rows
    sums = torch.zeros(2, len(labels), dtype=torch.float64)  # summed NLL, predicted tokens
    for start in range(0, per_rank, batch_size):
        batch = mine[start:start + batch_size]
        padding = min(batch_size, per_rank - start) - len(batch)
        nll = window_nll(engine, torch.stack([w for _, w in batch] + [rows[0][1]] * padding))
        for (text, window), value in zip(batch, nll):
            sums[0, text] += value
            sums[1, text] += window.numel() - 1
        WATCHDOG.pet("dev batch")
    sums = sums.to(device)  # NCCL reduces only GPU tensors
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    ppl = {label: math.exp(sums[0, i].item() / sums[1, i].item()) for i, label in enumerate(labels)}
    return {**ppl, "geomean": geometric_mean(list(ppl.values()))}

