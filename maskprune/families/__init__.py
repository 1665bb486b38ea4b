"""The registry of supported model families: one module each, looked up by config.json model_type.

    family_of(config)   the Family of a config dict or object; one clear error naming the
                        supported families otherwise
    FAMILIES            name -> Family, e.g. FAMILIES["qwen3"]

To add a family: a module here with its `Family` value, one line in `_ALL`, and its tests
(tests/test_families.py parametrizes over FAMILIES).
"""
from __future__ import annotations

from typing import Any

from maskprune.families.base import (ATTN_PROJ, MLP_PROJ, Architecture, Family, FamilyError, HeadRule,
                                     get)
from maskprune.families.gemma3 import GEMMA3
from maskprune.families.llama import LLAMA
from maskprune.families.mistral import MISTRAL
from maskprune.families.qwen2 import QWEN2
from maskprune.families.qwen3 import QWEN3

_ALL = (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA3)
FAMILIES: dict[str, Family] = {family.name: family for family in _ALL}
_BY_MODEL_TYPE = {family.model_type: family for family in _ALL}
# model_types users will try that are close to a supported one, with what to do instead.
_HINTS = {"gemma3": "a multimodal Gemma-3 checkpoint (Gemma3ForConditionalGeneration); prune its "
                    "text model (model_type gemma3_text, Gemma3ForCausalLM)"}

__all__ = ["ATTN_PROJ", "MLP_PROJ", "Architecture", "FAMILIES", "Family", "FamilyError", "HeadRule",
           "family_of", "supported"]


def supported() -> str:
    return ", ".join(f"{f.name} ({f.architecture})" for f in _ALL)


def family_of(config: Any) -> Family:
    """The family of a config.json dict or transformers config; a config without model_type is
    read as Llama (older Llama checkpoints)."""
    model_type = get(config, "model_type") or "llama"
    family = _BY_MODEL_TYPE.get(model_type)
    if family is None:
        hint = f" ({_HINTS[model_type]})" if model_type in _HINTS else ""
        raise FamilyError(f"model_type {model_type!r} is not a supported model family{hint}; maskprune "
                          f"prunes {supported()}")
    architectures = get(config, "architectures") or []
    if architectures and family.architecture not in architectures:
        raise FamilyError(f"architectures {architectures}: maskprune prunes {family.architecture} "
                          f"checkpoints of model_type {model_type!r}")
    return family
