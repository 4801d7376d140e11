"""Studies: the tiny 2-arm x 2-seed study end to end, continuing a study, and bad study input."""

import json
import os

import pytest

from rl_mismatch import study
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
    # A third call has nothing left to run.
    assert all(v is None for v in study.run_study(spec, tmp_path, progress=False).values())

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
