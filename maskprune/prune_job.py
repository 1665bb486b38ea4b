"""One hard-prune job, from whichever input, to a checked, published HF folder with its report.

Inputs: a source HF folder + keep indices (+ PEFT LoRA folder) — the run directory's way — or any
ZeRO-3 checkpoint of this project (mask_learn: frozen base from its model_dir, LoRA and masks from
the checkpoint; continued_pretrain: the already pruned model's weights from the checkpoint).
The output folder appears under its final name only once written, checked and reported.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskprune.arch import LlamaShape
from maskprune.config import HardPruneConfig
from maskprune.equivalence import check_blocks, check_full
from maskprune.export import (ExportError, WeightSource, full_keep, plan_export, with_compensation,
                              write_export)
from maskprune.lora_merge import LoraAdapter, lora_scale
from maskprune.masks_io import KeepIndices, load_keep_indices
from maskprune.reconstruction import CorrectedSource
from maskprune.rundir import atomic_write_json
from maskprune.safetensors_io import SafetensorsDir
from maskprune.stage import publish_dir, staging_dir
from maskprune.zero_checkpoint import ZeroCheckpoint, read_meta, resolve_tag_dir


class EquivalenceError(ExportError):
    """The pruned model does not reproduce the masked dense model within tolerance."""


@dataclass
class PruneJob:
    source: WeightSource
    config: dict[str, Any]        # the source's config.json
    keep: KeepIndices | None      # None: consolidate without pruning
    lora: LoraAdapter | None
    files_dir: Path               # tokenizer and generation config to copy
    origin: dict[str, Any] = field(default_factory=dict)


def corrected(source: WeightSource, config: dict[str, Any], keep: KeepIndices | None,
              reconstruction: Path | None) -> WeightSource:
    """`source` with mask_learn's least-squares corrections of the kept columns, if it made any."""
    if reconstruction is None:
        return source
    if keep is None:
        raise ValueError(f"{reconstruction}: corrections of kept columns, but no masks to apply them with")
    return CorrectedSource(source, reconstruction, keep, LlamaShape.from_hf_config(config).head_dim)


def job_from_model_dir(model_dir: str | Path, masks: str | Path | None, lora_dir: str | Path | None = None,
                       reconstruction: str | Path | None = None) -> PruneJob:
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    keep = load_keep_indices(Path(masks)) if masks else None
    return PruneJob(source=corrected(SafetensorsDir(model_dir), config, keep,
                                     Path(reconstruction) if reconstruction else None),
                    config=config, keep=keep,
                    lora=LoraAdapter.from_peft_dir(lora_dir) if lora_dir else None,
                    files_dir=model_dir,
                    origin={"model": str(model_dir), "masks": str(masks) if masks else None,
                            "lora": str(lora_dir) if lora_dir else None,
                            "reconstruction": str(reconstruction) if reconstruction else None})


def job_from_checkpoint(path: str | Path, tag: str | None = None) -> PruneJob:
    tag_dir = resolve_tag_dir(path, tag)
    meta = read_meta(tag_dir)
    base = SafetensorsDir(meta.model_dir)
    ckpt = ZeroCheckpoint(tag_dir, dtype_hint=base)
    lora = None
    if meta.lora:
        lora = LoraAdapter.from_names(ckpt.names(), ckpt.get, lora_scale(meta.lora["r"], meta.lora["alpha"]),
                                      where=str(tag_dir))
    # mask_learn trains only LoRA (and masks): its base weights are the frozen model_dir ones.
    config = json.loads((meta.model_dir / "config.json").read_text())
    keep = load_keep_indices(meta.masks) if meta.masks else None
    source = corrected(base, config, keep, meta.reconstruction) if meta.stage == "mask_learn" else ckpt
    return PruneJob(source=source, config=config, keep=keep, lora=lora,
                    files_dir=meta.model_dir,
                    origin={"checkpoint": str(tag_dir), "stage": meta.stage, "step": meta.step,
                            "model_dir": str(meta.model_dir),
                            "reconstruction": str(meta.reconstruction) if meta.reconstruction else None})


def build_pruned_model(job: PruneJob, final: Path, cfg: HardPruneConfig, progress: bool = True) -> dict:
    """Write, check and publish the pruned model at `final`; returns the report written beside it."""
    started = time.time()
    # With compensation the masked dense reference carries the same biases as the output.
    config, source = with_compensation(job.config, job.source, job.keep)
    plan = plan_export(config, job.keep, cfg.architecture)
    keep = job.keep if job.keep is not None else full_keep(LlamaShape.from_hf_config(config))
    tmp = staging_dir(final)
    try:
        shapes = write_export(plan, source, job.lora, tmp, cfg.shard_size_mb, cfg.dtype,
                              job.files_dir, progress)
        written = time.time()
        check: dict[str, Any] = {"mode": "skipped", "max_abs_diff": None}
        if cfg.equivalence_sequences > 0:
            args = (plan, config, source, job.lora, keep, cfg.dtype, tmp,
                    cfg.equivalence_sequences, cfg.equivalence_seq_len)
            if plan.params_before * 8 <= cfg.equivalence_full_max_mb << 20:  # fp64 reference
                check = {"mode": "logits", "max_abs_diff": check_full(*args)}
            else:
                diff, layers = check_blocks(*args, cfg.equivalence_layers)
                check = {"mode": "blocks", "layers": layers, "max_abs_diff": diff}
            if check["max_abs_diff"] > cfg.equivalence_tolerance:
                raise EquivalenceError(f"pruned model differs from the masked dense model by "
                                       f"{check['max_abs_diff']:.3g} > tolerance {cfg.equivalence_tolerance} "
                                       f"({check['mode']} check); nothing was published")
        report = {
            "origin": job.origin, "method": keep.method, "attn_mode": keep.attn_mode,
            "keep_digest": plan.keep_digest,
            # The source's own count: the plan's includes the zero biases compensation adds.
            "params_before": LlamaShape.from_hf_config(job.config).param_count(),
            "params_after": plan.params_after, "kept_layers": plan.kept_layers,
            "config": {k: plan.config[k] for k in LlamaShape.from_hf_config(plan.config).hf_overrides()},
            "architecture": plan.config["architectures"][0],
            "dtype": cfg.dtype, "lora_merged": job.lora is not None,
            "bias_compensation": sorted(keep.bias), "reconstruction": isinstance(job.source, CorrectedSource),
            "shapes": shapes,
            "equivalence": check, "max_abs_diff": check["max_abs_diff"],
            "seconds": {"write": round(written - started, 2), "check": round(time.time() - written, 2)},
        }
        atomic_write_json(tmp / "prune_report.json", report)
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed export leaves no folder behind
        raise
    return report
