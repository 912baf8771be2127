"""The configuration tree: defaults, YAML, overrides and per-field errors."""

import os

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


@pytest.mark.parametrize(
    "content, message",
    [(b"train:\n  epochs: 3\ntrain:\n  epochs: 5\n", r"not valid YAML \(ConstructorError: duplicate key 'train' at line 3\)"),
     (b"[]\n", "config must be a mapping of sections"),
     (b"[a, b]: 1\n", r"not valid YAML \(ConstructorError: unusable key \['a', 'b'\] at line 1\)"),
     (b"false\n", "config must be a mapping of sections"),
     (b"0\n", "config must be a mapping of sections"),
     (b"\xff\xfe\x00garbage", r"not a text file \(a YAML config is UTF-8 text\)"),
     (b"model:\n  in_channels: 3\n", "model.in_channels: Input should be 1"),
     (b"train:\n  seed: -1\n", "train.seed: Input should be greater than or equal to 0"),
     (b"train:\n  device: cuda:x\n", "device must be auto, cpu, cuda or cuda:N"),
     (b"train.epochs: 5\n", r"train.epochs: unknown key \(a dotted name: write it nested, 'train:' then '  epochs: ...' on the next line\)"),
     (b"train:\n  epochs:5\n", r"invalid config: train: expected keys indented below it \(e.g. '  epochs: 5'\), got 'epochs:5' \(a space missing after ':'\?\)"),
     (b"data:\n  crop_size: 100\n", r"c.yaml: data.crop_size 100: must be a multiple of 8 \(2\^model.depth, the U-Net's 3 poolings\): 96 or 104$"),
     (b"model:\n  depth: 6\ndata:\n  crop_size: 32\n", r"data.crop_size 32: must be a multiple of 64 .*: 64$"),
     (b"schedule:\n  until: [20]\n  lrs: [1.0e+3]\n", r"learning rates must be in \(0, 1\]"),
     (b"schedule:\n  until: [20]\n  lrs: [.nan]\n", "schedule.lrs.0: Input should be a finite number"),
     (b"targets:\n  sigma: .inf\n", "targets.sigma: Input should be a finite number"),
     (b"augment:\n  elastic_alpha_max: .inf\n", "augment.elastic_alpha_max: Input should be a finite number"),
     (b"tracking:\n  model_name: my/model\n", "tracking.model_name: a registered model name must be non-empty, not '.' or '..', without quotes, '/', ':' or '@'"),
     (b"tracking:\n  model_name: '..'\n", "tracking.model_name: a registered model name must be non-empty, not '.' or '..'"),
     # values of another type are not converted: `true` is not 1 epoch, nor "5" five
     (b"train:\n  epochs: true\n", "train.epochs: expected a whole number, got true$"),
     (b"train:\n  epochs: '5'\n", r"train.epochs: expected a whole number, got the text '5' \(quoted\?\)$"),
     (b"train:\n  epochs: 1e9\n", r"train.epochs: expected a whole number, got 1e\+09$"),
     (b"train:\n  tiles: true\n", "train.tiles: expected 1 or 4, got true$"),
     (b"train:\n  amp: 1\n", "train.amp: expected true or false, got 1$"),
     (b"targets:\n  sigma: two\n", "targets.sigma: expected a number, got the text 'two'$"),
     (b"data:\n  path: 5\n", "data.path: expected text, got 5$")],
)
def test_config_files_that_would_mislead_are_refused(tmp_path, content, message):
    p = tmp_path / "c.yaml"
    p.write_bytes(content)
    with pytest.raises(CellsegError, match=message):
        load_config(p)


def test_an_empty_config_file_means_the_defaults(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("# nothing set\n")
    assert load_config(p) == Config()
    p.write_text("train:\n#  epochs: 5\nmodel:\n  depth: 2\n")  # a section with every key commented out
    assert load_config(p) == Config(model={"depth": 2})


def test_a_config_folder_is_not_called_missing(tmp_path):
    with pytest.raises(CellsegError, match=rf"^{tmp_path}: is a folder; --config takes a YAML file$"):
        load_config(tmp_path)


def test_option_errors_name_the_option():
    options = {"train.epochs": "--epochs", "train.seed": "--seed"}
    with pytest.raises(CellsegError, match=r"^--epochs 0: Input should be greater than or equal to 1; --seed -5: Input should be greater"):
        apply_overrides(Config(), {"train.epochs": 0, "train.seed": -5}, options)
    with pytest.raises(CellsegError, match=r"^--epochs 1000000: Input should be less than or equal to 100000$"):  # a typo
        apply_overrides(Config(), {"train.epochs": 10**6}, options)
    with pytest.raises(CellsegError, match=r"^options: invalid config: train.tiles"):  # no option named: the field
        apply_overrides(Config(), {"train.tiles": 3}, options)
    with pytest.raises(CellsegError, match=r"^--crop-size 36: must be a multiple of 8 .*: 32 or 40$"):
        apply_overrides(Config(), {"data.crop_size": 36}, {"data.crop_size": "--crop-size"})
    with pytest.raises(CellsegError, match=r"^data.crop_size 40: must be a multiple of 16 .*: 32 or 48$"):  # --depth changed it
        apply_overrides(Config(data={"crop_size": 40}), {"model.depth": 4}, {"data.crop_size": "--crop-size"})


@pytest.mark.parametrize(
    "text, message",
    [("10:-1", r"learning rates must be in \(0, 1\]"), ("20:1e3", r"learning rates must be in \(0, 1\]"), ("10:1e-3,5:1e-4", "until must be strictly increasing"),
     (",", r"expected 'EPOCH:LR,EPOCH:LR,...' \(no EPOCH:LR pair\)"), ("abc", "expected 'EPOCH:LR")],
)
def test_lr_schedule_errors_are_one_line(text, message):
    from cellseg.config import ScheduleConfig

    with pytest.raises(CellsegError, match=message) as exc:
        ScheduleConfig.parse(text)
    assert "\n" not in str(exc.value) and "pydantic" not in str(exc.value)


def test_a_missing_relative_config_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CellsegError, match=rf"^cfg.yaml: config file not found \(looked in {tmp_path}\)$"):
        load_config("cfg.yaml")
    with pytest.raises(CellsegError, match=r"nope.yaml: config file not found$"):  # absolute: nothing to add
        load_config(tmp_path / "nope.yaml")


def test_yaml_exponents_without_a_dot_are_numbers(tmp_path):
    """PyYAML reads `1e-3` as text (YAML 1.1); a config file means the number."""
    p = tmp_path / "c.yaml"
    p.write_text("schedule:\n  until: [5, 10]\n  lrs: [1e-3, 5E-4]\ntargets:\n  w0: 1e1\n")
    cfg = load_config(p)
    assert cfg.schedule.lrs == [1e-3, 5e-4] and cfg.targets.w0 == 10.0


def test_yaml_merge_keys_still_work(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  <<: {epochs: 3, batch_size: 2}\n  epochs: 5\n")
    cfg = load_config(p)
    assert (cfg.train.epochs, cfg.train.batch_size) == (5, 2)  # merged, then overridden: not a duplicate key


def test_an_empty_experiment_name_is_refused_before_any_work(tmp_path):
    """MLflow refuses '' only once a run is made (after training data was loaded, or an evaluation ran)."""
    from typer.testing import CliRunner

    from cellseg.cli import app
    from cellseg.config import Config, apply_overrides

    with pytest.raises(CellsegError, match=r"^--experiment '': an MLflow experiment name must be non-empty$"):
        apply_overrides(Config(), {"tracking.experiment": ""}, {"tracking.experiment": "--experiment"})
    res = CliRunner().invoke(app, ["evaluate", str(tmp_path), "--log", "--experiment", " ", "-o", str(tmp_path / "ev")])
    assert isinstance(res.exception, CellsegError) and "an MLflow experiment name must be non-empty" in str(res.exception)
    assert not (tmp_path / "ev").exists()


def test_a_config_from_a_pipe_is_read(tmp_path):
    """`--config <(printf ...)` gives a pipe, not a regular file: read, not called missing."""
    import threading

    fifo = tmp_path / "cfg"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("train:\n  epochs: 7\n"))
    writer.start()
    try:
        assert load_config(fifo).train.epochs == 7
    finally:
        writer.join(timeout=10)
