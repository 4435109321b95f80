from pathlib import Path

import pytest

from decrop.config import (ExperimentConfig, describe, from_dict, from_flat, load_config,
                           to_dict, to_flat, to_yaml)
from decrop.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("profile", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_profiles_load_and_round_trip(profile):
    cfg = load_config(profile)
    assert from_dict(to_dict(cfg)) == cfg
    assert from_flat(to_flat(cfg)) == cfg


def test_paper_profile_is_the_paper_protocol():
    cfg = load_config(CONFIGS / "paper.yaml")
    assert (cfg.data.dataset, cfg.classifier.arch, cfg.denoiser.arch) == ("cifar10", "resnet110", "dncnn")
    assert (cfg.denoiser.depth, cfg.denoiser.width, cfg.data.percent, cfg.sigma) == (17, 64, 1.0, 0.25)
    assert (cfg.train.epochs, cfg.train.adam_epochs, cfg.train.lr_step) == (600, 50, 200)
    assert (cfg.certify.n0, cfg.certify.n, cfg.certify.alpha, cfg.data.test_every) == (100, 10_000, 0.001, 20)


def test_overrides_apply_in_order_and_parse_yaml_values():
    cfg = load_config(CONFIGS / "quick.yaml", ["train.epochs=5", "certify.radii=[0, 0.5]", "train.epochs=7"])
    assert cfg.train.epochs == 7
    assert cfg.certify.radii == (0.0, 0.5)
    assert isinstance(cfg.certify.radii[0], float)


def test_config_is_frozen():
    cfg = ExperimentConfig()
    with pytest.raises(AttributeError):
        cfg.sigma = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("override, names", [
    ("train.epoch=5", ["'train.epoch'", "did you mean 'train.epochs'", "allowed keys in 'train'"]),
    ("bogus=1", ["'bogus'", "allowed keys"]),
    ("data.dataset=mnist", ["'data.dataset'", "'fashion_mnist'", "'cifar10'"]),
    ("data.augment=4", ["'data.augment'", "0, 1, 2, 3"]),
    ("data.augment=true", ["'data.augment'"]),
    ("data.percent=0", ["'data.percent'", "> 0", "<= 100"]),
    ("data.percent=101", ["'data.percent'"]),
    ("train.epochs=-1", ["'train.epochs'", ">= 1"]),
    ("train.epochs=2.5", ["'train.epochs'", "integer"]),
    ("certify.alpha=1", ["'certify.alpha'", "< 1"]),
    ("sigma=abc", ["'sigma'", "number"]),
    ("sigma=.nan", ["'sigma'", "finite"]),
    ("certify.radii=3", ["'certify.radii'", "list"]),
    ("certify.radii=[-1]", ["'certify.radii'", ">= 0"]),
    ("methods=[baseline, baseline]", ["'methods'", "twice"]),
    ("methods=[salman]", ["'methods[0]'", "'baseline'"]),
    ("denoiser.arch=unet", ["'denoiser.arch'", "'dncnn'", "'memnet'"]),
    ("train=5", ["'train'", "mapping"]),
    ("train.epochs", ["key=value"]),
])
def test_errors_name_the_key_and_what_is_allowed(override, names):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "quick.yaml", [override])
    for name in names:
        assert name in str(err.value)


def test_flat_dict_errors_and_missing_file():
    with pytest.raises(ConfigError, match="'train.lr'"):
        from_flat({"train.lr": -0.1})
    with pytest.raises(ConfigError, match="configs/quick.yaml"):
        load_config("no/such/profile.yaml")


def test_yaml_dump_reads_back(tmp_path):
    cfg = load_config(CONFIGS / "quick.yaml", ["seed=3"])
    (tmp_path / "c.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg


def test_every_key_is_documented():
    rows = describe()
    assert len(rows) == len(to_flat(ExperimentConfig()))
    assert all(text for _, _, text in rows)
