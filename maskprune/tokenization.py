"""The tokenizer the tokenize stage uses, always as one `tokenizers.Tokenizer` (Rust, fast).

Kinds (`data.tokenizer`):
- "model":               the HF tokenizer saved next to the prepared model (must be a fast one);
- "sentencepiece":       a SentencePiece `.model` file (`data.tokenizer_path`), converted here;
- "gguf":                the tokenizer embedded in a GGUF file (`data.tokenizer_path`);
- "train_sentencepiece": a SentencePiece BPE model trained on the corpus, vocab = the model's.

SentencePiece is converted by hand: transformers 5.23's `LlamaTokenizerFast(vocab_file=...)` silently
builds a 3-token tokenizer and its BPE converter crashes, so the conversion below is checked against
the SentencePiece processor itself (vocab size and the ids of probe documents).
"""
from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from maskprune.config import DataConfig


class TokenizerError(ValueError):
    """A tokenizer that cannot be used for this model or corpus; the message says what to do."""


@dataclass
class LoadedTokenizer:
    core: Tokenizer
    eos_id: int
    kind: str
    source: str  # where it came from, for the index

    @property
    def vocab_size(self) -> int:
        return self.core.get_vocab_size(with_added_tokens=True)

    def fingerprint(self) -> str:
        """Hash of the full serialised tokenizer (vocab, merges, normaliser, added tokens) + EOS."""
        text = self.core.to_str() + f"\neos={self.eos_id}"
        return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------- SentencePiece

def _sp_proto(model_bytes: bytes):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    return proto


def sentencepiece_to_fast(model_bytes: bytes) -> Tokenizer:
    """A `tokenizers` object that reproduces a SentencePiece model (unigram or BPE)."""
    proto = _sp_proto(model_bytes)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if spec.model_type == 1:
        model = models.Unigram(pieces, unk_id=spec.unk_id, byte_fallback=spec.byte_fallback)
    elif spec.model_type == 2:
        from transformers.convert_slow_tokenizer import generate_merges

        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        # SentencePiece BPE merges in order of the merged piece's score, highest first.
        merges = generate_merges(vocab, pieces)
        model = models.BPE(vocab, merges, unk_token=spec.unk_piece, fuse_unk=True,
                           byte_fallback=spec.byte_fallback)
    else:
        raise TokenizerError(f"SentencePiece model type {spec.model_type} is not unigram (1) or BPE (2)")
    core = Tokenizer(model)
    steps: list[normalizers.Normalizer] = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    core.normalizer = normalizers.Sequence(steps)
    # Pieces never cross a word start (SentencePiece's split_by_whitespace).
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never",
                                                  split=spec.split_by_whitespace)
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                      decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    # Control pieces (<s>, </s>) are special; user-defined pieces are matched verbatim.
    core.add_tokens([AddedToken(p.piece, normalized=False, special=p.type == 3)
                     for p in proto.pieces if p.type in (3, 4)])
    return core


def _load_sentencepiece(model_bytes: bytes, source: str, kind: str,
                        probe: list[str]) -> LoadedTokenizer:
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_proto=model_bytes)
    core = sentencepiece_to_fast(model_bytes)
    if core.get_vocab_size(with_added_tokens=True) != processor.get_piece_size():
        raise TokenizerError(f"{source}: converted tokenizer has {core.get_vocab_size(True)} tokens, the "
                             f"SentencePiece model {processor.get_piece_size()}; use data.tokenizer = "
                             "\"model\" with a saved HF tokenizer instead")
    wrong = [doc for doc in probe
             if processor.encode(doc) != core.encode(doc, add_special_tokens=False).ids]
    if wrong:
        raise TokenizerError(f"{source}: the converted tokenizer disagrees with SentencePiece on "
                             f"{len(wrong)}/{len(probe)} probe documents (first: {wrong[0][:60]!r}); "
                             "save an HF tokenizer with the model and use data.tokenizer = \"model\"")
    if processor.eos_id() < 0:
        raise TokenizerError(f"{source}: the SentencePiece model has no EOS piece; train it with eos_id set")
    return LoadedTokenizer(core, processor.eos_id(), kind, source)


def train_sentencepiece(texts: Iterable[str], vocab_size: int) -> bytes:
    """A byte-fallback BPE SentencePiece model (the Llama 1/2 recipe) as serialised bytes.

    One thread and no sampling, so the same corpus gives the same model."""
    import sentencepiece as spm

    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=out, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
            normalization_rule_name="identity", minloglevel=2, unk_id=0, bos_id=1, eos_id=2,
            hard_vocab_limit=True)
    except RuntimeError as err:
        raise TokenizerError(f"data.tokenizer = \"train_sentencepiece\": training failed ({err}); "
                             "lower data.tokenizer_vocab_size or give more text") from None
    return out.getvalue()


# ----------------------------------------------------------------------------- HF / GGUF

def _from_hf(tokenizer, source: str, kind: str) -> LoadedTokenizer:
    if not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
        raise TokenizerError(f"{source}: not a fast (tokenizers) tokenizer; save one with "
                             "`tokenizer.save_pretrained` from a fast tokenizer (tokenizer.json)")
    if tokenizer.eos_token_id is None:
        raise TokenizerError(f"{source}: the tokenizer has no EOS token; set eos_token in tokenizer_config.json")
    return LoadedTokenizer(tokenizer.backend_tokenizer, int(tokenizer.eos_token_id), kind, source)


def _from_tokenizer_json(model_dir: Path) -> LoadedTokenizer:
    """A saved fast tokenizer read without importing transformers (seconds per process saved);
    EOS as tokenizer_config.json names it, as AutoTokenizer would."""
    core = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    config_path = model_dir / "tokenizer_config.json"
    eos = json.loads(config_path.read_text()).get("eos_token") if config_path.is_file() else None
    eos_text = eos.get("content") if isinstance(eos, dict) else eos
    eos_id = core.token_to_id(eos_text) if eos_text else None
    if eos_id is None:
        raise TokenizerError(f"{config_path}: no eos_token naming a token of tokenizer.json; set eos_token")
    return LoadedTokenizer(core, eos_id, "model", str(model_dir))


def model_vocab_size(model_dir: Path) -> int:
    return int(json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])


def check_against_model(tok: LoadedTokenizer, model_dir: Path) -> None:
    """Ids must index the model's embedding; a smaller model vocab, or one padded by more than the
    usual rounding to a multiple of 128, means the tokenizer belongs to another model."""
    model_vocab = model_vocab_size(model_dir)
    padded = -(-tok.vocab_size // 128) * 128
    if not tok.vocab_size <= model_vocab <= padded:
        raise TokenizerError(f"tokenizer {tok.source} has {tok.vocab_size} tokens but the model "
                             f"{model_dir}/config.json has vocab_size {model_vocab}; use the model's own "
                             "tokenizer (data.tokenizer = \"model\") or a matching data.tokenizer_path")


def load_tokenizer(cfg: DataConfig, model_dir: Path, probe: list[str],
                   trained_sp: bytes | None = None) -> LoadedTokenizer:
    """The configured tokenizer, checked against the model's vocab_size.

    `probe`: a few corpus documents to verify SentencePiece conversions on.
    `trained_sp`: the model from `train_sentencepiece` when data.tokenizer = "train_sentencepiece"."""
    kind = cfg.tokenizer
    if kind == "model" and (Path(model_dir) / "tokenizer.json").is_file():
        tok = _from_tokenizer_json(Path(model_dir))
    elif kind == "model":
        from transformers import AutoTokenizer  # here only: seconds of import the common path avoids

        tok = _from_hf(AutoTokenizer.from_pretrained(model_dir), str(model_dir), kind)
    elif kind == "gguf":
        from transformers import AutoTokenizer

        path = Path(cfg.tokenizer_path).expanduser().resolve()
        if not path.is_file():
            raise TokenizerError(f"data.tokenizer_path {path}: no such GGUF file")
        tok = _from_hf(AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), str(path), kind)
    elif kind == "sentencepiece":
        path = Path(cfg.tokenizer_path).expanduser().resolve()
        if not path.is_file():
            raise TokenizerError(f"data.tokenizer_path {path}: no such SentencePiece model file")
        tok = _load_sentencepiece(path.read_bytes(), str(path), kind, probe)
    else:
        assert trained_sp is not None, "train_sentencepiece needs the trained model bytes"
        tok = _load_sentencepiece(trained_sp, "trained SentencePiece", kind, probe)
    check_against_model(tok, model_dir)
    return tok
