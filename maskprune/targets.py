"""Target shapes from `[target]`: explicit architectures, the one-shot baselines' cut, early checks."""
from __future__ import annotations

from maskprune.arch import LlamaShape, ShapeError, admissible, budget_for_sparsity, legal_attn_units
from maskprune.config import ExperimentConfig


def explicit_units(shape: LlamaShape, cfg: ExperimentConfig) -> tuple[int, int]:
    """(attention units, FFN width) of `target.arch`, refused with the legal head counts."""
    arch, mode = cfg.target.arch, cfg.target.attn_mode
    heads = arch.num_attention_heads or shape.num_attention_heads
    units = heads if mode == "query_per_group" else heads // shape.group_size
    legal = legal_attn_units(shape, mode)
    if units not in legal:
        legal_heads = [u if mode == "query_per_group" else u * shape.group_size for u in legal]
        raise ShapeError(f"target.arch.num_attention_heads = {heads} is not reachable in {mode} mode; "
                         f"legal head counts: {legal_heads}")
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
    if cfg.target.prune_hidden or cfg.target.prune_layers:
        raise ShapeError("target.prune_hidden / target.prune_layers: mask_learn learns attention and "
                         "FFN masks only; hidden-channel and layer pruning are hard_prune options")
    if cfg.target.arch is not None:
        explicit_units(shape, cfg)
        return
    units = legal_attn_units(shape, cfg.target.attn_mode)
    admissible(shape, units[-1], shape.intermediate_size, budget_for_sparsity(shape, cfg.target.sparsity),
               cfg.target.attn_mode, cfg.target.ffn_alignment)
