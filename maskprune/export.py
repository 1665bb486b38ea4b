"""Keep indices (+ LoRA) → a plain, uniform HF checkpoint of the source's family, one tensor at a time.

Which tensors a family has, which carry biases and which class the pruned model is written as come
from maskprune.families (a pruned Llama whose head count LlamaConfig rejects is written as
MistralForCausalLM: the same tensors and computation with the sliding window off).

`plan_export` decides every output tensor's source, row/column indices and shape from the config
and keep indices alone (so it also runs for 70B configs on paper); `write_export` streams: read one
source tensor (memory-mapped), merge its LoRA delta, slice, cast, append to the open shard.
`build_pruned_model` wraps that in a staging folder, the equivalence check and the report, and
publishes only a complete, checked folder. Keep indices with bias compensation (FLAP) go through
`with_compensation` first: the source then reads as a Llama with biases, and everything after it
(plan, export, equivalence check) handles those biases like any others.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from maskprune.arch import LlamaShape, ShapeError, check_loadable, written_architecture
from maskprune.families import ATTN_PROJ, FAMILIES, MLP_PROJ, Architecture, family_of
from maskprune.families.llama import compensation_config
from maskprune.lora_merge import LoraAdapter
from maskprune.masks_io import KeepIndices, head_channels
from maskprune.safetensors_io import ShardedWriter
from maskprune.watchdog import WATCHDOG

COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
                "added_tokens.json", "chat_template.jinja")
# Buffers some old checkpoints carry; the model recomputes them from the rope parameters.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
DTYPE_BY_NAME = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(ValueError):
    """Keep indices or weights that cannot become a uniform checkpoint; the message says why."""


class WeightSource(Protocol):
    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def get(self, name: str) -> torch.Tensor: ...


@dataclass(frozen=True)
class TensorSpec:
    name: str                  # output name (layers renumbered)
    source: str                # source tensor name
    shape: tuple[int, ...]     # output shape
    source_shape: tuple[int, ...]
    rows: torch.Tensor | None  # kept indices of dim 0, None = all
    cols: torch.Tensor | None  # kept indices of dim 1, None = all


@dataclass
class ExportPlan:
    config: dict[str, Any]
    specs: list[TensorSpec]
    params_before: int
    params_after: int
    keep_digest: str
    kept_layers: list[int] = field(default_factory=list)
    source_names: set[str] = field(default_factory=set)  # every tensor the source must hold


def full_keep(shape: LlamaShape) -> KeepIndices:
    """Keep everything: the plan of a plain consolidation (continued-pretrain checkpoints)."""
    layers = shape.num_hidden_layers
    return KeepIndices(q_heads=torch.arange(shape.num_attention_heads).repeat(layers, 1),
                       kv_heads=torch.arange(shape.num_key_value_heads).repeat(layers, 1),
                       ffn=torch.arange(shape.intermediate_size).repeat(layers, 1),
                       method="none", attn_mode="query_per_group")


def keep_digest(keep: KeepIndices) -> str:
    """sha256 of the kept indices, so a report ties a checkpoint to the exact masks it came from."""
    digest = hashlib.sha256()
    for name in ("q_heads", "kv_heads", "ffn", "hidden", "layers"):
        value = getattr(keep, name)
        if value is not None:
            digest.update(name.encode() + str(list(value.shape)).encode())
            digest.update(value.to(torch.int64).contiguous().numpy().tobytes())
    for name, value in sorted(keep.bias.items()):  # compensation changes the weights written too
        digest.update(f"bias.{name}".encode() + value.float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _check_keep(keep: KeepIndices, shape: LlamaShape) -> None:
    keep.validate()
    limits = {"q_heads": shape.num_attention_heads, "kv_heads": shape.num_key_value_heads,
              "ffn": shape.intermediate_size}
    for name, limit in limits.items():
        value = getattr(keep, name)
        if value.shape[0] != shape.num_hidden_layers or int(value.max()) >= limit or int(value.min()) < 0:
            raise ExportError(f"keep.{name}: {tuple(value.shape)} with values up to {int(value.max())} "
                              f"does not fit the source ({shape.num_hidden_layers} layers, {limit} units)")
    for name, limit in (("hidden", shape.hidden_size), ("layers", shape.num_hidden_layers)):
        value = getattr(keep, name)
        if value is not None and (value.dim() != 1 or not bool((value[1:] > value[:-1]).all())
                                  or int(value.max()) >= limit or int(value.min()) < 0):
            raise ExportError(f"keep.{name}: must be sorted unique indices below {limit}")
    for name, value in keep.bias.items():
        if tuple(value.shape) != (shape.num_hidden_layers, shape.hidden_size):
            raise ExportError(f"bias.{name}: {tuple(value.shape)}, but the source has "
                              f"{shape.num_hidden_layers} layers of hidden size {shape.hidden_size}")
    n_q, n_kv = keep.q_heads.shape[1], keep.kv_heads.shape[1]
    if n_q % n_kv:
        raise ExportError(f"keep indices give {n_q} query heads over {n_kv} KV heads: not a whole GQA group")
    # The pruned model serves its query head j from its KV head j // g'; that must be the KV head
    # the source served it from (h // g), or slicing would silently rewire attention.
    served = keep.q_heads // shape.group_size
    wanted = keep.kv_heads.repeat_interleave(n_q // n_kv, dim=1)
    if not torch.equal(served, wanted):
        layer = int((served != wanted).any(dim=1).nonzero()[0])
        raise ExportError(f"keep indices of layer {layer}: kept query heads {keep.q_heads[layer].tolist()} "
                          f"are not served by the kept KV heads {keep.kv_heads[layer].tolist()} in "
                          "uniform groups; use keep_from_scores in either GQA mode")


def plan_export(config: dict[str, Any], keep: KeepIndices | None, architecture: Architecture = "auto") -> ExportPlan:
    """Every output tensor and the new config, from the source config and keep indices alone."""
    family = family_of(config)
    src = LlamaShape.from_hf_config(config)
    keep = keep if keep is not None else full_keep(src)
    _check_keep(keep, src)
    if keep.hidden is not None and family.scaled_embedding:
        raise ExportError(f"keep.hidden: {family.architecture} scales its embeddings by sqrt(hidden_size), "
                          "so cutting hidden channels changes what every kept channel computes; prune "
                          "heads, FFN channels and layers only")
    hd = src.head_dim
    hidden = keep.hidden
    d_out = src.hidden_size if hidden is None else len(hidden)
    layers = list(range(src.num_hidden_layers)) if keep.layers is None else keep.layers.tolist()
    new_shape = src.replace(hidden_size=d_out, num_hidden_layers=len(layers),
                            num_attention_heads=keep.q_heads.shape[1],
                            num_key_value_heads=keep.kv_heads.shape[1],
                            intermediate_size=keep.ffn.shape[1])
    written = written_architecture(new_shape, architecture)
    check_loadable(new_shape, written)

    specs: list[TensorSpec] = []

    def add(out: str, source: str, rows: torch.Tensor | None, cols: torch.Tensor | None,
            full: tuple[int, ...]) -> None:
        shape = (len(rows) if rows is not None else full[0],
                 *((len(cols) if cols is not None else full[1],) if len(full) > 1 else ()))
        specs.append(TensorSpec(out, source, shape, full, rows, cols))

    d, n_q, n_kv, inter = src.hidden_size, src.num_attention_heads, src.num_key_value_heads, src.intermediate_size
    add("model.embed_tokens.weight", "model.embed_tokens.weight", None, hidden, (src.vocab_size, d))
    for new, old in enumerate(layers):
        p, s = f"model.layers.{new}.", f"model.layers.{old}."
        q, kv, ffn = head_channels(keep.q_heads[old], hd), head_channels(keep.kv_heads[old], hd), keep.ffn[old].long()
        # (weight rows, weight cols, full shape) per projection; a bias is sliced like the rows.
        cuts = {"q_proj": (q, hidden, (n_q * hd, d)), "k_proj": (kv, hidden, (n_kv * hd, d)),
                "v_proj": (kv, hidden, (n_kv * hd, d)), "o_proj": (hidden, q, (d, n_q * hd)),
                "gate_proj": (ffn, hidden, (inter, d)), "up_proj": (ffn, hidden, (inter, d)),
                "down_proj": (hidden, ffn, (d, inter))}
        for norm in family.layer_norms:
            add(p + f"{norm}.weight", s + f"{norm}.weight", hidden, None, (d,))
        for proj, (rows, cols, full) in cuts.items():
            name = family.proj_name(proj)
            add(p + f"{name}.weight", s + f"{name}.weight", rows, cols, full)
            if proj in src.biases:
                add(p + f"{name}.bias", s + f"{name}.bias", rows, None, full[:1])
        for norm in family.head_norms:  # one head_dim vector shared by every head: kept whole
            name = f"{family.attn}.{norm}.weight"
            add(p + name, s + name, None, None, (hd,))
    add("model.norm.weight", "model.norm.weight", hidden, None, (d,))
    if not src.tie_word_embeddings:
        add("lm_head.weight", "lm_head.weight", None, hidden, (src.vocab_size, d))

    new_config = dict(config)
    new_config.update(new_shape.hf_overrides())
    if isinstance(config.get("layer_types"), list):
        new_config["layer_types"] = [config["layer_types"][i] for i in layers]
    new_config = FAMILIES[written].output_config(new_config)
    return ExportPlan(config=new_config, specs=specs, params_before=src.param_count(),
                      params_after=sum(_numel(s.shape) for s in specs), keep_digest=keep_digest(keep),
                      kept_layers=layers, source_names=_source_names(src))


def hf_config(config: dict[str, Any]):
    """The transformers config object of a config.json dict (any supported family)."""
    return family_of(config).hf_config(config)


def _source_names(src: LlamaShape) -> set[str]:
    family = FAMILIES[src.family]
    suffixes = [f"{norm}.weight" for norm in family.layer_norms]
    suffixes += [f"{family.attn}.{norm}.weight" for norm in family.head_norms]
    for proj in ATTN_PROJ + MLP_PROJ:
        name = family.proj_name(proj)
        suffixes += [f"{name}.weight"] + ([f"{name}.bias"] if proj in src.biases else [])
    names = {f"model.layers.{i}.{s}" for i in range(src.num_hidden_layers) for s in suffixes}
    return names | {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}


class CompensatedSource:
    """`source` read as a Llama with `attention_bias` and `mlp_bias`: the q/k/v/gate/up biases it
    lacks are zeros (HF's flags add them along with the o_proj/down_proj biases the compensation
    needs), and the o_proj/down_proj biases are its own (or zeros) plus the compensation."""

    def __init__(self, source: WeightSource, config: dict[str, Any], bias: dict[str, torch.Tensor]):
        shape = LlamaShape.from_hf_config(config)
        widths = {"self_attn.q_proj": shape.num_attention_heads * shape.head_dim,
                  "self_attn.k_proj": shape.num_key_value_heads * shape.head_dim,
                  "self_attn.v_proj": shape.num_key_value_heads * shape.head_dim,
                  "self_attn.o_proj": shape.hidden_size, "mlp.gate_proj": shape.intermediate_size,
                  "mlp.up_proj": shape.intermediate_size, "mlp.down_proj": shape.hidden_size}
        self.source = source
        self._own = set(source.names())
        self._width = {f"model.layers.{layer}.{proj}.bias": width
                       for layer in range(shape.num_hidden_layers) for proj, width in widths.items()}
        self._added = {f"model.layers.{layer}.{module}.{name}.bias": value[layer]
                       for name, value in bias.items() for layer in range(shape.num_hidden_layers)
                       for module in ("self_attn", "mlp") if f"{module}.{name}" in widths}

    def names(self) -> list[str]:
        return sorted(self._own | set(self._width))

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(name) if name in self._own else (self._width[name],)

    def dtype(self, name: str) -> torch.dtype:
        # A bias the source lacks takes its weight's dtype, so dtype = "source" stays uniform.
        return self.source.dtype(name if name in self._own else name.removesuffix("bias") + "weight")

    def get(self, name: str) -> torch.Tensor:
        own = self.source.get(name) if name in self._own else torch.zeros(self._width[name])
        added = self._added.get(name)
        return own if added is None else own.float() + added.float()


def with_compensation(config: dict[str, Any], source: WeightSource,
                      keep: KeepIndices | None) -> tuple[dict[str, Any], WeightSource]:
    """The config and source to export from: unchanged, or with keep's bias compensation."""
    if keep is None or not keep.bias:
        return config, source
    if family_of(config).name != "llama":
        raise ShapeError(f"the masks carry FLAP's bias compensation ({', '.join(sorted(keep.bias))}), which "
                         f"{family_of(config).architecture} has no bias fields for; prune it without "
                         "compensation (mask_learn.method = 'wanda_sp' or another method)")
    return compensation_config(config), CompensatedSource(source, config, keep.bias)


def merged_weight(source: WeightSource, lora: LoraAdapter | None, name: str) -> torch.Tensor:
    """The source tensor with its LoRA delta merged (in fp32 when there is one)."""
    weight = source.get(name)
    delta = lora.delta(name) if lora is not None else None
    return weight if delta is None else weight.float() + delta


def slice_tensor(weight: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    if spec.rows is not None:
        weight = weight.index_select(0, spec.rows)
    if spec.cols is not None:
        weight = weight.index_select(1, spec.cols)
    return weight


def output_dtype(dtype: str, source: WeightSource, name: str) -> torch.dtype:
    return source.dtype(name) if dtype == "source" else DTYPE_BY_NAME[dtype]


def check_source(plan: ExportPlan, source: WeightSource) -> None:
    """Every tensor the plan needs, with the shape the config promises; nothing unexplained.
    (A tied checkpoint may store lm_head.weight anyway; that copy is dropped.)"""
    names = set(source.names())
    missing = sorted({s.source for s in plan.specs} - names)
    extra = sorted(n for n in names - plan.source_names if not n.endswith(IGNORED_SUFFIXES))
    if missing or extra:
        raise ExportError(f"source weights do not match config.json: missing {missing[:5]}, "
                          f"unexpected {extra[:5]}; is this checkpoint the one config.json describes?")
    for spec in plan.specs:
        if tuple(source.shape(spec.source)) != spec.source_shape:
            raise ExportError(f"{spec.source}: shape {tuple(source.shape(spec.source))} in the weights, "
                              f"{spec.source_shape} in config.json")


def write_export(plan: ExportPlan, source: WeightSource, lora: LoraAdapter | None, out_dir: Path,
                 shard_size_mb: int, dtype: str, files_dir: Path | None, progress: bool = True) -> dict:
    """Stream the planned tensors into `out_dir`; returns the shapes written."""
    check_source(plan, source)
    dtypes = {s.name: output_dtype(dtype, source, s.source) for s in plan.specs}
    writer = ShardedWriter(out_dir, [(s.name, s.shape, dtypes[s.name]) for s in plan.specs],
                           shard_size_mb << 20)
    for spec in tqdm(plan.specs, desc="export", unit="tensor", disable=not progress):
        writer.write(spec.name, slice_tensor(merged_weight(source, lora, spec.source), spec)
                     .to(dtypes[spec.name]).contiguous())
        WATCHDOG.pet("export: a tensor written")  # a 70B export outlasts any hang timeout
    writer.close()
    config = dict(plan.config)
    config["dtype"] = str(dtypes["model.embed_tokens.weight"]).removeprefix("torch.")
    config.pop("torch_dtype", None)  # the old name of the same field; one source of truth
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if files_dir is not None:
        for name in COPIED_FILES:
            if (files_dir / name).is_file():
                shutil.copy2(files_dir / name, out_dir / name)
    return {s.name: list(s.shape) for s in plan.specs}


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def dry_run(plan: ExportPlan) -> int:
    """Every slice on meta tensors and the pruned model built on the meta device: proves the
    export path's shapes for configs far too big to hold (70B) in seconds; returns its parameters."""
    from transformers import AutoModelForCausalLM

    for spec in plan.specs:
        meta = TensorSpec(spec.name, spec.source, spec.shape, spec.source_shape,
                          *(i.to("meta") if i is not None else None for i in (spec.rows, spec.cols)))
        out = slice_tensor(torch.empty(spec.source_shape, device="meta"), meta)
        if tuple(out.shape) != spec.shape:
            raise ExportError(f"{spec.name}: slicing gives {tuple(out.shape)}, planned {spec.shape}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(plan.config))
    loaded = {name: tuple(p.shape) for name, p in model.named_parameters()}
    planned = {spec.name: spec.shape for spec in plan.specs}
    if loaded != planned:
        raise ExportError(f"transformers builds {sorted(set(loaded) ^ set(planned))[:5]} differently "
                          "from the plan")
    return sum(p.numel() for p in model.parameters())
