"""Studies: the same RL experiment over arms (config variants) x seeds, one run at a time.

One RL trajectory of a few dozen samples per step is chaos: another seed, host or code
revision draws other tokens and tells another story. A claim about the mismatch is therefore
a comparison of *arms* (a control and its variants) over several *seeds*, reported as medians
and per-seed outcomes (``rl_mismatch.outcomes``, ``experiments/report.py``).

A study file (``experiments/studies/<name>.py``) defines ``get_study(arg=None) -> Study``::

  def get_study(arg=None):
    base = my_config.get_config()                     # an ml_collections.ConfigDict
    return Study("main", base, seeds=(0, 1, 2), arms=(
        Arm("a_fp32", "fp32 sampler and trainer: the control", {"sampler.dtype": "float32"}),
        Arm("b_bf16", "bf16 sampler, fp32 trainer", {}),
    ))

:func:`run_study` runs every (seed, arm) pair with ``experiment.run``, seed by seed (so a study
cut short still compares every arm on the seeds it finished), each in its own sub-workdir
``<workdir>/<arm label>/seed<seed>``; the runs share the generated dataset (``<workdir>/data``).
A run's config is the base with the arm's overrides and ``seed = <seed>``: every random draw of
the run (model init for a random model, the data order, the sampling keys) derives from that
seed, so the arms of one seed start from the same weights and see the same prompts, and
differ only in what the arm changes. Each run is resumable (``experiment.run`` resumes from its
checkpoint), and a run that has all its steps is skipped, so rerunning the same command
continues an interrupted study; ``arms=`` / ``seeds=`` restrict a call to a part of the study
(parts of one study may run in separate sittings into the same workdir).

``<workdir>/study.json`` records the study: its name, file, steps, seeds and, per arm, the
label, description, overrides and the full config of its first seed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import tqdm
from absl import logging

from rl_mismatch.experiment_config import ExperimentConfig, config_differences
from rl_mismatch.metric_writing import Row, read_metrics

STUDY_FILE = "study.json"
DATA_DIR = "data"
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclasses.dataclass(frozen=True)
class Arm:
    """One variant of the base config.

    Attributes:
      label: short name, also the arm's sub-directory (letters, digits, ``_ . -``).
      description: one line for the report, e.g. "bf16 sampler, fp32 trainer, constant LR".
      overrides: dotted config keys and their values, e.g. ``{"sampler.dtype": "float32"}``.
    """

    label: str
    description: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Study:
    """Arms x seeds of one base config.

    Attributes:
      name: the study's name (used in the report).
      base: the base experiment config (``ml_collections.ConfigDict`` or nested dict).
      arms: the variants; labels must be unique.
      seeds: the seeds every arm runs with (>= 0, unique).
    """

    name: str
    base: Any
    arms: tuple[Arm, ...]
    seeds: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "arms", tuple(self.arms))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if not self.arms or not self.seeds:
            raise ValueError(f"Study {self.name!r} needs at least one arm and one seed.")
        labels = [a.label for a in self.arms]
        bad = [l for l in labels if not _LABEL.fullmatch(l)]
        if bad:
            raise ValueError(f"Arm labels {bad} are not usable as directory names; use letters, digits, '_', '.', '-'.")
        if len(set(labels)) != len(labels):
            raise ValueError(f"Arm labels must be unique, got {labels}.")
        if len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"Seeds must be unique and >= 0, got {list(self.seeds)}.")

    def config(self, arm: Arm, seed: int) -> ExperimentConfig:
        """The validated config of one run: the base, the arm's overrides, ``seed``.

        Raises:
          ValueError: an override names no setting, or makes an invalid config (named).
        """
        c = ml_collections.ConfigDict(_as_dict(self.base))
        try:
            c.update_from_flattened_dict(dict(arm.overrides))
        except (AttributeError, KeyError) as e:
            raise ValueError(f"Arm {arm.label!r}: an override names no config setting ({e}); "
                             f"its overrides are {dict(arm.overrides)}.") from None
        c.seed = seed
        try:
            return ExperimentConfig.from_dict(c.to_dict())
        except ValueError as e:
            raise ValueError(f"Arm {arm.label!r}, seed {seed}: {e}") from None

    def arm(self, label: str) -> Arm:
        for a in self.arms:
            if a.label == label:
                return a
        raise ValueError(f"Study {self.name!r} has no arm {label!r}; its arms are {[a.label for a in self.arms]}.")


def _as_dict(config: Any) -> dict[str, Any]:
    return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)


def load_study(spec: str) -> tuple[Study, str]:
    """Imports a study file ``path.py[:arg]`` and returns ``(get_study(arg), path)``.

    Raises:
      ValueError: the file does not exist, or has no ``get_study``.
    """
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ValueError(f"No study file {path!r}; a study is a Python file with get_study(), e.g. "
                         "experiments/studies/main.py.")
    module_spec = importlib.util.spec_from_file_location("rl_mismatch_study_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_study"):
        raise ValueError(f"The study file {path!r} defines no get_study(arg=None) -> rl_mismatch.study.Study.")
    study = module.get_study(arg or None)
    if not isinstance(study, Study):
        raise ValueError(f"get_study() of {path!r} returned {type(study).__name__}, not a rl_mismatch.study.Study.")
    return study, path


def run_dir(workdir: str | os.PathLike, arm: Arm | str, seed: int) -> str:
    """``<workdir>/<arm label>/seed<seed>``: where one run of a study lives."""
    return os.path.join(os.fspath(workdir), arm if isinstance(arm, str) else arm.label, f"seed{seed}")


def steps_done(path: str | os.PathLike) -> int:
    """Steps of a run whose metrics are written (0 for a run not started)."""
    rows = read_metrics(path)
    return 1 + max(int(r["step"]) for r in rows) if rows else 0


def _check_same_config(path: str, cfg: ExperimentConfig, label: str, seed: int) -> None:
    config_file = os.path.join(path, "config.json")
    if not os.path.exists(config_file):
        return
    with open(config_file, encoding="utf-8") as f:
        old = json.load(f)
    changed = config_differences(old, cfg.to_dict())
    if changed:
        raise ValueError(
            f"The run {path!r} (arm {label!r}, seed {seed}) was made with other settings: {'; '.join(changed)}. "
            "The study file changed since; use a new --workdir, or restore the study's settings.")


def write_study_json(study: Study, workdir: str, study_file: str | None) -> None:
    """Writes ``<workdir>/study.json`` (atomically): what the report needs to know of the study."""
    first = study.seeds[0]
    record = {
        "name": study.name,
        "study_file": study_file,
        "steps": study.config(study.arms[0], first).steps,
        "seeds": list(study.seeds),
        "arms": [{"label": a.label, "description": a.description, "overrides": dict(a.overrides),
                  "config": study.config(a, first).to_dict()} for a in study.arms],
    }
    tmp = os.path.join(workdir, STUDY_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(workdir, STUDY_FILE))


def run_study(study: Study, workdir: str | os.PathLike, *, arms: Sequence[str] | None = None,
              seeds: Sequence[int] | None = None, study_file: str | None = None,
              progress: bool = True) -> dict[tuple[str, int], Row | None]:
    """Runs (or continues) every (seed, arm) run of ``study`` in ``workdir``, one at a time.

    Args:
      study: the study.
      workdir: the study's directory (created).
      arms, seeds: only these arm labels / seeds (default: all), e.g. one part of a long study.
      study_file: the study file's path, recorded in ``study.json``.
      progress: a tqdm bar over the selected runs' steps (runs done, steps done, ETA).

    Returns:
      ``{(label, seed): last metrics row}`` of the runs run now (None for those skipped).

    Raises:
      ValueError: an unknown arm or seed, an invalid arm config, or a finished run made with
        other settings (all checked before the first run starts).
    """
    from rl_mismatch import experiment  # Heavy (JAX, models); the spec above needs none of it.

    selected_arms = [study.arm(l) for l in arms] if arms else list(study.arms)
    unknown = sorted(set(seeds or ()) - set(study.seeds))
    if unknown:
        raise ValueError(f"Seeds {unknown} are not in study {study.name!r} (its seeds: {list(study.seeds)}).")
    selected_seeds = [s for s in study.seeds if not seeds or s in seeds]
    workdir = experiment.prepare_workdir(workdir)
    data_dir = os.path.join(workdir, DATA_DIR)

    runs = []  # (arm, seed, config, directory, steps done): every config checked before any run.
    for seed in selected_seeds:
        for arm in selected_arms:
            cfg = study.config(arm, seed)
            if not cfg.task.data_dir:
                cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, data_dir=data_dir))
            path = run_dir(workdir, arm, seed)
            _check_same_config(path, cfg, arm.label, seed)
            runs.append((arm, seed, cfg, path, min(steps_done(path), cfg.steps)))
    write_study_json(study, workdir, study_file)

    total = sum(r[2].steps for r in runs)
    bar = tqdm.tqdm(total=total, initial=sum(r[4] for r in runs), unit="step", disable=not progress,
                    desc=f"study {study.name}", dynamic_ncols=True)
    results: dict[tuple[str, int], Row | None] = {}
    t_start = time.perf_counter()
    try:
        for i, (arm, seed, cfg, path, done) in enumerate(runs):
            key = (arm.label, seed)
            if done >= cfg.steps:
                results[key] = None
                continue
            bar.set_postfix_str(f"run {i + 1}/{len(runs)}: {arm.label} seed {seed}")
            logging.info("Study %s: run %d/%d, arm %s, seed %d (%d/%d steps done) in %s.", study.name, i + 1,
                         len(runs), arm.label, seed, done, cfg.steps, path)
            last: list[Row] = []

            def on_row(row: Row, steps: int = cfg.steps) -> None:
                last[:] = [row]
                if row["step"] < steps:  # Not the trained policy's eval row at step `steps`.
                    bar.update(1)

            experiment.run(cfg, path, on_row=on_row)
            results[key] = last[0] if last else None
            logging.info("Study %s: %s seed %d finished; %d of %d steps done in %.0f s.", study.name,
                         arm.label, seed, bar.n, total, time.perf_counter() - t_start)
            _free_compiled()
    finally:
        bar.close()
    return results


def _free_compiled() -> None:
    """Drops the finished run's compiled programs (each run compiles its own closures)."""
    import jax

    jax.clear_caches()
