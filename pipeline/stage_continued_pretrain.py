"""Stage 4, continued_pretrain: full-parameter recovery training of the pruned model under ZeRO-3.

    deepspeed --num_gpus 2 pipeline/stage_continued_pretrain.py --run-dir runs/tiny

Trains hard_prune's model on the tokenize stage's train split (optionally distilling from prepare's
dense model), validates on the valid split (and on continued_pretrain.dev_texts, by which select =
"best_dev" chooses the checkpoint to export) and checkpoints to RUN/continued_pretrain/checkpoints/
(resumable with resume = "auto"), under the DeepSpeed JSON frozen in RUN/continued_pretrain/
ds_config.json. Outputs the checkpoint root and the final tag; the export stage turns that tag into
a plain HF model once this job (and every rank and GPU of it) has exited.
"""

import torch

from maskprune.data import BatchIterator, TokenShards
from maskprune.dev_texts import dev_windows
from maskprune.dist import PREEMPTED_EXIT_CODE, StopFlag, log, stage_argv_parser
from maskprune.pretrain import Pretrainer, build_teacher
from maskprune.stage import run_stage, start_distributed, warn_if_fp32_on_gpu
from maskprune.training import Checkpointer, build_zero3_model, init_engine, prepare_for_training
from maskprune.universal import grad_accum_for_resume


def main() -> int:
    args = stage_argv_parser(__doc__).parse_args()
    dist, run = start_distributed("continued_pretrain", args.run_dir)
    cpt = run.cfg.continued_pretrain
    torch.manual_seed(cpt.train.seed)
    cpt.train.grad_accum = grad_accum_for_resume(run.dir / "checkpoints", cpt.train, dist.world_size)
    ds = run.ds_config(cpt)
    warn_if_fp32_on_gpu("continued_pretrain", ds)
    data = run.upstream("tokenize", "data")
    valid = TokenShards(data, "valid")
    dev = dev_windows("continued_pretrain", cpt, data, valid.seq_len, dist)  # a bad text fails before the model loads
    model_dir = run.upstream("hard_prune", "model")
    model, hf_ds = build_zero3_model(model_dir, ds)  # hf_ds (and teacher_hf_ds) must stay alive
    prepare_for_training(model, cpt.activation_checkpointing)
    teacher, teacher_hf_ds = None, None
    if cpt.distill.kl_weight > 0:
        teacher, teacher_hf_ds = build_teacher(run.upstream("prepare", "model"), model.config, ds)
    engine = init_engine(model, list(model.parameters()), ds, cpt.train)
    trainer = Pretrainer(
        cfg=cpt, dist=dist, engine=engine, teacher=teacher,
        train_iter=BatchIterator(TokenShards(data, "train"), cpt.train.micro_batch_size, dist.rank,
                                 dist.world_size, cpt.train.seed),
        valid=valid, dev=dev,
        checkpointer=Checkpointer(run.dir / "checkpoints", cpt.train.keep_last, keep_best=cpt.select == "best_dev",
                                  run_root=run.run.root),
        meta={"stage": "continued_pretrain", "model_dir": model_dir, "lora": None, "masks": None,
              "frozen_excluded": False},
        tb_dir=run.tb_dir, progress_path=run.dir / "progress.json")
    if not trainer.run(StopFlag(run.run.root / "STOP")):
        return PREEMPTED_EXIT_CODE
    final = trainer.final_checkpoint()
    log(f"continued_pretrain: final checkpoint {final}" + (" (lowest dev perplexity)" if cpt.select == "best_dev" else "")
        + "; the export stage makes the HF model from it")
    dev_scores = {"dev_ppl_geomean": trainer.checkpointer.dev_scores()} if dev else {}
    run.finish({"checkpoints": str(final.parent), "final_tag": final.name, "select": cpt.select, **dev_scores})
    return 0


if __name__ == "__main__":
    run_stage(main)
