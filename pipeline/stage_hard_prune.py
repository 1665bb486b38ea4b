"""Stage 3, hard_prune: learned keep indices (+ LoRA) → a plain, uniform, smaller HF checkpoint.

    python pipeline/stage_hard_prune.py --run-dir runs/tiny

Reads prepare's `model`, mask_learn's `masks` and (when present) `lora` and `reconstruction` — or, with
hard_prune.checkpoint set, any ZeRO-3 checkpoint of this project. Writes RUN/hard_prune/model/
(sharded safetensors, config, tokenizer, prune_report.json) only after the built-in equivalence
check passed.
"""
import sys

from maskprune.dist import log, stage_argv_parser
from maskprune.prune_job import build_pruned_model, job_from_checkpoint, job_from_model_dir
from maskprune.stage import StageRun, run_stage


def main() -> int:
    args = stage_argv_parser(__doc__).parse_args()
    run = StageRun("hard_prune", args.run_dir)
    cfg = run.cfg.hard_prune
    try:
        if cfg.checkpoint:
            job = job_from_checkpoint(cfg.checkpoint)
        else:
            learned = run.run.state("mask_learn").outputs or {}  # one-shot baselines: no lora, no reconstruction
            job = job_from_model_dir(run.upstream("prepare", "model"), run.upstream("mask_learn", "masks"),
                                     learned.get("lora"), learned.get("reconstruction"))
        final = run.dir / "model"
        report = build_pruned_model(job, final, cfg, progress=sys.stderr.isatty())
    except (ValueError, FileNotFoundError) as err:  # bad input: one line, nothing written
        print(f"maskprune: error: {err}", file=sys.stderr)
        return 2
    check = report["equivalence"]
    log(f"hard_prune: {report['params_before']:,} → {report['params_after']:,} parameters, "
        f"config {report['config']}, equivalence ({check['mode']}) max |Δ| = {check['max_abs_diff']}")
    run.finish({"model": str(final), "report": str(final / "prune_report.json"),
                "params": report["params_after"], "max_abs_diff": report["max_abs_diff"]})
    return 0


if __name__ == "__main__":
    run_stage(main)
