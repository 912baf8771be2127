"""Learning-rate schedule, curriculum switch and early stopping with fake metric sequences."""

import math

import pytest

from cellseg.config import CurriculumConfig, EarlyStoppingConfig, ScheduleConfig
from cellseg.errors import CellsegError
from cellseg.schedule import Curriculum, EarlyStopping, learning_rate


def test_default_schedule_follows_the_original_method():
    s = ScheduleConfig()
    expected = {1: 1e-3, 20: 1e-3, 21: 5e-4, 100: 5e-4, 101: 1e-4, 150: 1e-4, 151: 5e-5, 200: 5e-5,
                201: 1e-5, 250: 1e-5, 251: 5e-6, 400: 5e-6, 900: 5e-6}
    for epoch, lr in expected.items():
        assert learning_rate(s, epoch) == lr, epoch


def test_schedule_parse_and_validation():
    s = ScheduleConfig.parse("2:1e-2,5:1e-3")
    assert [learning_rate(s, e) for e in range(1, 7)] == [1e-2, 1e-2, 1e-3, 1e-3, 1e-3, 1e-3]
    with pytest.raises(CellsegError, match="--lr-schedule"):
        ScheduleConfig.parse("abc")
    with pytest.raises(ValueError):
        ScheduleConfig(until=[5, 2], lrs=[1e-3, 1e-4])


def test_curriculum_switches_once_at_threshold():
    c = Curriculum(CurriculumConfig(enabled=True, threshold=0.7))
    seq = [0.2, 0.5, 0.69, 0.71, 0.5, 0.9]
    switched = [c.update(e, {"val_iou": v}) for e, v in enumerate(seq, start=1)]
    assert switched == [False, False, False, True, False, False]
    assert c.stage == 2 and c.switch_epoch == 4 and c.elastic is True
    restored = Curriculum(CurriculumConfig(enabled=True))
    restored.load_state_dict(c.state_dict())
    assert restored.stage == 2 and restored.switch_epoch == 4


def test_curriculum_off_leaves_augmentation_to_config():
    c = Curriculum(CurriculumConfig(enabled=False))
    assert not c.update(1, {"val_iou": 0.99})
    assert c.elastic is None and c.stage == 1


def test_curriculum_ignores_nan():
    c = Curriculum(CurriculumConfig(enabled=True, threshold=0.5))
    assert not c.update(1, {"val_iou": math.nan})
    assert c.stage == 1 and c.elastic is False


def test_early_stopping_after_patience_without_improvement():
    es = EarlyStopping(EarlyStoppingConfig(patience=3, metric="val_iou"))
    seq = [0.1, 0.3, 0.3, 0.29, 0.31, 0.2, 0.2, 0.2]
    out = [es.update(e, {"val_iou": v}) for e, v in enumerate(seq, start=1)]
    assert [b for b, _ in out] == [True, True, False, False, True, False, False, False]
    assert [s for _, s in out] == [False] * 7 + [True]
    assert es.best_epoch == 5 and es.best == 0.31


def test_early_stopping_on_loss_minimises():
    es = EarlyStopping(EarlyStoppingConfig(patience=2, metric="val_loss"))
    assert es.update(1, {"val_loss": 1.0}) == (True, False)
    assert es.update(2, {"val_loss": 0.5}) == (True, False)
    assert es.update(3, {"val_loss": 0.7}) == (False, False)
    assert es.update(4, {"val_loss": 0.6}) == (False, True)
    es2 = EarlyStopping(EarlyStoppingConfig(patience=2, metric="val_loss"))
    es2.load_state_dict(es.state_dict())
    assert es2.best == 0.5 and es2.bad_epochs == 2
