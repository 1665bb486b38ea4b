"""Target shapes from `[target]`: explicit architectures, the one-shot baselines' cut, early checks."""
from __future__ import annotations

import dataclasses

from maskprune.arch import (LlamaShape, ShapeError, admissible, budget_for_sparsity, kv_heads_for_units,
                            lattice_for, legal_attn_units, resolve_attn_mode, units_to_q_heads)
from maskprune.config import ExperimentConfig


def resolve_target(shape: LlamaShape, cfg: ExperimentConfig) -> tuple[LlamaShape, ExperimentConfig]:
    """Where the `auto` settings meet the source shape, once: target.attn_mode resolved (kv_group on
    an MHA model), the shape's head-count lattice taken from hard_prune.architecture and its budgeted
    resource from target.budget (parameters, or FLOPs at data.seq_len). The run's
    frozen config keeps what the user wrote, so stage hashes do not move; every computation uses
    this pair (idempotent: resolving a resolved pair changes nothing)."""
    mode = resolve_attn_mode(shape, cfg.target.attn_mode)
    lattice = lattice_for(shape, cfg.hard_prune.architecture, biased=cfg.mask_learn.method == "flap")
    flops_seq_len = cfg.data.seq_len if cfg.target.budget == "flops" else 0
    return (shape.replace(lattice=lattice, flops_seq_len=flops_seq_len),
            dataclasses.replace(cfg, target=dataclasses.replace(cfg.target, attn_mode=mode)))


def explicit_units(shape: LlamaShape, cfg: ExperimentConfig) -> tuple[int, int]:
    """(attention units, FFN width) of `target.arch`, refused with the legal head counts."""
    arch, mode = cfg.target.arch, cfg.target.attn_mode
    for name in ("hidden_size", "num_hidden_layers"):  # not learned here: refused, not ignored
        if getattr(arch, name) not in (0, getattr(shape, name)):
            raise ShapeError(f"target.arch.{name} = {getattr(arch, name)}: mask_learn cuts attention and "
                             f"FFN only; leave it 0 (the source's {getattr(shape, name)})")
    heads = arch.num_attention_heads or shape.num_attention_heads
    units = heads if mode == "query_per_group" else heads // shape.group_size
    legal = legal_attn_units(shape, mode)
    if units not in legal or units_to_q_heads(units, shape, mode) != heads:
        legal_heads = [u if mode == "query_per_group" else u * shape.group_size for u in legal]
        raise ShapeError(f"target.arch.num_attention_heads = {heads} is not reachable in {mode} mode; "
                         f"legal head counts: {legal_heads}")
    kv = int(kv_heads_for_units(units, shape, mode))
    if arch.num_key_value_heads not in (0, kv):
        raise ShapeError(f"target.arch.num_key_value_heads = {arch.num_key_value_heads}: {heads} heads in "
                         f"{mode} mode keep {kv} KV heads; leave it 0 or set {kv}")
    return units, arch.intermediate_size or shape.intermediate_size


def one_shot_units(shape: LlamaShape, cfg: ExperimentConfig) -> tuple[int, int]:
    """Baselines have nothing to learn the attention/FFN split from: they cut both types by the
    target fraction (or take target.arch), then snap to the admissible shape."""
    target = cfg.target
    if target.arch is not None:
        return explicit_units(shape, cfg)
    units = legal_attn_units(shape, target.attn_mode)
    return admissible(shape, (1 - target.sparsity) * units[-1] + 0.5 * units[0],
                      (1 - target.sparsity) * shape.intermediate_size,
                      budget_for_sparsity(shape, target.sparsity), target.attn_mode, target.ffn_alignment)


def check_target(shape: LlamaShape, cfg: ExperimentConfig) -> None:
    """Before any model loads or any step runs: the target must be reachable (an explicit
    target.arch with legal heads; at target.sparsity, some legal shape within the budget), or the
    stage would fail only when it cuts the masks at its end."""
    if cfg.target.arch is not None:
        explicit_units(shape, cfg)
        return
    units = legal_attn_units(shape, cfg.target.attn_mode)
    admissible(shape, units[-1], shape.intermediate_size, budget_for_sparsity(shape, cfg.target.sparsity),
               cfg.target.attn_mode, cfg.target.ffn_alignment)
