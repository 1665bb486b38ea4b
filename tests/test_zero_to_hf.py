"""tools/zero_to_hf.py: 2-rank ZeRO-3 checkpoints → HF equal to the weights gathered in the job; 70B on paper."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from maskprune.masks_io import load_keep_indices
from maskprune.safetensors_io import SafetensorsDir

from helpers import REPO, cpu_env, run_deepspeed

JOB = REPO / "tests" / "ds_jobs" / "zero3_save.py"


def tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "zero_to_hf.py"), *args], cwd=REPO,
                          env=cpu_env(), capture_output=True, text=True, timeout=600)


def tiny_model(folder: Path, **overrides) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(**{**dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48), **overrides})
    LlamaForCausalLM(config).save_pretrained(folder)


@pytest.mark.slow
def test_continued_pretrain_checkpoint_equals_gathered(tmp_path: Path) -> None:
    tiny_model(tmp_path / "model", tie_word_embeddings=True)
    root, gathered = tmp_path / "ckpt", tmp_path / "gathered.safetensors"
    run_deepspeed(JOB, str(tmp_path / "model"), str(root), str(gathered), "continued_pretrain", timeout=900)
    proc = tool(str(root), str(tmp_path / "hf"))  # resolves `latest`
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = load_file(str(gathered))
    out = SafetensorsDir(tmp_path / "hf")
    assert sorted(out.names()) == sorted(want)  # tied: lm_head is embed_tokens, stored once
    for name, value in want.items():
        assert torch.equal(out.get(name), value), name
    before = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], want["model.layers.0.mlp.up_proj.weight"])
    report = json.loads((tmp_path / "hf" / "prune_report.json").read_text())
    assert report["origin"]["stage"] == "continued_pretrain" and report["origin"]["step"] == 2
    assert report["params_after"] == report["params_before"] == 64 * 32 + 32 + 2 * (
        2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 48 + 64)
    assert report["max_abs_diff"] == 0.0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert torch.equal(loaded.lm_head.weight, want["model.embed_tokens.weight"])

    # A tag without COMPLETE (an interrupted save) is refused with one clear line, nothing written.
    shutil.copytree(root / "global_step2", root / "global_step3")
    (root / "global_step3" / "COMPLETE").unlink()
    proc = tool(str(root), str(tmp_path / "hf3"), "--tag", "global_step3")
    assert proc.returncode == 2 and not (tmp_path / "hf3").exists()
    assert proc.stderr.strip().splitlines()[-1] == (
        f"maskprune: error: {root / 'global_step3'}: incomplete checkpoint (no COMPLETE marker, the "
        "save was interrupted); use an earlier tag or the root's `latest`")


@pytest.mark.slow
def test_mask_learn_checkpoint_merges_lora_and_slices(tmp_path: Path) -> None:
    tiny_model(tmp_path / "model")
    root, gathered = tmp_path / "ckpt", tmp_path / "gathered.safetensors"
    run_deepspeed(JOB, str(tmp_path / "model"), str(root), str(gathered), "mask_learn", timeout=900)
    tag = root / "global_step2"
    assert not any("lora" not in n for n in _checkpoint_names(tag))  # frozen base excluded
    proc = tool(str(tag), str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr[-3000:]

    lora = load_file(str(gathered))
    assert sorted(lora) == sorted(f"model.layers.{i}.{m}.lora_{ab}.weight" for i in range(2)
                                  for m in ("self_attn.q_proj", "mlp.down_proj") for ab in "AB")
    base = load_file(str(tmp_path / "model" / "model.safetensors"))
    keep = load_keep_indices(tag / "maskprune_masks.safetensors")
    out = SafetensorsDir(tmp_path / "hf")
    for layer in range(2):
        p = f"model.layers.{layer}."
        q_rows = (keep.q_heads[layer].unsqueeze(1) * 8 + torch.arange(8)).flatten()
        delta = 2.0 * (lora[p + "self_attn.q_proj.lora_B.weight"] @ lora[p + "self_attn.q_proj.lora_A.weight"])
        assert torch.equal(out.get(p + "self_attn.q_proj.weight"), (base[p + "self_attn.q_proj.weight"] + delta)[q_rows])
        delta = 2.0 * (lora[p + "mlp.down_proj.lora_B.weight"] @ lora[p + "mlp.down_proj.lora_A.weight"])
        want = (base[p + "mlp.down_proj.weight"] + delta)[:, keep.ffn[layer]]
        assert torch.equal(out.get(p + "mlp.down_proj.weight"), want)
        assert torch.equal(out.get(p + "self_attn.o_proj.weight"), base[p + "self_attn.o_proj.weight"][:, q_rows])
        assert delta.abs().max() > 0  # the LoRA actually trained
    report = json.loads((tmp_path / "hf" / "prune_report.json").read_text())
    assert report["config"] == {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 24}
    assert report["lora_merged"] and report["max_abs_diff"] <= 1e-5


def _checkpoint_names(tag: Path) -> list[str]:
    from maskprune.zero_checkpoint import ZeroCheckpoint

    return ZeroCheckpoint(tag).names()


@pytest.mark.parametrize("model,mode,params,heads,kv,ffn", [
    ("llama-2-70b", "kv_group", 34_751_127_552, 32, 4, 14336),
    ("llama-3-70b", "query_per_group", 35_992_641_536, 32, 8, 13824),
])
def test_70b_export_on_paper(model: str, mode: str, params: int, heads: int, kv: int, ffn: int) -> None:
    proc = tool("--dry-run", model, "--attn-mode", mode, "--sparsity", "0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    vocab = 32000 if model == "llama-2-70b" else 128256
    d = 8192
    per_layer = 2 * d * heads * 128 + 2 * d * kv * 128 + 3 * d * ffn + 2 * d
    assert result["params_after"] == params == 2 * vocab * d + d + 80 * per_layer
    assert result["params_before"] == 2 * vocab * d + d + 80 * (2 * d * 64 * 128 + 2 * d * 8 * 128 + 3 * d * 28672 + 2 * d)
    assert result["config"] == {"hidden_size": d, "num_hidden_layers": 80, "num_attention_heads": heads,
                                "num_key_value_heads": kv, "head_dim": 128, "intermediate_size": ffn}
    assert result["seconds"] < 60


MEASURE = """
import json, runpy, sys
import psutil
import maskprune.prune_job, maskprune.zero_checkpoint  # the tool's imports, before the baseline
from transformers import LlamaConfig, LlamaForCausalLM  # imported lazily by the export: ~100 MB of code
sys.argv = ["zero_to_hf.py", *sys.argv[1:]]
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # reset the peak (VmHWM): transients of the imports above are not the tool's
base = psutil.Process().memory_info().rss
try:
    runpy.run_path("tools/zero_to_hf.py", run_name="__main__")
except SystemExit as exit:
    code = exit.code
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"code": code, "growth": peak - base}))
"""


@pytest.mark.slow
def test_consolidation_memory_near_one_layer(tmp_path: Path) -> None:
    """8 layers of 15 MB: consolidating grows RSS by a few layers, not a whole model (121 MB)."""
    tiny_model(tmp_path / "model", vocab_size=512, hidden_size=512, num_hidden_layers=8,
               num_attention_heads=8, num_key_value_heads=2, intermediate_size=2048)
    root, gathered = tmp_path / "ckpt", tmp_path / "gathered.safetensors"
    run_deepspeed(JOB, str(tmp_path / "model"), str(root), str(gathered), "continued_pretrain", timeout=900)
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(root), str(tmp_path / "hf"),
                           "--equivalence-sequences", "0"], cwd=REPO, env=cpu_env(),
                          capture_output=True, text=True, timeout=600)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, proc.stderr[-3000:]
    layer = 4 * (2 * 512 * 512 + 2 * 128 * 512 + 3 * 2048 * 512 + 2 * 512)
    model = 4 * (2 * 512 * 512 + 512) + 8 * layer
    # Measured ~2.5 layers; without dropping the mapped pages after each read it is 1.2x the model.
    assert layer == 15_208_448 and result["growth"] < 4 * layer < 0.51 * model
    assert torch.equal(SafetensorsDir(tmp_path / "hf").get("model.layers.7.mlp.up_proj.weight"),
                       load_file(str(gathered))["model.layers.7.mlp.up_proj.weight"])
