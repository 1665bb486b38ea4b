"""A ZeRO-3 job that loads a model through `build_zero3_model` and records what each rank got.

    deepspeed --num_gpus N tests/ds_jobs/stream_load_job.py MODEL_DIR OUT_DIR MODE DS_CONFIG

MODE check: every parameter is gathered (all ranks enter GatheredParameters) and rank 0 writes
them, the non-persistent buffers and the logits of a forward pass on fixed tokens to
OUT_DIR/gathered.safetensors. MODE memory: a thread samples this rank's RssAnon every 10 ms from
before anything is imported beyond the stdlib to after the load, and each rank writes
OUT_DIR/rank{r}.json with its baseline (after `import deepspeed, transformers` and
init_distributed and the model code, before the model) and its peak. MODE memory_from_pretrained: the same
measurement for transformers' own from_pretrained under HfDeepSpeedConfig (the path this
replaced), for the before/after figures.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler:
    """Polls RssAnon; the kernel reports only the peak of total RSS (VmHWM), which counts the
    memory-mapped checkpoint pages (page cache) too."""

    def __init__(self, interval_s: float = 0.01):
        self.peak = rss_anon_bytes()
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_bytes())
            time.sleep(self._interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_bytes())
        return self.peak


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it
    model_dir, out_dir, mode, ds_path = Path(args[0]), Path(args[1]), args[2], args[3]
    sampler = PeakSampler()
    # The baseline includes the libraries and model code any load imports (111 MB of RssAnon on
    # their own): a fixed cost per rank, whatever the model's size.
    import deepspeed  # noqa: F401
    import torch
    import transformers.integrations.deepspeed  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    from maskprune.config import TrainLoopConfig
    from maskprune.dist import init_distributed
    from maskprune.training import build_zero3_model, load_ds_config

    info = init_distributed()
    ds = load_ds_config(ds_path, TrainLoopConfig())
    baseline = rss_anon_bytes()
    started = time.perf_counter()
    if mode == "memory_from_pretrained":
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        from maskprune.training import model_dtype

        hf_ds = HfDeepSpeedConfig(ds)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=model_dtype(ds))
    else:
        model, hf_ds = build_zero3_model(model_dir, ds)
    seconds = time.perf_counter() - started
    peak = sampler.stop()
    if mode.startswith("memory"):
        partition = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
        (out_dir / f"rank{info.rank}.json").write_text(json.dumps(
            {"baseline": baseline, "peak": peak, "partition_bytes": partition, "seconds": seconds}))
        return
    tensors: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            tensors[name] = param.detach().clone()
    for name, buffer in model.named_buffers():
        tensors[f"buffer:{name}"] = buffer.detach().clone()
    tokens = torch.arange(3 * 17).reshape(3, 17) * 7 % model.config.vocab_size
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None), torch.no_grad():
        tensors["logits"] = model(input_ids=tokens).logits.float()
    tensors["tokens"] = tokens
    if info.rank == 0:
        from safetensors.torch import save_file

        save_file(tensors, str(out_dir / "gathered.safetensors"))


if __name__ == "__main__":
    main()
