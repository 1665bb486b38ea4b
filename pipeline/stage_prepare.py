"""Stage 0, prepare: the source model as one local Hugging Face directory (see maskprune.model_source).

    python pipeline/stage_prepare.py --run-dir runs/tiny
"""
from maskprune.arch import LlamaShape
from maskprune.dist import log, stage_argv_parser
from maskprune.model_source import materialize
from maskprune.stage import StageRun, publish_dir, run_stage, staging_dir


def main() -> None:
    args = stage_argv_parser(__doc__).parse_args()
    run = StageRun("prepare", args.run_dir)
    final = run.dir / "model"
    if run.cfg.model.source == "hf":
        model_dir, facts = materialize(run.cfg.model, run.cfg.data, final)
    else:
        tmp = staging_dir(final)
        _, facts = materialize(run.cfg.model, run.cfg.data, tmp)
        publish_dir(tmp, final)
        model_dir = final
    from transformers import AutoConfig

    shape = LlamaShape.from_hf_config(AutoConfig.from_pretrained(model_dir))
    log(f"prepare: source model {model_dir}: {shape.param_count():,} parameters, "
        f"{shape.num_hidden_layers} layers, {shape.num_attention_heads} heads / "
        f"{shape.num_key_value_heads} KV, FFN {shape.intermediate_size}")
    run.finish({"model": str(model_dir), "params": shape.param_count(), **facts})


if __name__ == "__main__":
    run_stage(main)
