"""What the training-step benchmarks share: a random Llama saved once, a token dataset in the
tokenize stage's format, and the mask-learn / LoRA engines built the way the stages build them.

The models are random because step time and memory depend on shapes, not on weights; the token
dataset is written straight in `maskprune.data`'s on-disk format (`index.json` + flat shards) so
`MaskLearner` and `Pretrainer` run unmodified, pulling batches through their own `BatchIterator`.
"""
from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskprune.config import ExperimentConfig
from maskprune.dist import DistInfo
from maskprune.shard_writer import INDEX_FORMAT


def llama_config(vocab: int, hidden: int, layers: int, heads: int, kv: int, ffn: int,
                 max_positions: int = 4096, head_dim: int | None = None) -> Any:
    """A Llama config; a pruned head count that does not divide `hidden` (LlamaConfig rejects it)
    gives the MistralConfig that hard_prune.architecture = auto writes for that shape."""
    from transformers import LlamaConfig, MistralConfig

    fields = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=ffn,
                  max_position_embeddings=max_positions, tie_word_embeddings=False)
    if hidden % heads == 0 and head_dim in (None, hidden // heads):
        return LlamaConfig(**fields)
    return MistralConfig(**fields, head_dim=head_dim, sliding_window=None)


def save_random_llama(folder: Path, config: Any, dtype: torch.dtype = torch.float32,
                      device: str = "cpu") -> Path:
    """A randomly initialised LlamaForCausalLM as safetensors; built on `device` (a GPU builds a
    1B model in seconds), written in `dtype`. Call on one rank only, outside any zero.Init."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    return folder


def write_token_dataset(folder: Path, vocab: int, seq_len: int, sequences: int, seed: int = 0) -> Path:
    """Random tokens as a `maskprune-tokens/1` dataset (one train shard, one valid shard)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "shards").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    dtype = "uint16" if vocab <= 1 << 16 else "uint32"
    shards, splits = [], {}
    for number, split in enumerate(("train", "valid")):
        tokens = sequences * seq_len
        name = f"shards/{number:05d}.{split}.bin"
        rng.integers(0, vocab, tokens, dtype=np.int64).astype(dtype).tofile(folder / name)
        shards.append({"file": name, "split": split, "tokens": tokens})
        splits[split] = {"segments": [[number, 0, tokens]], "tokens": tokens, "sequences": sequences}
    index = {"format": INDEX_FORMAT, "seq_len": seq_len, "dtype": dtype, "eos_id": 0,
             "vocab_size": vocab, "shards": shards, "splits": splits}
    (folder / "index.json").write_text(json.dumps(index))
    return folder


def build_mask_learner(cfg: ExperimentConfig, dist: DistInfo, model_dir: Path, data_dir: Path,
                       work: Path) -> tuple[Any, Any]:
    """A `MaskLearner` built the way the mask-learn stage builds it (`assemble_learner`), with
    `init = "ones"` scores: the Wanda-sp initialisation changes the starting scores, not the cost
    of a step. Returns (learner, the HfDeepSpeedConfig that must stay alive with the model)."""
    import dataclasses

    from maskprune.data import BatchIterator, TokenShards
    from maskprune.mask_learn import assemble_learner
    from maskprune.training import build_zero3_model, load_ds_config

    ml = dataclasses.replace(cfg.mask_learn, init="ones", train=dataclasses.replace(cfg.mask_learn.train, keep_last=1))
    cfg = dataclasses.replace(cfg, mask_learn=ml)
    ds = load_ds_config(ml.ds_config, ml.train)
    model, hf_ds = build_zero3_model(model_dir, ds)
    model.config.use_cache = False
    model.requires_grad_(False)
    train_iter = BatchIterator(TokenShards(data_dir, "train"), ml.train.micro_batch_size, dist.rank,
                               dist.world_size, ml.train.seed)
    learner = assemble_learner(cfg, dist, model, ds, train_iter, TokenShards(data_dir, "valid"), None,
                               work, work / "tb", meta={})
    return learner, hf_ds


def build_lora_engine(cfg: ExperimentConfig, model_dir: Path) -> tuple[Any, Any]:
    """Plain LoRA fine-tuning on the same path, without masks: (engine, HfDeepSpeedConfig)."""
    from maskprune.lora import attach_lora
    from maskprune.training import build_zero3_model, init_engine, load_ds_config, prepare_for_training

    ml = cfg.mask_learn
    ds = load_ds_config(ml.ds_config, ml.train)
    model, hf_ds = build_zero3_model(model_dir, ds)
    model.requires_grad_(False)
    _, lora_params = attach_lora(model, ml.lora, seed=ml.train.seed)
    prepare_for_training(model, ml.activation_checkpointing)  # as assemble_learner does: a like-for-like step
    return init_engine(model, lora_params, ds, ml.train), hf_ds


def lora_step(engine: Any, batch: torch.Tensor) -> float:
    """One plain LoRA step: student pass, backward, optimizer step (loss read as a loop logs it)."""
    out = engine(input_ids=batch, labels=batch)
    engine.backward(out.loss)
    engine.step()
    return out.loss.item()


def timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    """Wall seconds of `fn` with every rank starting together and the slowest rank's time kept
    (a step is as slow as its slowest rank)."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    if torch.distributed.is_initialized():
        if torch.cuda.is_available() and torch.distributed.get_backend() == "nccl":
            elapsed = elapsed.cuda()
        torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
    return float(elapsed.item())


def spread(values: list[float]) -> str:
    """median [min - max] of a list, for a printed line."""
    return f"{statistics.median(values):.3f} [{min(values):.3f} - {max(values):.3f}]"
