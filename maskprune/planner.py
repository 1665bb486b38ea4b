"""Memory planner and meta-device dry run: will a run fit, and what shape comes out, before a cluster
is spent on it.

    maskprune plan --config configs/llama3-70b.toml [--model llama-3-70b] [--json]
    maskprune plan --model llama-2-70b --nodes 4 --gpus-per-node 8 [--offload optimizer] [--json]
    maskprune plan --model path/to/config.json --dry-run --sparsity 0.5

With --config, every setting comes from the experiment file (per stage: micro-batch, activation
checkpointing, offload implied by its ds_config; LoRA rank, seq_len, target, nodes × GPUs); flags
given on the command line override it.

Parameters are counted on the meta device (DeepSpeed's `estimate_zero3_model_states_mem_needs_all_live`
reads `numel()` of ZeRO-partitioned tensors and is wrong there); model-state bytes then use
DeepSpeed's `estimate_zero3_model_states_mem_needs`. Activations use the formula of `block_activation_bytes`.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from maskprune.arch import (LlamaShape, admissible, attn_unit_count, budget_for_sparsity,
                            check_loadable, lattice_for, resolve_attn_mode, shape_for, written_architecture)
from maskprune.config import ContinuedPretrainConfig, ExperimentConfig, MaskLearnConfig
from maskprune.export import hf_config
from maskprune.families import ATTN_PROJ, FAMILIES, MLP_PROJ, FamilyError
from maskprune.losses import LOSS_CHUNK_TOKENS
from maskprune.masks_io import keep_from_scores

Offload = Literal["none", "optimizer", "param"]
BF16 = 2  # bytes per weight/activation element in the runs we plan (ZeRO-3 bf16)
FP32 = 4
LORA_TARGETS = ATTN_PROJ + MLP_PROJ  # the default: an adapter on every projection

# Published configs, built in code so planning needs no download (model_type: maskprune.families).
PRESETS: dict[str, dict] = {
    "llama-2-70b": dict(model_type="llama", vocab_size=32000, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, intermediate_size=28672, max_position_embeddings=4096,
                        rope_theta=10000.0, rms_norm_eps=1e-5),
    "llama-3-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, intermediate_size=28672, max_position_embeddings=8192,
                        rope_theta=500000.0, rms_norm_eps=1e-5),
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, max_position_embeddings=8192,
                       rope_theta=500000.0, rms_norm_eps=1e-5),
    "llama-2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, intermediate_size=11008, max_position_embeddings=4096,
                       rope_theta=10000.0, rms_norm_eps=1e-5),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True),
    "mistral-7b": dict(model_type="mistral", vocab_size=32768, hidden_size=4096, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=14336,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-5,
                       sliding_window=None),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "qwen3-8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=12288,
                     max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "gemma-3-270m": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=640, num_hidden_layers=18,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=256, intermediate_size=2048,
                         max_position_embeddings=32768, query_pre_attn_scalar=256, sliding_window=512,
                         sliding_window_pattern=6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                          "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
}

# The preset of each model.source that names one published model.
SOURCE_PRESETS = {"smollm2": "smollm2-135m", "gemma3_270m": "gemma-3-270m"}


class PlanError(ValueError):
    """A model name or config the planner cannot use; the message says what it accepts."""


def load_model_config(name_or_path: str) -> PretrainedConfig:
    if name_or_path in PRESETS:
        return hf_config(PRESETS[name_or_path])
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise PlanError(f"--model {name_or_path}: neither a preset ({', '.join(PRESETS)}) nor a "
                        "config.json / model directory")
    raw = json.loads(path.read_text())
    try:
        return hf_config(raw)
    except FamilyError as err:
        raise PlanError(f"{path}: {err}") from None


# ----------------------------------------------------------------------------- meta-device counts

@dataclass(frozen=True)
class ParamCount:
    total: int
    largest_module: int  # DeepSpeed's "largest layer": most parameters one module holds directly
    largest_block: int   # one decoder layer: what a layer-at-a-time pass holds


def meta_model(config: PretrainedConfig) -> torch.nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count_params(model: torch.nn.Module) -> ParamCount:
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    block = max(sum(p.numel() for p in layer.parameters()) for layer in model.get_decoder().layers)
    return ParamCount(total=sum(p.numel() for p in model.parameters()), largest_module=largest,
                      largest_block=block)


# ----------------------------------------------------------------------------- dry run

@dataclass
class DryRun:
    source_params: int
    pruned_params: int
    attn_units: int
    ffn_width: int
    pruned_shape: dict[str, int]
    attn_mode: str      # target.attn_mode after `auto` is resolved
    architecture: str   # the class the pruned model is written as
    family: str         # ... and its family (maskprune.families)
    prunable_sparsity: float  # fraction of attention + FFN weights removed
    seconds: float


def pruned_config(config: PretrainedConfig, pruned: LlamaShape, written: str) -> PretrainedConfig:
    return hf_config(FAMILIES[written].output_config({**config.to_dict(), **pruned.hf_overrides()}))


def plan_dry_run(config: PretrainedConfig, sparsity: float, attn_mode: str = "auto",
                 ffn_alignment: int = 64, architecture: str = "auto") -> DryRun:
    """The shape logic of a run without data: admissible target at `sparsity` (both types cut by the
    same fraction first, then fitted to the budget), the keep-index export applied to meta weights,
    and the pruned model built on the meta device and checked against it."""
    start = time.perf_counter()
    source = meta_model(config)
    shape = LlamaShape.from_hf_config(config)
    counted = count_params(source).total
    if counted != shape.param_count():
        raise PlanError(f"meta model has {counted} parameters but arch.LlamaShape counts "
                        f"{shape.param_count()}; the config has parts the planner does not model")
    attn_mode = resolve_attn_mode(shape, attn_mode)  # as the mask_learn stage resolves it
    shape = shape.replace(lattice=lattice_for(shape, architecture, biased=False))
    units, width = admissible(shape, (1 - sparsity) * attn_unit_count(shape, attn_mode),
                              (1 - sparsity) * shape.intermediate_size,
                              budget_for_sparsity(shape, sparsity), attn_mode, ffn_alignment)
    pruned = shape_for(shape, units, width, attn_mode)
    written = written_architecture(pruned, architecture)
    check_loadable(pruned, written)
    target = meta_model(pruned_config(config, pruned, written))
    _check_export(source, target, shape, units, width, attn_mode)
    pruned_total = count_params(target).total
    return DryRun(source_params=counted, pruned_params=pruned_total, attn_units=units, ffn_width=width,
                  pruned_shape=pruned.hf_overrides(), attn_mode=attn_mode,
                  architecture=FAMILIES[written].architecture, family=written,
                  prunable_sparsity=1 - pruned.prunable_params() / shape.prunable_params(),
                  seconds=time.perf_counter() - start)


def _check_export(source: torch.nn.Module, target: torch.nn.Module, shape: LlamaShape, units: int,
                  width: int, mode: str) -> None:
    """Slice every source projection by keep indices (as hard-prune does) and compare with the
    pruned model's shapes; meta tensors make this free."""
    layers = shape.num_hidden_layers
    keep = keep_from_scores(torch.rand(layers, attn_unit_count(shape, mode)),
                            torch.rand(layers, shape.intermediate_size), shape, units, width, mode, "dry_run")
    hd = shape.head_dim
    family = FAMILIES[shape.family]
    for index, (src, dst) in enumerate(zip(source.model.layers, target.model.layers)):
        sa, mlp = family.attn_module(src), family.mlp_module(src)
        q_rows = (keep.q_heads[index].unsqueeze(1) * hd + torch.arange(hd)).flatten()
        kv_rows = (keep.kv_heads[index].unsqueeze(1) * hd + torch.arange(hd)).flatten()
        ffn = keep.ffn[index]
        sliced = {
            family.proj_name("q_proj"): sa.q_proj.weight.index_select(0, q_rows),
            family.proj_name("k_proj"): sa.k_proj.weight.index_select(0, kv_rows),
            family.proj_name("v_proj"): sa.v_proj.weight.index_select(0, kv_rows),
            family.proj_name("o_proj"): sa.o_proj.weight.index_select(1, q_rows),
            family.proj_name("gate_proj"): mlp.gate_proj.weight.index_select(0, ffn),
            family.proj_name("up_proj"): mlp.up_proj.weight.index_select(0, ffn),
            family.proj_name("down_proj"): mlp.down_proj.weight.index_select(1, ffn),
        }
        for name, tensor in sliced.items():
            expected = dst.get_submodule(name).weight.shape
            if tensor.shape != expected:
                raise PlanError(f"layer {index} {name}: export gives {tuple(tensor.shape)}, "
                                f"pruned model expects {tuple(expected)}")


# ----------------------------------------------------------------------------- memory plan

@dataclass
class StageSettings:
    """What a training stage sets for itself: its micro-batch, checkpointing, offload (its ds_config)
    and whether it distills from the dense model's logits (distill.kl_weight > 0) and final hidden
    states (distill.hidden_weight > 0; mask-learn only)."""

    micro_batch: int = 1
    checkpointing: bool = True
    offload: Offload = "none"
    distill: bool = False
    distill_hidden: bool = False

    def __post_init__(self) -> None:
        if self.micro_batch < 1:
            raise PlanError(f"--micro-batch: must be >= 1, got {self.micro_batch}")


@dataclass
class PlanSettings:
    nodes: int = 1
    gpus_per_node: int = 8
    seq_len: int = 4096
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lora_dropout: float = 0.0
    sparsity: float = 0.5
    attn_mode: str = "auto"
    ffn_alignment: int = 64
    architecture: str = "auto"
    reconstruction: bool = False  # mask_learn.reconstruction
    # Micro-batches of calibration hidden states its pass holds per rank (each of mask_learn's
    # micro-batch): mask_learn.reconstruction_batches × grad_accum.
    reconstruction_micro_batches: int = MaskLearnConfig.reconstruction_batches
    # The stages' defaults: mask-learn distills (kl_weight 1), continued pretraining does not (0).
    mask_learn: StageSettings = field(default_factory=lambda: StageSettings(distill=True))
    continued_pretrain: StageSettings = field(default_factory=StageSettings)

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node", "seq_len", "ffn_alignment"):
            if getattr(self, name) < 1:
                raise PlanError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        if self.lora_rank < 1 or not 0.0 < self.sparsity < 1.0 or not 0.0 <= self.lora_dropout < 1.0:
            raise PlanError(f"--lora-rank must be >= 1, --sparsity in (0, 1) and --lora-dropout in [0, 1); "
                            f"got {self.lora_rank}, {self.sparsity}, {self.lora_dropout}")
        unknown = [proj for proj in self.lora_targets if proj not in LORA_TARGETS]
        if unknown or not self.lora_targets:
            raise PlanError(f"LoRA targets {list(self.lora_targets)}: name one or more of {', '.join(LORA_TARGETS)}")

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class Item:
    name: str
    gpu_bytes: int       # per GPU
    cpu_node_bytes: int  # per node (host memory)
    formula: str


@dataclass
class StagePlan:
    stage: str
    items: list[Item] = field(default_factory=list)

    def gpu_bytes(self) -> int:
        return sum(i.gpu_bytes for i in self.items)

    def cpu_node_bytes(self) -> int:
        return sum(i.cpu_node_bytes for i in self.items)


# What CUDA's fused dropout keeps for backward besides its output: a bool mask, 1 byte per element.
# (CPU's unfused dropout keeps a noise tensor of the input's dtype instead: 2 bytes in bf16.)
DROPOUT_MASK_BYTES = 1


def lora_input_width(shape: LlamaShape, proj: str) -> int:
    """Elements per token of what a LoRA target reads: the normed hidden state for q/k/v and gate/up,
    the (masked) attention output for o_proj, the (masked) FFN product for down_proj."""
    return {"o_proj": shape.num_attention_heads * shape.head_dim,
            "down_proj": shape.intermediate_size}.get(proj, shape.hidden_size)


# Projections that read the same tensor: one LoRA input saved per group, unless dropout gives each
# adapter its own copy.
LORA_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def block_activation_bytes(shape: LlamaShape, masked: bool = False, lora_rank: int = 0,
                           lora_targets: tuple[str, ...] = LORA_TARGETS, lora_dropout: bool = False,
                           dropout_mask_bytes: int = DROPOUT_MASK_BYTES) -> int:
    """Bytes per token one bf16 decoder layer keeps for backward (SDPA: no T² score matrix), as
    torch's saved-tensor hooks count them on real layers (tests/test_planner.py).

    Full-parameter training (continued pretraining): each RMSNorm keeps its fp32 input, the bf16
    normalized input its weight's gradient needs and its bf16 output (8h per norm) and one fp32
    scalar; q, k, v in head layout and the attention output (4·n_q·d + 4·n_kv·d), the log-sum-exp
    (4·n_q); gate, up, act(gate) and their product (8·I).
    The mask-learn student (frozen weights, masks, LoRA on `lora_targets`): a frozen norm keeps only
    its fp32 input (4h per norm); the FFN's four [T, I] tensors as above. Each adapter keeps its
    r-wide intermediate (2r) and its input, once per group of projections that read the same tensor
    (the normed state for q/k/v and for gate/up: 2h each; the masked attention output for o_proj:
    2·n_q·d; the masked FFN product for down_proj: 2·I). With LoRA dropout every adapter keeps its
    own dropped copy (2 B per element) and dropout's mask instead of the shared input."""
    h, q, kv, d, i = (shape.hidden_size, shape.num_attention_heads, shape.num_key_value_heads,
                      shape.head_dim, shape.intermediate_size)
    per_token = 4 * q * d + 4 * kv * d + 4 * q + 2 * FP32
    if not masked:
        return per_token + 16 * h + 8 * i
    adapter_inputs = 0
    for group in LORA_INPUT_GROUPS:
        adapted = [proj for proj in group if proj in lora_targets]
        if adapted:
            width = lora_input_width(shape, group[0])
            adapter_inputs += (len(adapted) * (BF16 + dropout_mask_bytes) if lora_dropout else BF16) * width
    return per_token + 8 * h + 8 * i + adapter_inputs + len(lora_targets) * BF16 * lora_rank


def activation_item(shape: LlamaShape, s: PlanSettings, stage: StageSettings, masked: bool) -> Item:
    """The decoder layers' activations: the dense model's for continued pretraining, the mask-learn
    student's (`masked`, with the settings' LoRA) for mask-learn."""
    tokens = stage.micro_batch * s.seq_len
    per_token = (block_activation_bytes(shape, True, s.lora_rank, s.lora_targets, s.lora_dropout > 0)
                 if masked else block_activation_bytes(shape))
    block = per_token * tokens
    boundaries = shape.num_hidden_layers * tokens * shape.hidden_size * BF16
    full = shape.num_hidden_layers * block
    if stage.checkpointing:
        return Item("activations (checkpointing)", boundaries + block, 0,
                    f"L·B·T·h·2 layer inputs + one layer recomputed ({per_token} B/token); "
                    f"without checkpointing {full / 2**30:.1f} GiB")
    return Item("activations (no checkpointing)", full, 0,
                f"L·B·T·{per_token} B; with checkpointing {(boundaries + block) / 2**30:.1f} GiB")


# Peak of the loss path (maskprune.losses) in B·T·V fp32 tensors, measured with torch's memory
# profiler (tests/test_planner.py): the bf16 logits and their gradient (1), plus one chunk's fp32
# work per chunk fraction f = LOSS_CHUNK_TOKENS / (B·T), at most 1: 2.5·f for CE alone (log-softmax,
# its recomputation in backward, the gradient), 5.5·f with distillation at a temperature other than
# 1 (the default; the teacher's log-softmax and its exp, the student's softened log-softmax). Without
# chunking the loss path held 3 (CE) and 7.5 (distillation) copies; the plan had counted 2 and 3.
CE_CHUNK_COPIES = 2.5
DISTILL_CHUNK_COPIES = 5.5


def loss_path_copies(tokens: int, distill: bool) -> float:
    fraction = min(1.0, LOSS_CHUNK_TOKENS / tokens)
    return 1.0 + (DISTILL_CHUNK_COPIES if distill else CE_CHUNK_COPIES) * fraction


def logits_item(shape: LlamaShape, s: PlanSettings, stage: StageSettings, name: str, copies: float) -> Item:
    size = int(stage.micro_batch * s.seq_len * shape.vocab_size * FP32 * copies)
    return Item(name, size, 0, f"B·T·V·4 fp32 × {copies:g}")


# Peak bytes per element of the final hidden states (B·T·h) of hidden-state distillation
# (maskprune.losses.hidden_mse and its backward), measured with torch's memory profiler
# (tests/test_planner.py): the teacher's bf16 normed states, fp32 copies of both (kept for backward),
# the MSE's work and the gradient in fp32 and bf16.
HIDDEN_DISTILL_BYTES = 18


def loss_items(shape: LlamaShape, s: PlanSettings, stage: StageSettings, teacher: str) -> list[Item]:
    tokens = stage.micro_batch * s.seq_len
    hidden = [Item("hidden-state distillation (fp32 MSE, grads)", HIDDEN_DISTILL_BYTES * tokens * shape.hidden_size,
                   0, f"B·T·h × {HIDDEN_DISTILL_BYTES} B")] if stage.distill_hidden else []
    if not stage.distill:
        return [logits_item(shape, s, stage, "logits, chunked CE loss, grads", loss_path_copies(tokens, False)),
                *hidden]
    return [logits_item(shape, s, stage, "student logits, chunked CE and distillation, grads",
                        loss_path_copies(tokens, True)),
            logits_item(shape, s, stage, f"teacher logits (bf16, {teacher})", 0.5), *hidden]


def dense_weight_items(counts: ParamCount, s: PlanSettings, stage: StageSettings, weights: str,
                       layers: str) -> list[Item]:
    """The dense model's frozen bf16 weights, ZeRO-3 partitioned (in host memory with parameter
    offload), and the two layers gathered at a time (current + prefetched)."""
    frozen = 2 * counts.total // s.gpus
    offload = stage.offload == "param"
    return [Item(f"{weights} (bf16, ZeRO-3 partitioned)", 0 if offload else frozen,
                 frozen * s.gpus_per_node if offload else 0, f"2·{counts.total:,} / {s.gpus} GPUs"),
            Item(f"{layers} (current + prefetched)", 2 * counts.largest_block * BF16, 0,
                 f"2 × {counts.largest_block:,} params × 2 B")]


def teacher_forward_item(shape: LlamaShape, s: PlanSettings, stage: StageSettings) -> Item:
    return Item("teacher forward (no_grad, one layer live)",
                block_activation_bytes(shape) * stage.micro_batch * s.seq_len, 0,
                "one layer's activations, freed layer by layer")


# bf16 ZeRO-3 with torch's AdamW on an H200 (benchmarks/README, bench_gpu --memory-breakdown): at rest
# 20 B per parameter where DeepSpeed's estimate counts 18 (the fp32 gradient partition the optimizer
# reads stays allocated beside the bf16 one); during the step 8 B more (torch's foreach AdamW makes
# two fp32 temporaries the size of the partition). With the optimizer offloaded both are host memory.
STATES_BYTES_UNCOUNTED = 2
ADAMW_STEP_TEMPORARY_BYTES = 8


def model_states(params: int, largest: int, s: PlanSettings, stage: StageSettings, name: str) -> Item:
    """DeepSpeed's ZeRO-3 estimate (bf16 params + grads, fp32 master + Adam = 18 B/param, partitioned;
    GPU also holds the largest module gathered in fp32; CPU includes its 1.5× buffer factor), plus the
    fp32 gradient partition it leaves out when the optimizer runs on the GPU."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        params, largest, num_gpus_per_node=s.gpus_per_node, num_nodes=s.nodes,
        cpu_offload=stage.offload != "none", cpu_offload_params=stage.offload == "param", zero_init=True)
    uncounted = STATES_BYTES_UNCOUNTED * params // s.gpus if stage.offload == "none" else 0
    formula = f"estimate_zero3_model_states_mem_needs({params:,} params, offload={stage.offload})"
    if uncounted:
        formula += f" + {STATES_BYTES_UNCOUNTED} B/param fp32 gradient"
    return Item(name, int(gpu) + uncounted, int(cpu), formula)


def optimizer_step_item(params: int, s: PlanSettings, stage: StageSettings, backward: list[Item]) -> Item:
    """The AdamW step's temporaries, counted only where they exceed what backward held (activations,
    logits): those are freed before the step, so the stage's peak is the larger of the two."""
    temporaries = ADAMW_STEP_TEMPORARY_BYTES * params // s.gpus if stage.offload == "none" else 0
    held = sum(item.gpu_bytes for item in backward)
    return Item("AdamW step temporaries beyond backward's", max(0, temporaries - held), 0,
                f"{ADAMW_STEP_TEMPORARY_BYTES} B/param fp32 ({temporaries / 2**30:.2f} GiB) less the "
                f"{held / 2**30:.2f} GiB of activations and logits freed before the step")


def reconstruction_items(shape: LlamaShape, pruned: LlamaShape, s: PlanSettings, stage: StageSettings,
                         backward: list[Item]) -> list[Item]:
    """mask_learn.reconstruction: its corrections (one o_proj- and one down_proj-sized bf16 matrix per
    layer, ZeRO-3 partitioned like the frozen weights), and the least-squares pass at hardening, which
    holds this rank's calibration hidden states (bf16, one copy: importance._advance) and per projection
    H (fp32, C²), the kept block and its Cholesky factor (fp64, 2k²), the right-hand side and solution
    (fp64, 2·k·d) and three fp32 d×C matrices (weight, residual, residual·H); counted only beyond what
    a training step's activations and logits hold, as it runs between steps."""
    d = shape.hidden_size
    sequences = s.reconstruction_micro_batches * stage.micro_batch
    hidden = BF16 * sequences * s.seq_len * d
    widths = {"attn": (shape.num_attention_heads * shape.head_dim, pruned.num_attention_heads * shape.head_dim),
              "ffn": (shape.intermediate_size, pruned.intermediate_size)}
    corrections = BF16 * shape.num_hidden_layers * d * sum(width for width, _ in widths.values()) // s.gpus
    offload = stage.offload == "param"

    def pass_bytes(width: int, kept: int) -> int:
        return FP32 * width * width + 8 * 2 * kept * kept + 8 * 2 * kept * d + FP32 * 3 * d * width

    projection = max(pass_bytes(*w) for w in widths.values())
    peak = projection + hidden
    held = sum(item.gpu_bytes for item in backward)
    return [Item("reconstruction corrections (bf16, ZeRO-3 partitioned)", 0 if offload else corrections,
                 corrections * s.gpus_per_node if offload else 0,
                 f"2 B × {shape.num_hidden_layers} layers × {d} × (o_proj + down_proj inputs) / {s.gpus} GPUs"),
            Item("reconstruction pass at hardening, beyond a step's", max(0, peak - held), 0,
                 f"largest projection: {projection / 2**30:.2f} GiB (H fp32, kept block fp64, d × C fp32) "
                 f"+ {hidden / 2**30:.2f} GiB of calibration hidden states ({sequences} × "
                 f"{s.seq_len} tokens × {d} × 2 B) less the {held / 2**30:.2f} GiB of activations and "
                 "logits a step holds")]


def lora_params(config: PretrainedConfig, rank: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """r·(in + out) per target projection per layer (A [r, in], B [out, r])."""
    model = meta_model(config)
    layer = model.model.layers[0]
    per_layer = sum(rank * (m.in_features + m.out_features)
                    for name, m in layer.named_modules() if name.split(".")[-1] in targets)
    return per_layer * config.num_hidden_layers


def plan_memory(config: PretrainedConfig, s: PlanSettings) -> tuple[list[StagePlan], DryRun]:
    shape = LlamaShape.from_hf_config(config)
    counts = count_params(meta_model(config))
    dry = plan_dry_run(config, s.sparsity, s.attn_mode, s.ffn_alignment, s.architecture)
    target = hf_config(FAMILIES[dry.family].output_config({**config.to_dict(), **dry.pruned_shape}))
    pruned = LlamaShape.from_hf_config(target)
    pruned_counts = count_params(meta_model(target))
    ml, cpt = s.mask_learn, s.continued_pretrain
    units = attn_unit_count(shape, dry.attn_mode)
    mask_floats = 2 * shape.num_hidden_layers * (units + shape.intermediate_size)  # value + grad
    dual_floats = 2 * shape.num_hidden_layers + 1 + 2                              # per-layer, budget, targets
    lora = lora_params(config, s.lora_rank, s.lora_targets)
    ml_backward = [activation_item(shape, s, ml, masked=True),
                   *loss_items(shape, s, ml, "same weights, masks off"), teacher_forward_item(shape, s, ml)]
    mask_learn = StagePlan("mask_learn", [
        *dense_weight_items(counts, s, ml, "frozen weights", "gathered layers"),
        model_states(lora, 0, s, ml, "LoRA params, grads, Adam"),
        Item("masks + duals (fp32, replicated)", (mask_floats + dual_floats) * FP32, 0,
             "L·(U + I) scores and grads, 2L + 3 duals/targets"),
        *ml_backward, optimizer_step_item(lora, s, ml, ml_backward),
        *(reconstruction_items(shape, pruned, s, ml, ml_backward) if s.reconstruction else []),
    ])
    cpt_backward = [activation_item(pruned, s, cpt, masked=False),
                    *loss_items(pruned, s, cpt, "the dense model")]
    teacher: list[Item] = []
    if cpt.distill:
        # The dense model as a second, optimizer-less ZeRO-3 engine (pretrain.build_teacher).
        teacher = dense_weight_items(counts, s, cpt, "dense teacher weights", "teacher's gathered layers")
        cpt_backward.append(teacher_forward_item(shape, s, cpt))
    continued = StagePlan("continued_pretrain", [
        model_states(pruned_counts.total, pruned_counts.largest_module, s, cpt,
                     f"model states of the pruned model ({pruned_counts.total:,} params)"),
        *cpt_backward, *teacher, optimizer_step_item(pruned_counts.total, s, cpt, cpt_backward),
    ])
    source_block = counts.largest_block * BF16
    hard_prune = StagePlan("hard_prune", [
        Item("largest layer + its pruned copy (bf16, one process)", 0,
             int(source_block * (2 - dry.prunable_sparsity)),
             f"{counts.largest_block:,} params × 2 B × (1 + kept fraction)"),
    ])
    return [mask_learn, continued, hard_prune], dry


def plan_report(config: PretrainedConfig, s: PlanSettings) -> dict:
    stages, dry = plan_memory(config, s)
    return {"settings": asdict(s), "dry_run": asdict(dry),
            "stages": {p.stage: {"gpu_bytes_per_gpu": p.gpu_bytes(),
                                 "gpu_bytes_per_node": p.gpu_bytes() * s.gpus_per_node,
                                 "cpu_bytes_per_node": p.cpu_node_bytes(),
                                 "items": [asdict(i) for i in p.items]} for p in stages}}


def format_report(report: dict) -> str:
    gib = lambda b: f"{b / 2**30:9.2f}"  # noqa: E731
    dry, s = report["dry_run"], report["settings"]
    targets = "" if tuple(s["lora_targets"]) == LORA_TARGETS else f" on {','.join(s['lora_targets'])}"
    dropout = f", dropout {s['lora_dropout']:g}" if s["lora_dropout"] else ""
    lines = [f"{s['nodes']} node(s) × {s['gpus_per_node']} GPUs, {s['seq_len']}-token sequences, "
             f"LoRA r={s['lora_rank']}{targets}{dropout}"]
    lines += [f"{stage}: micro-batch {s[stage]['micro_batch']}, activation checkpointing "
              f"{'on' if s[stage]['checkpointing'] else 'off'}, offload={s[stage]['offload']}"
              for stage in ("mask_learn", "continued_pretrain")]
    lines += [
             f"source {dry['source_params']:,} params → pruned {dry['pruned_params']:,} at sparsity "
             f"{s['sparsity']} ({dry['attn_units']} attention units, {dry['ffn_width']} FFN channels "
             f"per layer)", "",
             f"{'stage / item':58s} {'GiB/GPU':>9s} {'GiB/node':>9s} {'CPU/node':>9s}"]
    for stage, plan in report["stages"].items():
        for item in plan["items"]:
            lines.append(f"  {item['name'][:56]:56s} {gib(item['gpu_bytes'])} "
                         f"{gib(item['gpu_bytes'] * s['gpus_per_node'])} {gib(item['cpu_node_bytes'])}")
        lines.append(f"{stage + ' total':58s} {gib(plan['gpu_bytes_per_gpu'])} "
                     f"{gib(plan['gpu_bytes_per_node'])} {gib(plan['cpu_bytes_per_node'])}")
    lines += ["", "formulas (per GPU unless noted):"]
    lines += [f"  {stage}: {item['name']}: {item['formula']}"
              for stage, plan in report["stages"].items() for item in plan["items"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- from an experiment file

def offload_of(ds: dict) -> Offload:
    """What a DeepSpeed config offloads to host memory (or NVMe): parameters (and with them the
    optimizer), the optimizer only, or nothing."""
    zero = ds.get("zero_optimization", {})
    if zero.get("offload_param", {}).get("device", "none") != "none":
        return "param"
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        return "optimizer"
    return "none"


def settings_from_config(cfg: ExperimentConfig) -> PlanSettings:
    """The planner's settings as the experiment file sets them for each stage."""
    from maskprune.training import load_ds_config

    def stage(section: MaskLearnConfig | ContinuedPretrainConfig) -> StageSettings:
        return StageSettings(micro_batch=section.train.micro_batch_size,
                             checkpointing=section.activation_checkpointing,
                             offload=offload_of(load_ds_config(section.ds_config, section.train)),
                             distill=section.distill.kl_weight > 0,
                             distill_hidden=section.distill.hidden_weight > 0)

    return PlanSettings(nodes=cfg.launcher.num_nodes, gpus_per_node=cfg.launcher.num_gpus,
                        seq_len=cfg.data.seq_len, lora_rank=cfg.mask_learn.lora.rank,
                        lora_targets=tuple(cfg.mask_learn.lora.targets), lora_dropout=cfg.mask_learn.lora.dropout,
                        sparsity=cfg.target.sparsity, attn_mode=cfg.target.attn_mode,
                        ffn_alignment=cfg.target.ffn_alignment, architecture=cfg.hard_prune.architecture,
                        reconstruction=cfg.mask_learn.reconstruction,
                        reconstruction_micro_batches=cfg.mask_learn.reconstruction_batches * cfg.mask_learn.train.grad_accum,
                        mask_learn=stage(cfg.mask_learn), continued_pretrain=stage(cfg.continued_pretrain))


def model_config_from(cfg: ExperimentConfig, where: str) -> PretrainedConfig:
    """The architecture an experiment file's model has, without needing its weights: the model's
    config.json where it is on this machine, else the preset the file names (plan.arch_preset)."""
    model = cfg.model
    if model.source == "tiny":
        from maskprune.model_source import tiny_config

        return tiny_config(model.tiny, model.tiny.vocab_size)
    if model.source in SOURCE_PRESETS:
        return load_model_config(SOURCE_PRESETS[model.source])
    if model.source == "hf" and (Path(model.path).expanduser() / "config.json").is_file():
        return load_model_config(str(Path(model.path).expanduser()))
    preset = cfg.plan.arch_preset
    if preset in PRESETS:
        return load_model_config(preset)
    if preset:
        raise PlanError(f"{where}: plan.arch_preset = {preset!r} is not a preset; use one of "
                        f"{', '.join(PRESETS)}")
    raise PlanError(f"{where}: no architecture to plan: model.path {model.path!r} ({model.source}) has no "
                    f"config.json on this machine; set plan.arch_preset to one of {', '.join(PRESETS)} "
                    "in the file, or pass --model PRESET or --model path/to/config.json")
