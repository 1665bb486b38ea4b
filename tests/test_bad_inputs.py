"""Bad inputs, one table: experiment files, ds_configs, models, tokenizers, data, masks, checkpoints.

Every case runs the real entry point a user would (`maskprune run ...` with the stage scripts it
launches, or tools/zero_to_hf.py) and must end with exit code != 0, exactly one line that names the
problem and the fix (plus, for a stage that failed under `maskprune run`, the orchestrator's own
"stage X failed" line), no traceback, and no existing file changed: finished stages' outputs and
records, the inputs and any earlier output folder keep their bytes and mtimes, and no stage that was
not done is recorded as done.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import copy_run
from helpers import BIN, REPO, cpu_env
from maskprune.arch import LlamaShape
from maskprune.masks_io import keep_from_scores, save_keep_indices
from maskprune.rundir import STAGES, RunDir, StageState


@dataclass
class Ctx:
    tmp: Path    # this case's own folder
    base: Path   # a run with prepare + tokenize done (shared, must stay untouched)

    @property
    def model(self) -> Path:
        return self.base / "prepare" / "model"

    @property
    def run(self) -> Path:
        return self.tmp / "run"


# ----------------------------------------------------------------------------- setups

def toml(text: str) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        (ctx.tmp / "exp.toml").write_text(text)
        return [str(ctx.tmp / "exp.toml"), "--run-dir", str(ctx.run)]
    return setup


def tiny(*sets: str, until: str = "prepare", run: Callable[[Ctx], None] | None = None) -> Callable[[Ctx], list[str]]:
    """configs/tiny.toml with --set overrides, up to `until`; `run` prepares the run dir first."""
    def setup(ctx: Ctx) -> list[str]:
        if run is not None:
            run(ctx)
        args = [a.format(tmp=ctx.tmp, model=ctx.model) for a in sets]
        return ["configs/tiny.toml", "--run-dir", str(ctx.run), "--until", until,
                *[x for a in args for x in ("--set", a)]]
    return setup


def existing_run(ctx: Ctx) -> None:
    copy_run(ctx.base, ctx.run)


def ds_config(text: str, interrupted: bool = False) -> Callable[[Ctx], list[str]]:
    """mask_learn.ds_config = this text; `interrupted`: mask_learn was started under a bf16 version of
    it (its frozen copy), then stopped."""
    def write(ctx: Ctx) -> None:
        existing_run(ctx)
        (ctx.tmp / "ds.json").write_text(text)
        if interrupted:
            run = RunDir(ctx.run)
            run.save_state(StageState(stage=ML, status="running", attempts=1))
            (run.stage_dir(ML) / "ds_config.json").write_text(json.dumps({**ZERO3, "bf16": {"enabled": True}}))
    return tiny("mask_learn.ds_config='{tmp}/ds.json'", until="mask_learn", run=write)


ZERO3 = json.loads((REPO / "ds_configs" / "zero3_cpu_fp32.json").read_text())


def hf_model(edit: Callable[[Path], None], until: str = "prepare") -> Callable[[Ctx], list[str]]:
    """model.source = "hf" at a copy of the prepared tiny Llama, changed by `edit`."""
    def write(ctx: Ctx) -> None:
        shutil.copytree(ctx.model, ctx.tmp / "model")
        edit(ctx.tmp / "model")
    return tiny("model.source='hf'", "model.path='{tmp}/model'", until=until, run=write)


def edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def only_config(config: dict) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        for item in path.iterdir():
            item.unlink()
        (path / "config.json").write_text(json.dumps(config))
    return edit


def pickled_only(path: Path) -> None:
    (path / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, path / "pytorch_model.bin")


def missing_shard(path: Path) -> None:
    (path / "model.safetensors").rename(path / "model-00001-of-00002.safetensors")
    from maskprune.safetensors_io import read_header

    names = sorted(read_header(path / "model-00001-of-00002.safetensors"))
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
    weight_map[names[-1]] = "model-00002-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def truncated(path: Path) -> None:
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def other_tokenizer(path: Path) -> None:
    from maskprune.model_source import train_bpe_tokenizer

    texts = [f"document number {i} about pruning and shapes" for i in range(200)]
    train_bpe_tokenizer(texts, 300, path)  # replaces tokenizer.json: 300 tokens, the model has 1024


def data_file(name: str, content: bytes, kind: str = "text", field: str = "") -> Callable[[Ctx], list[str]]:
    """The prepared tiny model used in place (source = "hf"), tokenizing one local file."""
    def write(ctx: Ctx) -> None:
        (ctx.tmp / name).write_bytes(content)
    extra = f", field = '{field}'" if field else ""
    return tiny("model.source='hf'", "model.path='{model}'",
                "data.sources=[{{kind = '%s', path = '{tmp}/%s'%s}}]" % (kind, name, extra),
                until="tokenize", run=write)


def masks_run(write_masks: Callable[[Path, LlamaShape], str]) -> Callable[[Ctx], list[str]]:
    """A run whose mask_learn is recorded done with the masks file `write_masks` makes."""
    def write(ctx: Ctx) -> None:
        existing_run(ctx)
        run = RunDir(ctx.run)
        shape = LlamaShape.from_hf_config(json.loads((ctx.model / "config.json").read_text()))
        masks = write_masks(ctx.run / "mask_learn", shape)
        run.mark_running("mask_learn", run.load_config())
        run.mark_done("mask_learn", {"masks": masks, "method": "random"})
    return tiny(until="hard_prune", run=write)


def unformatted_masks(folder: Path, shape: LlamaShape) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"keep.q_heads": torch.zeros(4, 2, dtype=torch.long)}, str(folder / "masks.safetensors"))
    return str(folder / "masks.safetensors")


def three_layer_masks(folder: Path, shape: LlamaShape) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    keep = keep_from_scores(torch.rand(3, shape.num_attention_heads, generator=gen),
                            torch.rand(3, shape.intermediate_size, generator=gen),
                            shape, 2, 64, "query_per_group", "random")
    save_keep_indices(folder / "masks.safetensors", keep)
    return str(folder / "masks.safetensors")


def no_masks(folder: Path, shape: LlamaShape) -> str:
    return str(folder / "masks.safetensors")


def checkpoint(complete: bool, latest: bool, give_root: bool = False) -> Callable[[Ctx], list[str]]:
    """A checkpoint root with one tag (COMPLETE or not, `latest` or not) and an earlier export in
    OUT that a failed conversion must leave alone."""
    def setup(ctx: Ctx) -> list[str]:
        root = ctx.tmp / "ckpt"
        tag = root / "step00000003"
        tag.mkdir(parents=True)
        (tag / "maskprune_meta.json").write_text(json.dumps(
            {"stage": "continued_pretrain", "step": 3, "model_dir": str(ctx.model), "lora": None,
             "masks": None, "frozen_excluded": False}))
        (tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"half-written")
        if complete:
            (tag / "COMPLETE").write_text("3\n")
        if latest:
            (root / "latest").write_text("step00000003")
        out = ctx.tmp / "out"
        out.mkdir()
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"an earlier finished export")
        return [str(root if latest or give_root else tag), str(out)]
    return setup


# ----------------------------------------------------------------------------- the table

GPT2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_layer": 2, "n_head": 2,
        "vocab_size": 1024}
GEMMA3_MULTIMODAL = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
                     "text_config": {"hidden_size": 64, "num_hidden_layers": 2}}
ML = "mask_learn"
slow = pytest.mark.slow

# (id, setup -> argv tail, command, fragment of the one error line, {tmp}: the case's folder)
#   command "run": `maskprune run` refuses before starting anything (stderr is exactly one line);
#   "stage": a stage started by `maskprune run` fails (its line, then the orchestrator's);
#   "zero_to_hf": tools/zero_to_hf.py CHECKPOINT OUT.
CASES: list[tuple[str, Callable[[Ctx], list[str]], str, str]] = [
    # experiment files
    ("unknown_key", toml("[mask_learn.train]\nlearning_rate = 1e-3\n"), "run",
     "mask_learn.train.learning_rate: unknown key; did you mean 'mask_learn.train.lr'?"),
    ("wrong_type", toml("[mask_learn.train]\nsteps = \"many\"\n"), "run",
     "mask_learn.train.steps: expected an integer, got str 'many'"),
    ("sparsity_out_of_range", toml("[target]\nsparsity = 1.2\n"), "run",
     "target.sparsity: must be in (0, 1), got 1.2; or give target.arch instead"),
    ("literal_not_allowed", toml("[target]\nattn_mode = \"heads\"\n"), "run",
     "target.attn_mode: 'heads' is not one of 'auto', 'query_per_group', 'kv_group'"),
    ("not_toml", toml("[target\nsparsity = 0.5\n"), "run", "not valid TOML"),
    ("experiment_file_missing", lambda ctx: [str(ctx.tmp / "nope.toml"), "--run-dir", str(ctx.run)], "run",
     "nope.toml: experiment file not found; pass a TOML file such as configs/tiny.toml"),
    ("hf_without_path", tiny("model.source='hf'"), "run",
     "model.path: required when model.source = 'hf'; set it to the model's directory or file"),
    ("set_without_value", lambda ctx: ["configs/tiny.toml", "--run-dir", str(ctx.run), "--set", "target.sparsity"],
     "run", "--set target.sparsity: expected KEY=VALUE"),
    ("evaluate_workers_over_nodes", tiny("launcher.kind='srun'", "launcher.evaluate_workers=3"), "run",
     "launcher.evaluate_workers: 3 is more than launcher.num_nodes (1); under srun each worker takes a whole node"),
    ("finished_stage_config_changed", tiny("data.seq_len=64", until="tokenize", run=existing_run), "run",
     "the config of finished stage(s) prepare, tokenize differs from the one this run was started with "
     "(data.seq_len: 128 -> 64); pass --force"),
    # ds_configs (checked by `maskprune run` before any rank starts)
    ("ds_config_missing", tiny("mask_learn.ds_config='ds_configs/nope.json'", until=ML, run=existing_run), "run",
     f"mask_learn.ds_config: ds_config ds_configs/nope.json: not found (looked in {REPO}); "
     "use one of ds_configs/*.json"),
    ("ds_config_changed_on_resume", ds_config(json.dumps(ZERO3), interrupted=True), "run",
     "mask_learn: ds_config {tmp}/ds.json changed since the stage started (bf16.enabled: true -> false); its "
     "checkpoints were trained under the copy in {tmp}/run/mask_learn/ds_config.json: restore the file, or pass "
     "--force to start mask_learn over with the new one"),
    ("ds_config_not_json", ds_config("{\"zero_optimization\": {\"stage\": 3,}"), "run", "not valid JSON"),
    ("ds_config_stage2", ds_config(json.dumps({**ZERO3, "zero_optimization": {"stage": 2}})), "run",
     "zero_optimization.stage must be 3 (got 2)"),
    ("ds_config_auto", ds_config(json.dumps({**ZERO3, "gradient_clipping": "auto"})), "run",
     "'auto' values (gradient_clipping) need the HF Trainer; give concrete numbers"),
    # models (prepare, model.source = "hf")
    ("model_path_missing", tiny("model.source='hf'", "model.path='{tmp}/no_such_model'"), "stage",
     "no_such_model: no such directory; set model.path"),
    ("model_without_config", hf_model(lambda p: (p / "config.json").unlink()), "stage",
     "no config.json; point it at a Hugging Face model directory"),
    ("gpt2_model", hf_model(only_config(GPT2)), "stage",
     "model_type 'gpt2' is not a supported model family; maskprune prunes llama (LlamaForCausalLM), "
     "mistral (MistralForCausalLM), qwen2 (Qwen2ForCausalLM), qwen3 (Qwen3ForCausalLM), gemma3 "
     "(Gemma3ForCausalLM)"),
    ("gemma3_multimodal_model", hf_model(only_config(GEMMA3_MULTIMODAL)), "stage",
     "model_type 'gemma3' is not a supported model family (a multimodal Gemma-3 checkpoint "
     "(Gemma3ForConditionalGeneration); prune its text model (model_type gemma3_text, Gemma3ForCausalLM))"),
    ("remote_code_without_flag", hf_model(lambda p: edit_config(p, auto_map={"AutoModelForCausalLM": "m.X"})),
     "stage", "needs remote code (auto_map in config.json); set model.trust_remote_code = true only if you trust it"),
    ("pickled_weights_only", hf_model(pickled_only), "stage",
     "no .safetensors weights (found pickled weights ['pytorch_model.bin']; convert them to safetensors"),
    ("missing_shard", hf_model(missing_shard), "stage",
     "model-00002-of-00002.safetensors: listed in model.safetensors.index.json but missing"),
    ("truncated_shard", hf_model(truncated), "stage", "truncated or corrupt safetensors file"),
    ("wrong_tensor_shapes", hf_model(lambda p: edit_config(p, intermediate_size=128)), "stage",
     "model.layers.0.mlp.gate_proj.weight: shape (192, 64) in the weights, (128, 64) in config.json"),
    # tokenizers and data (tokenize)
    ("tokenizer_vocab_mismatch", hf_model(other_tokenizer, until="tokenize"), "stage",
     "has 300 tokens but the model"),
    ("empty_corpus", data_file("empty.txt", b"\n\n   \n\n"), "stage", "no documents (empty corpus)"),
    ("undecodable_bytes", data_file("bad.txt", b"a good document\n\nbad \xff\xfe bytes\n"), "stage",
     "undecodable UTF-8 bytes at byte 21; fix the file"),
    ("jsonl_missing_field", data_file("c.jsonl", b'{"text": "a b c"}\n{"txt": "d e"}\n', kind="jsonl"), "stage",
     "no field 'text' (has txt); set data.sources.field"),
    ("jsonl_not_json", data_file("d.jsonl", b'{"text": "a b c"}\n{"text": \n', kind="jsonl"), "stage",
     "not valid JSON"),
    ("data_path_matches_nothing", tiny("model.source='hf'", "model.path='{model}'",
                                       "data.sources=[{{kind = 'text', path = '{tmp}/none*.txt'}}]", until="tokenize"),
     "stage", "no file matches; check the path or glob"),
    # keep indices (hard_prune)
    ("masks_wrong_format", masks_run(unformatted_masks), "stage",
     "not a maskprune masks file (format None, expected 'maskprune.masks/1')"),
    ("keep_indices_wrong_layer_count", masks_run(three_layer_masks), "stage",
     "keep.q_heads: (3, 2) with values up to 3 does not fit the source (4 layers, 4 units)"),
    ("masks_file_missing", masks_run(no_masks), "stage", "masks.safetensors: no masks file"),
    # target shape (mask_learn, 2 ranks: checked before the model loads)
    pytest.param("arch_illegal_heads", tiny("target.arch.num_attention_heads=3", until=ML, run=existing_run),
                 "stage", "target.arch.num_attention_heads = 3 is not reachable in query_per_group mode; "
                 "legal head counts: [2, 4]", marks=slow, id="arch_illegal_heads"),
    pytest.param("ffn_alignment_no_fit", tiny("target.ffn_alignment=192", until=ML, run=existing_run), "stage",
                 "no legal shape fits the budget", marks=slow, id="ffn_alignment_no_fit"),
    # checkpoints (tools/zero_to_hf.py)
    ("tag_without_complete", checkpoint(complete=False, latest=False), "zero_to_hf",
     "incomplete checkpoint (no COMPLETE marker"),
    ("root_without_latest", checkpoint(complete=True, latest=False, give_root=True), "zero_to_hf",
     "neither a checkpoint tag folder nor a root with a `latest` file"),
]


def test_the_table_has_enough_cases() -> None:
    assert len(CASES) >= 25


# ----------------------------------------------------------------------------- checks

def snapshot(*roots: Path) -> dict[str, tuple[int, str]]:
    files = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                files[str(path)] = (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return files


def statuses(run_dir: Path) -> dict[str, str]:
    run = RunDir(run_dir)
    return {stage: run.state(stage).status for stage in STAGES}


def command(kind: str, tail: list[str]) -> list[str]:
    if kind == "zero_to_hf":
        return [sys.executable, str(REPO / "tools" / "zero_to_hf.py"), *tail]
    return [str(BIN / "maskprune"), "run", *tail]


def ids() -> list[str]:
    return [c.id if hasattr(c, "id") else c[0] for c in CASES]


@pytest.mark.parametrize("name, setup, kind, fragment", CASES, ids=ids())
def test_bad_input_fails_in_one_line_and_writes_nothing(name: str, setup: Callable[[Ctx], list[str]], kind: str,
                                                        fragment: str, tiny_tokenized: Path,
                                                        tmp_path: Path) -> None:
    ctx = Ctx(tmp=tmp_path, base=tiny_tokenized)
    tail = setup(ctx)
    statuses_before = statuses(ctx.run)
    done_before = {s for s, status in statuses_before.items() if status == "done"}
    before = snapshot(tmp_path, tiny_tokenized)
    proc = subprocess.run(command(kind, tail), cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                          timeout=600)
    shown = f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode != 0, shown
    assert "Traceback" not in proc.stdout + proc.stderr, shown
    lines = proc.stderr.strip().splitlines()
    errors = errors_all = [line for line in lines if "error" in line.lower()]
    if kind == "stage":
        # The stage's own line, then `maskprune run` saying which stage failed and how to resume.
        assert len(errors) == 2, shown
        assert errors[1].startswith("maskprune: error: stage ") and "failed (exit code 2)" in errors[1], shown
        errors = errors[:1]
    else:
        assert len(lines) == 1, shown
    assert errors[0].startswith("maskprune: error: "), shown
    assert fragment.format(tmp=tmp_path) in errors[0], shown

    # Nothing that existed changed, except `maskprune run`'s frozen config and the state record of
    # a stage that was not done (now running/failed); no stage became done.
    after = snapshot(tmp_path, tiny_tokenized)
    lock = ctx.run / ".lock"  # taken (rewritten) before anything in the run is read, released empty
    allowed = {str(ctx.run / "config.toml")} if kind == "stage" else set()
    allowed.add(str(lock))
    allowed |= {str(ctx.run / s / "state.json") for s in STAGES if s not in done_before}
    changed = sorted(p for p, v in before.items() if p not in allowed and after.get(p) != v)
    assert not changed, changed
    # The lock is the one new file a refused `maskprune run` may leave: released, naming no holder.
    assert not lock.exists() or lock.read_text() == "", lock.read_text()
    if kind != "stage":
        assert sorted(set(after) - set(before) - {str(lock)}) == [], "a refused command wrote files"
    now = statuses(ctx.run)
    if kind == "stage":
        # The stage named by the orchestrator failed; stages before it may have run (a model that
        # prepare accepts can still fail tokenize), none after it did, and it published no model.
        failed = errors_all[-1].removeprefix("maskprune: error: stage ").split()[0]
        assert now[failed] == "failed", now
        for stage in STAGES[STAGES.index(failed):]:
            assert now[stage] == "failed" if stage == failed else now[stage] == statuses_before[stage], now
        assert not (ctx.run / failed / "model").exists()
    else:
        assert now == statuses_before, now
    if kind == "zero_to_hf":
        assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())
