"""Stage 2, mask_learn: learn uniform structured masks (MaskPrune) or score units one-shot (baselines).

    deepspeed --num_gpus 2 pipeline/stage_mask_learn.py --run-dir runs/tiny

Writes RUN/mask_learn/masks.safetensors (keep indices + scores), lora/ (PEFT adapter, MaskPrune
only), reconstruction/ (with mask_learn.reconstruction), summary.json, checkpoints/ (DeepSpeed
ZeRO-3, resumable with resume = "auto"), ds_config.json (the DeepSpeed JSON it trains under).
"""
import json
from pathlib import Path

import torch

from maskprune.arch import LlamaShape
from maskprune.baselines import one_shot_keep
from maskprune.data import BatchIterator, TokenShards
from maskprune.dev_texts import dev_windows
from maskprune.config import MaskLearnConfig
from maskprune.dist import PREEMPTED_EXIT_CODE, DistInfo, StopFlag, log, stage_argv_parser
from maskprune.importance import unit_scores
from maskprune.lora import lora_state_dict, save_adapter
from maskprune.mask_learn import assemble_learner, write_summary
from maskprune.masks_io import save_keep_indices
from maskprune.stage import run_stage, start_distributed, warn_if_fp32_on_gpu
from maskprune.targets import check_target, resolve_target
from maskprune.training import build_zero3_model
from maskprune.universal import grad_accum_for_resume


def reconstruction_batches(data_dir: str, ml: MaskLearnConfig, dist: DistInfo) -> list[torch.Tensor]:
    """This rank's share of the first `reconstruction_batches` global batches of the training stream,
    from a stream of their own: the same on every start and resume, and training's is not shifted."""
    stream = BatchIterator(TokenShards(data_dir, "train"), ml.train.micro_batch_size, dist.rank,
                           dist.world_size, ml.train.seed)
    return [next(stream) for _ in range(ml.reconstruction_batches * ml.train.grad_accum)]


def main() -> int:
    args = stage_argv_parser(__doc__).parse_args()
    dist, run = start_distributed("mask_learn", args.run_dir)
    ml = run.cfg.mask_learn
    torch.manual_seed(ml.train.seed)
    ml.train.grad_accum = grad_accum_for_resume(run.dir / "checkpoints", ml.train, dist.world_size)
    ds = run.ds_config(ml)
    warn_if_fp32_on_gpu("mask_learn", ds)
    model_dir = run.upstream("prepare", "model")
    source = LlamaShape.from_hf_config(json.loads((Path(model_dir) / "config.json").read_text()))
    shape, cfg = resolve_target(source, run.cfg)  # run.cfg stays as written: the stage hash reads it
    log(f"mask_learn: target.attn_mode = {cfg.target.attn_mode}"
        + (f" (auto: {source.num_attention_heads} query heads over {source.num_key_value_heads} KV heads)"
           if run.cfg.target.attn_mode == "auto" else "")
        + f"; {shape.family} source, head counts: {shape.lattice.replace('_', ' ')} "
          f"(hard_prune.architecture = {cfg.hard_prune.architecture}); target.budget = {cfg.target.budget}"
        + (f" at {shape.flops_seq_len} tokens" if shape.flops_seq_len else ""))
    check_target(shape, cfg)
    data_dir = run.upstream("tokenize", "data")
    valid = TokenShards(data_dir, "valid")
    # Only the learner trains (a one-shot method reads no dev text); a bad text fails before the model loads.
    dev = dev_windows("mask_learn", ml, data_dir, valid.seq_len, dist) if ml.method == "maskprune" else {}
    model, hf_ds = build_zero3_model(model_dir, ds)
    model.config.use_cache = False
    model.requires_grad_(False)
    train_iter = BatchIterator(TokenShards(data_dir, "train"), ml.train.micro_batch_size, dist.rank,
                               dist.world_size, ml.train.seed)
    if ml.method != "maskprune" or ml.init != "ones":
        # Whole global batches: the same sequences on any rank count that keeps the global batch, and
        # training starts on a global-batch boundary, so its checkpoints resume on each such count.
        calibration = [next(train_iter) for _ in range(ml.calibration_batches * ml.train.grad_accum)]
    if ml.method != "maskprune":
        keep = one_shot_keep(model, calibration, cfg, shape)
        if dist.is_rank0:
            save_keep_indices(run.dir / "masks.safetensors", keep)
        log(f"mask_learn ({ml.method}): every layer keeps {keep.q_heads.shape[1]} heads, "
            f"{keep.ffn.shape[1]} FFN channels" + (", with bias compensation" if keep.bias else ""))
        run.finish({"masks": str(run.dir / "masks.safetensors"), "method": ml.method})
        return 0

    scores = unit_scores(model, calibration, ml.init, shape, cfg.target.attn_mode,
                         seed=ml.train.seed) if ml.init != "ones" else None
    learner = assemble_learner(
        cfg, dist, model, ds, train_iter, valid, scores, run.dir, run.tb_dir,
        meta={"stage": "mask_learn", "model_dir": model_dir, "frozen_excluded": True,
              "lora": {"r": ml.lora.rank, "alpha": ml.lora.alpha, "targets": ml.lora.targets}}, dev=dev,
        calibration=reconstruction_batches(data_dir, ml, dist) if ml.reconstruction else None)
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
                "method": "maskprune", **({"reconstruction": str(learner.reconstruction_dir)}
                                          if ml.reconstruction else {})})
    return 0


if __name__ == "__main__":
    run_stage(main)
