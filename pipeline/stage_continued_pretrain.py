"""Stage 4, continued_pretrain: full-parameter recovery training of the pruned model under ZeRO-3.

    deepspeed --num_gpus 2 pipeline/stage_continued_pretrain.py --run-dir runs/tiny

Trains hard_prune's model on the tokenize stage's train split (optionally distilling from prepare's
dense model), validates on the valid split and checkpoints to RUN/continued_pretrain/checkpoints/
(resumable with resume = "auto"). Outputs the checkpoint root and the final tag; the export stage
turns that tag into a plain HF model once this job (and every rank and GPU of it) has exited.
"""

import torch

from maskprune.data import BatchIterator, TokenShards
from maskprune.dist import StopFlag, init_distributed, log, stage_argv_parser
from maskprune.mask_learn import PREEMPTED_EXIT_CODE
from maskprune.pretrain import Pretrainer, build_teacher
from maskprune.stage import StageRun, run_stage
from maskprune.training import Checkpointer, build_zero3_model, init_engine, load_ds_config


def main() -> int:
    args = stage_argv_parser(__doc__).parse_args()
    dist = init_distributed()
    run = StageRun("continued_pretrain", args.run_dir, is_rank0=dist.is_rank0)
    cpt = run.cfg.continued_pretrain
    torch.manual_seed(cpt.train.seed)
    ds = load_ds_config(cpt.ds_config, cpt.train)
    model_dir = run.upstream("hard_prune", "model")
    model, hf_ds = build_zero3_model(model_dir, ds)  # hf_ds (and teacher_hf_ds) must stay alive
    model.config.use_cache = False  # no KV cache in training; checkpointing requires it off
    if cpt.activation_checkpointing:
        # Non-reentrant (PyTorch's recommended mode): a recomputed layer runs its forward again,
        # and ZeRO-3's forward hooks gather its parameters for it as they did the first time.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    teacher, teacher_hf_ds = None, None
    if cpt.distill.kl_weight > 0:
        teacher, teacher_hf_ds = build_teacher(run.upstream("prepare", "model"), model.config, ds)
    engine = init_engine(model, list(model.parameters()), ds, cpt.train)
    data = run.upstream("tokenize", "data")
    trainer = Pretrainer(
        cfg=cpt, dist=dist, engine=engine, teacher=teacher,
        train_iter=BatchIterator(TokenShards(data, "train"), cpt.train.micro_batch_size, dist.rank,
                                 dist.world_size, cpt.train.seed),
        valid=TokenShards(data, "valid"),
        checkpointer=Checkpointer(run.dir / "checkpoints", cpt.train.keep_last),
        meta={"stage": "continued_pretrain", "model_dir": model_dir, "lora": None, "masks": None,
              "frozen_excluded": False},
        tb_dir=run.tb_dir, progress_path=run.dir / "progress.json")
    if not trainer.run(StopFlag(run.run.root / "STOP")):
        return PREEMPTED_EXIT_CODE
    final = trainer.final_checkpoint()
    log(f"continued_pretrain: final checkpoint {final}; the export stage makes the HF model from it")
    run.finish({"checkpoints": str(final.parent), "final_tag": final.name})
    return 0


if __name__ == "__main__":
    run_stage(main)
