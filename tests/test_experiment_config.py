"""Tests for the loss settings of rl_mismatch.experiment_config: the ``loss`` group is the library's
LossConfig, spelled as in a config file (correction strings, 0 for off), and its errors name their key."""

import json

import pytest

from experiments.configs import base
from rl_mismatch import corrections, losses
from rl_mismatch.experiment_config import ExperimentConfig, config_differences


def _loss(**values) -> losses.LossConfig:
    return ExperimentConfig.from_dict({"loss": values}).loss


def test_the_loss_group_is_the_library_loss_config():
    config = ExperimentConfig.from_dict(base.get_base_config().to_dict()).loss
    assert type(config) is losses.LossConfig and config == ExperimentConfig().loss
    assert (config.correction, config.norm_length, config.dual_clip) == ("none", 0, 0.0)  # as a config file has them
    assert config.resolved_correction == corrections.Correction()
    # A key the group lacks takes the experiment's default, so the saved JSON keeps its string.
    assert _loss(dual_clip=3).correction == "none" and _loss(dual_clip=3).dual_clip == 3.0


def test_a_preset_keeps_its_low_high_form():
    config = _loss(correction="seq_mis", correction_high=2.0)
    assert (config.correction, config.correction_low, config.correction_high) == ("seq_mis", None, 2.0)
    assert config.resolved_correction == corrections.CorrectionConfig("seq_mis", high=2.0).correction
    assert config.dual_clip == 0.0  # off by default


def test_a_composed_correction_string_and_dual_clip():
    config = _loss(correction="seq_is(2, batch_norm) + seq_max_k3(0.1) + token_ratio(0.5, 2)", dual_clip=3)
    assert config.resolved_correction == corrections.Correction(
        corrections.ISWeight("sequence", 2.0, batch_normalize=True),
        (corrections.Reject("seq_max_k3", 0.1), corrections.Reject("token_ratio", 2.0, 0.5)))
    assert config.dual_clip == 3.0


@pytest.mark.parametrize("values,message", [
    (dict(correction="seq_is(2) + seq_k3(0.1)"),
     r"config.loss.correction = 'seq_is\(2\) \+ seq_k3\(0.1\)': .*'seq_k3\(0.1\)' is not a part"),
    (dict(correction="seq_is(2)", correction_high=2.0),
     r"config.loss.correction = 'seq_is\(2\)': .*carries its thresholds"),
    (dict(correction="bypass + seq_is(2)"), "config.loss.correction = 'bypass [+] seq_is.2.': .*count it twice"),
    (dict(correction="token_tis"), "config.loss.correction = 'token_tis': .*needs `high`"),
    (dict(correction=2), "config.loss.correction must be a string, got 2"),
    (dict(dual_clip=0.5), r"config.loss.dual_clip = 0.5 must be 0 \(off\) or a finite number > 1"),
    (dict(dual_clip=3.0, policy_loss="reinforce"), "config.loss.dual_clip = 3.0: .*reinforce"),
    (dict(clip_eps_low=1), r"config.loss.clip_eps_low = 1.0 must be in \[0, 1\)"),
    (dict(clip_eps_high="wide"), "config.loss.clip_eps_high must be a number, got 'wide'"),
    (dict(policy_loss="dapo"), r"config.loss.policy_loss = 'dapo' is not one of \['ppo', 'reinforce', 'gspo'\]"),
    (dict(advantage_mode="rloo"), "config.loss.advantage_mode = 'rloo' is not one of"),
    (dict(aggregation="seq_mean_token_sum_norm"),
     "config.loss.norm_length = 0: aggregation='seq_mean_token_sum_norm'"),
    (dict(norm_length=64), "config.loss.norm_length = 64 is only used by"),
    (dict(norm_length=1.5), "config.loss.norm_length must be an int"),
    (dict(clip=0.2), r"Unknown config key\(s\) \['loss.clip'\]; the keys of config.loss are \['advantage_mode'"),
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


def test_saved_loss_settings_round_trip():
    """The ``loss`` JSON a run stores (and compares on resume) keeps the keys and values of a config file."""
    values = base.get_base_config().to_dict()
    values["loss"].update(correction="token_tis", correction_high=2.0, aggregation="seq_mean_token_sum_norm",
                          norm_length=64)
    saved = json.loads(json.dumps(ExperimentConfig.from_dict(values).to_dict()))
    assert saved["loss"] == values["loss"]
    assert ExperimentConfig.from_dict(saved) == ExperimentConfig.from_dict(values)
    assert config_differences(saved, ExperimentConfig.from_dict(values).to_dict()) == []
