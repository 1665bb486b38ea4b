"""What one model family is, for every stage: its classes, where heads and channels live, which
projections carry biases, which norms ride along, and which head counts its loader accepts.

A family is one frozen `Family` value in its own module (maskprune/families/<name>.py); the
stages read everything family-specific through it, so a new family is one file and its tests.

Every supported family keeps the Llama layout of a decoder layer: `self_attn.{q,k,v,o}_proj`
(q/k/v rows and o columns grouped by head, `head_dim` each; query head h served by KV head
h // group) and `mlp.{gate,up,down}_proj` (gate/up rows and down columns per channel, down's input
being act(gate) * up). What differs is declared here and nowhere else.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

# Which head counts a family's config class accepts: those dividing hidden_size (LlamaConfig and
# Gemma3TextConfig check it even with an explicit head_dim), or any (head_dim is read from the config).
HeadRule = Literal["divides_hidden", "any"]
# hard_prune.architecture: the class a pruned Llama is written as ("auto" = the source family's
# own rule; only Llama has a choice, see families/llama.py).
Architecture = Literal["auto", "llama", "mistral"]

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


class FamilyError(ValueError):
    """A model this project cannot prune (unsupported family, or an option the family cannot write)."""


def get(config: Any, key: str, default: Any = None) -> Any:
    """A field of a config given as a dict (config.json) or a transformers config object."""
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


@dataclass(frozen=True)
class Family:
    name: str                 # the registry key, also hard_prune's written-family name
    model_type: str           # config.json model_type
    architecture: str         # the *ForCausalLM class of config.json "architectures"
    prefix: str               # transformers class prefix: <prefix>Config, <prefix>DecoderLayer, ...
    modeling: str             # the transformers module holding those classes
    config_class: str         # usually <prefix>Config (Gemma-3 text: Gemma3TextConfig)
    head_rule: HeadRule
    # Decoder-layer attributes holding the attention and MLP projections.
    attn: str = "self_attn"
    mlp: str = "mlp"
    # Per-layer norms over the hidden size (sliced with hidden channels, never by head or channel).
    layer_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    # Norms inside the attention module over head_dim, shared by every head (Qwen3 / Gemma-3
    # q_norm, k_norm): kept whole whatever heads are cut.
    head_norms: tuple[str, ...] = ()
    # Projections with a bias whatever the config says (Qwen2: q, k, v), and config flags that add
    # biases to a set of projections (Llama's attention_bias also adds o_proj's).
    fixed_biases: tuple[str, ...] = ()
    bias_flags: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Input embeddings multiplied by sqrt(hidden_size) (Gemma): cutting hidden channels would
    # change that factor, so hidden pruning is refused for such a family.
    scaled_embedding: bool = False
    # Trained with BOS opening every sequence: training sequences (tokenize stage) and perplexity
    # chunks (evaluation.py) get it in front.
    bos_first: bool = False
    # Settings a tiny test/demo model of this family adds to the common shape (model.tiny).
    tiny_extras: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ classes
    def _modeling(self) -> Any:
        return importlib.import_module(self.modeling)

    def model_class(self) -> type:
        return getattr(self._modeling(), self.architecture)

    def decoder_layer_class(self) -> type:
        return getattr(self._modeling(), f"{self.prefix}DecoderLayer")

    def hf_config(self, config: dict[str, Any]) -> Any:
        """The transformers config object of a config.json dict of this family."""
        import transformers

        cls = getattr(transformers, self.config_class)
        return cls.from_dict({k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")})

    def position_embeddings(self, config: Any, x: torch.Tensor, positions: torch.Tensor,
                            layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) a decoder layer of this family receives for `positions`."""
        return getattr(self._modeling(), f"{self.prefix}RotaryEmbedding")(config)(x, positions)

    # ------------------------------------------------------------------ where things live
    def attn_module(self, layer: torch.nn.Module) -> torch.nn.Module:
        return getattr(layer, self.attn)

    def mlp_module(self, layer: torch.nn.Module) -> torch.nn.Module:
        return getattr(layer, self.mlp)

    def proj_name(self, proj: str) -> str:
        """`q_proj` -> `self_attn.q_proj`: the projection's path inside a decoder layer."""
        return f"{self.attn if proj in ATTN_PROJ else self.mlp}.{proj}"

    def biased(self, config: Any) -> frozenset[str]:
        """The projections (q_proj ... down_proj) that carry a bias in `config`."""
        flagged = {p for flag, projs in self.bias_flags.items() if get(config, flag, False) for p in projs}
        return frozenset(self.fixed_biases) | flagged

    def head_dim(self, config: Any) -> int:
        return get(config, "head_dim") or get(config, "hidden_size") // get(config, "num_attention_heads")

    # ------------------------------------------------------------------ what a pruned model is written as
    def check_architecture(self, architecture: Architecture) -> None:
        if architecture not in ("auto", self.name):
            raise FamilyError(f"hard_prune.architecture = {architecture!r} chooses how a pruned Llama is "
                              f"written; a {self.name} source is written as {self.architecture}: set 'auto'")

    def lattice(self, architecture: Architecture, biases: frozenset[str], compensated: bool) -> HeadRule:
        """The head counts mask_learn, the baselines and the planner may choose for this source;
        `compensated`: FLAP's o_proj / down_proj bias compensation is to be written too."""
        self.check_architecture(architecture)
        if compensated:
            raise FamilyError(f"mask_learn.method = 'flap' adds o_proj / down_proj biases (its compensation), "
                              f"which {self.architecture} has no field for; use 'wanda_sp' or another method")
        return self.head_rule

    def written(self, architecture: Architecture, biases: frozenset[str], heads: int, hidden: int) -> "Family":
        """The family a pruned model of this source with `heads` query heads is written as: its
        own, or a refusal naming why it cannot be."""
        self.check_architecture(architecture)
        if self.head_rule == "divides_hidden" and hidden % heads:
            raise FamilyError(f"num_attention_heads={heads} does not divide hidden_size={hidden}, which "
                              f"transformers' {self.config_class} rejects; choose a head count that does")
        return self

    def output_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """A pruned config dict (of any source family) as this family's config.json."""
        return {**config, "model_type": self.model_type, "architectures": [self.architecture]}

    def tiny_config(self, **shape: Any) -> Any:
        """A config object of a small model of this family: the common shape plus `tiny_extras`."""
        import transformers

        return getattr(transformers, self.config_class)(**{**shape, **self.tiny_extras})
