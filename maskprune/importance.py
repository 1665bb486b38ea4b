"""One-shot unit-importance scores for the baselines: magnitude, Wanda-sp, FLAP, Taylor, random.

Every method returns the layout `keep_from_scores` takes: {"attn": [L, U], "ffn": [L, I]}, higher =
keep, U = query heads (query_per_group) or KV groups (kv_group), see `arch.attn_unit_count`.

Works on a plain HF Llama and on one partitioned by ZeRO-3, with or without a DeepSpeed engine
(without one, `_zero3_gathering` gathers one decoder layer at a time for the forward/backward):
- forward hooks only accumulate activation statistics (FLAP's compensation pass also replaces
  inputs); they never read weights, so they do not care whether DeepSpeed's release hook ran before them;
- statistics are sums (float64) all-reduced over ranks, so every rank derives identical scores and
  the result does not depend on how the calibration batches were split;
- weights are read after the pass, one layer at a time, inside `GatheredParameters`, which every rank
  enters in the same order (the same layers, the same modules).
Every rank must be given the same number of batches: a ZeRO-3 forward is itself a sequence of
collectives. `_batch_list` checks that up front instead of hanging.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from maskprune.arch import LlamaShape, attn_unit_count
from maskprune.dist import gathered
from maskprune.families import family_of
from maskprune.masks_io import KeepIndices, head_channels

METHODS = ("magnitude", "wanda_sp", "flap", "taylor", "random")


class ImportanceError(ValueError):
    """Bad method name or calibration input; the message says what to pass instead."""


# ----------------------------------------------------------------------------- distributed plumbing

def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce_(*tensors: Tensor, op: str = "sum") -> None:
    if _world() == 1:
        return
    reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN,
                 "max": torch.distributed.ReduceOp.MAX}[op]
    for tensor in tensors:
        torch.distributed.all_reduce(tensor, op=reduce_op)


def _gathered(*modules: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Full weights of `modules` for the duration."""
    return gathered([m.weight for m in modules])


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batch_list(batches: Iterable[Tensor], device: torch.device) -> list[Tensor]:
    """Materialise the calibration batches and check every rank has as many (see module doc)."""
    batches = [b.to(device) for b in batches]
    counts = torch.tensor([len(batches), -len(batches)], dtype=torch.float64, device=device)
    _all_reduce_(counts, op="max")
    if counts[0] != -counts[1]:
        raise ImportanceError(f"ranks got between {int(-counts[1])} and {int(counts[0])} calibration "
                              "batches; give every rank the same number")
    if not batches:
        raise ImportanceError("no calibration batches; the data-driven methods need at least one")
    return batches


def _layers(model: nn.Module) -> nn.ModuleList:
    return model.get_decoder().layers


def _blocks(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(attention, MLP) module of every decoder layer, where the model's family keeps them."""
    family = family_of(model.config)
    return [(family.attn_module(layer), family.mlp_module(layer)) for layer in _layers(model)]


@contextlib.contextmanager
def _zero3_gathering(model: nn.Module, backward: bool) -> Iterator[None]:
    """Gather a ZeRO-3 model's weights piece by piece (one decoder layer, or one other module that
    holds weights) around its forward, and for Taylor around its backward, when no DeepSpeed engine
    does it: the mask-learn stage scores the model before it builds its engine. With an engine (its
    hooks set `ds_inflight_param_registry` on the module) or without ZeRO-3 there is nothing to do;
    gathering on top of an engine would release weights its coordinator still counts as live."""
    if hasattr(model, "ds_inflight_param_registry") or not any(hasattr(p, "ds_id")
                                                                for p in model.parameters()):
        yield
        return
    import deepspeed

    layers = list(_layers(model))
    inside = {id(m) for layer in layers for m in layer.modules()}
    others = [m for m in model.modules()
              if id(m) not in inside and next(m.parameters(recurse=False), None) is not None]
    pieces = [(layer, list(layer.parameters())) for layer in layers] + \
             [(m, list(m.parameters(recurse=False))) for m in others]
    live: dict[int, deepspeed.zero.GatheredParameters] = {}

    def hooks(params: list[nn.Parameter]):
        def gather(module: nn.Module, *_: object) -> None:
            live[id(module)] = deepspeed.zero.GatheredParameters(params)
            live[id(module)].__enter__()

        def release(module: nn.Module, *_: object) -> None:
            live.pop(id(module)).__exit__(None, None, None)
        return gather, release

    handles = []
    for module, params in pieces:
        gather, release = hooks(params)
        handles += [module.register_forward_pre_hook(gather), module.register_forward_hook(release)]
        # The embedding's backward is never run (its output is where gradients start).
        if backward and module is not model.get_input_embeddings():
            handles += [module.register_full_backward_pre_hook(gather),
                        module.register_full_backward_hook(release)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for context in live.values():
            context.__exit__(None, None, None)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- activation statistics

@dataclass
class InputStats:
    """Per-channel sums over every calibration token (all ranks) of the inputs of o_proj and down_proj,
    the two projections whose input channels are the prunable units."""

    attn_sum: Tensor    # float64 [L, n_q * head_dim]
    attn_sumsq: Tensor
    ffn_sum: Tensor     # float64 [L, I]
    ffn_sumsq: Tensor
    tokens: int

    def mean(self, kind: str) -> Tensor:
        return getattr(self, f"{kind}_sum") / self.tokens

    def sq_norm(self, kind: str) -> Tensor:
        """||x_c||² over all calibration tokens (Wanda's input norm, squared)."""
        return getattr(self, f"{kind}_sumsq")

    def variance(self, kind: str) -> Tensor:
        """Population variance of each channel over tokens (FLAP's fluctuation)."""
        return (self.sq_norm(kind) / self.tokens - self.mean(kind) ** 2).clamp_min(0.0)


def input_stats(model: nn.Module, batches: Iterable[Tensor]) -> InputStats:
    device = _device(model)
    batches = _batch_list(batches, device)
    blocks = _blocks(model)
    width_attn = blocks[0][0].o_proj.in_features
    width_ffn = blocks[0][1].down_proj.in_features
    sums = {kind: torch.zeros(2, len(blocks), width, dtype=torch.float64, device=device)
            for kind, width in (("attn", width_attn), ("ffn", width_ffn))}

    def tap(kind: str, index: int):
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[kind][0, index] += x.sum(0)
            sums[kind][1, index] += (x * x).sum(0)
        return hook

    handles = []
    for index, (sa, mlp) in enumerate(blocks):
        handles.append(sa.o_proj.register_forward_pre_hook(tap("attn", index)))
        handles.append(mlp.down_proj.register_forward_pre_hook(tap("ffn", index)))
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    try:
        with torch.no_grad(), eval_mode(model), _zero3_gathering(model, backward=False):
            for batch in batches:
                model(input_ids=batch, use_cache=False)
                tokens += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    _all_reduce_(sums["attn"], sums["ffn"], tokens)
    return InputStats(attn_sum=sums["attn"][0].cpu(), attn_sumsq=sums["attn"][1].cpu(),
                      ffn_sum=sums["ffn"][0].cpu(), ffn_sumsq=sums["ffn"][1].cpu(), tokens=int(tokens))


# ----------------------------------------------------------------------------- per-unit aggregation

def _to_units(per_head: Tensor, shape: LlamaShape, mode: str, reduce: str = "sum") -> Tensor:
    """[..., n_q] per query head → [..., U] per attention unit (a KV group sums/averages its heads)."""
    if mode == "query_per_group":
        return per_head
    grouped = per_head.unflatten(-1, (shape.num_key_value_heads, shape.group_size))
    return grouped.mean(-1) if reduce == "mean" else grouped.sum(-1)


def _per_head(per_channel: Tensor, shape: LlamaShape, reduce: str = "sum") -> Tensor:
    """[..., n_q * head_dim] per o_proj input channel → [..., n_q]."""
    grouped = per_channel.unflatten(-1, (shape.num_attention_heads, shape.head_dim))
    return grouped.mean(-1) if reduce == "mean" else grouped.sum(-1)


# ----------------------------------------------------------------------------- the methods

def _magnitude(model: nn.Module, shape: LlamaShape, mode: str) -> dict[str, Tensor]:
    """L2 norm of every weight the unit owns: q rows + o columns of a head (+ k, v rows of a KV group
    in kv_group mode, where the group is removed with them); gate + up rows and the down column of a
    channel."""
    attn, ffn = [], []
    for sa, mlp in _blocks(model):
        with _gathered(sa.q_proj, sa.k_proj, sa.v_proj, sa.o_proj):
            q_rows = sa.q_proj.weight.detach().double().pow(2).sum(1)          # [n_q * hd]
            o_cols = sa.o_proj.weight.detach().double().pow(2).sum(0)
            head_sq = _per_head(q_rows + o_cols, shape)                         # [n_q]
            unit_sq = _to_units(head_sq, shape, mode)
            if mode == "kv_group":
                kv_rows = (sa.k_proj.weight.detach().double().pow(2).sum(1)
                           + sa.v_proj.weight.detach().double().pow(2).sum(1))
                unit_sq = unit_sq + kv_rows.view(shape.num_key_value_heads, shape.head_dim).sum(1)
        with _gathered(mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            chan_sq = (mlp.gate_proj.weight.detach().double().pow(2).sum(1)
                       + mlp.up_proj.weight.detach().double().pow(2).sum(1)
                       + mlp.down_proj.weight.detach().double().pow(2).sum(0))
        attn.append(unit_sq.sqrt().cpu())
        ffn.append(chan_sq.sqrt().cpu())
    return {"attn": torch.stack(attn), "ffn": torch.stack(ffn)}


def _wanda_sp(model: nn.Module, stats: InputStats, shape: LlamaShape, mode: str) -> dict[str, Tensor]:
    """Wanda structured: Σ |W_ij| · ||x_j|| over the output projection's columns of the unit."""
    attn, ffn = [], []
    for index, (sa, mlp) in enumerate(_blocks(model)):
        o_proj, down_proj = sa.o_proj, mlp.down_proj
        with _gathered(o_proj):
            col_abs = o_proj.weight.detach().double().abs().sum(0).cpu()
        attn.append(_to_units(_per_head(col_abs * stats.sq_norm("attn")[index].sqrt(), shape), shape, mode))
        with _gathered(down_proj):
            col_abs = down_proj.weight.detach().double().abs().sum(0).cpu()
        ffn.append(col_abs * stats.sq_norm("ffn")[index].sqrt())
    return {"attn": torch.stack(attn), "ffn": torch.stack(ffn)}


def _standardize(x: Tensor) -> Tensor:
    """FLAP's per-layer standardisation over the channels of one structure type (row-wise)."""
    return (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True).clamp_min(1e-12)


def _flap(model: nn.Module, stats: InputStats, shape: LlamaShape, mode: str) -> dict[str, Tensor]:
    """FLAP (WIFV): Var(x_j) · ||W[:, j]||², standardised per layer and type; a head averages its
    channels, a KV group its heads. With uniform per-layer widths (our setting) the standardisation
    leaves each layer's ranking unchanged; it is kept so scores compare across types as in FLAP."""
    attn, ffn = [], []
    for index, (sa, mlp) in enumerate(_blocks(model)):
        o_proj, down_proj = sa.o_proj, mlp.down_proj
        with _gathered(o_proj):
            col_sq = o_proj.weight.detach().double().pow(2).sum(0).cpu()
        fluct = _standardize(stats.variance("attn")[index] * col_sq)
        attn.append(_to_units(_per_head(fluct, shape, "mean"), shape, mode, "mean"))
        with _gathered(down_proj):
            col_sq = down_proj.weight.detach().double().pow(2).sum(0).cpu()
        ffn.append(_standardize(stats.variance("ffn")[index] * col_sq))
    return {"attn": torch.stack(attn), "ffn": torch.stack(ffn)}


def _removed_channels(model: nn.Module, keep: KeepIndices) -> dict[str, list[Tensor]]:
    """Per layer, the o_proj ("attn") and down_proj ("ffn") input channels `keep` removes (bool)."""
    blocks = _blocks(model)
    head_dim = blocks[0][0].head_dim
    removed: dict[str, list[Tensor]] = {"attn": [], "ffn": []}
    for index, (sa, mlp) in enumerate(blocks):
        attn = torch.ones(sa.o_proj.in_features, dtype=torch.bool)
        attn[head_channels(keep.q_heads[index], head_dim)] = False
        ffn = torch.ones(mlp.down_proj.in_features, dtype=torch.bool)
        ffn[keep.ffn[index]] = False
        removed["attn"].append(attn)
        removed["ffn"].append(ffn)
    return removed


def _decoder_inputs(model: nn.Module, batches: list[Tensor]) -> tuple[list[Tensor], list[dict]]:
    """Per batch, the hidden states entering the first decoder layer, and apart from them the keyword
    arguments the decoder passes every layer (causal mask, rotary embeddings, positions), so layers
    can then be run one at a time with `_advance`. Each forward runs to the end: one stopped by an
    exception leaves a DeepSpeed engine's parameter coordinator with weights it still counts as in use."""
    hidden: list[Tensor] = []
    kwargs: list[dict] = []

    def catch(module: nn.Module, args: tuple[Tensor, ...], layer_kwargs: dict) -> None:
        hidden.append(args[0])
        kwargs.append(layer_kwargs)

    handle = _layers(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in batches:
            model(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    return hidden, kwargs


def _advance(layer: nn.Module, hidden: list[Tensor], kwargs: list[dict]) -> None:
    """Each batch's hidden states replaced by `layer`'s output, one batch at a time: a layer-by-layer
    pass holds one copy of the calibration hidden states and one batch's output (a new list would
    hold two copies, and the first layer's inputs kept beside them a third: Llama-3-70B, 16 global
    batches of 2 × 4,096 tokens per rank, 2 GiB per copy on every GPU)."""
    for index, kw in enumerate(kwargs):
        hidden[index] = _hidden_states(layer(hidden[index], **kw))


def flap_bias(model: nn.Module, batches: Iterable[Tensor], keep: KeepIndices) -> dict[str, Tensor]:
    """FLAP bias compensation for `keep`: the removed input channels' mean contribution,
    b = W[:, removed] @ mean(x[removed]), for o_proj and down_proj ({"bias.o_proj": [L, hidden],
    "bias.down_proj": [L, hidden]}).

    Sequential, as FLAP computes it: a layer's means are those of its inputs in the model whose
    earlier layers are already pruned and compensated, so each compensation also corrects the shift
    the earlier cuts cause (means of the dense model's inputs measured worse than no compensation).
    Layer by layer over every calibration batch of every rank: each batch's hidden states are carried
    from one layer to the next; in a layer, one sweep over the batches sums o_proj's inputs (float64,
    all-reduced), a second sums down_proj's with o_proj's removed inputs replaced by their mean (which
    is the pruned layer plus its compensation), a third gives the next layer's inputs with both
    replaced. Memory: this rank's calibration hidden states (tokens x hidden, twice) and one batch's
    activations at a time, whatever the number of batches; ZeRO-3 gathers one layer at a time.

    Llama has no o_proj / down_proj bias, so the pruned checkpoint needs `mlp_bias=True` (zero
    gate/up biases) and `attention_bias=True`, which in HF Llama adds q/k/v biases too; those must be
    written as zeros. The mask_learn stage stores them in the masks file (`KeepIndices.bias`) and
    hard-prune writes them that way (`export.with_compensation`)."""
    device = _device(model)
    batches = _batch_list(batches, device)
    removed = _removed_channels(model, keep)
    means: dict[str, list[Tensor]] = {kind: [] for kind in removed}
    with torch.no_grad(), eval_mode(model), _zero3_gathering(model, backward=False):
        hidden, layer_kwargs = _decoder_inputs(model, batches)
        for index, (layer, (sa, mlp)) in enumerate(zip(_layers(model), _blocks(model))):
            replace: dict[str, tuple[Tensor, Tensor]] = {}  # kind -> (removed channels, their mean)
            sums: dict[str, Tensor] = {}  # the kind being measured -> [channel sums..., token count]

            def pre_hook(kind: str):
                def hook(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
                    x = args[0]
                    if kind in replace:
                        cut, mean = replace[kind]
                        return (torch.where(cut, mean.to(x.dtype), x), *args[1:])
                    if kind in sums:
                        flat = x.detach().double().reshape(-1, x.shape[-1])
                        sums[kind] += torch.cat([flat.sum(0), flat.new_tensor([flat.shape[0]])])
                    return None
                return hook

            handles = [sa.o_proj.register_forward_pre_hook(pre_hook("attn")),
                       mlp.down_proj.register_forward_pre_hook(pre_hook("ffn"))]
            try:
                for kind in ("attn", "ffn"):
                    cut = removed[kind][index].to(device)
                    sums[kind] = torch.zeros(cut.numel() + 1, dtype=torch.float64, device=device)
                    for h, kwargs in zip(hidden, layer_kwargs):
                        layer(h, **kwargs)
                    total = sums.pop(kind)
                    _all_reduce_(total)
                    mean = total[:-1] / total[-1] * cut
                    means[kind].append(mean.cpu())
                    replace[kind] = (cut, mean)
                _advance(layer, hidden, layer_kwargs)
            finally:
                for handle in handles:
                    handle.remove()
    out: dict[str, list[Tensor]] = {"bias.o_proj": [], "bias.down_proj": []}
    for index, (sa, mlp) in enumerate(_blocks(model)):
        for name, module, kind in (("bias.o_proj", sa.o_proj, "attn"),
                                   ("bias.down_proj", mlp.down_proj, "ffn")):
            with _gathered(module):
                out[name].append((module.weight.detach().double().cpu() @ means[kind][index]).float())
    return {name: torch.stack(rows) for name, rows in out.items()}


@contextlib.contextmanager
def _recomputed_layers(model: nn.Module) -> Iterator[None]:
    """Each decoder layer's forward under reentrant activation checkpointing: backward recomputes one
    layer at a time, so a backward pass holds the layers' inputs and one layer's activations, not
    every layer's (Llama-3-70B: ~1.6 GB per layer per 4,096 tokens, 80 layers). Reentrant, because its
    backward runs through the recomputed graph, where Taylor's taps see the activations and register
    their gradient hooks; the first forward runs without grad. The model stays in eval mode (HF's own
    checkpointing only acts in train mode, which would switch dropout on)."""
    from torch.utils.checkpoint import checkpoint

    layers = list(_layers(model))
    own = [layer.__dict__.get("forward") for layer in layers]  # a wrapper someone set on the instance
    for layer in layers:
        def recomputed(*args: object, _forward=layer.forward, **kwargs: object) -> object:
            # Keyword arguments (mask, rotary tables) never need a gradient: bound, not checkpoint inputs.
            return checkpoint(functools.partial(_forward, **kwargs), *args, use_reentrant=True)
        layer.forward = recomputed
    try:
        yield
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def _hidden_states(layer_output: Tensor | tuple[Tensor, ...]) -> Tensor:
    """A decoder layer's output hidden states (transformers 5 returns the tensor, 4.x a tuple)."""
    return layer_output[0] if isinstance(layer_output, tuple) else layer_output


def _taylor(model: nn.Module, batches: list[Tensor], shape: LlamaShape, mode: str,
            checkpointing: bool) -> dict[str, Tensor]:
    """First-order Taylor (LLM-Pruner, vector-wise): |Σ_{w in unit} w · ∂L/∂w|, gradients summed over
    the calibration batches; with `checkpointing`, each layer's activations are recomputed in backward
    (`_recomputed_layers`), to the same scores.

    For a linear y = x Wᵀ the sum over an output row r is Σ_t y_tr · ∂L/∂y_tr and over an input
    column c it is Σ_t x_tc · ∂L/∂x_tc, so hooks on activations give it exactly without ever
    materialising a weight gradient: parameters are frozen for the pass (no ZeRO-3 gradient
    partitioning is triggered) and the embedding output is made to require grad instead."""
    device = _device(model)
    blocks = _blocks(model)
    n_layers, n_q, n_kv = len(blocks), shape.num_attention_heads, shape.num_key_value_heads
    acc = {"q": torch.zeros(n_layers, n_q, dtype=torch.float64, device=device),
           "o": torch.zeros(n_layers, n_q, dtype=torch.float64, device=device),
           "kv": torch.zeros(n_layers, n_kv, dtype=torch.float64, device=device),
           "ffn": torch.zeros(n_layers, shape.intermediate_size, dtype=torch.float64, device=device)}

    def tap(name: str, index: int, group: int, use_input: bool):
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            act = args[0] if use_input else output
            if not act.requires_grad:  # checkpointing's first forward; the recomputation is tapped
                return
            saved = act.detach()

            def on_grad(grad: Tensor) -> None:
                prod = (saved.double() * grad.double()).reshape(-1, saved.shape[-1]).sum(0)
                acc[name][index] += prod.view(-1, group).sum(1)
            act.register_hook(on_grad)
        return hook

    hd = shape.head_dim
    handles = [model.get_input_embeddings().register_forward_hook(
        lambda module, args, output: output.requires_grad_(True))]
    for index, (sa, mlp) in enumerate(blocks):
        handles += [sa.q_proj.register_forward_hook(tap("q", index, hd, False)),
                    sa.o_proj.register_forward_hook(tap("o", index, hd, True)),
                    mlp.gate_proj.register_forward_hook(tap("ffn", index, 1, False)),
                    mlp.up_proj.register_forward_hook(tap("ffn", index, 1, False)),
                    mlp.down_proj.register_forward_hook(tap("ffn", index, 1, True))]
        if mode == "kv_group":
            handles += [sa.k_proj.register_forward_hook(tap("kv", index, hd, False)),
                        sa.v_proj.register_forward_hook(tap("kv", index, hd, False))]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        recompute = _recomputed_layers(model) if checkpointing else contextlib.nullcontext()
        with eval_mode(model), torch.enable_grad(), _zero3_gathering(model, backward=True), recompute:
            for batch in batches:
                model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for handle in handles:
            handle.remove()
    _all_reduce_(*acc.values())
    acc = {k: v.cpu() for k, v in acc.items()}
    units = _to_units(acc["q"] + acc["o"], shape, mode)
    if mode == "kv_group":
        units = units + acc["kv"]
    return {"attn": units.abs(), "ffn": acc["ffn"].abs()}


def _random(shape: LlamaShape, mode: str, seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    layers = shape.num_hidden_layers
    return {"attn": torch.rand(layers, attn_unit_count(shape, mode), generator=gen, dtype=torch.float64),
            "ffn": torch.rand(layers, shape.intermediate_size, generator=gen, dtype=torch.float64)}


def unit_scores(model: nn.Module, batches: Iterable[Tensor], method: str, shape: LlamaShape,
                mode: str, seed: int = 0, checkpointing: bool = False) -> dict[str, Tensor]:
    """{"attn": [L, U], "ffn": [L, I]} float32 on CPU, identical on every rank; higher = keep.

    `batches`: this rank's calibration LongTensors [b, T] (ignored by magnitude and random).
    `checkpointing`: Taylor's backward recomputes each layer's activations instead of holding every
    layer's (mask_learn.activation_checkpointing; a 70B's would not fit)."""
    if method not in METHODS:
        raise ImportanceError(f"importance method {method!r} is not one of {', '.join(METHODS)}")
    if mode not in ("query_per_group", "kv_group"):
        raise ImportanceError(f"attn_mode {mode!r} is not one of query_per_group, kv_group")
    if method == "random":
        scores = _random(shape, mode, seed)
    elif method == "magnitude":
        scores = _magnitude(model, shape, mode)
    elif method == "taylor":
        scores = _taylor(model, _batch_list(batches, _device(model)), shape, mode, checkpointing)
    else:
        scores = (_wanda_sp if method == "wanda_sp" else _flap)(model, input_stats(model, batches), shape, mode)
    return {name: value.float().cpu() for name, value in scores.items()}
