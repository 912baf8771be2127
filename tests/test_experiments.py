"""The experiments pipeline at the smallest budget: one parent run, six nested children, a summary."""

import pytest
from mlflow import MlflowClient

from cellseg.config import apply_overrides
from pipelines.experiments import VARIANTS, run_experiments


@pytest.mark.slow
def test_experiment_grid_parent_and_children(tracking, tiny_cfg):
    cfg = apply_overrides(tiny_cfg, {"train.epochs": 1, "train.steps_per_epoch": 1, "train.val_steps": 1,
                                     "tracking.log_model": False})
    parent_id, rows = run_experiments(cfg)
    client = MlflowClient()
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(c.info.run_name for c in children) == sorted(name for name, _ in VARIANTS)
    assert all(c.info.status == "FINISHED" for c in children)
    by_name = {c.info.run_name: c for c in children}
    assert by_name["tiles"].data.params["train.tiles"] == "4"
    assert by_name["batch8"].data.params["train.batch_size"] == "8"
    assert by_name["vanilla+curriculum"].data.params["curriculum.enabled"] == "True"
    assert [r["variant"] for r in rows] == [name for name, _ in VARIANTS]
    arts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"summary.md", "summary.csv", "val_iou.png"} <= arts
    md = client.download_artifacts(parent_id, "summary.md")
    text = open(md).read()
    assert text.count("\n") == 2 + len(VARIANTS) and "tiles+curriculum" in text


def test_an_interrupted_grid_stops_and_keeps_what_finished(tracking, tiny_cfg, monkeypatch, capsys):
    """Ctrl-C in the second variant: no further variant runs, the parent run is KILLED with the
    summary of the first, exit status 130."""
    import cellseg.train as train_mod

    real, calls = train_mod.train, []

    def interrupted_second(cfg, **kw):
        calls.append(cfg.tracking.run_name)
        result = real(cfg, **kw)
        if len(calls) == 2:
            result.status = "KILLED"  # as if Ctrl-C ended its epoch
        return result

    monkeypatch.setattr(train_mod, "train", interrupted_second)
    cfg = apply_overrides(tiny_cfg, {"train.epochs": 1, "train.steps_per_epoch": 1, "train.val_steps": 1,
                                     "tracking.log_model": False})
    with pytest.raises(SystemExit) as exit_:
        run_experiments(cfg)
    assert exit_.value.code == 130 and calls == [VARIANTS[0][0], VARIANTS[1][0]]
    client = MlflowClient()
    parent = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                                "tags.`cellseg.pipeline` = 'experiments'")[0]
    assert parent.info.status == "KILLED"
    md = open(client.download_artifacts(parent.info.run_id, "summary.md")).read()
    assert VARIANTS[0][0] in md and VARIANTS[1][0] not in md.replace(VARIANTS[0][0], "")
    err = capsys.readouterr().err
    assert f"parent run {parent.info.run_id} KILLED (variants finished: {VARIANTS[0][0]})" in err


@pytest.mark.parametrize("bad", ["missing", "one_image"])
def test_a_bad_dataset_is_refused_before_any_run(tracking, tiny_cfg, tiny_data, tmp_path, bad):
    """A mistyped --data or a dataset too small to split: one error, no empty FAILED parent run."""
    import shutil

    from cellseg.errors import CellsegError

    data = tmp_path / bad
    if bad == "one_image":
        for sub in ("images", "masks"):
            (data / sub).mkdir(parents=True)
            first = sorted((tiny_data / sub).iterdir())[0]
            shutil.copy(first, data / sub / first.name)
    cfg = apply_overrides(tiny_cfg, {"tracking.experiment": f"exp-bad-{bad}"})
    with pytest.raises(CellsegError, match="dataset folder not found" if bad == "missing" else "need at least 2 images"):
        run_experiments(cfg, data=str(data))
    assert MlflowClient().get_experiment_by_name(cfg.tracking.experiment) is None  # not even the experiment
