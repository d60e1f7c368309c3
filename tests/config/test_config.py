"""Config: presets load, precedence holds, bad input fails naming the full key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from soft.config.core import describe, from_dict, save_yaml, to_dict
from soft.config.errors import ConfigError
from soft.config.root import RootConfig, load_config

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_preset_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.exit_plan().final == cfg.model.num_layers


def test_paper_13b_preset():
    cfg = load_config(Path("configs/llama2_13b_alpaca.yaml"))
    assert cfg.soft.exit_layers == [12, 16, 20, 24, 28, 32, 36, 40]
    assert cfg.exit_plan().weights == (0.125,) * 8
    assert (cfg.train.lr, cfg.train.seed, cfg.data.seq_length, cfg.data.format) == (
        2e-5,
        42,
        2048,
        "alpaca",
    )
    assert load_config(Path("configs/llama2_70b.yaml")).model.num_query_groups == 8


def test_default_config_file_equals_embedded_default():
    assert to_dict(load_config(Path("configs/default.yaml"))) == to_dict(load_config(None))


def test_precedence_defaults_yaml_cli(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  train_iters: 7\n  seed: 3\n")
    cfg = load_config(f, ["train.seed=5", "soft.exit_layers=[2,4]"])
    assert (cfg.train.train_iters, cfg.train.seed, cfg.soft.exit_layers) == (7, 5, [2, 4])
    assert cfg.train.lr == RootConfig().train.lr


@pytest.mark.parametrize(
    "override, message",
    [
        ("modle.num_layers=2", r"unknown config key 'modle'"),
        ("model.num_layer=2", r"unknown config key 'model.num_layer' in section 'model'"),
        ("train.train_iters=abc", r"'train.train_iters': expected int"),
        ("train.lr=fast", r"'train.lr': expected float"),
        ("soft.exit_layers=[2,x]", r"'soft.exit_layers\[1\]': expected int"),
        ("soft.mode=sorted", r"'soft.mode': expected 'soft' \| 'sft'"),
        ("soft.exit_layers=[0,4]", r"exit 0 is outside 1..model.num_layers=4"),
        ("soft.exit_layers=[2,9]", r"exit 9 is outside"),
        ("soft.exit_layers=[2,2,4]", r"duplicate exits"),
        ("soft.exit_layers=[3,2,4]", r"must be sorted"),
        ("soft.exit_layers=[1,2]", r"the last layer \(4\) must be an exit"),
        ("soft.exit_weights=[1,2]", r"'soft.exit_weights': expected 4 weights"),
        ("soft.exit_weights=[1,-1,1,1]", r"weights must be >= 0"),
        ("train.global_batch_size=6", r"'train.global_batch_size' \(6\) must be a multiple"),
        (
            "parallel.tensor_model_parallel_size=3",
            r"'parallel.tensor_model_parallel_size' \(3\) must divide",
        ),
        (
            "parallel.sequence_parallel=true",
            r"'parallel.sequence_parallel' needs tensor_model_parallel_size > 1",
        ),
        ("data.seq_length=4", r"'data.seq_length': expected >= 8"),
        ("model.fp8=e5m2", r"'model.fp8': expected 'e4m3' \| 'hybrid', got 'e5m2'"),
        ("train.train_iters", r"expected key=value"),
        (
            "train.lr_warmup_iters=60",
            r"'train.lr_warmup_iters' \(60\): expected 0 <= value < train.train_iters \(60\)",
        ),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_yaml_file_names_the_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_pipeline_split_must_cover_layers():
    with pytest.raises(ConfigError, match="cannot be split over 3 pipeline stages"):
        load_config(None, ["parallel.pipeline_model_parallel_size=3"])
    uneven = ["model.num_layers=6", "parallel.pipeline_model_parallel_size=3"]
    cfg = load_config(
        None,
        [
            *uneven,
            "parallel.num_layers_in_first_pipeline_stage=1",
            "parallel.num_layers_in_last_pipeline_stage=1",
        ],
    )
    assert cfg.parallel.stage_layer_counts(6) == [1, 4, 1]
    with pytest.raises(ConfigError, match="5 layers left for 2 stage"):
        load_config(None, [*uneven, "parallel.num_layers_in_first_pipeline_stage=1"])


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["soft.exit_layers=[1,4]", "train.lr=0.01"])
    save_yaml(cfg, tmp_path / "config.yaml")
    again = from_dict(RootConfig, yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert to_dict(again) == to_dict(cfg)


def test_every_field_has_help():
    missing = [key for key, _, _, text in describe(RootConfig) if not text]
    assert missing == []


def test_describe_shows_defaults_factories_and_required_fields():
    @dataclasses.dataclass
    class Section:
        required: int
        plain: float = 1.5
        made: list[int] = dataclasses.field(default_factory=lambda: [1, 2])

    defaults = {key: default for key, _, default, _ in describe(Section)}
    assert defaults == {"required": "(required)", "plain": "1.5", "made": "[1, 2]"}


def test_config_reference_doc_is_current():
    from soft.config.cli_reference import DOC, render

    assert DOC.read_text() == render(), "run: python tools/config_reference.py --write"


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 2e-5\n  min_lr: 1e-6\n")
    assert load_config(f, ["train.weight_decay=1e-2"]).train.lr == 2e-5
    with pytest.raises(ConfigError, match="'train.lr': expected float, got '2e-5x'"):
        load_config(None, ["train.lr=2e-5x"])


def test_ict_refuses_full_recompute():
    """ict's frozen backbone is never backpropagated: megatron-core would not rerun its
    checkpointed segments, and the heads inside them would get no gradient."""
    with pytest.raises(ConfigError, match="soft.mode=ict cannot"):
        load_config(
            None,
            [
                "soft.mode=ict",
                "checkpoint.load_dir=x",
                "checkpoint.finetune=true",
                "model.recompute_granularity=full",
            ],
        )


def test_default_warmup_fits_a_shortened_run():
    """A new user shortening the default job (train.train_iters=3) is not stopped by the
    warmup: null means 5 steps, capped at a quarter of the run, with a note when capped."""
    default = load_config(None).train
    assert default.lr_warmup_iters is None and default.warmup_iters == 5
    assert default.warmup_note() is None
    short = load_config(None, ["train.train_iters=3"]).train
    assert short.warmup_iters == 0
    assert "0 warmup steps" in short.warmup_note()
    assert load_config(None, ["train.train_iters=10"]).train.warmup_iters == 2
    assert load_config(None, ["train.train_iters=20"]).train.warmup_iters == 5  # golden run
    explicit = load_config(None, ["train.train_iters=3", "train.lr_warmup_iters=2"]).train
    assert explicit.warmup_iters == 2 and explicit.warmup_note() is None
