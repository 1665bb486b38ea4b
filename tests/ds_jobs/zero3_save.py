"""A 2-rank ZeRO-3 job that writes a checkpoint in this project's layout, for tests/test_zero_to_hf.py.

    deepspeed --num_gpus 2 tests/ds_jobs/zero3_save.py MODEL_DIR CKPT_ROOT GATHERED.safetensors STAGE

STAGE mask_learn: base weights frozen and excluded from the checkpoint, LoRA children on q_proj and
down_proj trained, masks file beside it; continued_pretrain: every weight trained. After a couple
of steps the checkpoint is saved (`<tag>/` + maskprune_meta.json + COMPLETE, then `latest`) and
every trainable weight is gathered inside the job with GatheredParameters and saved by rank 0:
what tools/zero_to_hf.py must reproduce exactly.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from maskprune.dist import init_distributed

RANK, ALPHA, TARGETS = 4, 8.0, ("self_attn.q_proj", "mlp.down_proj")


def attach_lora(model: torch.nn.Module) -> None:
    """LoRA as child Linear modules of each targeted nn.Linear (names …q_proj.lora_A.weight)."""
    for name, module in model.named_modules():
        if name.endswith(TARGETS):
            module.lora_A = torch.nn.Linear(module.in_features, RANK, bias=False)
            module.lora_B = torch.nn.Linear(RANK, module.out_features, bias=False)
            torch.nn.init.zeros_(module.lora_B.weight)
            module.register_forward_hook(
                lambda mod, args, out: out + (ALPHA / RANK) * mod.lora_B(mod.lora_A(args[0])))


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it
    model_dir, root, gathered_path, stage = args
    info = init_distributed()
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    ds_config = json.loads(Path("ds_configs/zero3_cpu_fp32.json").read_text())
    ds_config["optimizer"]["params"]["lr"] = 1e-2  # move the weights visibly in two steps
    keep_alive = HfDeepSpeedConfig(ds_config)  # makes from_pretrained partition under zero.Init
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = stage == "mask_learn"
    if lora:
        model.requires_grad_(False)
        attach_lora(model)  # plain params; the ZeRO-3 engine partitions them at initialize
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    gen = torch.Generator().manual_seed(info.rank)
    for _ in range(2):
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=gen)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()  # B starts at zero, so A only moves in the second step

    tag = "global_step2"
    engine.save_checkpoint(root, tag=tag, exclude_frozen_parameters=lora, save_latest=False)
    gathered = {}
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            with deepspeed.zero.GatheredParameters([param]):  # collective: every rank enters
                gathered[name] = param.detach().clone()
    torch.distributed.barrier()
    if info.rank == 0:
        from safetensors.torch import save_file

        from maskprune.arch import LlamaShape
        from maskprune.masks_io import keep_from_scores, save_keep_indices

        tag_dir = Path(root) / tag
        masks = None
        if lora:
            shape = LlamaShape.from_hf_config(model.config)
            g = torch.Generator().manual_seed(7)
            keep = keep_from_scores(torch.rand(shape.num_hidden_layers, shape.num_attention_heads, generator=g),
                                    torch.rand(shape.num_hidden_layers, shape.intermediate_size, generator=g),
                                    shape, shape.num_key_value_heads, shape.intermediate_size // 2,
                                    "query_per_group", "maskprune")
            masks = "maskprune_masks.safetensors"
            save_keep_indices(tag_dir / masks, keep)
        meta = {"stage": stage, "step": 2, "model_dir": str(Path(model_dir).resolve()),
                "lora": {"r": RANK, "alpha": ALPHA, "targets": list(TARGETS)} if lora else None,
                "masks": masks, "frozen_excluded": lora}
        (tag_dir / "maskprune_meta.json").write_text(json.dumps(meta))
        (tag_dir / "COMPLETE").write_text("")
        (Path(root) / "latest").write_text(tag)
        save_file(gathered, gathered_path)
    del keep_alive


if __name__ == "__main__":
    main()
