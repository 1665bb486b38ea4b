"""The experiment file: typed sections, dotted overrides, one-line errors naming the field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import REPO, run_cli
from maskprune.config import ConfigError, config_from_dict, dump_config, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


def test_tiny_config_loads_and_round_trips(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / "tiny.toml")
    assert cfg.model.tiny.num_attention_heads == 4 and cfg.model.tiny.num_key_value_heads == 2
    assert cfg.data.sources[0].kind == "treebank"
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg


def test_dotted_overrides_are_typed() -> None:
    cfg = load_config(REPO / "configs" / "tiny.toml",
                      ["mask_learn.train.lr=1e-3", "target.sparsity=0.3", "model.source=hf",
                       "model.path=/models/x", "mask_learn.lora.targets=['q_proj']"])
    assert cfg.mask_learn.train.lr == 1e-3 and cfg.target.sparsity == 0.3
    assert cfg.model.source == "hf" and cfg.model.path == "/models/x"
    assert cfg.mask_learn.lora.targets == ["q_proj"]


@pytest.mark.parametrize("text, message", [
    ("[mask_learn.train]\nlearning_rate = 1e-3\n",
     "mask_learn.train.learning_rate: unknown key; did you mean 'mask_learn.train.lr'?"),
    ("[target]\nsparsty = 0.5\n", "target.sparsty: unknown key; did you mean 'target.sparsity'?"),
    ("[mask_learn.train]\nsteps = \"many\"\n", "mask_learn.train.steps: expected an integer, got str 'many'"),
    ("[model]\nsource = \"hf\"\n", "model.path: required when model.source = 'hf'"),
    ("[target]\nsparsity = 1.5\n", "target.sparsity: must be in (0, 1), got 1.5"),
    ("[target]\nsparsity = 0.0\n", "target.sparsity: must be in (0, 1), got 0.0"),
    ("[target]\nbudget = \"bytes\"\n", "target.budget: 'bytes' is not one of 'params', 'flops'"),
    ("[target]\nattn_mode = \"heads\"\n", "target.attn_mode: 'heads' is not one of 'auto', 'query_per_group', 'kv_group'"),
    ("[target]\nprune_hidden = true\n", "target.prune_hidden: no stage chooses hidden channels or layers to cut "
     "yet (mask_learn and the one-shot baselines cut attention heads and FFN channels; hard_prune slices hidden "
     "channels and layers only where a masks file lists them); set it to false"),
    ("[target]\nprune_layers = true\n", "target.prune_layers: no stage chooses"),
    ("[mask_learn.lora]\nrank = 0\n", "mask_learn.lora: rank must be >= 1 and dropout in [0, 1), got rank 0"),
    ("[mask_learn.lora]\ndropout = 1.0\n", "mask_learn.lora: rank must be >= 1 and dropout in [0, 1), got rank 8, "
     "dropout 1.0"),
    ("[mask_learn.lora]\ntargets = [\"q\"]\n", "mask_learn.lora.targets: ['q'] must name each projection at most "
     "once, one or more of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"),
    ("[mask_learn.lora]\ntargets = []\n", "mask_learn.lora.targets: [] must name"),
    ("[mask_learn.lora]\ntargets = [\"q_proj\", \"q_proj\"]\n", "mask_learn.lora.targets: ['q_proj', 'q_proj'] must"),
])
def test_bad_experiment_files_name_the_field(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert str(err.value).startswith(message)


def test_cli_prints_one_line_error_and_writes_nothing(tmp_path: Path) -> None:
    bad = write(tmp_path, "[target]\nsparsity = 2\n")
    run_dir = tmp_path / "run"
    proc = run_cli("run", str(bad), "--run-dir", str(run_dir), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["maskprune: error: target.sparsity: must be in (0, 1), got 2.0; "
                                                "or give target.arch instead"]
    assert not run_dir.exists()


def test_unknown_section_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match=r"^mask_lean: unknown key; did you mean 'mask_learn'\?"):
        config_from_dict({"mask_lean": {}})


class EightWayDataParallel:
    """The model-parallel-unit interface DeepSpeedConfig asks for its data-parallel size."""

    def get_data_parallel_world_size(self) -> int:
        return 8

    def get_sequence_parallel_world_size(self) -> int:
        return 1


def test_every_ds_config_parses_with_deepspeed() -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    from maskprune.config import TrainLoopConfig
    from maskprune.training import load_ds_config

    files = sorted((REPO / "ds_configs").glob("*.json"))
    assert len(files) >= 3
    for path in files:
        ds = load_ds_config(path, TrainLoopConfig(micro_batch_size=2, grad_accum=4))
        parsed = DeepSpeedConfig(ds, mpu=EightWayDataParallel())  # the parser DeepSpeed's engine uses
        assert parsed.zero_optimization_stage == 3, path.name
        assert parsed.train_micro_batch_size_per_gpu == 2, path.name
        assert parsed.gradient_accumulation_steps == 4, path.name
        assert "auto" not in json.dumps(json.loads(path.read_text())), path.name
