"""What both training stages share: the ZeRO-3 model and engine, the LR schedule, checkpoints.

Checkpoints are complete or ignored: each tag folder gets a `COMPLETE` marker written last, and
`latest` is rewritten only after it, so a kill mid-write leaves a folder that resume skips.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from maskprune.config import TrainLoopConfig
from maskprune.data import BatchIterator, TokenShards, eval_batches
from maskprune.ds_json import read as read_ds_json, resolve as resolve_ds_json
from maskprune.dist import DistInfo, barrier, broadcast_from_rank0, log, rank
from maskprune.importance import eval_mode
from maskprune.rundir import atomic_write_json, atomic_write_text, disk_bytes, human_bytes, path_inside
from maskprune.safe_load import refusal_explained, tensors_only
from maskprune.watchdog import WATCHDOG

if TYPE_CHECKING:
    from maskprune.metrics import MetricWriter

COMPLETE_MARKER = "COMPLETE"
META_FILE = "maskprune_meta.json"
UNIVERSAL_DIR = "universal"  # root/universal/<tag>: a checkpoint re-laid for any world size (universal.py)
DEV_SCORE = "dev_ppl_geomean"  # a checkpoint's dev score, in its metadata (maskprune.dev_texts)
DEV_TEXT_TAG = "loss/dev_ppl/"  # + a dev text's label: its perplexity at each eval step (score_dev)
TB_UNSAFE = re.compile(r"[^\w./-]")  # what a text label ("britannica:dev") may not carry into a tag


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed as asked; the message says what to do instead."""


class CheckpointSpaceError(CheckpointError):
    """No room for the next checkpoint, even without the ones its rotation removes; raised before
    anything of it is written, so the newest complete checkpoint stays whole."""


# A ZeRO checkpoint holds, per trainable parameter, the fp32 master copy and Adam's two moments
# (measured: 12.0 bytes per parameter on the tiny test models, model and RNG files aside).
CHECKPOINT_BYTES_PER_PARAM = 12
ROOM_MARGIN = 1.05  # the small files beside the optimizer states, filesystem blocks


def trainable_parameters(engine: Any) -> int:
    """Trainable parameters of the whole model (ds_numel: the full size of a ZeRO-3 partitioned one)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters() if p.requires_grad)


def load_ds_config(path: str | Path, train: TrainLoopConfig) -> dict[str, Any]:
    """The DeepSpeed JSON at `path` (ds_json.resolve), with_experiment_numbers."""
    return with_experiment_numbers(read_ds_json(resolve_ds_json(path)), train)


def with_experiment_numbers(ds: dict[str, Any], train: TrainLoopConfig) -> dict[str, Any]:
    """A DeepSpeed JSON with the batch, clipping and optimizer numbers of the experiment file written
    in, so the TOML is the one place a user sets them."""
    ds = json.loads(json.dumps(ds))
    ds.pop("train_batch_size", None)
    ds["train_micro_batch_size_per_gpu"] = train.micro_batch_size
    ds["gradient_accumulation_steps"] = train.grad_accum
    ds["gradient_clipping"] = train.grad_clip
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    optimizer.setdefault("params", {}).update(lr=train.lr, weight_decay=train.weight_decay)
    # DeepSpeed's fused / CPU Adam JIT-compile for minutes; torch's AdamW is what runs everywhere.
    optimizer["params"].setdefault("torch_adam", True)
    return ds


def model_dtype(ds: dict[str, Any]) -> torch.dtype:
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def build_zero3_model(model_dir: str | Path, ds: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    """A Llama partitioned across ranks as it is built (zero.Init) and filled from its safetensors
    files slice by slice (`zero_load`), so no rank ever holds more than its partition and one
    tensor's slice: a 70B never materialises on a rank. Keep the returned HfDeepSpeedConfig alive
    for as long as the model is used (transformers checks it for ZeRO-3)."""
    from transformers.integrations import HfDeepSpeedConfig

    from maskprune.zero_load import build_partitioned_model, load_into_partitions, open_checkpoint

    weights = open_checkpoint(Path(model_dir))  # a bad folder fails before the model is built
    hf_ds = HfDeepSpeedConfig(ds)
    with WATCHDOG.guard(f"model load {model_dir}"):  # load_into_partitions also pets it per tensor
        model = build_partitioned_model(Path(model_dir), ds, model_dtype(ds))
        load_into_partitions(model, weights)
    return model, hf_ds


def prepare_for_training(model: torch.nn.Module, activation_checkpointing: bool) -> None:
    """Train mode, no KV cache and, when asked, non-reentrant activation checkpointing of every
    decoder layer: the one way both training stages set a model up before `init_engine`.

    from_pretrained returns the model in eval mode, where HF's layers skip checkpointing without a
    word, so train mode is set here (Llama has no dropout: the losses are those of eval mode).
    HF checkpoints each layer's `forward`, not `__call__`: in backward the layer's submodules run
    their forward again, hooks included, so the hooks on o_proj / down_proj (masks) and on the
    projections (LoRA) must be, and are, pure functions of the switches and the scores at call
    time. ZeRO-3's own submodule hooks gather the parameters again for the recomputation; dropout
    (LoRA's) replays the same mask because checkpoint restores the RNG state."""
    model.config.use_cache = False
    model.train()
    if activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        layers = sum(bool(getattr(m, "gradient_checkpointing", False)) for m in model.model.layers)
        log(f"activation checkpointing: {layers} decoder layers recompute their forward in backward")


GPU_DS_CONFIG = "ds_configs/zero3_gpu_bf16.json"


def precision_warning(stage: str, ds: dict[str, Any], gpu: bool) -> str | None:
    """What to tell a GPU run whose ds_config trains in fp32 (the default, made for CPU ranks): on
    GPU that is twice the memory of bf16 and a fraction of its speed. We warn rather than switch, so
    the experiment file stays the record of what ran."""
    if not gpu or model_dtype(ds) != torch.float32:
        return None
    return (f"{stage}: warning: CUDA is present but the ds_config trains in fp32 (neither bf16 nor fp16 "
            f"enabled; the CPU default); on GPUs set {stage}.ds_config = \"{GPU_DS_CONFIG}\"")


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    progress = min(1.0, (step - warmup) / max(total - warmup, 1))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@WATCHDOG.guard("DeepSpeed engine init")
def init_engine(model: torch.nn.Module, params: list[torch.nn.Parameter], ds: dict[str, Any],
                train: TrainLoopConfig):
    import deepspeed

    def scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, train.warmup_steps, train.steps))

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds,
                                           lr_scheduler=scheduler)
    return engine


# ----------------------------------------------------------------------------- checkpoints

def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int:
    return int(tag.removeprefix("step"))


class Checkpointer:
    """DeepSpeed checkpoints under `root`, with per-rank RNG, our metadata and a completeness marker.
    With `keep_best`, rotation also keeps the checkpoint with the lowest dev score (`best`)."""

    def __init__(self, root: Path, keep_last: int, keep_best: bool = False, run_root: Path | None = None):
        self.root = Path(root)
        self.keep_last = max(1, keep_last)
        self.keep_best = keep_best
        self.run_root = Path(run_root) if run_root is not None else None

    def _portable(self, meta: dict[str, Any], folder: Path) -> dict[str, Any]:
        """`meta` as a checkpoint records it: paths inside the run directory relative to the
        checkpoint (zero_checkpoint.read_meta joins them to it), so the run directory can move as a
        whole; paths outside it (a source model elsewhere) stay absolute."""
        def record(value: Any) -> Any:
            if self.run_root is not None and path_inside(value, self.run_root) is not None:
                return os.path.relpath(value, folder)
            return str(value) if isinstance(value, Path) else value
        return {key: record(value) for key, value in meta.items()}

    def complete_tags(self) -> list[str]:
        if not self.root.is_dir():
            return []
        tags = [p.name for p in self.root.glob("step*") if (p / COMPLETE_MARKER).is_file()]
        return sorted(tags, key=step_of)

    def latest(self) -> str | None:
        tags = self.complete_tags()
        return tags[-1] if tags else None

    def dev_scores(self) -> dict[str, float]:
        """{tag: dev score} of the complete checkpoints that have one (saved at an eval step)."""
        metas = {tag: json.loads((self.root / tag / META_FILE).read_text()) for tag in self.complete_tags()}
        return {tag: meta[DEV_SCORE] for tag, meta in metas.items() if DEV_SCORE in meta}

    def rotated_out(self) -> list[str]:
        """The complete checkpoints a save removes: all but the last keep_last and (keep_best) the best."""
        best = self.best() if self.keep_best else None
        return [tag for tag in self.complete_tags()[:-self.keep_last] if tag != best]

    def best(self) -> str | None:
        """The complete checkpoint with the lowest dev score, the earliest of equals. Rotation never
        removes it (keep_best), so it is the best of every checkpoint this run has saved."""
        scores = self.dev_scores()
        return min(scores, key=lambda tag: (scores[tag], step_of(tag)), default=None)

    def make_room(self, engine: Any, step: int) -> None:
        """Before the checkpoint of `step` is written, and when training starts: the free space under
        root must hold one as large as the newest complete checkpoint (or, before the first, the
        estimate from the trainable parameters). Where it does not, what would go anyway goes first:
        folders of killed saves, then the checkpoints this save's rotation removes, never the newest
        complete one or the best. Where that is not enough, every rank raises CheckpointSpaceError
        before writing anything: at the start rather than at the first save an hour later, and
        never a save that dies half-way on a full disk."""
        problem = (self._free_room(CHECKPOINT_BYTES_PER_PARAM * trainable_parameters(engine), step)
                   if rank() == 0 else None)
        problem = broadcast_from_rank0(problem)
        if problem is not None:
            raise CheckpointSpaceError(problem)

    def _free_room(self, estimate: int, step: int) -> str | None:
        """Rank 0's part of make_room: None when there is room (after removals), else the error."""
        self.root.mkdir(parents=True, exist_ok=True)
        complete = self.complete_tags()
        newest = disk_bytes(self.root / complete[-1]) if complete else 0
        need = ROOM_MARGIN * max(estimate, newest)
        free = shutil.disk_usage(self.root).free
        if free >= need:
            return None
        kept = set(complete[-max(1, self.keep_last - 1):]) | ({self.best()} if self.keep_best else set())
        killed = [p.name for p in sorted(self.root.glob("step*")) if p.is_dir() and p.name not in complete]
        for tag in killed + [tag for tag in complete if tag not in kept]:
            shutil.rmtree(self.root / tag, ignore_errors=True)
            shutil.rmtree(self.root / UNIVERSAL_DIR / tag, ignore_errors=True)
            free = shutil.disk_usage(self.root).free
            log(f"WARNING: removed {self.root / tag} before the checkpoint of step {step} rather than after it: "
                f"{human_bytes(free)} free now, a checkpoint takes ~{human_bytes(need)}")
            if free >= need:
                return None
        basis = (f"the size of {complete[-1]}" if newest >= estimate else
                 f"{CHECKPOINT_BYTES_PER_PARAM} bytes per trainable parameter")
        fixes = "free space there or move the run directory to a larger filesystem"
        if self.keep_last > 2:
            fixes += f", or lower train.keep_last (now {self.keep_last})"
        return (f"{self.root}: {human_bytes(free)} free, and the checkpoint of step {step} needs "
                f"~{human_bytes(need)} ({basis}); kept: {', '.join(sorted(kept & set(complete))) or 'none'}. "
                f"Nothing was written; {fixes}, then rerun (resume = \"auto\" continues from the newest checkpoint)")

    @WATCHDOG.guard("checkpoint save")
    def save(self, engine: Any, step: int, train_iter: BatchIterator, meta: dict[str, Any],
             tensors: dict[str, torch.Tensor] | None = None, exclude_frozen: bool = False,
             rank0_extra: Callable[[Path], None] | None = None) -> Path:
        """Everything a bit-exact resume needs: engine (weights, optimizer, schedule), the global
        data position, every rank's RNG, and the caller's extra tensors. `rank0_extra(folder)` writes
        further files of the checkpoint on rank 0, before the completeness marker."""
        client_state = {"step": step, "data": train_iter.state_dict()}
        tag = tag_for(step)
        folder = self.root / tag
        if rank() == 0 and folder.exists():
            shutil.rmtree(folder)  # an incomplete leftover of a killed save of this same step
        self.make_room(engine, step)
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=exclude_frozen)
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["torch_cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(folder / f"rng_rank{rank():05d}.safetensors"))
        if rank() == 0:
            if tensors:
                save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                          str(folder / "maskprune_state.safetensors"))
            atomic_write_json(folder / META_FILE, {**self._portable(meta, folder), "step": step, "world_size": _world(),
                                                   "train_batch_size": engine.train_batch_size()})
            if rank0_extra is not None:
                rank0_extra(folder)
        barrier()
        if rank() == 0:
            atomic_write_text(folder / COMPLETE_MARKER, f"{step}\n")
            atomic_write_text(self.root / "latest", tag)
            for old in self.rotated_out():
                shutil.rmtree(self.root / old, ignore_errors=True)
                shutil.rmtree(self.root / UNIVERSAL_DIR / old, ignore_errors=True)
        barrier()
        return folder

    def resume(self, engine: Any, train_iter: BatchIterator, mode: str,
               stage: str) -> tuple[int, dict[str, torch.Tensor]] | None:
        """Restore the newest complete checkpoint when resume = "auto": returns (step, tensors).
        Rank 0 picks the tag: on a shared filesystem ranks can list the folder differently while a
        save is under way, and ranks that loaded different steps would silently diverge."""
        tag = broadcast_from_rank0(self.latest() if mode == "auto" and rank() == 0 else None)
        if tag is None:
            return None
        client, tensors = self.load(engine, tag)
        train_iter.load_state_dict(client["data"])
        log(f"{stage}: resumed from {self.root / tag} at step {client['step']}")
        return int(client["step"]), tensors

    @WATCHDOG.guard("checkpoint load")
    def load(self, engine: Any, tag: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        folder = self.root / tag
        if not (folder / COMPLETE_MARKER).is_file():
            raise CheckpointError(f"{folder}: incomplete checkpoint (no {COMPLETE_MARKER}); "
                                  "resume picks the newest complete one")
        written = json.loads((folder / META_FILE).read_text()).get("world_size", _world())
        tensors_only()  # DeepSpeed's loaders unpickle with weights_only=False (maskprune.safe_load)
        with refusal_explained(folder):
            if written == _world():
                client_state = self._load_engine(engine, self.root, tag)
                rng = load_file(str(folder / f"rng_rank{rank():05d}.safetensors"))
                torch.set_rng_state(rng["torch_cpu"])
                if "torch_cuda" in rng and torch.cuda.is_available():
                    torch.cuda.set_rng_state(rng["torch_cuda"])
            else:
                client_state = self._load_resharded(engine, folder, written)
        state_path = folder / "maskprune_state.safetensors"
        tensors = load_file(str(state_path)) if state_path.is_file() else {}
        return client_state, tensors

    @staticmethod
    def _load_engine(engine: Any, root: Path, tag: str) -> dict[str, Any]:
        _, client_state = engine.load_checkpoint(str(root), tag=tag, load_module_strict=False)
        if client_state is None:
            raise CheckpointError(f"{root / tag}: DeepSpeed could not load this checkpoint")
        return client_state

    def _load_resharded(self, engine: Any, folder: Path, written: int) -> dict[str, Any]:
        """A checkpoint of `written` ranks on this run's world size, through its universal form
        (maskprune/universal.py); each rank's RNG reseeded from (seed, step, rank)."""
        from maskprune.universal import convert_on_rank0

        universal = convert_on_rank0(folder)
        log(f"{folder}: written by {written} ranks, resuming on {_world()}: loading its universal form "
            f"{universal}; RNG reseeded per rank, losses continue within fp tolerance, not bit-identically")
        # DeepSpeed reads the flag at load time; only this load takes the universal path.
        engine._config.load_universal_checkpoint = True
        try:
            client_state = self._load_engine(engine, universal.parent, universal.name)
        finally:
            engine._config.load_universal_checkpoint = False
        entropy = [client_state["data"]["seed"], client_state["step"], rank()]
        torch.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
        return client_state


# ----------------------------------------------------------------------------- validation

@torch.no_grad()
def validation_loss(engine: Any, valid: TokenShards, batch_size: int, max_batches: int,
                    device: torch.device) -> float:
    """Mean next-token loss over the first `max_batches` global batches of `valid`, averaged over
    every rank's batches so all ranks return the same number."""
    total, count = 0.0, 0
    for batch in eval_batches(valid, batch_size, rank(), _world(), max_batches):
        batch = batch.to(device)
        total += engine(input_ids=batch, labels=batch).loss.item()
        count += 1
        WATCHDOG.pet("validation batch")
    # On the device: NCCL reduces only GPU tensors.
    values = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
    return values[0].item() / max(values[1].item(), 1.0)


def mean_over_ranks(values: dict[str, float | torch.Tensor], device: torch.device) -> dict[str, float]:
    """Each value averaged over ranks (float64): a logged loss is the whole global batch's, the same
    however the batch is split over ranks, so a resume on another world size continues the curve."""
    names = sorted(values)
    # On the device: NCCL reduces only GPU tensors.
    stacked = torch.stack([torch.as_tensor(values[n], dtype=torch.float64, device=device) for n in names])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(stacked)
        stacked /= _world()
    return dict(zip(names, stacked.cpu().tolist()))


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


# Tests only: seconds each training step sleeps, so a test can run a stage longer than the watchdog's
# timeout without thousands of steps.
TEST_STEP_DELAY_S = float(os.environ.get("MASKPRUNE_TEST_STEP_DELAY_S", "0"))


@dataclass(kw_only=True)
class TrainingLoop:
    """The step loop both training stages share: resume, train, log, validate, checkpoint, report
    progress, stop on request. A stage adds its own fields and supplies `stage`, `train_cfg`,
    `train_step()`, `save()`, `restore()`, `log_line(stats)`; `before_step()` /
    `after_validation()` are optional."""

    stage: ClassVar[str]
    dist: DistInfo
    engine: Any
    train_iter: BatchIterator
    valid: TokenShards
    checkpointer: Checkpointer
    meta: dict[str, Any]  # what the run trains from, written into every checkpoint
    tb_dir: Path
    progress_path: Path
    step: int = 0
    writer: MetricWriter | None = None
    # {text label: [n, seq_len] windows} scored at every eval step (maskprune.dev_texts); the last
    # score, (step, geomean), goes into the checkpoint of that step (checkpoint_meta).
    dev: dict[str, torch.Tensor] = field(default_factory=dict)
    dev_score: tuple[int, float] | None = None

    @property
    def train_cfg(self) -> TrainLoopConfig:
        raise NotImplementedError

    def before_step(self) -> None:
        pass

    def after_validation(self) -> None:
        pass

    def checkpoint_meta(self) -> dict[str, Any]:
        """What this step's checkpoint records besides the weights: the run's meta and, when the dev
        texts were scored at this step, that score (what select = "best_dev" chooses by)."""
        if self.dev_score is not None and self.dev_score[0] == self.step:
            return {**self.meta, DEV_SCORE: self.dev_score[1]}
        return self.meta

    def score_dev(self) -> None:
        from maskprune.dev_texts import dev_perplexity

        scores = dev_perplexity(self.engine, self.dev, self.train_cfg.micro_batch_size, self.dist.rank,
                                self.dist.world_size, self.dist.device)
        geomean = scores.pop("geomean")
        self.writer.scalars({"loss/dev_ppl_geomean": geomean,
                             **{DEV_TEXT_TAG + TB_UNSAFE.sub("_", label): ppl for label, ppl in scores.items()}},
                            self.step)
        log(f"{self.stage} step {self.step}: dev ppl geomean {geomean:.3f} ("
            + ", ".join(f"{label} {ppl:.3f}" for label, ppl in scores.items()) + ")")
        self.dev_score = (self.step, geomean)

    def run(self, stop: Any) -> bool:
        """Train to the last step; False if stopped early on request (after a checkpoint)."""
        from maskprune.metrics import MetricWriter, memory_metrics

        train = self.train_cfg
        self.restore()
        if self.step < train.steps:
            every = train.checkpoint_every
            self.checkpointer.make_room(self.engine, min(train.steps, (self.step // every + 1) * every))
        # Events past this step came from a run cut short before its next checkpoint: drop them, so
        # curves continue instead of overlapping (also when no checkpoint existed yet).
        self.writer = MetricWriter(self.tb_dir, purge_step=self.step + 1)
        while self.step < train.steps:
            WATCHDOG.pet(f"{self.stage} after step {self.step}")
            if TEST_STEP_DELAY_S:
                time.sleep(TEST_STEP_DELAY_S)
            self.before_step()
            stats = self.train_step()
            self.step += 1
            last = self.step == train.steps
            if self.step % train.log_every == 0 or last:
                stats.update(memory_metrics())
                self.writer.scalars(stats, self.step)
                log(f"{self.stage} step {self.step}/{train.steps} {self.log_line(stats)}")
            if self.step % train.eval_every == 0 or last:
                # Eval mode: LoRA's dropout (mask_learn.lora.dropout) must not drop the inputs it scores.
                with eval_mode(self.engine.module):
                    valid = validation_loss(self.engine, self.valid, train.micro_batch_size,
                                            train.eval_batches, self.dist.device)
                    ppl = math.exp(min(valid, 50))
                    self.writer.scalars({"loss/valid": valid, "loss/valid_ppl": ppl}, self.step)
                    log(f"{self.stage} step {self.step}: valid loss {valid:.4f} ppl {ppl:.2f}")
                    if self.dev:
                        self.score_dev()
                self.after_validation()
            stopping = stop.should_stop()
            if self.step % train.checkpoint_every == 0 or last or stopping:
                self.writer.flush()  # events up to the checkpoint survive a kill right after it
                self.save()
            if self.dist.is_rank0:
                atomic_write_json(self.progress_path, {"step": self.step, "steps": train.steps})
            if stopping and not last:
                log(f"{self.stage}: stop requested; checkpoint at step {self.step} saved, exiting")
                self.writer.close()
                return False
        self.writer.close()
        return True
