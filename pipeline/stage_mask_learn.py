"""Stage 2, mask_learn: learn uniform structured masks (MaskPrune) or score units one-shot (baselines).

    deepspeed --num_gpus 2 pipeline/stage_mask_learn.py --run-dir runs/tiny

Writes RUN/mask_learn/masks.safetensors (keep indices + scores), lora/ (PEFT adapter, MaskPrune
only), summary.json, checkpoints/ (DeepSpeed ZeRO-3, resumable with resume = "auto").
"""
import json
from pathlib import Path

import torch

from maskprune.arch import LlamaShape, admissible, budget_for_sparsity, legal_attn_units, shape_for
from maskprune.data import BatchIterator, TokenShards
from maskprune.dist import StopFlag, init_distributed, log, stage_argv_parser
from maskprune.lora import attach_lora, lora_state_dict, save_adapter
from maskprune.mask_learn import PREEMPTED_EXIT_CODE, MaskLearner, init_scores, write_summary
from maskprune.masking import MaskState, attach_masks
from maskprune.masks_io import keep_from_scores, save_keep_indices
from maskprune.minimax import BudgetModel, MinimaxState
from maskprune.stage import StageRun, run_stage
from maskprune.training import Checkpointer, build_zero3_model, init_engine, load_ds_config


def calibration(train_iter: BatchIterator, count: int) -> list[torch.Tensor]:
    return [next(train_iter) for _ in range(count)]


def one_shot_units(shape: LlamaShape, cfg) -> tuple[int, int]:
    """Baselines have nothing to learn the attention/FFN split from: they cut both types by the
    target fraction (or take target.arch), then snap to the admissible shape."""
    target = cfg.target
    if target.arch is not None:
        return explicit_units(shape, cfg)
    budget = budget_for_sparsity(shape, target.sparsity)
    units = legal_attn_units(shape, target.attn_mode)
    return admissible(shape, (1 - target.sparsity) * units[-1] + 0.5 * units[0],
                      (1 - target.sparsity) * shape.intermediate_size, budget, target.attn_mode,
                      target.ffn_alignment)


def explicit_units(shape: LlamaShape, cfg) -> tuple[int, int]:
    arch, mode = cfg.target.arch, cfg.target.attn_mode
    heads = arch.num_attention_heads or shape.num_attention_heads
    units = heads if mode == "query_per_group" else heads // shape.group_size
    legal = legal_attn_units(shape, mode)
    if units not in legal:
        raise ValueError(f"target.arch.num_attention_heads = {heads} is not reachable in {mode} mode; "
                         f"legal head counts: {[u if mode == 'query_per_group' else u * shape.group_size for u in legal]}")
    return units, arch.intermediate_size or shape.intermediate_size


def check_target(shape: LlamaShape, cfg) -> None:
    """Before any model loads or any step runs: the target must be reachable (an explicit
    target.arch with legal heads; at target.sparsity, some legal shape within the budget), or the
    stage would fail only when it cuts the masks at its end."""
    if cfg.target.arch is not None:
        explicit_units(shape, cfg)
        return
    units = legal_attn_units(shape, cfg.target.attn_mode)
    admissible(shape, units[-1], shape.intermediate_size, budget_for_sparsity(shape, cfg.target.sparsity),
               cfg.target.attn_mode, cfg.target.ffn_alignment)


def main() -> int:
    args = stage_argv_parser(__doc__).parse_args()
    dist = init_distributed()
    run = StageRun("mask_learn", args.run_dir, is_rank0=dist.is_rank0)
    cfg, ml = run.cfg, run.cfg.mask_learn
    if cfg.target.prune_hidden or cfg.target.prune_layers:
        raise ValueError("target.prune_hidden / target.prune_layers: mask_learn learns attention and "
                         "FFN masks only; hidden-channel and layer pruning are hard_prune options")
    torch.manual_seed(ml.train.seed)
    ds = load_ds_config(ml.ds_config, ml.train)
    model_dir = run.upstream("prepare", "model")
    check_target(LlamaShape.from_hf_config(json.loads((Path(model_dir) / "config.json").read_text())), cfg)
    model, hf_ds = build_zero3_model(model_dir, ds)
    model.config.use_cache = False
    model.requires_grad_(False)
    shape = LlamaShape.from_hf_config(model.config)
    mode = cfg.target.attn_mode
    train = TokenShards(run.upstream("tokenize", "data"), "train")
    train_iter = BatchIterator(train, ml.train.micro_batch_size, dist.rank, dist.world_size, ml.train.seed)
    needs_scores = ml.method != "maskprune" or ml.init == "wanda_sp"
    scores = stats = None
    if needs_scores:
        from maskprune.importance import flap_bias, input_stats, unit_scores

        method = ml.method if ml.method != "maskprune" else "wanda_sp"
        batches = calibration(train_iter, ml.calibration_batches)
        # FLAP's bias compensation needs the same activation means its scores come from.
        stats = input_stats(model, batches) if method == "flap" else None
        scores = unit_scores(model, batches, method, shape, mode, seed=ml.train.seed, stats=stats)
    if ml.method != "maskprune":
        attn_units, ffn_width = one_shot_units(shape, cfg)
        keep = keep_from_scores(scores["attn"], scores["ffn"], shape, attn_units, ffn_width, mode, ml.method)
        if stats is not None:  # every rank: the weights are gathered layer by layer under ZeRO-3
            keep.bias = {name.removeprefix("bias."): value
                         for name, value in flap_bias(model, stats, keep).items()}
        if dist.is_rank0:
            save_keep_indices(run.dir / "masks.safetensors", keep)
        log(f"mask_learn ({ml.method}): every layer keeps {keep.q_heads.shape[1]} heads, "
            f"{keep.ffn.shape[1]} FFN channels" + (", with bias compensation" if keep.bias else ""))
        run.finish({"masks": str(run.dir / "masks.safetensors"), "method": ml.method})
        return 0

    init_attn, init_ffn = init_scores(shape, mode, ml.init, scores)
    masks = MaskState(shape, mode, init_attn, init_ffn).to(dist.device)
    attach_masks(model, masks)
    lora_switch, lora_params = attach_lora(model, ml.lora, seed=ml.train.seed)
    engine = init_engine(model, lora_params, ds, ml.train)
    budget = BudgetModel(shape, mode, cfg.target.sparsity, ml.budget_warmup_steps)
    explicit = explicit_units(shape, cfg) if cfg.target.arch is not None else None
    if explicit is not None:
        budget.final_budget = float(shape_for(shape, *explicit, mode).prunable_params())
    minimax = MinimaxState(s={"attn": float(budget.units["attn"]), "ffn": float(budget.units["ffn"])},
                           y={"attn": torch.zeros(shape.num_hidden_layers, dtype=torch.float64),
                              "ffn": torch.zeros(shape.num_hidden_layers, dtype=torch.float64)})
    learner = MaskLearner(
        cfg=cfg, dist=dist, engine=engine, masks=masks, lora=lora_switch, minimax=minimax,
        budget=budget, train_iter=train_iter, valid=TokenShards(run.upstream("tokenize", "data"), "valid"),
        checkpointer=Checkpointer(run.dir / "checkpoints", ml.train.keep_last),
        meta={"stage": "mask_learn", "model_dir": model_dir, "frozen_excluded": True,
              "lora": {"r": ml.lora.rank, "alpha": ml.lora.alpha, "targets": ml.lora.targets}},
        tb_dir=run.tb_dir, progress_path=run.dir / "progress.json",
        explicit_units=explicit)
    if not learner.run(StopFlag(run.run.root / "STOP")):
        return PREEMPTED_EXIT_CODE
    keep = learner.final_keep()
    adapter = lora_state_dict(model, ml.lora)  # every rank gathers
    if dist.is_rank0:
        save_keep_indices(run.dir / "masks.safetensors", keep)
        save_adapter(run.dir / "lora", adapter, ml.lora, model_dir)
        summary = write_summary(run.dir / "summary.json", shape, keep, learner)
        log(f"mask_learn: final shape {summary['final_shape']}, params {summary['params']['source']:,} -> "
            f"{summary['params']['final']:,}, violation {summary['final_violation']}")
    run.finish({"masks": str(run.dir / "masks.safetensors"), "lora": str(run.dir / "lora"),
                "summary": str(run.dir / "summary.json"), "checkpoints": str(run.dir / "checkpoints"),
                "method": "maskprune"})
    return 0


if __name__ == "__main__":
    run_stage(main)
