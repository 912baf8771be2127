"""The configuration tree: defaults, YAML, overrides and per-field errors."""

import pytest

from cellseg.config import Config, apply_overrides, flatten, load_config, to_yaml
from cellseg.errors import CellsegError


def test_defaults_follow_the_method():
    cfg = Config()
    assert cfg.train.batch_size == 4 and cfg.train.epochs == 400
    assert cfg.early_stopping.patience == 10 and cfg.curriculum.threshold == 0.7
    assert cfg.targets.w0 == 10 and cfg.targets.sigma == 5
    assert cfg.augment.elastic_alpha_max == 50


def test_yaml_round_trip(tmp_path):
    cfg = apply_overrides(Config(), {"train.epochs": 7, "model.depth": 2})
    p = tmp_path / "c.yaml"
    p.write_text(to_yaml(cfg))
    assert load_config(p) == cfg


def test_unknown_key_names_the_field(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 3\n  lerning_rate: 0.1\n")
    with pytest.raises(CellsegError, match=r"c.yaml: invalid config: train.lerning_rate: unknown key"):
        load_config(p)


def test_out_of_range_value_names_the_field(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  val_fraction: 1.5\n")
    with pytest.raises(CellsegError, match=r"data.val_fraction: Input should be less than 1"):
        load_config(p)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(CellsegError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(CellsegError, match="not valid YAML"):
        load_config(p)


def test_override_validation_and_flatten():
    with pytest.raises(CellsegError, match="train.tiles"):
        apply_overrides(Config(), {"train.tiles": 3})
    flat = flatten(apply_overrides(Config(), {"train.epochs": 5, "tracking.run_name": None}))
    assert flat["train.epochs"] == "5" and flat["model.depth"] == "3"
