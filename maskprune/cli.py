"""`maskprune`: run a pipeline, show its status, reset a stage.

    maskprune run configs/tiny.toml --run-dir runs/tiny [--set mask_learn.train.steps=20] [--force]
    maskprune run configs/tiny.toml --run-dir runs/tiny --only mask_learn
    maskprune status runs/tiny [--json]
    maskprune reset runs/tiny mask_learn
    maskprune report runs/tiny
    maskprune plan --model llama-2-70b --nodes 4 --gpus-per-node 8 [--offload optimizer] [--dry-run]
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path

from maskprune.config import ConfigError, load_config
from maskprune.launcher import remove_shm_buffers, stage_command, stage_env, stop_file_path
from maskprune.rundir import STAGES, RunDir, RunDirError, plan
from maskprune.stage import preflight


class CliError(RuntimeError):
    pass


EXIT_STOPPED = 3  # a stop request (RUN/STOP, SIGUSR1, SIGTERM) ended the run; the same command resumes


def _arm_stop_signals(stop_file: Path) -> dict[int, object]:
    """SIGUSR1 / SIGTERM (a batch script's trap forwards them; Slurm signals every process of the
    job) write the stop file: the running stage checkpoints at its next step boundary, and no
    further stage starts. Returns the previous handlers."""
    def handler(signum: int, frame: object) -> None:
        stop_file.touch()

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGUSR1, signal.SIGTERM)}


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    run_dir = RunDir(args.run_dir or Path("runs") / cfg.name)
    until = STAGES.index(args.until) + 1 if args.until else len(STAGES)
    decisions = plan(run_dir, cfg, force=args.force)
    selected = decisions[:until]
    if args.only:
        index = STAGES.index(args.only)
        missing = [d.stage for d in decisions[:index] if d.action != "skip"]
        if missing:
            raise CliError(f"--only {args.only}: the stage(s) before it must be done first, but "
                           f"{', '.join(missing)} would run; run with --until {missing[-1]} first")
        selected = decisions[index:index + 1]
    refused = [d.stage for d in decisions if d.action == "refuse"]
    if refused:
        raise CliError(f"{run_dir.root}: the config of finished stage(s) {', '.join(refused)} differs "
                       "from the one this run was started with; pass --force to re-run them, or "
                       "use a new --run-dir")
    preflight(cfg, [d.stage for d in selected if d.action == "run"])
    run_dir.write_config(cfg)
    stop_file = stop_file_path(run_dir.root)
    stop_file.unlink(missing_ok=True)  # a stop request is for a running invocation, not the next one
    previous = _arm_stop_signals(stop_file)
    try:
        return _run_stages(run_dir, cfg, selected, stop_file)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _run_stages(run_dir: RunDir, cfg, selected: list, stop_file: Path) -> int:
    ran = 0
    for decision in selected:
        if decision.action == "skip":
            print(f"[maskprune] {decision.stage}: done, skipped")
            continue
        if stop_file.exists():
            print(f"[maskprune] stop requested ({stop_file}): {decision.stage} not started; run the "
                  "same command again to continue", flush=True)
            return EXIT_STOPPED
        print(f"[maskprune] {decision.stage}: running ({decision.reason})", flush=True)
        if decision.reason != "resume":
            run_dir.clear_stage(decision.stage)
        run_dir.mark_running(decision.stage, cfg)
        argv = stage_command(decision.stage, run_dir.root, cfg.launcher)
        code = subprocess.run(argv, env=stage_env(cfg.launcher, decision.stage)).returncode
        remove_shm_buffers(argv)
        state = run_dir.state(decision.stage)
        if code != 0 or state.status != "done":
            if stop_file.exists():
                run_dir.mark_failed(decision.stage, f"stopped on request (exit code {code})")
                print(f"[maskprune] {decision.stage}: stopped on request; run the same command again "
                      "to resume from its last checkpoint", flush=True)
                return EXIT_STOPPED
            run_dir.mark_failed(decision.stage, f"exit code {code}")
            raise CliError(f"stage {decision.stage} failed (exit code {code}); fix the cause and run "
                           f"the same command again to resume from its last checkpoint")
        ran += 1
    if ran == 0:
        print(f"[maskprune] nothing to do: every stage of {run_dir.root} is done")
    final = run_dir.final_checkpoint()
    if final:
        print(f"[maskprune] final checkpoint: {final}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    run_dir = RunDir(args.run_dir)
    summary = {"config": str(run_dir.config_path), **run_dir.summary()}
    run_dir.load_config()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for stage, info in summary["stages"].items():
        extra = f"  ({info['error']})" if info["error"] else ""
        print(f"{stage:20s} {info['status']}{extra}")
    print(f"final checkpoint: {summary['final_checkpoint'] or '-'}")
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    run_dir = RunDir(args.run_dir)
    run_dir.load_config()
    run_dir.reset(args.stage)
    print(f"[maskprune] {args.stage}: reset to pending; the next `maskprune run` re-runs it "
          "and the stages after it")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    # Imported here: planning pulls in transformers, which the other commands do not need.
    from dataclasses import asdict

    from maskprune.planner import PlanSettings, format_report, load_model_config, plan_dry_run, plan_report

    config = load_model_config(args.model)
    settings = PlanSettings(nodes=args.nodes, gpus_per_node=args.gpus_per_node, offload=args.offload,
                            micro_batch=args.micro_batch, seq_len=args.seq_len, lora_rank=args.lora_rank,
                            checkpointing=args.checkpointing, sparsity=args.sparsity,
                            attn_mode=args.attn_mode, ffn_alignment=args.ffn_alignment,
                            architecture=args.architecture)
    if args.dry_run:
        dry = asdict(plan_dry_run(config, args.sparsity, args.attn_mode, args.ffn_alignment, args.architecture))
        print(json.dumps(dry, indent=2) if args.json else
              "\n".join(f"{key:18s} {value}" for key, value in dry.items()))
        return 0
    report = plan_report(config, settings)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from maskprune.report import write_report  # matplotlib / tensorboard only for this command

    _, summary = write_report(Path(args.run_dir))
    print(summary)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskprune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) the pipeline of an experiment file")
    run.add_argument("config", help="experiment TOML, e.g. configs/tiny.toml")
    run.add_argument("--run-dir", help="run directory (default runs/<name>)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field, e.g. mask_learn.train.steps=20 (repeatable)")
    run.add_argument("--force", action="store_true", help="re-run finished stages whose config changed")
    which = run.add_mutually_exclusive_group()
    which.add_argument("--until", choices=STAGES, help="stop after this stage")
    which.add_argument("--only", choices=STAGES,
                       help="run just this stage (the ones before it must be done), e.g. from "
                            "launch/stage.sbatch")
    run.set_defaults(func=cmd_run)
    status = sub.add_parser("status", help="show the stages of a run directory")
    status.add_argument("run_dir")
    status.add_argument("--json", action="store_true", help="machine-readable, with final_checkpoint")
    status.set_defaults(func=cmd_status)
    reset = sub.add_parser("reset", help="mark one stage pending so it and the ones after it re-run")
    reset.add_argument("run_dir")
    reset.add_argument("stage", choices=STAGES)
    reset.set_defaults(func=cmd_reset)
    planp = sub.add_parser("plan", help="per-GPU / per-node memory of each stage, or --dry-run the shape logic")
    planp.add_argument("--model", required=True,
                       help="preset (llama-2-70b, llama-3-70b, llama-2-7b, smollm2-135m) or a config.json / model dir")
    planp.add_argument("--nodes", type=int, default=1)
    planp.add_argument("--gpus-per-node", type=int, default=8)
    planp.add_argument("--offload", choices=["none", "optimizer", "param"], default="none")
    planp.add_argument("--micro-batch", type=int, default=1)
    planp.add_argument("--seq-len", type=int, default=4096)
    planp.add_argument("--lora-rank", type=int, default=8)
    planp.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                       help="plan activations without activation checkpointing")
    planp.add_argument("--sparsity", type=float, default=0.5, help="target.sparsity of the pruned model")
    planp.add_argument("--attn-mode", choices=["auto", "query_per_group", "kv_group"], default="auto",
                       help="target.attn_mode (auto: kv_group on MHA models, query_per_group on GQA)")
    planp.add_argument("--architecture", choices=["auto", "llama", "mistral"], default="auto",
                       help="hard_prune.architecture: auto writes Mistral where Llama rejects the head count")
    planp.add_argument("--ffn-alignment", type=int, default=64)
    planp.add_argument("--dry-run", action="store_true",
                       help="only build source and pruned model on the meta device and check the shapes")
    planp.add_argument("--json", action="store_true")
    planp.set_defaults(func=cmd_plan)
    report = sub.add_parser("report", help="write RUN/report.md with plots and print a short summary")
    report.add_argument("run_dir")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, RunDirError, CliError, FileNotFoundError, ValueError) as err:
        print(f"maskprune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
