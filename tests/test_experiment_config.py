"""Tests for the loss settings of rl_mismatch.experiment_config: correction strings and dual clip."""

import pytest

from rl_mismatch import corrections
from rl_mismatch.experiment_config import ExperimentConfig, config_differences


def _loss(**values):
    return ExperimentConfig.from_dict({"loss": values}).loss.loss_config()


def test_a_preset_keeps_its_low_high_form():
    config = _loss(correction="seq_mis", correction_high=2.0)
    assert corrections.resolve(config.correction) == corrections.CorrectionConfig("seq_mis", high=2.0).correction
    assert config.dual_clip is None  # off by default


def test_a_composed_correction_string_and_dual_clip():
    config = _loss(correction="seq_is(2, batch_norm) + seq_max_k3(0.1) + token_ratio(0.5, 2)", dual_clip=3)
    assert config.correction == corrections.Correction(
        corrections.ISWeight("sequence", 2.0, batch_normalize=True),
        (corrections.Reject("seq_max_k3", 0.1), corrections.Reject("token_ratio", 2.0, 0.5)))
    assert config.dual_clip == 3.0


@pytest.mark.parametrize("values,message", [
    (dict(correction="seq_is(2) + seq_k3(0.1)"), r"config.loss: .*'seq_k3\(0.1\)' is not a part"),
    (dict(correction="seq_is(2)", correction_high=2.0), "config.loss: .*carries its thresholds"),
    (dict(correction="bypass + seq_is(2)"), "config.loss: .*count it twice"),
    (dict(dual_clip=0.5), "config.loss: dual_clip must be a finite number > 1"),
    (dict(dual_clip=3.0, policy_loss="reinforce"), "config.loss: dual_clip .*reinforce"),
])
def test_bad_loss_settings_are_clear_errors(values, message):
    with pytest.raises(ValueError, match=message):
        _loss(**values)


def test_a_run_saved_before_dual_clip_existed_resumes():
    saved = ExperimentConfig().to_dict()
    del saved["loss"]["dual_clip"]
    assert config_differences(saved, ExperimentConfig().to_dict()) == []
    changed = ExperimentConfig.from_dict({"loss": {"dual_clip": 3.0}}).to_dict()
    assert config_differences(saved, changed) == ["loss.dual_clip: 0.0 -> 3.0"]
