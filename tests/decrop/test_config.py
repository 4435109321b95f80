from pathlib import Path

import pytest

from decrop.config import (ExperimentConfig, describe, from_dict, from_flat, load_config,
                           to_dict, to_flat, to_yaml)
from decrop.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


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


def test_numbers_in_exponent_form_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-3 as the string '1e-3'; a number field takes it as the number it spells."""
    cfg = load_config(CONFIGS / "quick.yaml", ["train.lr=1e-3", "certify.radii=[0, 5E-1]", "certify.n=1e3"])
    assert cfg.train.lr == 0.001 and cfg.certify.radii == (0.0, 0.5) and cfg.certify.n == 1000
    assert type(cfg.train.lr) is float and type(cfg.certify.n) is int
    (tmp_path / "c.yaml").write_text("sigma: 5e-1\ndecrop:\n  disc_lr: 1e-5\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.sigma, cfg.decrop.disc_lr) == (0.5, 1e-5)
    assert from_flat({"train.lr": "2e-4"}).train.lr == 2e-4
    for bad, words in (("sigma=1e400", "finite number"), ("train.epochs=1.5e0", "integer"),
                       ("sigma=1e-3x", "finite number")):
        with pytest.raises(ConfigError, match=words):
            load_config(CONFIGS / "quick.yaml", [bad])


def test_a_string_key_takes_an_integer_and_says_to_quote_other_values():
    cfg = load_config(CONFIGS / "quick.yaml", ["name=2024"])
    assert cfg.name == "2024"
    assert from_dict({"data": {"dataset": "folder", "percent": 100, "classes": [3, 7]},
                      "classifier": {"source": "export", "path": "m.pt2"}}).data.classes == ("3", "7")
    for value, kind in (("1.10", "float"), ("yes", "bool")):
        with pytest.raises(ConfigError) as err:
            load_config(CONFIGS / "quick.yaml", [f"name={value}"])
        assert f"read the value as a {kind}" in str(err.value) and "put it in quotes" in str(err.value)


def test_a_key_given_twice_is_refused_with_its_lines(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  epochs: 3\n  lr: 0.1\n  epochs: 4\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'epochs' \(first on line 2; keep one\) at line 4"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="duplicate key 'epochs'"):
        load_config(CONFIGS / "quick.yaml", ["train={epochs: 1, epochs: 2}"])
    (tmp_path / "merge.yaml").write_text("train: &t {epochs: 3}\ndecrop: {}\n")  # anchors stay allowed
    assert load_config(tmp_path / "merge.yaml").train.epochs == 3


def test_a_folder_or_an_empty_file_is_no_config(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a YAML file"):
        load_config(tmp_path)
    for text in ("", "\n", "# train:\n#   epochs: 3\n"):
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(ConfigError, match=r"is empty \(no keys\)"):
            load_config(tmp_path / "c.yaml")


def test_n0_may_not_exceed_n():
    assert load_config(CONFIGS / "quick.yaml", ["certify.n0=100", "certify.n=100"]).certify.n0 == 100
    with pytest.raises(ConfigError, match="'certify.n0' = 101 exceeds certify.n = 100"):
        load_config(CONFIGS / "quick.yaml", ["certify.n0=101", "certify.n=100"])


def test_folder_profile_is_own_data_in_one_command(tmp_path):
    """configs/folder.yaml takes the README's one command (a folder, an exported model) as it is: every image of
    train/ (data.percent=100), validation held out of it (no unlabeled/ needed), the quick profile's budgets."""
    cfg = load_config(CONFIGS / "folder.yaml", [f"data.root={tmp_path / 'images'}", "classifier.source=export",
                                                f"classifier.path={tmp_path / 'model.pt2'}"])
    quick = load_config(CONFIGS / "quick.yaml")
    assert (cfg.data.dataset, cfg.data.percent, cfg.data.val_source) == ("folder", 100.0, "holdout")
    assert cfg.data.root == str(tmp_path / "images") and cfg.classifier.path == str(tmp_path / "model.pt2")
    assert (cfg.train, cfg.denoiser, cfg.methods) == (quick.train, quick.denoiser, quick.methods)
    assert (cfg.certify.n0, cfg.certify.n, cfg.certify.radii) == (quick.certify.n0, quick.certify.n,
                                                                  quick.certify.radii)
    assert cfg.certify.val_images <= cfg.data.val_size


def test_a_folder_on_the_quick_profile_points_at_the_folder_profile(tmp_path):
    with pytest.raises(ConfigError, match=r"set data.percent=100 \(configs/folder.yaml"):
        load_config(CONFIGS / "quick.yaml", ["data.dataset=folder", "classifier.source=export",
                                             f"classifier.path={tmp_path / 'model.pt2'}"])
