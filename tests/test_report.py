"""rl_mismatch.outcomes and experiments/report.py on synthetic studies (no model, no JAX compute)."""

import gzip
import json
import math

import numpy as np
import pytest

from experiments import report
from rl_mismatch import outcomes
from rl_mismatch.metric_writing import read_metrics

STEPS = 12
EVAL_EVERY = 4
SEEDS = (0, 1, 2)
CONFIG = {"trainer": {"n_microbatches": 2, "dtype": "float32"},
          "rollout": {"prompts_per_step": 4, "group_size": 4},
          "sampler": {"dtype": "float32"}, "optim": {"lr_schedule": "constant"}}
ARMS = [
    {"label": "a_fp32", "description": "fp32 sampler + fp32 trainer (zero-mismatch control)",
     "overrides": {"sampler.dtype": "float32"}, "config": CONFIG},
    {"label": "b_fp16", "description": "fp16 sampler | fp32 trainer",
     "overrides": {"sampler.dtype": "float16", "optim.k3_trigger_threshold": 0.01},
     "config": {**CONFIG, "sampler": {"dtype": "float16"}}},
]


def synthetic_rows(seed, n_steps=STEPS, *, eval_acc=None, nan_k3_at=None):
    """One run's metric rows: noisy curves, eval keys every EVAL_EVERY steps, a list-valued metric.

    eval_acc: accuracies of the successive evaluations (default: a slowly rising noisy curve).
    nan_k3_at: a step whose mismatch/k3 is NaN.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for step in range(n_steps):
        k3 = 1e-4 * math.exp(0.2 * step) * rng.uniform(0.5, 1.5)
        row = {
            "step": step,
            "reward/mean": rng.uniform(0, 1), "reward/accuracy": rng.uniform(0, 1),
            "rollout/response_length_mean": 40 + 3 * step + rng.normal(0, 2),
            "rollout/finished_frac": rng.uniform(0.5, 1),
            "mismatch/k3": math.nan if step == nan_k3_at else k3,
            "mismatch/prob_diff_max": rng.uniform(0.01, 0.2),
            "mismatch/by_position/k3": rng.uniform(0, 1, 4).tolist(),
            "opt/grad_noise_scale": math.inf if step % 3 == 0 else rng.uniform(1, 100),
            "opt/grad_sq_small": rng.uniform(2, 3), "opt/grad_sq_big": rng.uniform(1, 1.5),
            "opt/noise_b_small": 8.0, "opt/noise_b_big": 16.0, "opt/noise_trace": rng.uniform(1, 10),
            "lr/scale": 1.0, "opt/update_norm": rng.uniform(0.1, 1), "opt/grad_norm": rng.uniform(1, 2),
            "loss/policy": rng.normal(),
        }
        if step % EVAL_EVERY == 0:
            i = step // EVAL_EVERY
            acc = eval_acc[i] if eval_acc is not None else 0.3 + 0.02 * i + rng.uniform(-0.05, 0.05)
            row.update({"eval/accuracy": acc, "eval/response_length_mean": rng.uniform(30, 60),
                        "eval/finished_frac": rng.uniform(0.5, 1), "eval/format": rng.uniform(0.5, 1)})
        rows.append({k: float(v) if isinstance(v, np.floating) else v for k, v in row.items()})
    return rows


def write_run(path, rows):
    path.mkdir(parents=True)
    with open(path / "metrics.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")  # NaN / Infinity literals, as MetricWriter writes them.
    (path / "config.json").write_text(json.dumps(CONFIG))


@pytest.fixture
def study_dir(tmp_path):
    """A study workdir: a_fp32 (seed 1 with a NaN k3, seed 2 unfinished), b_fp16 (seed 0
    collapses, seed 2 missing)."""
    d = tmp_path / "study"
    d.mkdir()
    (d / "study.json").write_text(json.dumps({"name": "synthetic", "study_file": "experiments/studies/main.py",
                                              "steps": STEPS, "seeds": list(SEEDS), "arms": ARMS}, indent=1))
    write_run(d / "a_fp32" / "seed0", synthetic_rows(0))
    write_run(d / "a_fp32" / "seed1", synthetic_rows(1, nan_k3_at=5))
    write_run(d / "a_fp32" / "seed2", synthetic_rows(2, n_steps=8))
    write_run(d / "b_fp16" / "seed0", synthetic_rows(3, eval_acc=[0.4, 0.5, 0.1]))
    write_run(d / "b_fp16" / "seed1", synthetic_rows(4))
    return d


def _json_rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------------ aggregate

@pytest.mark.parametrize("key", ["mismatch/k3", "eval/accuracy", "reward/mean", "opt/grad_noise_scale"])
def test_aggregate_matches_numpy(study_dir, key):
    paths = {seed: study_dir / "a_fp32" / f"seed{seed}" / "metrics.jsonl" for seed in SEEDS}
    agg = outcomes.aggregate({seed: read_metrics(p) for seed, p in paths.items()}, key)

    # Independent: {step: [finite values over seeds]} straight from the files.
    by_step = {}
    for p in paths.values():
        for row in _json_rows(p):
            value = row.get(key)
            if isinstance(value, float) and math.isfinite(value):
                by_step.setdefault(row["step"], []).append(value)
    steps = sorted(by_step)
    np.testing.assert_array_equal(agg["step"], steps)
    np.testing.assert_array_equal(agg["n"], [len(by_step[s]) for s in steps])
    for name, fn in [("median", np.median), ("min", np.min), ("max", np.max),
                     ("q25", lambda v: np.percentile(v, 25)), ("q75", lambda v: np.percentile(v, 75))]:
        np.testing.assert_allclose(agg[name], [fn(np.array(by_step[s])) for s in steps], rtol=1e-12, err_msg=name)
    if key == "mismatch/k3":  # Step 5: seed 1 is NaN there; steps 8-11: seed 2 has not reached them.
        n = dict(zip(agg["step"].tolist(), agg["n"].tolist()))
        assert n[4] == 3 and n[5] == 2 and n[8] == 2 and n[11] == 2
    if key == "eval/accuracy":
        assert agg["step"].tolist() == [0, 4, 8]
    if key == "opt/grad_noise_scale":  # Its +inf steps do not count.
        assert 0 not in agg["step"].tolist()


def test_aggregate_of_an_absent_metric_is_empty():
    agg = outcomes.aggregate({0: synthetic_rows(0, n_steps=3)}, "no/such_key")
    assert all(v.size == 0 for v in agg.values())
    agg = outcomes.aggregate({0: synthetic_rows(0, n_steps=3)}, "mismatch/by_position/k3")  # a list: skipped
    assert agg["step"].size == 0


# ------------------------------------------------------------------------------------ criterion

def _evals(accs, every=5):
    return [{"step": every * i, "eval/accuracy": a, "mismatch/k3": 1e-3} for i, a in enumerate(accs)]


def test_criterion_flags_a_degrading_run_at_its_first_low_eval():
    assert outcomes.InstabilityCriterion().first_unstable_step(_evals([0.4, 0.45, 0.5, 0.2, 0.1])) == (
        15, "eval collapse")


def test_criterion_accepts_a_noisy_run():
    # Best 0.5 -> threshold 0.25; 0.24 and 0.2 are below, but never twice in a row, and not last.
    rows = _evals([0.3, 0.5, 0.24, 0.4, 0.2, 0.45, 0.3])
    assert outcomes.InstabilityCriterion().first_unstable_step(rows) == (None, None)
    assert not outcomes.run_outcome(rows).unstable


def test_criterion_flags_a_non_finite_metric_at_its_step():
    rows = synthetic_rows(0, nan_k3_at=7)
    assert outcomes.InstabilityCriterion().first_unstable_step(rows) == (7, "non-finite mismatch/k3")
    rows[9]["opt/grad_norm"] = math.inf  # A later one does not move the step.
    assert outcomes.InstabilityCriterion().first_unstable_step(rows[::-1]) == (7, "non-finite mismatch/k3")
    # A present-but-NaN eval accuracy is non-finite, not a missing evaluation.
    nan_eval = _evals([0.3, math.nan, 0.3])
    assert outcomes.InstabilityCriterion().first_unstable_step(nan_eval) == (5, "non-finite eval/accuracy")


def test_criterion_needs_a_best_of_min_best():
    rows = _evals([0.15, 0.19, 0.05, 0.01, 0.0])
    assert outcomes.InstabilityCriterion().first_unstable_step(rows) == (None, None)
    assert outcomes.InstabilityCriterion(min_best=0.1).first_unstable_step(rows) == (10, "eval collapse")


def test_criterion_final_eval_counts_only_when_finished():
    rows = _evals([0.4, 0.5, 0.45, 0.2])
    crit = outcomes.InstabilityCriterion()
    assert crit.first_unstable_step(rows) == (15, "eval collapse")
    assert crit.first_unstable_step(rows, finished=False) == (None, None)
    assert outcomes.InstabilityCriterion(consecutive=3).first_unstable_step(_evals([0.5, 0.2, 0.2, 0.4])) == (
        None, None)
    assert "0.5 x" in crit.describe() and "0.2" in crit.describe() and "2 consecutive" in crit.describe()


def _finished_fracs(fracs, eval_at=()):
    rows = [{"step": s, "rollout/finished_frac": f, "mismatch/k3": 1e-3} for s, f in enumerate(fracs)]
    return rows + [{"step": s, "eval/accuracy": 0.5} for s in eval_at]  # Eval-only rows carry no fraction.


def test_criterion_flags_a_budget_collapse_at_the_first_step_of_its_streak():
    crit = outcomes.InstabilityCriterion()  # Below 1/8 (fewer than 2 of 16 rollouts end), 3 steps in a row.
    assert crit.first_unstable_step(_finished_fracs([1, 0.9, 0.69, 0.0, 0.0625, 0.0, 0.0])) == (3, "budget collapse")
    # Exactly 2 of 16 (0.125) is not below; a streak broken by one good step starts again.
    assert crit.first_unstable_step(_finished_fracs([1, 0.125, 0.125, 0.125, 0.0, 0.0, 0.5, 0.0, 0.0])) == (
        None, None)
    # Eval-only rows in between neither break nor extend the streak.
    assert crit.first_unstable_step(_finished_fracs([1, 0, 0, 0], eval_at=(2, 3))) == (1, "budget collapse")
    assert outcomes.InstabilityCriterion(min_finished=0).first_unstable_step(_finished_fracs([0] * 9)) == (
        None, None)
    assert outcomes.InstabilityCriterion(unfinished_steps=1).first_unstable_step(_finished_fracs([1, 0])) == (
        1, "budget collapse")
    assert "fewer than 0.125 of the rollouts end" in crit.describe()
    assert "budget collapse" not in outcomes.InstabilityCriterion(min_finished=0).describe()


def test_criterion_reports_the_earliest_rule_that_fires():
    rows = _finished_fracs([1, 1, 0, 0, 0, 1, 1]) + _evals([0.5, 0.1, 0.1])  # Eval collapse from step 5.
    assert outcomes.InstabilityCriterion().first_unstable_step(rows) == (2, "budget collapse")
    assert outcomes.InstabilityCriterion(min_finished=0).first_unstable_step(rows) == (5, "eval collapse")
    rows[6]["loss/policy"] = math.nan  # Step 6: after both collapses.
    assert outcomes.InstabilityCriterion().first_unstable_step(rows) == (2, "budget collapse")
    rows[2]["loss/policy"] = math.nan  # Step 2, the budget collapse's first step: non-finite wins a tie.
    assert outcomes.InstabilityCriterion().first_unstable_step(rows) == (2, "non-finite loss/policy")


def test_a_final_eval_row_is_not_a_training_step():
    assert not outcomes.is_training_row({"step": 30, "eval/accuracy": 0.5, "time/eval_s": 3.0})
    assert outcomes.is_training_row({"step": 29, "eval/accuracy": 0.5, "time/eval_s": 3.0, "reward/mean": 0.1})
    rows = _finished_fracs([1, 1]) + [{"step": 2, "eval/accuracy": 0.5, "time/eval_s": 3.0}]
    assert outcomes.run_outcome(rows).steps_done == 2


def test_criterion_rejects_bad_settings():
    with pytest.raises(ValueError, match="unfinished_steps"):
        outcomes.InstabilityCriterion(unfinished_steps=0)
    with pytest.raises(ValueError, match="min_finished"):
        outcomes.InstabilityCriterion(min_finished=1.5)


def test_run_outcome():
    rows = synthetic_rows(5, eval_acc=[0.3, 0.5, 0.4], nan_k3_at=2)
    o = outcomes.run_outcome(rows, total_steps=STEPS)
    assert (o.unstable, o.step, o.cause, o.steps_done) == (True, 2, "non-finite mismatch/k3", STEPS)
    assert (o.final_eval_accuracy, o.final_eval_step, o.best_eval_accuracy) == (0.4, 8, 0.5)
    steps = np.array([r["step"] for r in rows if math.isfinite(r["mismatch/k3"])])
    k3 = np.array([r["mismatch/k3"] for r in rows if math.isfinite(r["mismatch/k3"])])
    assert o.k3_area == pytest.approx(np.trapezoid(k3, steps))
    all_k3 = np.array([r["mismatch/k3"] for r in rows])
    assert o.k3_growth == pytest.approx(np.median(all_k3[-5:]) / np.nanmedian(all_k3[:5]))
    lengths = np.array([r["rollout/response_length_mean"] for r in rows])
    assert o.max_response_length == lengths.max()
    assert o.length_surge == pytest.approx(lengths.max() / np.median(lengths[:5]))
    empty = outcomes.run_outcome([])
    assert not empty.unstable and empty.steps_done == 0 and math.isnan(empty.k3_area)


# ----------------------------------------------------------------------------------- end to end

def test_report_end_to_end_and_reproducible(study_dir, tmp_path):
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    report.main([f"--workdir={study_dir}", f"--out={out1}"])
    names = ["metrics.jsonl.gz", "study.json", "report.md", "aggregates.csv", "study.png", "outcomes.png"]
    for name in names:
        assert (out1 / name).stat().st_size > 0, name
    assert (out1 / "study.json").read_bytes() == (study_dir / "study.json").read_bytes()

    # The bundle: every scalar row of every run, arms in study order, then seed, then step.
    expected = []
    for arm in ARMS:
        for seed in SEEDS:
            path = study_dir / arm["label"] / f"seed{seed}" / "metrics.jsonl"
            if path.exists():
                expected += [{**{k: v for k, v in row.items() if not isinstance(v, list)},
                              "arm": arm["label"], "seed": seed} for row in _json_rows(path)]
    with gzip.open(out1 / "metrics.jsonl.gz", "rt", encoding="utf-8") as f:
        bundled = [json.loads(line) for line in f]
    canon = lambda rows: [json.dumps(r, sort_keys=True) for r in rows]  # NaN-safe comparison
    assert canon(bundled) == canon(expected)

    # The output folder is a study of its own: same report, same bundle, same aggregates.
    report.main([f"--workdir={out1}", f"--out={out2}"])
    for name in ["report.md", "metrics.jsonl.gz", "aggregates.csv", "study.json"]:
        assert (out2 / name).read_bytes() == (out1 / name).read_bytes(), name
    text = (out1 / "report.md").read_text()
    report.main([f"--workdir={out1}"])  # In place (--out defaults to --workdir).
    assert (out1 / "report.md").read_text() == text

    assert str(tmp_path) not in text
    assert outcomes.InstabilityCriterion().describe() in text
    assert "`a_fp32` seed 2 (in progress: 8/12 steps)" in text
    assert "Missing runs (no metrics yet): `b_fp16` seed 2." in text
    assert "| `a_fp32` | 1/3 (seed 1 @ 5) |" in text
    assert "| `b_fp16` | 1/2 (seed 0 @ 8) |" in text
    assert "non-finite mismatch/k3" in text and "eval collapse" in text
    assert "fp16 sampler \\| fp32 trainer" in text  # A pipe in a cell is escaped.
    assert "![study](study.png)" in text and "![outcomes](outcomes.png)" in text

    header, *lines = (out1 / "aggregates.csv").read_text().splitlines()
    assert header == "arm,metric,step,n,median,min,max,q25,q75"
    k3_rows = [ln.split(",") for ln in lines if ln.startswith("a_fp32,mismatch/k3,")]
    assert [int(r[2]) for r in k3_rows] == list(range(STEPS))
    assert {r[0] for r in map(lambda ln: ln.split(","), lines)} == {"a_fp32", "b_fp16"}
    assert any(ln.startswith(f"b_fp16,{report.NOISE_KEY},") for ln in lines)


def test_report_needs_a_study_json(tmp_path):
    with pytest.raises(SystemExit):
        report.main([f"--workdir={tmp_path}"])


def _section_table(text, heading):
    """The first Markdown table after ``heading`` in ``text``."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


@pytest.mark.parametrize("study", ["main", "format_reward"])
def test_committed_study_reports_are_reproducible(study, tmp_path):
    """docs/results/<study> is what the report command writes from its own bundle."""
    import os

    committed = os.path.join(os.path.dirname(__file__), "..", "docs", "results", study)
    report.main([f"--workdir={committed}", f"--out={tmp_path}"])
    with open(os.path.join(committed, "report.md"), encoding="utf-8") as f:
        assert (tmp_path / "report.md").read_text(encoding="utf-8") == f.read()
    with open(os.path.join(committed, "metrics.jsonl.gz"), "rb") as f:
        assert (tmp_path / "metrics.jsonl.gz").read_bytes() == f.read()


def test_the_readme_quotes_the_main_study_report():
    """The README's results table is the report's arm table, not a hand-written one."""
    import os

    root = os.path.join(os.path.dirname(__file__), "..")
    with open(os.path.join(root, "docs", "results", "main", "report.md"), encoding="utf-8") as f:
        committed_md = f.read()
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert "docs/results/main/study.png" in readme
    assert _section_table(readme, "### Replication study") == _section_table(committed_md, "## Arms: outcomes")


def test_finished_only_leaves_out_runs_in_progress(study_dir, tmp_path):
    report.main([f"--workdir={study_dir}", f"--out={tmp_path / 'all'}"])
    report.main([f"--workdir={study_dir}", f"--out={tmp_path / 'done'}", "--finished_only"])
    seeds = lambda out: {(r["arm"], r["seed"]) for r in map(json.loads, gzip.open(out / "metrics.jsonl.gz", "rt"))}
    assert seeds(tmp_path / "all") - seeds(tmp_path / "done") == {("a_fp32", 2)}  # 8 of STEPS steps.
    text = (tmp_path / "done" / "report.md").read_text()
    assert "Unfinished runs" not in text and "`a_fp32` seed 2" in text  # Listed as missing.
