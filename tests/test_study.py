"""Studies: the tiny 2-arm x 2-seed study end to end, continuing a study, and bad study input."""

import json
import os

import pytest

from rl_mismatch import study
from rl_mismatch.experiment_config import config_differences
from rl_mismatch.metric_writing import read_metrics

TINY_STUDY = os.path.join(os.path.dirname(__file__), "..", "experiments", "studies", "tiny.py")
STEPS = 3


def _tiny_study(**changes):
    spec, _ = study.load_study(f"{TINY_STUDY}:{STEPS}")
    return study.Study(**{**spec.__dict__, **changes})


@pytest.mark.slow
def test_tiny_study_runs_every_arm_and_seed_then_skips_them(tmp_path):
    spec = _tiny_study()
    # Part 1: seed 0 only (a study split over two sittings), then the whole study.
    first = study.run_study(spec, tmp_path, seeds=[0], progress=False)
    assert set(first) == {("a_fp32", 0), ("b_bf16", 0)}
    seed0 = {label: read_metrics(study.run_dir(tmp_path, label, 0)) for label in ("a_fp32", "b_bf16")}
    second = study.run_study(spec, tmp_path, progress=False)
    # The seed-0 runs are finished: skipped (None), their metrics untouched; seed 1 ran now.
    assert second[("a_fp32", 0)] is None and second[("b_bf16", 0)] is None
    assert second[("a_fp32", 1)]["step"] == STEPS and second[("b_bf16", 1)]["step"] == STEPS
    for label in ("a_fp32", "b_bf16"):
        assert read_metrics(study.run_dir(tmp_path, label, 0)) == seed0[label]
    # A third call has nothing left to run; nor has one on the study moved to another directory
    # (its runs recorded the old data directory, a place and not a setting).
    assert all(v is None for v in study.run_study(spec, tmp_path, progress=False).values())
    moved = tmp_path.parent / f"{tmp_path.name}_moved"
    os.rename(tmp_path, moved)
    try:
        assert all(v is None for v in study.run_study(spec, moved, progress=False).values())
    finally:
        os.rename(moved, tmp_path)

    runs = {(a, s): read_metrics(study.run_dir(tmp_path, a, s)) for a in ("a_fp32", "b_bf16") for s in (0, 1)}
    for rows in runs.values():
        # Every step once, then the trained policy's eval in a row of its own.
        assert [r["step"] for r in rows] == list(range(STEPS + 1))
        assert "reward/mean" in rows[STEPS - 1] and "reward/mean" not in rows[STEPS]
        # The held-out eval ran at steps 0, 2 (every 2) and after the last update.
        assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 2, STEPS]
    for s in (0, 1):
        # Arms of one seed see the same prompts and start from the same weights ...
        a, b = runs[("a_fp32", s)][:STEPS], runs[("b_bf16", s)][:STEPS]
        assert [r["rollout/prompt_length_mean"] for r in a] == [r["rollout/prompt_length_mean"] for r in b]
        # ... and differ in what the arm changes: the sampler's precision, so the mismatch.
        assert a[0]["mismatch/k3"] < 1e-9 < b[0]["mismatch/k3"]
    # Another seed draws other prompts.
    assert ([r["rollout/prompt_length_mean"] for r in runs[("a_fp32", 0)][:STEPS]]
            != [r["rollout/prompt_length_mean"] for r in runs[("a_fp32", 1)][:STEPS]])

    record = json.loads((tmp_path / study.STUDY_FILE).read_text())
    assert record["name"] == "tiny" and record["steps"] == STEPS and record["seeds"] == [0, 1]
    assert [a["label"] for a in record["arms"]] == ["a_fp32", "b_bf16"]
    assert record["arms"][0]["config"]["sampler"]["dtype"] == "float32"
    assert record["arms"][1]["config"]["sampler"]["dtype"] == "bfloat16"

    # The study file changed under a finished run: refused before anything runs, naming the run.
    changed = _tiny_study(arms=(study.Arm("a_fp32", "", {"sampler.dtype": "float32", "optim.learning_rate": 1e-3}),))
    with pytest.raises(ValueError, match=r"a_fp32.*seed 0.*other settings.*optim.learning_rate"):
        study.run_study(changed, tmp_path, progress=False)


def test_study_spec_errors_name_the_problem(tmp_path):
    spec = _tiny_study()
    with pytest.raises(ValueError, match="no arm 'c'"):
        study.run_study(spec, tmp_path, arms=["c"], progress=False)
    with pytest.raises(ValueError, match=r"Seeds \[7\] are not in study"):
        study.run_study(spec, tmp_path, seeds=[7], progress=False)
    bad_key = _tiny_study(arms=(study.Arm("x", "", {"sampler.dtyp": "float32"}),))
    with pytest.raises(ValueError, match=r"Arm 'x', seed 0: Unknown config key.*sampler.dtyp"):
        study.run_study(bad_key, tmp_path, progress=False)
    bad_value = _tiny_study(arms=(study.Arm("x", "", {"sampler.dtype": "bf17"}),))
    with pytest.raises(ValueError, match=r"Arm 'x', seed 0: config.sampler.dtype"):
        study.run_study(bad_value, tmp_path, progress=False)
    with pytest.raises(ValueError, match="unique"):
        _tiny_study(arms=(study.Arm("x", ""), study.Arm("x", "")))
    with pytest.raises(ValueError, match="directory names"):
        _tiny_study(arms=(study.Arm("a/b", ""),))
    with pytest.raises(ValueError, match="No study file"):
        study.load_study(str(tmp_path / "nope.py"))
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines no get_study"):
        study.load_study(str(tmp_path / "empty.py"))
    assert not any(p.name.startswith(("a_", "b_", "x")) for p in tmp_path.iterdir())  # Nothing ran.


def test_study_files_define_the_arms_the_studies_need():
    studies = os.path.join(os.path.dirname(__file__), "..", "experiments", "studies")
    main, _ = study.load_study(os.path.join(studies, "main.py"))
    accel, _ = study.load_study(os.path.join(studies, "accelerator.py") + ":/models/Qwen2.5-1.5B-Instruct")
    search, _ = study.load_study(os.path.join(studies, "regime_search.py") + ":lr=1e-4,budget=64,steps=5,seeds=0+1")
    for spec in (main, accel, search):
        for arm in spec.arms:
            for seed in spec.seeds:
                assert study.Study.config(spec, arm, seed).seed == seed  # Every run validates.
    assert len(main.seeds) >= 3 and main.seeds == accel.seeds
    cfg = {a.label: main.config(a, 0) for a in main.arms}
    b = cfg["b_bf16"]
    assert (b.sampler.dtype, b.trainer.dtype, b.optim.lr_schedule, b.loss.correction) == (
        "bfloat16", "float32", "constant", "none")
    assert (cfg["a_fp32"].sampler.dtype, cfg["a_fp32"].trainer.dtype) == ("float32", "float32")
    assert cfg["c_bf16_length_lr"].optim.lr_schedule == "length_triggered"
    assert cfg["c_bf16_length_lr"].optim.trigger_smoothing == 0.0  # The raw length.
    assert cfg["d_bf16_token_tis"].loss.correction == "token_tis"
    assert cfg["e_bf16_seq_mis"].loss.correction == "seq_mis"
    assert (cfg["f_fp16"].sampler.dtype, cfg["f_fp16"].trainer.dtype) == ("float16", "float16")
    # Each arm differs from the base (b) only in what it names.
    for label, c in cfg.items():
        changed = {k.split(":")[0] for k in config_differences(b.to_dict(), c.to_dict())}
        assert changed == set(main.arm(label).overrides) - {
            k for k, v in main.arm(label).overrides.items() if _get(b.to_dict(), k) == v}, label
    # The budget holds a 3x surge of the stable ~20-30-token replies (>= 4x).
    assert b.sampler.max_new_tokens >= 4 * 24
    assert accel.config(accel.arms[0], 0).model.source == "/models/Qwen2.5-1.5B-Instruct"
    assert accel.config(accel.arms[0], 0).steps >= 300
    assert (search.seeds, search.config(search.arms[0], 0).optim.learning_rate) == ((0, 1), 1e-4)


def _get(tree, dotted):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def test_a_setting_an_old_run_lacks_counts_as_its_default():
    # A run made before a setting existed has no such key in its saved config: it matches a new
    # config that keeps the default, and differs from one that changes it.
    from rl_mismatch.experiment_config import ExperimentConfig

    new = ExperimentConfig().to_dict()
    old = {**new, "loss": {k: v for k, v in new["loss"].items() if k != "clip_eps_low"}}
    del old["seed"]
    assert config_differences(old, new) == []
    changed = ExperimentConfig.from_dict({"loss": {"clip_eps_low": 0.1}, "seed": 3}).to_dict()
    assert config_differences(old, changed) == [f"loss.clip_eps_low: {new['loss']['clip_eps_low']!r} -> 0.1",
                                                 f"seed: {new['seed']!r} -> 3"]
    # A setting the new config lacks (one that was removed) is a difference.
    assert config_differences({**new, "gone": 1}, new) == ["gone: 1 -> None"]
