"""Tests for the RL experiment: configs, the tiny run end to end, resume, multi-process, bad input."""

from __future__ import annotations

import gc
import glob
import importlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from rl_mismatch import experiment, sampler, tasks, train_step
from rl_mismatch.experiment_config import ExperimentConfig
from rl_mismatch.metric_writing import read_metrics
from rl_mismatch.workdir_lock import WorkdirBusyError, WorkdirLock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "experiments", "configs")
CONFIG_NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
                      if not os.path.basename(p).startswith("_") and not p.endswith("base.py"))
PAPER_CONFIGS = ("bf16_constant_lr", "fp16", "bf16_length_lr", "bf16_token_tis", "bf16_seq_mis", "fp32")


def _config_dict(name: str, arg: str | None = None) -> dict:
    return importlib.import_module(f"experiments.configs.{name}").get_config(arg).to_dict()


def _subprocess_env(devices: int = 1) -> dict:
    env = dict(os.environ)
    # conftest gives this process 8 fake devices; a child sets its own count explicitly.
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env


def _train_cmd(workdir, *flags) -> list[str]:
    return [sys.executable, "-m", "experiments.train", "--config=experiments/configs/tiny.py",
            f"--workdir={workdir}", *flags]


def _comparable(rows):
    """Rows without wall-clock timings (the only values that may differ between equal runs)."""
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


# --------------------------------------------------------------------------------------------
# Configs


def test_every_config_validates_and_documents_its_command():
    assert set(PAPER_CONFIGS) | {"default", "tiny"} <= set(CONFIG_NAMES)
    for name in CONFIG_NAMES:
        module = importlib.import_module(f"experiments.configs.{name}")
        assert f"experiments/configs/{name}.py" in module.__doc__, name
        assert "What to expect" in module.__doc__, name
        cfg = ExperimentConfig.from_dict(module.get_config(None).to_dict())
        assert cfg.steps >= 1
    assert ExperimentConfig.from_dict(_config_dict("default", "3")).steps == 3


def test_base_config_is_the_typed_defaults_and_takes_overrides():
    from experiments.configs import base

    c = base.get_base_config()
    assert ExperimentConfig.from_dict(c.to_dict()) == ExperimentConfig()
    # A None default is a typed placeholder: it takes a value of its type, and only that.
    assert c.loss.correction_high is None
    c.loss.correction_high = 2.0
    with pytest.raises(TypeError):
        c.loss.correction_low = "low"
    # Every float setting is a float field, so the command line can give it a fraction.
    for group, settings in ExperimentConfig().to_dict().items():
        for name, value in settings.items() if isinstance(settings, dict) else ():
            if isinstance(value, float):
                assert isinstance(c[group][name], float), (group, name)
    c.optim.trigger_threshold, c.loss.dual_clip = 2.5, 3.0
    cfg = ExperimentConfig.from_dict({**c.to_dict(), "loss": {**c.loss.to_dict(), "correction": "token_tis"}})
    assert (cfg.loss.correction_high, cfg.optim.trigger_threshold, cfg.loss.dual_clip) == (2.0, 2.5, 3.0)


def test_paper_configs_differ_where_the_papers_do():
    cfgs = {n: ExperimentConfig.from_dict(_config_dict(n)) for n in PAPER_CONFIGS}
    assert (cfgs["fp16"].sampler.dtype, cfgs["fp16"].trainer.dtype) == ("float16", "float16")
    assert (cfgs["fp32"].sampler.dtype, cfgs["fp32"].trainer.dtype) == ("float32", "float32")
    assert cfgs["bf16_constant_lr"].optim.lr_schedule == "constant"
    assert cfgs["bf16_length_lr"].optim.lr_schedule == "length_triggered"
    assert cfgs["bf16_token_tis"].loss.correction == "token_tis"
    assert cfgs["bf16_seq_mis"].loss.correction == "seq_mis"
    for name in ("bf16_constant_lr", "bf16_length_lr", "bf16_token_tis", "bf16_seq_mis"):
        assert (cfgs[name].sampler.dtype, cfgs[name].trainer.dtype) == ("bfloat16", "float32")


@pytest.mark.parametrize("dotted, value, message", [
    ("sampler.dtyp", "bf16", r"Unknown config key\(s\) \['sampler.dtyp'\]"),
    ("nonsense", 1, r"Unknown config key\(s\) \['nonsense'\]"),
    ("sampler.dtype", "bf17", r"config.sampler.dtype: Unknown dtype name 'bf17'"),
    ("trainer.dtype", "int8", r"config.trainer.dtype: Unknown dtype name 'int8'"),
    ("steps", "ten", r"config.steps must be an int"),
    ("rollout.group_size", 1, r"config.rollout.group_size = 1 must be >= 2"),
    ("loss.correction", "token_tis", r"config.loss.correction = 'token_tis': .*needs `high`"),
    ("optim.lr_schedule", "cosine", r"config.optim.lr_schedule = 'cosine' is not one of"),
    ("sampler.temperature", 0.0, r"config.sampler.temperature = 0.0 must be > 0"),
    ("task.train_size", 0, r"a split needs at least one example"),
    ("trainer.remat", "all", r"config.trainer.remat = 'all' is not one of \['layer', 'projections', 'none'\]"),
    ("trainer.keep_logits", "yes", r"config.trainer.keep_logits must be a bool"),
    ("optim.trigger_threshold", -1.0, r"config.optim \(the trigger_\* settings\): threshold must be > 0"),
    ("optim.trigger_smoothing", 1.0, r"config.optim \(the trigger_\* settings\): smoothing must be"),
    ("optim.b1", 1.5, r"config.optim.b1 = 1.5 must be in \[0, 1\)"),
    ("optim.weight_decay", -1.0, r"config.optim.weight_decay = -1.0 must be finite and >= 0"),
    ("task.overlong_buffer", 100, r"config.task.overlong_buffer = 100 must be <= sampler.max_new_tokens"),
    ("mesh.sampler_model", 4, r"config.mesh.sampler_data = 0 / mesh.sampler_model = 4: both >= 1 for a sampler"),
])
def test_bad_config_is_a_clear_error(dotted, value, message, tiny_cfg):
    with pytest.raises(ValueError, match=message):
        tiny_cfg(**{dotted: value})


@pytest.mark.parametrize("flag, message", [
    ("--config.sampler.nonexistent=1", "unknown config key 'nonexistent'"),
    ("--config.sampler.dtyp=bf16", "unknown config key 'dtyp' (in --config.sampler.dtyp): no setting of the config "
                                   "file has that name. Did you mean \"dtype\" instead of \"dtyp\"?"),
    ("--config.steps=ten", "flag --config.steps=ten: invalid literal"),
    ("--config.sampler.dtype=bf17", "Unknown dtype name 'bf17'"),
    ("--config.model.source=no-such-model", "error: No such file or directory: 'no-such-model'. Pass a .gguf file"),
])
def test_command_line_rejects_bad_settings_at_startup(tmp_path, flag, message):
    proc = subprocess.run(_train_cmd(tmp_path / "run", flag), cwd=REPO, env=_subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()  # Failed before touching the workdir.


@pytest.mark.parametrize("config, message", [
    ("experiments/configs/nope.py", "error: --config=experiments/configs/nope.py: there is no file "
                                    "'experiments/configs/nope.py'. The configs are in experiments/configs/: "),
    ("experiments/configs/base.py", "error: --config=experiments/configs/base.py: experiments/configs/base.py defines "
                                    "no get_config(arg=None), so it is not a config file (base.py holds"),
    ("experiments/configs/default.py:abc", "error: --config=experiments/configs/default.py:abc: The config argument "
                                           "'abc' must be a number of steps, e.g. file.py:40."),
])
def test_a_bad_config_file_is_one_error_line(tmp_path, config, message):
    cmd = [sys.executable, "-m", "experiments.train", f"--config={config}", f"--workdir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_print_config_prints_the_resolved_settings_and_runs_nothing(tmp_path, tiny_cfg):
    cmd = [sys.executable, "-m", "experiments.train", "--config=experiments/configs/tiny.py", "--config.steps=3",
           "--print_config"]
    proc = subprocess.run(cmd, cwd=REPO, env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == json.loads(json.dumps(tiny_cfg(steps=3).to_dict()))
    # Without --print_config, the workdir is required: one line, no traceback.
    proc = subprocess.run(cmd[:-1], cwd=REPO, env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        "error: --workdir is required: the run directory (a run already in it is resumed).")


# --------------------------------------------------------------------------------------------
# The tiny run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_cfg):
    """The tiny config run once, uninterrupted: (workdir, rows)."""
    workdir = tmp_path_factory.mktemp("tiny")
    experiment.run(tiny_cfg(), workdir)
    return workdir, read_metrics(workdir)


@pytest.mark.slow
def test_packed_updates_change_no_number(tiny_run, tiny_cfg, tmp_path, monkeypatch):
    """The tiny run again with every group's replies packed end to end (multiple 1, and any
    width up to the unpacked one: the tiny model's replies are too long for the default rule):
    while a step samples the same replies as the unpacked run, its update gives the same
    numbers up to float32 summation order (test_train_step's bound, 1.5e-4 relative)."""
    monkeypatch.setattr(train_step, "_PACK_AT_MOST", 1.0)
    experiment.run(tiny_cfg(steps=3, **{"trainer.pack_multiple": 1}), tmp_path)
    packed, plain = read_metrics(tmp_path), tiny_run[1]
    assert [r["rollout/packed_width"] for r in plain] == [0] * len(plain)
    compared = 0
    for p, r in zip(packed, plain):
        same_replies = all(p[k] == r[k] for k in ("rollout/response_length_mean", "reward/mean"))
        if not same_replies:
            break  # the runs parted: a float32 rounding difference changed a sampled token
        assert 0 < p["rollout/packed_width"] <= 4 * 49
        for key in ("loss/policy", "opt/grad_norm", "opt/grad_sq_big", "opt/param_norm", "mismatch/k1",
                    "is/weight_mean"):
            np.testing.assert_allclose(p[key], r[key], rtol=1.5e-4, atol=1e-7, err_msg=f"step {p['step']} {key}")
        compared += 1
    assert compared >= 1 and max(p["opt/grad_norm"] for p in packed[:compared]) > 0  # step 0 samples alike


@pytest.mark.slow
@pytest.mark.parametrize("eval_every", [0, 1])
def test_first_step_compiles_its_programs_side_by_side(tmp_path, tiny_cfg, count_compiles, eval_every):
    """The first step's update compiles in a thread of its own while the sampler compiles and
    samples (`experiment._Run._compile_update_early`). With one response bucket (48 new tokens,
    the cache's first 64 slots) and no packing, its guess of the batch's shapes is exact: the
    update itself then compiles nothing, in the first step or the next. With an evaluation
    first, the sampler's program compiles in a thread of its own beside it, and the rollout
    compiles nothing; the main thread compiles only the evaluation's program."""
    sampler._compiled.cache_clear()  # an earlier run in this process may have compiled the same sampler programs
    with count_compiles() as compiles:
        experiment.run(tiny_cfg(steps=2, **{"trainer.pack_multiple": 0, "eval.every": eval_every}), tmp_path)
    assert compiles.threads["jit(_train_step)", "compile-update"] == 1
    assert compiles.names["jit(_train_step)"] == 1
    assert compiles.threads["jit(_generate)", "compile-sampler"] == eval_every
    assert compiles.threads["jit(_generate)", "MainThread"] == 1
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2][:2 + eval_every]  # with eval, the trained policy's row
    parts = ("time/eval_s", "time/sample_s", "time/score_s", "time/train_s", "time/write_s", "time/checkpoint_s")
    for r in rows[:2]:
        assert abs(sum(r.get(k, 0.0) for k in parts) - r["time/step_s"]) <= 0.05 * r["time/step_s"], r


@pytest.mark.slow
def test_tiny_end_to_end(tiny_run, tiny_cfg):
    workdir, rows = tiny_run
    cfg = tiny_cfg()
    assert [r["step"] for r in rows] == list(range(cfg.steps))
    for key in ("reward/mean", "reward/accuracy", "reward/format", "rollout/response_length_mean",
                "rollout/finished_frac", "mismatch/k3", "mismatch/prob_diff_max", "is/weight_mean",
                "opt/grad_norm", "opt/grad_sq_small", "opt/grad_sq_big", "lr/scale", "lr/value",
                "lr/length_trigger/scale", "lr/length_trigger/surge_step", "time/compile_s",
                "time/step_s", "time/tokens_per_s"):
        assert all(key in r and math.isfinite(r[key]) for r in rows), key
    # The timed phases add up to the step's wall time (what is left is a few dict and numpy
    # operations between them: well under 5% even of a 0.1 s tiny step).
    parts = ("time/eval_s", "time/sample_s", "time/score_s", "time/train_s", "time/write_s", "time/checkpoint_s")
    for r in rows:
        assert abs(sum(r.get(k, 0.0) for k in parts) - r["time/step_s"]) <= 0.05 * r["time/step_s"], r
    assert max(r["time/checkpoint_s"] for r in rows) > 10 * rows[0]["time/checkpoint_s"]  # Step 0 saves nothing.
    # CPU seconds of the step, not of the process so far: at most every core busy for the whole step
    # (+0.1 s for the kernel's per-tick accounting); the first step compiles, on the CPU.
    for r in rows:
        assert 0 <= r["time/cpu_system_s"] and 0 <= r["time/cpu_user_s"], r
        assert r["time/cpu_user_s"] + r["time/cpu_system_s"] <= os.cpu_count() * r["time/step_s"] + 0.1, r
    assert rows[0]["time/cpu_user_s"] > 0.25 * rows[0]["time/compile_s"]  # 2 test workers may share 2 cores
    # One step's noise-scale estimate is +inf when its |G|^2 estimate is <= 0 (documented).
    assert all(not math.isnan(r["opt/grad_noise_scale"]) for r in rows)
    # The first step compiles; a later step reuses the programs unless its update has a shape
    # no earlier step had (one prompt width for the run; a packed width is a new shape).
    assert rows[0]["time/compile_s"] > 0
    shapes = [(r["rollout/response_width"], r["rollout/packed_width"]) for r in rows]
    assert all(r["time/compile_s"] < 0.5 * rows[0]["time/compile_s"] for i, r in enumerate(rows[2:], 2)
               if shapes[i] in shapes[:i])
    assert len({r["rollout/prompt_width"] for r in rows}) == 1
    # The update packs a group's replies end to end where that leaves at most 2/3 of its 4 x 49
    # columns, in multiples of trainer.pack_multiple (32).
    assert all(w == 0 or (w % 32 == 0 and w <= 130) for _, w in shapes), shapes
    # The update ran on the cache size each step's longest reply ended in (the one size of a
    # 48-token budget under the default 64-token segment).
    assert all(r["rollout/response_width"] == 48 >= r["rollout/response_length_max"] for r in rows)
    # bf16 sampler vs fp32 trainer: a small but nonzero mismatch.
    assert all(0 < r["mismatch/k3"] < 1e-2 for r in rows)
    # The overlong penalty spreads rewards within groups, so the policy gets gradients.
    assert any(r["opt/grad_norm"] > 0 for r in rows)
    assert os.listdir(workdir / "checkpoints") and glob.glob(str(workdir / "tensorboard" / "events.*"))
    assert json.loads((workdir / "config.json").read_text()) == json.loads(json.dumps(cfg.to_dict()))


@pytest.mark.slow
def test_a_save_is_on_disk_before_the_update_on_cpu(tmp_path, tiny_cfg, monkeypatch):
    """On a CPU backend a pending save's host copy would share memory with the update's buffers:
    each step waits for the save it started (the save of the previous step's state) before its
    update, which then finds that checkpoint complete, and the wait is part of the step's
    time/checkpoint_s, not of its time/train_s."""
    from rl_mismatch.checkpointing import Checkpointer

    events = []  # ("save", step) / ("wait",) / ("update", step run, newest complete checkpoint)
    save, wait, update = Checkpointer.save, Checkpointer.wait, experiment._Run._update

    def save_spy(self, step, *args, **kwargs):
        events.append(("save", step))
        return save(self, step, *args, **kwargs)

    def wait_spy(self):  # A wait of at least 0.2 s, so that the test can see where it is counted.
        events.append(("wait",))
        time.sleep(0.2)
        return wait(self)

    def update_spy(self, *args, **kwargs):
        events.append(("update", self.completed, self.ckpt.latest_step()))
        return update(self, *args, **kwargs)

    monkeypatch.setattr(Checkpointer, "save", save_spy)
    monkeypatch.setattr(Checkpointer, "wait", wait_spy)
    monkeypatch.setattr(experiment._Run, "_update", update_spy)
    experiment.run(tiny_cfg(steps=3, **{"checkpoint.every": 1}), tmp_path)
    assert jax.default_backend() == "cpu"
    # Step s > 0 saves the state after step s - 1 before it samples, and waits before its update.
    steps = [("wait",), ("update", 0, None)] + [e for s in (1, 2) for e in (("save", s), ("wait",), ("update", s, s))]
    assert events[:len(steps)] == steps
    assert [e for e in events[len(steps):] if e != ("wait",)] == [("save", 3)]  # After the last step.
    rows = read_metrics(tmp_path)
    assert all(r["time/checkpoint_s"] >= 0.2 > r["time/train_s"] for r in rows[1:])


@pytest.mark.slow
def test_plot_draws_runs(tiny_run, tmp_path):
    from experiments import plot

    workdir, _ = tiny_run
    out = plot.plot_runs([str(workdir), str(workdir)], str(tmp_path / "plot.png"))
    assert os.path.getsize(out) > 10_000
    assert "bfloat16/float32, length_triggered" in plot.run_label(str(workdir))
    with pytest.raises(ValueError, match="no metrics"):
        plot.plot_runs([str(tmp_path)], str(tmp_path / "x.png"))
    # Ratio of averages (McCandlish et al.): B_small = 4 / 4 = 1, B_big = 4; |G_small|^2 averages
    # to 3 and |G_big|^2 to 1.5, so |G|^2 = (4*1.5 - 3) / 3 = 1, tr = 1.5 / 0.75 = 2, B_noise = 2.
    cfg = {"trainer": {"n_microbatches": 4}, "rollout": {"prompts_per_step": 2, "group_size": 2}}
    rows = [{"step": 0, "opt/grad_sq_small": 2.0, "opt/grad_sq_big": 1.0},
            {"step": 1, "opt/grad_sq_small": 4.0, "opt/grad_sq_big": 2.0}]
    assert plot.smoothed_noise_scale(rows, cfg)[1]["opt/grad_noise_scale"] == pytest.approx(2.0)
    # With the logged batch sizes: harmonic means B_small = 2 / (1/1 + 1/2) = 4/3, B_big = 4, so
    # |G|^2 = (4*1.5 - 4/3*3) / (8/3) = 0.75, tr = 1.5 / (3/4 - 1/4) = 3, B_noise = 4. A step with
    # no estimate (NaN trace: one micro-batch held all the sequences) is left out of the average.
    rows = [{**rows[0], "opt/noise_b_small": 1.0, "opt/noise_b_big": 4.0, "opt/noise_trace": 1.0},
            {**rows[1], "opt/noise_b_small": 2.0, "opt/noise_b_big": 4.0, "opt/noise_trace": 1.0},
            {"step": 2, "opt/grad_sq_small": 9.0, "opt/grad_sq_big": 9.0, "opt/noise_b_small": 2.0,
             "opt/noise_b_big": 2.0, "opt/noise_trace": float("nan")}]
    smoothed = plot.smoothed_noise_scale(rows, cfg)
    assert smoothed[1]["opt/grad_noise_scale"] == pytest.approx(4.0)
    assert smoothed[2]["opt/grad_noise_scale"] == pytest.approx(4.0)


@pytest.mark.slow
def test_resume_after_restart_equals_uninterrupted(tiny_run, tmp_path, tiny_cfg):
    _, reference = tiny_run
    # Stop after step 4 (checkpoints at 2 and 4) ...
    experiment.run(tiny_cfg(steps=4), tmp_path)
    # ... as a killed run would: rows past the checkpoint, one cut off mid-line.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "reward/mean": 123.0}) + "\n" + '{"step": 5, "rew')
    experiment.run(tiny_cfg(), tmp_path)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(6))  # no step twice
    # Same state, key, data position and programs: the resumed steps are bit-for-bit the same.
    assert _comparable(rows) == _comparable(reference)


@pytest.mark.slow
def test_resume_refuses_other_settings(tiny_run, tmp_path, tiny_cfg):
    experiment.run(tiny_cfg(steps=2), tmp_path)
    with pytest.raises(ValueError, match=r"other settings: sampler.dtype: 'bfloat16' -> 'float16'"):
        experiment.run(tiny_cfg(**{"sampler.dtype": "float16"}), tmp_path)


@pytest.mark.slow
def test_resume_with_other_recompute_settings(tiny_run, tmp_path, tiny_cfg):
    # remat / keep_logits trade memory for compute and change no number beyond summation
    # order: a run may resume with them changed, and its first resumed step is the same step.
    _, reference = tiny_run
    experiment.run(tiny_cfg(steps=4), tmp_path)
    experiment.run(tiny_cfg(**{"trainer.remat": "none", "trainer.keep_logits": True}), tmp_path)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(6))
    resumed, ref = rows[4], reference[4]
    assert resumed["reward/mean"] == ref["reward/mean"]  # the same rollout: the sampler is untouched
    # float32 reordering moves a log-prob of size ~3 by ~1e-6: 1e-5 relative on the loss and
    # the gradient norm; k3 ≈ r²/2 of log-ratios r ~ 1e-3 here, so those 1e-6 are ~1e-3 of r
    # and 2e-3 of k3. (Measured: all three bit-identical on this tiny model.)
    for key, rtol in (("loss/policy", 1e-5), ("opt/grad_norm", 1e-5), ("mismatch/k3", 5e-3)):
        np.testing.assert_allclose(resumed[key], ref[key], rtol=rtol, err_msg=key)


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_with_the_same_metrics(tiny_run, tmp_path):
    _, reference = tiny_run  # the same settings, 6 steps, uninterrupted, in this process
    steps = 30  # Long enough that the kill lands mid-run (a tiny step takes ~0.1 s).
    cmd = _train_cmd(tmp_path, f"--config.steps={steps}")
    env = _subprocess_env(devices=8)  # As in this process, so that XLA compiles the same programs.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir = tmp_path / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
            break  # the first checkpoint (step 2) is complete
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = max(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    assert done < len(reference), "the kill came too late to test a resume against the reference"

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Resuming from checkpoint {done}" in rerun.stderr
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(steps))  # every step once
    # Steps before and after the kill equal the uninterrupted run's, bit for bit: the same
    # programs on one device, restored state and keys, and the prompt stream is a function of
    # the step. (The run's length does not enter any step.)
    assert _comparable(rows[: len(reference)]) == _comparable(reference)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(command, timeout: int) -> list[str]:
    """Runs ``command(process_id)`` for processes 0 and 1 side by side (one CPU device each);
    asserts both exit 0 and returns their standard outputs."""
    procs = [subprocess.Popen(command(i), cwd=REPO, env=_subprocess_env(devices=1), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(err[-3000:] for _, err in outs)
    return [out for out, _ in outs]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, tiny_cfg):
    steps = 4
    port = _free_port()
    flags = [f"--config.steps={steps}", "--config.mesh.data=2", f"--coordinator_address=127.0.0.1:{port}",
             "--num_processes=2"]
    _two_processes(lambda i: _train_cmd(tmp_path / "two", *flags, f"--process_id={i}"), timeout=600)

    experiment.run(tiny_cfg(steps=steps, **{"mesh.data": 2}), tmp_path / "one")
    two, one = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(steps))
    # Both runs see the same global batch, keys and mesh shape (2 devices on the data axis); what
    # differs is how XLA reduces gradients across the 2 devices (one program vs. two processes
    # talking over gloo), which may round differently in the last bit (seen: opt/update_norm at
    # step 1, 0.67285728 vs 0.67285734). Hence, per group of metrics:
    for a, b in zip(one, two):
        # Step 0's rescoring and sampling precede any update: identical inputs, per-row math and
        # exact all-gathers of the weights, so its mismatch metrics agree bit for bit.
        if a["step"] == 0:
            assert {k: v for k, v in a.items() if k.startswith("mismatch/")} == \
                   {k: v for k, v in b.items() if k.startswith("mismatch/")}
        for key, value in a.items():
            if key.startswith(("reward/", "rollout/")):
                # Samples: argmax(logits + Gumbel noise) with the same noise; an ulp-level change
                # of the float32 weights flips a few bf16 roundings, which moves a draw only at
                # an exact near-tie -- so the responses, and all that is counted from them, agree.
                assert b[key] == value, (a["step"], key)
            elif key.startswith(("loss/", "is/", "opt/", "lr/")) and key != "opt/grad_noise_scale":
                # float32 trainer quantities: a few last-bit differences per step, carried
                # through 4 Adam steps, stay near 1e-6 relative.
                np.testing.assert_allclose(b[key], value, rtol=1e-5, atol=1e-7, err_msg=f"{a['step']} {key}")
            elif key in ("mismatch/k3", "mismatch/k2", "mismatch/prob_diff_mean"):
                # After the first update the mismatch is bf16 rounding of weights that differ in
                # the last bit, so it is re-drawn, not reproduced: its scale must agree (these
                # are means of squares/magnitudes over ~300 tokens), not its value.
                np.testing.assert_allclose(b[key], value, rtol=0.05, err_msg=f"{a['step']} {key}")


_TRIM_ON_TWO_PROCESSES = """
import sys
import jax, numpy as np
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from rl_mismatch import sampler, sharding as shd
mesh = shd.make_mesh(2, 1)
B, P, N, lengths = 4, 3, 8, np.array([2, 5, 1, 3])
resp = (np.arange(P + N) >= P) & (np.arange(P + N) < P + lengths[:, None])
def global_(x):  # rows over the data axis, each process holding its device's half
    sharding = shd.batch_sharding(mesh, x.ndim)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
per_token = {k: global_(np.where(resp, v, 0).astype(v.dtype)) for k, v in dict(
    tokens_BT=np.full((B, P + N), 7, np.int32), response_mask_BT=resp, logp_BT=np.full((B, P + N), -1.0, np.float32),
    logp_truncated_BT=np.full((B, P + N), -1.0, np.float32), log_kept_mass_BT=np.zeros((B, P + N), np.float32),
    entropy_BT=np.ones((B, P + N), np.float32)).items()}
rollout = sampler.Rollout(valid_BT=global_(resp | (np.arange(P + N) < P)), prompt_lengths_B=global_(np.full(B, P)),
                          response_lengths_B=global_(lengths.astype(np.int32)), finished_B=global_(np.ones(B, bool)),
                          prompt_width=P, **per_token)
trimmed = rollout.trimmed(5)
assert trimmed.tokens_BT.shape == (B, P + 5) and trimmed.logp_BT.sharding.is_equivalent_to(rollout.logp_BT.sharding, 2)
try:
    rollout.trimmed(4)
except ValueError as e:
    assert "up to 5 tokens" in str(e), e
else:
    raise AssertionError("a width below the longest reply was accepted")
print("ok")
"""


@pytest.mark.slow
def test_trimming_a_rollout_on_two_processes():
    """`Rollout.trimmed` on a batch split over two processes (a pod's rollout): the longest reply
    is read from the global lengths and the trimmed arrays keep their layout."""
    port = _free_port()
    outs = _two_processes(lambda i: [sys.executable, "-c", _TRIM_ON_TWO_PROCESSES, f"127.0.0.1:{port}", str(i)],
                          timeout=300)
    assert [out.strip().splitlines()[-1] for out in outs] == ["ok", "ok"]  # after gloo's own lines


def test_live_arrays_do_not_grow_with_steps(tmp_path, tiny_cfg):
    """The loop holds the same arrays at every step: each step's sampler copy is freed when the
    step is done with it, not left for Python's cyclic collector (disabled here), which counts
    objects, not bytes; on SmolLM2-135M the copies reached 10 GB over 32 steps."""
    live = []
    gc.disable()
    try:
        experiment.run(tiny_cfg(steps=6, **{"eval.every": 2, "checkpoint.every": 100}), tmp_path,
                       on_row=lambda row: live.append(sum(a.nbytes for a in jax.live_arrays())))
    finally:
        gc.enable()
    assert len(live) == 7  # 6 steps and the final eval
    # Steps 1-5 (step 0 also holds the model loader's arrays; the last row comes after the
    # final save) hold the same arrays up to a few scalars; one bf16 copy of the tiny model is
    # 177 KiB, and without the release each step added one (1.4 -> 3.8 MB over the run).
    train_steps = live[1:6]
    assert max(train_steps) - min(train_steps) < 8 << 10, live


def test_sampler_on_its_own_mesh_equals_the_shared_mesh(tmp_path, tiny_cfg):
    """8 fake devices: the trainer FSDP over devices 0-3 with the sampler sharing them, against the
    same trainer with the sampler on devices 4-7 as a (2, 2) mesh (tensor-parallel over 2 KV
    heads). An fp32 sampler, so the two samplers differ only in how sharded matmuls sum."""
    base = {"steps": 3, "sampler.dtype": "float32", "mesh.data": 4, "eval.every": 2, "log.samples_every": 1}
    experiment.run(tiny_cfg(**base), tmp_path / "shared")
    experiment.run(tiny_cfg(**base, **{"mesh.sampler_data": 2, "mesh.sampler_model": 2}), tmp_path / "own")
    shared, own = read_metrics(tmp_path / "shared"), read_metrics(tmp_path / "own")
    assert [r["step"] for r in own] == [r["step"] for r in shared] == [0, 1, 2, 3]  # 3: the final eval
    for a, b in zip(shared, own):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if key.startswith("mismatch/"):
                # fp32 against fp32: per-token log-probs that differ by the summation order of
                # sharded matmuls (within the float32 decode bound, 2e-5), on both layouts.
                np.testing.assert_allclose(b[key], value, rtol=1e-6, atol=2e-5, err_msg=f"{a['step']} {key}")
            elif not key.startswith("time/"):
                # Tokens: the same key and logits equal to ~1e-6 draw the same tokens (a flip needs
                # a near-tie at that level), so rewards, lengths and greedy evals agree. The
                # trainer is the same program on the same devices and rescores the same tokens,
                # so its loss, gradients and updates agree bit for bit.
                assert b[key] == value, (a["step"], key, value, b[key])
    replies = [(tmp_path / w / "samples.jsonl").read_text() for w in ("shared", "own")]
    assert replies[0] and [json.loads(l)["response"] for l in replies[0].splitlines()] == \
        [json.loads(l)["response"] for l in replies[1].splitlines()]


# --------------------------------------------------------------------------------------------
# Bad input


def test_unwritable_workdir_is_a_clear_error(tmp_path, tiny_cfg):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="is not a writable directory"):
        experiment.run(tiny_cfg(), blocker / "run")


def test_dataset_with_no_examples_is_a_clear_error(tmp_path, tiny_cfg):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cfg = tiny_cfg(**{"task.name": "jsonl", "task.jsonl_path": str(empty)})
    with pytest.raises(ValueError, match="contains no examples"):
        experiment.run(cfg, tmp_path / "run")


def test_prompt_longer_than_the_context_fails_at_startup(tmp_path, tiny_cfg):
    cfg = tiny_cfg(**{"model.tiny_max_seq_len": 64, "sampler.max_new_tokens": 16, "task.overlong_buffer": 8})
    with pytest.raises(ValueError, match=r"renders to \d+ prompt tokens, more than the prompt limit max_prompt_len=48"):
        experiment.run(cfg, tmp_path)
    assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.slow
def test_nan_reward_stops_the_run_and_loses_nothing(tmp_path, monkeypatch, tiny_cfg):
    real_score = tasks.score
    calls = []

    def score_with_nan_at_step_3(responses, examples, **kwargs):
        out = real_score(responses, examples, **kwargs)
        calls.append(1)
        if len(calls) == 4:
            out["rewards"] = np.where(np.arange(len(responses)) == 1, np.nan, out["rewards"]).astype(np.float32)
        return out

    monkeypatch.setattr(tasks, "score", score_with_nan_at_step_3)
    with pytest.raises(ValueError, match=r"Non-finite rewards at step 3, rows \[1\]"):
        experiment.run(tiny_cfg(), tmp_path)
    # Steps 0-2 are recorded and their state saved (the regular checkpoint is at step 2, the
    # one taken on the way out at 3), so a rerun continues from the failed step.
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    assert sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit()) == [2, 3]
    monkeypatch.setattr(tasks, "score", real_score)
    experiment.run(tiny_cfg(), tmp_path)
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(6))


@pytest.mark.slow
def test_interrupt_while_writing_metrics_loses_no_row_and_saves_the_k3_signal(tmp_path, monkeypatch, tiny_cfg):
    """Ctrl-C inside the loop's metric write, after step 3's update: the state saved on the way
    out must come with step 3's row and step 3's k3 (the k3 trigger's signal for step 4)."""
    cfg = tiny_cfg(**{"optim.k3_trigger_threshold": 1.5})
    seen = []  # (step, k3 signal) of every call of the train step
    real_call = train_step.TrainStep.__call__

    def recording_call(self, state, batch, **signals):
        seen.append((int(state.step), float(signals["k3"])))
        return real_call(self, state, batch, **signals)

    monkeypatch.setattr(train_step.TrainStep, "__call__", recording_call)
    experiment.run(cfg, tmp_path / "reference")
    reference, reference_k3 = read_metrics(tmp_path / "reference"), dict(seen)
    seen.clear()

    interrupted = []

    def on_row(row):  # Called as each row is written: row 2 inside the loop's flush after step 3.
        if row["step"] == 2 and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        experiment.run(cfg, tmp_path / "run", on_row=on_row)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0, 1, 2, 3]
    assert sorted(int(p) for p in os.listdir(tmp_path / "run" / "checkpoints") if p.isdigit()) == [2, 4]
    seen.clear()
    experiment.run(cfg, tmp_path / "run")
    assert seen[0] == (4, reference_k3[4])  # step 3's k3, restored from the checkpoint
    assert _comparable(read_metrics(tmp_path / "run")) == _comparable(reference)


def test_gather_rows_packs_mixed_dtypes_into_one_collective(monkeypatch):
    # Two processes simulated: the other process's rows are this one's reversed. One
    # process_allgather call must carry all arrays and give each back in its own dtype/shape.
    calls = []

    def fake_allgather(x, tiled):
        assert tiled
        calls.append(x.shape)
        return np.concatenate([x, x[::-1]])

    monkeypatch.setattr(experiment.jax, "process_count", lambda: 2)
    monkeypatch.setattr(experiment.multihost_utils, "process_allgather", fake_allgather)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50_000, (3, 5)).astype(np.int32)
    valid = rng.random((3, 5)) > 0.3
    rewards = rng.normal(size=3)
    flags = np.array([True, False, True])
    got = experiment._gather_rows(tokens, valid, rewards, flags)
    assert len(calls) == 1
    for g, a in zip(got, (tokens, valid, rewards, flags)):
        assert g.dtype == a.dtype
        np.testing.assert_array_equal(g, np.concatenate([a, a[::-1]]))
    assert experiment._gather_rows(rewards)[0].shape == (6,)


def _samples(workdir):
    with open(workdir / "samples.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_eval_rows_and_resume_with_eval(tmp_path, caplog, tiny_cfg):
    """Greedy eval every 2 steps and after the last update; a run extended from 2 to 4 steps
    writes exactly the rows (and sampled replies) of an uninterrupted 4-step run (its old
    final-eval row is replaced); the run ends with its summary."""
    caplog.set_level(logging.INFO, logger="absl")
    cfg = tiny_cfg(steps=4, **{"eval.every": 2, "log.samples_every": 2, "log.samples_per_step": 3})
    experiment.run(cfg, tmp_path / "whole")
    whole = read_metrics(tmp_path / "whole")
    # Steps 0 and 2, three replies each: one per prompt first (the tiny run has 2 prompts x 4).
    samples = _samples(tmp_path / "whole")
    assert [s["step"] for s in samples] == [0, 0, 0, 2, 2, 2]
    assert samples[0]["question"] != samples[1]["question"] and samples[0]["question"] == samples[2]["question"]
    assert set(samples[0]) == {"step", "question", "answer", "response", "reward", "correct", "length", "finished"}
    assert all(0 < s["length"] <= 48 and isinstance(s["response"], str) for s in samples)
    log = caplog.text
    assert "Run finished: 4/4 steps" in log and "held-out accuracy:" in log and "after step 3" in log
    assert "mismatch k3:" in log and "python -m experiments.plot --workdir" in log
    assert "step 0 (1/4) |" in log and "step 3 (4/4) |" in log and "ETA" in log and "tok/s" in log
    assert [r["step"] for r in whole] == [0, 1, 2, 3, 4]
    assert [r["step"] for r in whole if "eval/accuracy" in r] == [0, 2, 4]
    assert set(whole[4]) == {"step", "eval/accuracy", "eval/format", "eval/response_length_mean",
                             "eval/finished_frac", "time/eval_s"}
    assert all(0 <= r["eval/finished_frac"] <= 1 and 0 < r["eval/response_length_mean"] <= 48
               for r in whole if "eval/accuracy" in r)
    experiment.run(tiny_cfg(steps=2, **{"eval.every": 2, "log.samples_every": 2, "log.samples_per_step": 3}),
                   tmp_path / "parts")
    assert [r["step"] for r in read_metrics(tmp_path / "parts")] == [0, 1, 2]  # 2 = the final eval
    experiment.run(cfg, tmp_path / "parts")
    assert _comparable(read_metrics(tmp_path / "parts")) == _comparable(whole)
    assert _samples(tmp_path / "parts") == samples
    # A finished run is left alone: rerunning it changes nothing.
    assert experiment.run(cfg, tmp_path / "parts") is None
    assert _comparable(read_metrics(tmp_path / "parts")) == _comparable(whole)


@pytest.mark.slow
def test_load_trained_and_replies(tiny_run, capsys):
    """The checkpointed policy comes back with the run's weights; the replies script prints it."""
    from absl import flags

    from experiments import replies

    workdir, _ = tiny_run
    cfg, model, tok, step = experiment.load_trained(workdir)
    assert step == cfg.steps
    _, start, _, zero = experiment.load_trained(workdir, 0)
    assert zero == 0
    trained_leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    start_leaves = jax.tree.leaves(nnx.state(start, nnx.Param))
    assert any(not np.array_equal(a, b) for a, b in zip(trained_leaves, start_leaves))  # Trained.
    with pytest.raises(ValueError, match="holds no run"):
        experiment.load_trained(workdir / "nope")
    flags.FLAGS(["replies", f"--workdir={workdir}", "--n=2"])
    try:
        replies.main(["replies"])
    finally:
        flags.FLAGS.unparse_flags()
    out = capsys.readouterr().out
    assert f"at step 0 and step {cfg.steps}" in out and out.count("step 0:") == 2


# --------------------------------------------------------------------------------------------
# Faults: a busy workdir, damaged checkpoints, failed writes, a finished run


@pytest.mark.slow
def test_a_second_run_on_a_busy_workdir_fails_at_once_naming_the_holder(tmp_path, tiny_cfg):
    with WorkdirLock(tmp_path):  # held by this process, as a running job would hold it
        with pytest.raises(WorkdirBusyError, match=rf"in use by another run \(PID {os.getpid()} on host "):
            experiment.run(tiny_cfg(), tmp_path)  # a second lock, even from this process, is refused
        cli = subprocess.run(_train_cmd(tmp_path), cwd=REPO, env=_subprocess_env(), capture_output=True,
                             text=True, timeout=300)
    assert cli.returncode == 1
    assert cli.stderr.strip().splitlines()[-1].startswith(f"error: The workdir '{tmp_path}' is in use by another "
                                                          f"run (PID {os.getpid()} on host ")
    assert "Traceback" not in cli.stderr
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "data").exists()  # nothing touched
    experiment.run(tiny_cfg(steps=1), tmp_path)  # released: the workdir is usable again


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock.*"))
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated array file", "missing _METADATA"])
def test_a_damaged_latest_checkpoint_resumes_from_the_one_before(tiny_run, tmp_path, damage, caplog, tiny_cfg):
    workdir, reference = tiny_run
    run = _copy_run(workdir, tmp_path / "run")
    newest = run / "checkpoints" / "6" / "state"
    if damage == "truncated array file":
        victim = max((os.path.join(r, f) for r, _, fs in os.walk(newest) for f in fs), key=os.path.getsize)
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    else:
        os.remove(newest / "_METADATA")
    caplog.set_level("INFO", logger="absl")  # absl may have been set to WARNING by another test
    experiment.run(tiny_cfg(steps=8), run)  # extended, so that the run has to restore
    resumed_from = 6 if "Resuming from checkpoint 6" in caplog.text else 4
    assert "does not match" not in caplog.text and "a different model" not in caplog.text
    if damage == "truncated array file":
        assert resumed_from == 4
        assert "Checkpoint 6 in" in caplog.text and "is unreadable" in caplog.text
        assert "trying checkpoint 4" in caplog.text
        assert os.listdir(run / "checkpoints.unreadable") == ["6"]
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(8))
    assert _comparable(rows[:6]) == _comparable(reference)  # the redone steps 4, 5 are the same


@pytest.mark.slow
def test_a_finished_run_started_again_says_so_and_loads_nothing(tiny_run, tmp_path, monkeypatch, caplog, tiny_cfg):
    run = _copy_run(tiny_run[0], tmp_path / "run")

    def must_not_load(*args, **kwargs):
        raise AssertionError("a finished run loaded its model")

    monkeypatch.setattr(experiment, "load_model", must_not_load)
    monkeypatch.setattr(experiment, "prepare_task", must_not_load)
    caplog.set_level("INFO", logger="absl")  # absl may have been set to WARNING by another test
    assert experiment.run(tiny_cfg(), run) is None
    assert "is finished: it has all its 6 steps (checkpoint 6). Nothing to do." in caplog.text
    assert read_metrics(run) == tiny_run[1]


@pytest.mark.slow
def test_a_failed_metrics_write_stops_the_run_truthfully_and_a_rerun_completes(tiny_run, tmp_path, monkeypatch,
                                                                               caplog, tiny_cfg):
    from rl_mismatch import metric_writing

    real_append = metric_writing.MetricWriter._append

    def full_disk_at_step_3(self, step, line):
        if step == 3:
            raise metric_writing.MetricsWriteError(f"Writing step {step}'s metrics to {self.path} failed: "
                                                   "No space left on device.")
        real_append(self, step, line)

    monkeypatch.setattr(metric_writing.MetricWriter, "_append", full_disk_at_step_3)
    with pytest.raises(experiment.RunIOError) as err:
        experiment.run(tiny_cfg(), tmp_path)
    message = str(err.value)
    assert message.startswith("Step ") and "step 3's metrics" in message and "No space left on device" in message
    assert "Once the cause is fixed, the same command resumes from checkpoint 2 in" in message
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]  # no cut-off line
    # Row 3 was never written, so no checkpoint may cover step 3: a resume redoes it.
    assert max(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit()) <= 3
    monkeypatch.undo()
    experiment.run(tiny_cfg(), tmp_path)
    assert _comparable(read_metrics(tmp_path)) == _comparable(tiny_run[1])


@pytest.mark.slow
def test_a_failed_background_save_stops_the_run_at_the_next_step(tiny_run, tmp_path, monkeypatch, caplog, tiny_cfg):
    import orbax.checkpoint as ocp

    class FullDisk:
        def result(self, timeout=None):
            raise OSError(28, "No space left on device")

    async def fail(self, *args, **kwargs):
        return [FullDisk()]

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", fail)
    caplog.set_level("INFO", logger="absl")  # absl may have been set to WARNING by another test
    with pytest.raises(experiment.RunIOError, match="No space left on device") as err:
        experiment.run(tiny_cfg(), tmp_path)
    # The save after step 1 failed in the background. The run stops at the first step that finds
    # it failed: the next step's check, or with tiny steps (0.1 s) at the latest the next save's.
    failed_at = int(str(err.value).split(":")[0].removeprefix("Step "))
    assert failed_at in (2, 3)
    assert "there is no checkpoint yet, so the same command starts the run again" in str(err.value)
    assert "Saved the state" not in caplog.text
    assert f"Could not save the state after step {failed_at}" in caplog.text
    assert not [p for p in os.listdir(tmp_path / "checkpoints") if p.isdigit()]
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(failed_at))
    monkeypatch.undo()
    experiment.run(tiny_cfg(), tmp_path)
    assert _comparable(read_metrics(tmp_path)) == _comparable(tiny_run[1])


@pytest.mark.slow
def test_chaos_five_kills_then_the_same_metrics(tmp_path):
    """SIGKILL at five seeded moments (after a drawn row, or inside a save), resumed each time."""
    from experiments import chaos

    lines = []
    difference = chaos.chaos(kills=5, seed=0, steps=12, workdir=str(tmp_path), echo=lines.append)
    assert difference is None, "\n".join(lines + [difference])
    assert sum("killed" in line for line in lines) >= 3, lines  # most kills land before the run ends
    assert [r["step"] for r in read_metrics(tmp_path / "chaos")] == list(range(12))
