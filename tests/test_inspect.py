"""tools/inspect_masks.py: learned shape, Jaccard overlap across layers, bias compensation, a PNG heatmap."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from maskprune.masks_io import KeepIndices, save_keep_indices

from helpers import REPO, cpu_env


def test_inspect_reports_overlap_and_heatmap(tmp_path: Path) -> None:
    keep = KeepIndices(q_heads=torch.tensor([[0, 1], [1, 2], [0, 1]]),
                       kv_heads=torch.tensor([[0], [1], [0]]),
                       ffn=torch.tensor([[0, 1, 2, 3], [2, 3, 4, 5], [0, 1, 2, 4]]),
                       method="flap", attn_mode="kv_group", layers=torch.tensor([0, 2]),
                       bias={"down_proj": torch.zeros(3, 32).index_fill_(1, torch.tensor([5]), 2.0)})
    keep.bias["down_proj"][1, 7] = 3.0  # layer 1: (2, 3) -> sqrt(13)
    save_keep_indices(tmp_path / "masks.safetensors", keep)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(
        {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 8,
         "hidden_size": 32, "num_hidden_layers": 3}))
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "inspect_masks.py"),
                           str(tmp_path / "masks.safetensors"), "--model", str(tmp_path / "model"),
                           "--png", str(tmp_path / "kept.png"), "--json"],
                          env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["shape"] == {"q_heads": "2/4", "kv_heads": "1/2", "ffn": "4/8", "layers": "2/3"}
    assert summary["overlap"]["q_heads"] == {"consecutive": [0.3333, 0.3333], "vs_layer0": [1.0, 0.3333, 1.0]}
    assert summary["overlap"]["kv_heads"] == {"consecutive": [0.0, 0.0], "vs_layer0": [1.0, 0.0, 1.0]}
    # {0,1,2,3} vs {2,3,4,5}: 2/6; {2,3,4,5} vs {0,1,2,4}: 2/6; {0,1,2,3} vs {0,1,2,4}: 3/5
    assert summary["overlap"]["ffn"] == {"consecutive": [0.3333, 0.3333], "vs_layer0": [1.0, 0.3333, 0.6]}
    assert summary["kept_layers"] == [0, 2]
    assert summary["bias_norm"] == {"down_proj": [2.0, round(13 ** 0.5, 4), 2.0]}
    assert (tmp_path / "kept.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bad = subprocess.run([sys.executable, str(REPO / "tools" / "inspect_masks.py"), str(tmp_path / "none")],
                         env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("maskprune: error:")
