"""YAML -> overrides -> one validated Config; every mistake names its key."""

from pathlib import Path

import pytest

from pegasus_dist.config import Config, config_from_dict, load_config
from pegasus_dist.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "name", ["pretrain.yaml", "finetune.yaml", "smoke/pretrain.yaml", "smoke/finetune.yaml"]
)
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.train.phase in name or name.startswith("smoke/" + cfg.train.phase)


def test_paper_recipe_phases():
    pre = load_config(REPO / "configs/pretrain.yaml")
    fine = load_config(REPO / "configs/finetune.yaml")
    assert (pre.data.shard_set, pre.train.epochs) == ("mix", 100)
    assert (fine.data.shard_set, fine.train.epochs) == ("horse_bird", 300)
    assert fine.train.init_from == "runs/pretrain"
    assert pre.model == fine.model  # both phases train the same network


def test_base_files_merge_and_later_files_win(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {epochs: 7, seed: 3}\nmodel: {latent_dim: 9}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain: {epochs: 2}\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert (cfg.train.epochs, cfg.train.seed, cfg.model.latent_dim) == (2, 3, 9)


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["train.epochs=5", "model.channels=[8,8,8,8]", "optim.lr=3e-4",
                             "wandb.mode=disabled", "run.name=x"])
    assert cfg.train.epochs == 5 and cfg.model.channels == [8, 8, 8, 8]
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.wandb.mode == "disabled"


def test_an_unquoted_no_is_the_choice_no():
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_resolved_config_round_trips():
    cfg = load_config(REPO / "configs/smoke/finetune.yaml", ["train.max_steps=4"])
    import yaml

    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.epoch=3"], "unknown config key train.epoch; did you mean train.epochs?"),
        (["trian.epochs=3"], "unknown config key trian"),
        (["train.epochs=three"], "train.epochs must be int"),
        (["train.epochs=-1"], "train.epochs must be at least 1"),
        (["model.latent_dim=0"], "model.latent_dim must be at least 1"),
        (["model.image_size=40"], "model.image_size must be a positive multiple of 16"),
        (["train.mixed_precision=fp8"], "train.mixed_precision must be one of no, bf16, fp16"),
        (["model.channels=[8,8]"], "model.channels must list 4 widths"),
        (["model.upsample=bilinear"], "model.upsample must be one of transpose, resize"),
        (["model.likelihood=gaussian"], "model.likelihood must be one of bernoulli, logistic"),
        (["data.batch_size=true"], "data.batch_size must be int"),
        (["sampler.horse_keys=[a]"], "sampler.horse_keys lists 1 keys but the sampler uses 8"),
        (["epochs=3"], "not of the form section.key=value"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("?", r"\?")):
        load_config(None, overrides)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_defaults_are_the_dataclass_defaults():
    assert load_config(None) == Config()
