"""Stage 5, export: continued_pretrain's final ZeRO-3 checkpoint -> a plain HF model, one process.

    python pipeline/stage_export.py --run-dir runs/tiny

Runs after the distributed training job has exited, so no rank or GPU waits on it: the fp32
partitions of every rank are read one parameter at a time from memory-mapped files (peak memory
near one tensor), written in the pruned model's dtype as sharded safetensors, checked against the
checkpoint and published whole as RUN/export/model/ (tools/zero_to_hf.py's path). A kill leaves
only the staging folder RUN/export/.model.partial, and the rerun starts the export over: it reads
the checkpoint once, minutes against the hours of training that wrote it.
"""
import os
import sys

from maskprune.dist import log, stage_argv_parser
from maskprune.prune_job import build_pruned_model, job_from_checkpoint
from maskprune.stage import StageRun, run_stage


def main() -> int:
    args = stage_argv_parser(__doc__).parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # N copies would write the same staging folder at once and leave N-1 accelerators idle.
        raise ValueError("the export stage runs as one process: start it with `python "
                         "pipeline/stage_export.py` (or `maskprune run`), not under deepspeed/torchrun/srun")
    run = StageRun("export", args.run_dir)
    checkpoints = run.upstream("continued_pretrain", "checkpoints")
    tag = run.upstream("continued_pretrain", "final_tag")
    final = run.dir / "model"
    report = build_pruned_model(job_from_checkpoint(checkpoints, tag), final, run.cfg.export.prune_config(),
                                progress=sys.stderr.isatty())
    log(f"export: {checkpoints}/{tag} -> {final} ({report['params_after']:,} parameters, "
        f"check max |diff| {report['max_abs_diff']})")
    run.finish({"model": str(final), "report": str(final / "prune_report.json"),
                "checkpoint": report["origin"]["checkpoint"]})
    return 0


if __name__ == "__main__":
    run_stage(main)
