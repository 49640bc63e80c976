"""YAML -> overrides -> one validated Config; every mistake is one line naming its key (and file).

The command line's errors are checked in process (typer's CliRunner); one test
starts the real ``pegasus-dist`` to check the exit path itself.
"""

import logging
from pathlib import Path

import pytest
import yaml
from processes import BIN, run_bounded
from typer.testing import CliRunner

from pegasus_dist.cli import app
from pegasus_dist.config import Config, ModelConfig, load_config, validated
from pegasus_dist.errors import ConfigError
from pegasus_dist.pipeline import PHASES, load_phases

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs/smoke/pretrain.yaml")
SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("folder", sorted({p.parent for p in SHIPPED}), ids=lambda p: p.name)
def test_every_config_folder_holds_the_two_phases_of_a_pipeline(folder):
    """What `pegasus-dist pipeline --config-dir FOLDER` needs: both phases, one network, one shard folder."""
    assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(PHASES)
    pretrain, finetune = load_phases(folder, [])
    assert (pretrain.data.shard_set, finetune.data.shard_set) == ("mix", "horse_bird")
    assert pretrain.model == finetune.model  # both phases train the same network
    # Run alone (`pegasus-dist train --config FOLDER/finetune.yaml`), finetune starts from this pretrain run.
    assert load_config(folder / "finetune.yaml").train.init_from == str(pretrain.run_dir)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_shipped_configs_load_as_the_phase_their_file_names(path):
    cfg = load_config(path)
    assert (cfg.train.phase, cfg.run.name) == (path.stem, path.stem)


def test_paper_recipe_phases():
    pre = load_config(REPO / "configs/pretrain.yaml")
    fine = load_config(REPO / "configs/finetune.yaml")
    assert (pre.data.shard_set, pre.train.epochs) == ("mix", 100)
    assert (fine.data.shard_set, fine.train.epochs) == ("horse_bird", 300)
    assert fine.train.init_from == "runs/pretrain"


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


def test_a_mistake_in_a_file_names_the_file_that_made_it(tmp_path):
    (tmp_path / "a.yaml").write_text("model: {latent_dims: 9}\ntrain: {epochs: 1.5}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain: {epochs: three}\n")
    with pytest.raises(ConfigError) as unknown:
        load_config(tmp_path / "a.yaml")
    assert str(unknown.value) == (f"{tmp_path / 'a.yaml'}: unknown config key model.latent_dims; "
                                  "did you mean model.latent_dim?")
    (tmp_path / "a.yaml").write_text("train: {epochs: 1.5}\n")
    with pytest.raises(ConfigError) as child:  # the child's value wins, and its file is named
        load_config(tmp_path / "b.yaml")
    assert str(child.value) == f"{tmp_path / 'b.yaml'}: train.epochs must be int, got 'three'"
    with pytest.raises(ConfigError) as parent:
        load_config(tmp_path / "b.yaml", ["train.epochs=4", "train.seed=x"])
    assert str(parent.value) == "train.seed must be int, got 'x'"  # an override names no file
    (tmp_path / "c.yaml").write_text("train: 5\n")
    with pytest.raises(ConfigError, match=r"c.yaml: train must be a mapping of keys, got 5$"):
        load_config(tmp_path / "c.yaml")


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["train.epochs=5", "model.channels=[8,8,8,8]", "optim.lr=3e-4",
                             "wandb.mode=disabled", "run.name=x", "train.init_from=", "train.cpu=yes"])
    assert cfg.train.epochs == 5 and cfg.model.channels == [8, 8, 8, 8]
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.wandb.mode == "disabled"
    assert cfg.train.init_from == "" and cfg.train.cpu is True


def test_an_override_list_the_locale_could_not_decode_names_the_locale():
    """Under LC_ALL=C Python reads the UTF-8 bytes of `café` as surrogates, which YAML refuses:
    the fix is the locale, not the list, while a name in such bytes stays a plain string."""
    undecoded = "caf\udcc3\udca9"  # os.fsdecode(b"caf\xc3\xa9") under LC_ALL=C
    with pytest.raises(ConfigError, match=r"^override wandb.tags: .* run under a UTF-8 locale"):
        load_config(None, [f"wandb.tags=[{undecoded}]"])
    assert load_config(None, [f"run.name={undecoded}"]).run.name == undecoded
    with pytest.raises(ConfigError, match=r"^wandb.tags .*must be a list"):
        load_config(None, ["wandb.tags=[a, b"])  # plain broken YAML: the value as it was


def test_an_unquoted_no_is_the_choice_no():
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_resolved_config_round_trips():
    cfg = load_config(REPO / "configs/smoke/finetune.yaml", ["train.max_steps=4"])
    assert validated(Config, yaml.safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.epoch=3"], "unknown config key train.epoch; did you mean train.epochs?"),
        (["trian.epochs=3"], "unknown config key trian; did you mean train?"),
        (["model.zzz=3"], "unknown config key model.zzz; known: image_size, channels, fc_dims,"),
        (["train.epochs=three"], "train.epochs must be int, got 'three'"),
        (["train.epochs=1.5"], "train.epochs must be int, got 1.5"),
        (["train.epochs=-1"], "train.epochs must be at least 1, got -1"),
        (["model.latent_dim=0"], "model.latent_dim must be at least 1, got 0"),
        (["model.image_size=40"], "model.image_size must be a multiple of 16, got 40"),
        (["train.mixed_precision=fp8"], "train.mixed_precision must be one of no, bf16, fp16, got 'fp8'"),
        (["model.channels=[8,8]"], "model.channels must list 4 widths"),
        (["model.channels=[8,8,0,8]"], "model.channels[2] must be at least 1, got 0"),
        (["model.upsample=bilinear"], "model.upsample must be one of transpose, resize"),
        (["model.likelihood=gaussian"], "model.likelihood must be one of bernoulli, logistic"),
        (["loss.patch_gan_weight=-1"], "loss.patch_gan_weight must be 0 or more, got -1"),
        (["loss.feature_matching_weight=3072"],
         "loss.feature_matching_weight works on the patch discriminator: turn it on too"),
        (["loss.patch_gan_adaptive=true"],
         "loss.patch_gan_adaptive works on the patch discriminator: turn it on too"),
        (["loss.acai_gamma=2"], "loss.acai_gamma must be at most 1, got 2"),
        (["loss.perceptual_weight=3072"], "loss.perceptual_weight needs loss.perceptual_network"),
        (["loss.perceptual_weight=1", "loss.perceptual_network=judge", "quality.classifier=./judge"],
         "loss.perceptual_network (judge) is quality.classifier, the judge of the grids"),
        (["loss.perceptual_weight=1", "loss.perceptual_network=net", "loss.perceptual_seed=0"],
         "loss.perceptual_seed equals quality.classifier_seed: the loss's network must differ"),
        (["loss.perceptual_weight=1", "loss.perceptual_network=net", "loss.perceptual_widths=[32,64,128]"],
         "loss.perceptual_widths equals quality.classifier_widths: the loss's network must differ"),
        (["loss.perceptual_widths=[8,8,8,8,8,8]"],
         "loss.perceptual_widths has 6 blocks, each halving the image: 32 px allows at most 5"),
        (["quality.classifier_widths=[8,8,8,8,8,8]"],
         "quality.classifier_widths has 6 blocks, each halving the image: 32 px allows at most 5"),
        (["quality.classifier_widths=[8,0]"], "quality.classifier_widths[1] must be at least 1, got 0"),
        (["optim.lr=0"], "optim.lr must be positive, got 0"),
        # Bounds pass an infinity, and NaN fails no comparison: both would train to NaN.
        (["optim.lr=inf"], "optim.lr must be a finite number, got inf"),
        (["loss.patch_gan_weight=.inf"], "loss.patch_gan_weight must be a finite number, got inf"),
        (["optim.weight_decay=nan"], "optim.weight_decay must be a finite number, got nan"),
        (["optim.betas=[0.9]"], "optim.betas must be two numbers in [0, 1), got [0.9]"),
        (["data.batch_size=true"], "data.batch_size must be int, got True"),
        (["data.shard_set="], "data.shard_set must not be empty"),
        (["train.cpu=maybe"], "train.cpu must be bool, got 'maybe'"),
        (["wandb.tags=x"], "wandb.tags must be a list, got 'x'"),
        (["run.name=a/b"], "run.name must be a plain folder name (no '/', not '.' or '..'), got 'a/b'"),
        (["sampler.horse_keys=[a]"], "sampler.horse_keys lists 1 keys but the sampler uses 8"),
        (["sampler.mu_start=0.8"], "sampler.mu_start 0.8 is past sampler.mu_end 0.7"),
        (["epochs=3"], "override 'epochs=3' is not of the form section.key=value"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value) and "pydantic" not in str(err.value)


def test_sections_built_in_code_are_validated_too():
    assert ModelConfig(channels=[4, 4, 8, 8], fc_dims=[16, 16, 8], latent_dim=4).latent_dim == 4
    with pytest.raises(ValueError, match="latent_dim"):
        ModelConfig(latent_dim=0)
    with pytest.raises(ValueError, match="extra"):
        Config(trian={})


def test_a_folder_or_an_unreadable_file_as_the_config_is_named_as_what_it_is(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .* is not a file; pass a YAML file \(e\.g"):
        load_config(tmp_path)  # `--config configs/`: it exists, so "does not exist" would mislead
    # /proc/self/mem is a file that reading from its start fails (EIO), even for root
    with pytest.raises(ConfigError, match=r"config file /proc/\d+/mem cannot be read \(Input/output error\)"):
        load_config(Path("/proc/self/mem"))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_bytes(b"train:\n  epochs: \xff\xfe\n")  # bytes flipped on disk
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML: 'utf-8' codec"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize(("text", "message"), [
    ("train:\n  epochs: 3\nmodel:\n  latent_dim: 8\ntrain:\n  max_steps: 5\n",
     "key 'train' is given twice, on lines 1 and 5; keep one"),
    ("train:\n  epochs: 3\n  epochs: 30\n", "key 'epochs' is given twice, on lines 2 and 3; keep one"),
])
def test_a_key_given_twice_in_a_file_is_refused_naming_both_lines(tmp_path, text, message):
    """YAML keeps the last silently: the first train section's epochs would be dropped unseen."""
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(ConfigError, match=f"^{tmp_path}/run.yaml: {message}$"):
        load_config(tmp_path / "run.yaml")


@pytest.mark.parametrize("text", ["", "\n\n", "# pretrain, batch 64\n", "null\n", "{}\n"])
def test_a_config_file_with_no_settings_is_refused_not_read_as_the_defaults(tmp_path, text):
    """Emptied or cut before its first key, it would train every default without a word."""
    (tmp_path / "run.yaml").write_text(text)
    (tmp_path / "child.yaml").write_text("base: run.yaml\ntrain:\n  epochs: 3\n")
    for path in (tmp_path / "run.yaml", tmp_path / "child.yaml"):
        with pytest.raises(ConfigError, match=f"^{tmp_path}/run.yaml holds no settings"):
            load_config(path)


def test_without_a_file_the_defaults_are_the_recipes_pretrain_model():
    cfg = load_config(None)
    assert (cfg.model.channels, cfg.model.fc_dims, cfg.model.latent_dim) == (
        [64, 128, 256, 512], [512, 512, 256], 128)  # the widths README and docs/scaling.md state
    assert cfg.model == load_config(REPO / "configs/pretrain.yaml").model
    assert (cfg.train.phase, cfg.data.shard_set) == ("pretrain", "mix")


@pytest.fixture
def cli():
    """``pegasus-dist ARGS`` in this process: (exit code, its ``error:`` lines); logging as it was."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # `train` sets up logging on the runner's stderr

    def invoke(*args: str) -> tuple[int, list[str]]:
        done = CliRunner().invoke(app, list(args))
        return done.exit_code, [line for line in done.output.splitlines() if line.startswith("error: ")]

    yield invoke
    root.handlers[:], root.level = handlers, level


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", "unknown config key train.epoch; did you mean train.epochs?"),
        ("train.epochs=-1", "train.epochs must be at least 1, got -1"),
        ("model.latent_dim=0", "model.latent_dim must be at least 1, got 0"),
        ("train.epochs=1.5", "train.epochs must be int, got 1.5"),
    ],
)
@pytest.mark.parametrize("command", ["train", "classifier"])
def test_a_config_mistake_on_the_command_line_is_one_error_line_and_exit_2(cli, tmp_path, command,
                                                                           override, message):
    done = cli(command, "--config", SMOKE, f"run.output_dir={tmp_path}", override)
    assert done == (2, [f"error: {message}"])
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_a_config_file_mistake_names_the_file_on_the_command_line(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {SMOKE}\ntrain: {{epoch: 3}}\n")
    assert cli("train", "--config", str(bad)) == (
        2, [f"error: {bad}: unknown config key train.epoch; did you mean train.epochs?"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "imagenet:x"], "unknown source 'imagenet:x'"),
        (["--source", "cifar10:{tmp}/missing.tar.gz"], "cifar10 archive not found"),
        (["--source", "synthetic:10", "--image-size", "40"], "--image-size must be a multiple of 16, got 40"),
        (["--source", "synthetic:10", "--eval-fraction", "1"], "--eval-fraction must be less than 1"),
        (["--source", "synthetic:10", "--shard-size", "0"], "--shard-size must be at least 1, got 0"),
    ],
)
def test_prepare_option_mistakes_are_one_error_line_and_exit_2(cli, tmp_path, args, message):
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    code, errors = cli("prepare", *args, "--out", str(tmp_path / "out"))
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"error: {message}"), errors
    assert not (tmp_path / "out").exists()


@pytest.mark.process
def test_the_real_command_prints_one_error_line_and_exits_2(tmp_path):
    """The exit path itself, once, in a process of its own: no traceback, exit code 2."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: 1.5}\n")
    done = run_bounded([str(BIN / "pegasus-dist"), "train", "--config", str(bad)], timeout=120)
    assert done.returncode == 2, done.stdout[-3000:]
    assert done.stdout.splitlines() == [f"error: {bad}: train.epochs must be int, got 1.5"]
