"""YAML -> overrides -> one validated Config; every mistake names its key."""

from pathlib import Path

import pytest

from pegasus_dist.config import config_from_dict, load_config
from pegasus_dist.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


SHIPPED = sorted(str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml"))


def test_every_phase_has_a_shipped_config():
    assert SHIPPED == ["finetune.yaml", "pretrain.yaml", "reference/finetune.yaml",
                       "reference/pretrain.yaml", "smoke/finetune.yaml", "smoke/pretrain.yaml"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load_as_the_phase_their_file_names(name):
    cfg = load_config(REPO / "configs" / name)
    phase = Path(name).stem
    assert (cfg.train.phase, cfg.run.name) == (phase, phase)
    assert cfg.data.shard_set == {"pretrain": "mix", "finetune": "horse_bird"}[phase]


def test_paper_recipe_phases():
    pre = load_config(REPO / "configs/pretrain.yaml")
    fine = load_config(REPO / "configs/finetune.yaml")
    assert (pre.data.shard_set, pre.train.epochs) == ("mix", 100)
    assert (fine.data.shard_set, fine.train.epochs) == ("horse_bird", 300)
    assert fine.train.init_from == "runs/pretrain"
    assert pre.model == fine.model  # both phases train the same network


def test_a_chain_of_base_files_merges_key_by_key_and_the_child_wins(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {epochs: 7, seed: 3}\nmodel: {latent_dim: 9}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/b.yaml").write_text("base: ../a.yaml\ntrain: {epochs: 2, log_every: 4}\n")
    (tmp_path / "sub/c.yaml").write_text("base: b.yaml\ntrain: {log_every: 5}\n")  # relative to c
    cfg = load_config(tmp_path / "sub/c.yaml", ["train.seed=8"])
    assert (cfg.train.epochs, cfg.train.seed, cfg.train.log_every, cfg.model.latent_dim) == (2, 8, 5, 9)


def test_base_names_one_file(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {epochs: 7}\n")
    (tmp_path / "b.yaml").write_text("base: [a.yaml, a.yaml]\n")
    with pytest.raises(ConfigError, match=r"b.yaml: base must name one file .*got \['a.yaml'"):
        load_config(tmp_path / "b.yaml")


def test_base_files_in_a_cycle_are_named(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"in a cycle: .*a.yaml -> .*b.yaml -> .*a.yaml$"):
        load_config(tmp_path / "a.yaml")


def test_a_missing_base_file_is_named(tmp_path):
    (tmp_path / "b.yaml").write_text("base: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"config file .*gone.yaml does not exist"):
        load_config(tmp_path / "b.yaml")


def test_an_unknown_key_in_a_file_suggests_the_near_one(tmp_path):
    (tmp_path / "a.yaml").write_text("model: {latent_dims: 9}\n")
    with pytest.raises(ConfigError, match=r"^unknown config key model.latent_dims; did you mean "
                                          r"model.latent_dim\?$"):
        load_config(tmp_path / "a.yaml")


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
        (["loss.patch_gan_weight=-1"], "loss.patch_gan_weight must be 0"),
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


def test_without_a_file_the_defaults_are_the_recipes_pretrain_model():
    cfg = load_config(None)
    assert (cfg.model.channels, cfg.model.fc_dims, cfg.model.latent_dim) == (
        [64, 128, 256, 512], [512, 512, 256], 128)  # the widths README and docs/scaling.md state
    assert cfg.model == load_config(REPO / "configs/pretrain.yaml").model
    assert (cfg.train.phase, cfg.data.shard_set) == ("pretrain", "mix")
