"""Inspect learned keep indices: the uniform shape, how the kept units overlap across layers, a heatmap.

    python tools/inspect_masks.py RUN/mask_learn/masks.safetensors --model RUN/prepare/model
    python tools/inspect_masks.py masks.safetensors --png kept.png --json

Overlap is the Jaccard index |A ∩ B| / |A ∪ B| of the kept unit sets (query heads, KV heads, FFN
channels) between consecutive layers and against layer 0: near 1 means every layer keeps the same
units, near the kept fraction means the choice is unrelated across layers. The PNG shows kept units
(white) per layer (rows) for query heads and FFN channels. Bias compensation (FLAP, or mask-learn's
`bias_compensation`): the L2 norm per layer of what hard-prune adds to o_proj's and down_proj's biases.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from maskprune.masks_io import KeepIndices, load_keep_indices

UNITS = ("q_heads", "kv_heads", "ffn")


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    sa, sb = set(a.tolist()), set(b.tolist())
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def source_counts(keep: KeepIndices, config: dict | None) -> dict[str, int]:
    """Units per layer in the source: from its config, else the score widths, else the largest index."""
    if config is not None:
        heads = config["num_attention_heads"]
        return {"q_heads": heads, "kv_heads": config.get("num_key_value_heads") or heads,
                "ffn": config["intermediate_size"], "hidden": config["hidden_size"],
                "layers": config["num_hidden_layers"]}
    counts = {name: int(getattr(keep, name).max()) + 1 for name in UNITS}
    if "ffn" in keep.scores:
        counts["ffn"] = keep.scores["ffn"].shape[1]
    counts["layers"] = keep.q_heads.shape[0]
    counts["hidden"] = int(keep.hidden.max()) + 1 if keep.hidden is not None else 0
    return counts


def summarize(keep: KeepIndices, counts: dict[str, int]) -> dict:
    layers = keep.q_heads.shape[0]
    shape = {name: f"{getattr(keep, name).shape[1]}/{counts[name]}" for name in UNITS}
    shape["layers"] = f"{len(keep.layers) if keep.layers is not None else layers}/{counts['layers']}"
    if keep.hidden is not None:
        shape["hidden"] = f"{len(keep.hidden)}/{counts['hidden']}"
    overlap = {name: {"consecutive": [round(jaccard(getattr(keep, name)[i - 1], getattr(keep, name)[i]), 4)
                                      for i in range(1, layers)],
                      "vs_layer0": [round(jaccard(getattr(keep, name)[0], getattr(keep, name)[i]), 4)
                                    for i in range(layers)]}
               for name in UNITS}
    # FLAP-style compensation: how much each layer's removed units are replaced by a constant output.
    bias = {name: [round(float(row.norm()), 4) for row in value] for name, value in sorted(keep.bias.items())}
    return {"method": keep.method, "attn_mode": keep.attn_mode, "shape": shape, "overlap": overlap,
            "kept_layers": keep.layers.tolist() if keep.layers is not None else list(range(layers)),
            "bias_norm": bias}


def heatmap(keep: KeepIndices, counts: dict[str, int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    layers = keep.q_heads.shape[0]
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.5 + 0.25 * layers),
                             gridspec_kw={"width_ratios": [1, 3]})
    for ax, name, title in ((axes[0], "q_heads", "kept query heads"), (axes[1], "ffn", "kept FFN channels")):
        grid = torch.zeros(layers, counts[name])
        grid.scatter_(1, getattr(keep, name), 1.0)
        ax.imshow(grid.numpy(), aspect="auto", cmap="gray", interpolation="nearest", vmin=0, vmax=1)
        ax.set_title(title)
        ax.set_xlabel("unit")
        ax.set_ylabel("layer")
    fig.suptitle(f"{keep.method} ({keep.attn_mode})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("masks", help="a masks.safetensors file (KeepIndices)")
    parser.add_argument("--model", help="source HF folder, for the source unit counts")
    parser.add_argument("--png", help="heatmap path (default: beside the masks, .png)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    try:
        keep = load_keep_indices(Path(args.masks))
        config = json.loads((Path(args.model) / "config.json").read_text()) if args.model else None
    except (ValueError, FileNotFoundError) as err:
        print(f"maskprune: error: {err}", file=sys.stderr)
        return 2
    counts = source_counts(keep, config)
    summary = summarize(keep, counts)
    png = Path(args.png) if args.png else Path(args.masks).with_suffix(".png")
    heatmap(keep, counts, png)
    summary["png"] = str(png)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['method']} ({summary['attn_mode']}): " + ", ".join(f"{k} {v}" for k, v in summary["shape"].items()))
    for name in UNITS:
        print(f"{name:9s} overlap with previous layer: {summary['overlap'][name]['consecutive']}")
        print(f"{'':9s} overlap with layer 0:        {summary['overlap'][name]['vs_layer0']}")
    for name, norms in summary["bias_norm"].items():
        print(f"bias compensation, {name}: L2 norm per layer {norms}")
    if not summary["bias_norm"]:
        print("bias compensation: none")
    print(f"heatmap: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
