"""Tests for rl_mismatch.precision_study, experiments/precision_report.py and experiments/precision_study.py
on a tiny random model."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import precision_report
from rl_mismatch import precision_study as ps
from rl_mismatch import sampler as smp
from rl_mismatch.models import Decoder, tiny_config

# float32 decode vs full forward differ only in summation order; see tests/test_sampler.py.
FP32_DECODE_ATOL = 2e-5


@pytest.fixture(scope="module")
def model():
    return Decoder(tiny_config(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def study(model, tmp_path_factory):
    cfg = ps.StudyConfig(max_new_tokens=12, eos_ids=(5,), pad_id=0, batch1_rows=3, prompt_bucket=8)
    stages = []
    results = ps.run_study(model, ps.random_prompts(6, 256), jax.random.key(0), cfg, progress=stages.append)
    out = tmp_path_factory.mktemp("study")
    return results, precision_report.write_report(results, str(out)), stages, cfg


def _row(results, name):
    (row,) = [r for r in results["rows"] if r["name"] == name]
    return row["metrics"]


@pytest.mark.slow
def test_outputs_are_written(study):
    results, paths, stages, cfg = study
    assert stages == ps.study_stages(cfg)  # the progress bar's total is exact
    with open(paths["json"]) as f:
        loaded = json.load(f)
    assert len([r for r in loaded["rows"] if r["group"] == "grid"]) == 9
    assert {r["metrics"]["n_tokens"] for r in loaded["rows"] if r["group"] == "grid"} == {
        loaded["shapes"]["response_tokens"]}
    md = open(paths["md"]).read()
    assert "sampler bf16 x trainer fp32" in md and "top-p 0.9 corrected" in md
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for key in ("fp32_sampler_fp32_trainer/k3", "bf16_sampler_fp32_trainer/k3", "fp16_sampler_fp32_trainer/k3",
                "ratio_bf16_over_fp16/trainer_fp32/k3", "ratio_bf16_over_fp16/same_dtype/k3"):
        assert np.isfinite(loaded["summary"][key]), key


@pytest.mark.slow
def test_fp32_decode_reproduces_the_rollout(study):
    repro = study[0]["reproduction_fp32_decode_vs_rollout"]
    # The teacher-forced decode runs the sampler's arithmetic on the sampler's shapes: on XLA:CPU
    # it is bit-exact; 1e-6 leaves room for another fusion of the log_softmax only.
    assert repro["max_abs_diff"] <= 1e-6


@pytest.mark.slow
def test_decode_vs_forward_fp32_is_tiny(study):
    m = _row(study[0], "fp32 KV-cache decode vs fp32 full forward")
    assert m["max_abs_log_ratio"] <= FP32_DECODE_ATOL
    assert m["k3"] <= FP32_DECODE_ATOL ** 2  # k3 ≈ mean r²/2
    grid = _row(study[0], "sampler fp32 x trainer fp32")
    assert grid["k3"] == m["k3"]  # the same comparison, reached two ways


@pytest.mark.slow
def test_precision_ordering(study):
    results = study[0]
    s = results["summary"]
    # bf16 keeps 8 significant bits, fp16 11: every rounding is ~8x larger in bf16, and k3 is
    # quadratic in the log-ratio, so bf16 must disagree more in every pairing.
    assert s["bf16_sampler_fp32_trainer/k3"] > s["fp16_sampler_fp32_trainer/k3"] > s["fp32_sampler_fp32_trainer/k3"]
    assert s["bf16_sampler_bf16_trainer/k3"] > s["fp16_sampler_fp16_trainer/k3"]
    ignored = _row(results, "top-p 0.9 ignored: logp_truncated vs fp32 trainer")
    corrected = _row(results, "top-p 0.9 corrected: logp_truncated + log_kept_mass vs fp32 trainer")
    # Corrected, only the fp32 decode-vs-forward difference remains.
    assert corrected["max_abs_log_ratio"] <= FP32_DECODE_ATOL < ignored["max_abs_log_ratio"]
    assert _row(results, "fp32 batch 1 vs batch 6 (first 3 rows)")["max_abs_log_ratio"] <= FP32_DECODE_ATOL


def test_weight_views_are_exact(model):
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, 256, (3, 10)), jnp.int32)
    valid = jnp.asarray(np.arange(10)[None] >= np.array([[0], [4], [7]]))
    mask = valid & (jnp.arange(10) >= 7)[None]
    master = ps.rescore_log_probs(model, tokens, valid, mask)
    # Rounding float32 weights to float32 is the identity.
    np.testing.assert_array_equal(ps.rescore_log_probs(ps.rounded_weights_view(model, "float32"), tokens, valid, mask),
                                  master)
    for d in ("bfloat16", "float16"):
        # Trainer casting fp32 masters in compute and sampler weights synced to d hold the same
        # values (both round to nearest even), so the same forward gives identical bits.
        trainer = ps.rescore_log_probs(ps.trainer_view(model, d), tokens, valid, mask)
        synced = ps.rescore_log_probs(smp.sync_weights(model, d), tokens, valid, mask)
        np.testing.assert_array_equal(trainer, synced)
        # And rounding is deterministic: the rounded view twice gives identical bits.
        a = ps.rescore_log_probs(ps.rounded_weights_view(model, d), tokens, valid, mask)
        b = ps.rescore_log_probs(ps.rounded_weights_view(model, d), tokens, valid, mask)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, master)


def test_bad_config():
    with pytest.raises(ValueError, match="float32"):
        ps.StudyConfig(dtypes=("bfloat16", "float16"))
    with pytest.raises(ValueError):
        ps.StudyConfig(dtypes=("float32", "int8"))
    with pytest.raises(ValueError, match="non-float32|float32 master"):
        ps.run_study(smp.sync_weights(Decoder(tiny_config(), rngs=nnx.Rngs(0)), "bf16"), [[1, 2]],
                     jax.random.key(0), ps.StudyConfig(max_new_tokens=2))


@pytest.mark.slow
def test_script_runs_on_a_tiny_model(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "experiments.precision_study", "--model=tiny", "--num_prompts=4",
           "--max_new_tokens=6", "--batch1_rows=2", f"--out={tmp_path}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"results.json", "results.md", "log_ratios.png"} <= set(os.listdir(tmp_path))
