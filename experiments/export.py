r"""Exports the trained policy of a run as a Hugging Face model directory, to serve or share it.

  python -m experiments.export --workdir=runs/default --out=exports/default [--step=N]

Restores the run's checkpoint of ``--step`` (default: the latest; 0: the starting model) and
writes ``--out`` with ``config.json``, ``model.safetensors`` (the float32 master weights),
``generation_config.json`` and the tokenizer files (those of the source model's HF directory or
HF cache snapshot, copied as they are; written from the tokenizer for a GGUF or tiny source).
``transformers.AutoModelForCausalLM.from_pretrained(out)`` loads it; the same files are what
``vllm serve out``, SGLang and llama.cpp's ``convert_hf_to_gguf.py`` read. ``--out`` must not exist
or be empty; it appears whole or not at all (written beside it, then renamed). Errors (no run, no
such checkpoint, a used ``--out``) are one ``error:`` line and exit status 1.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

_FLAGS: dict = {}  # Defined only when run as a command: importing export_run must not claim flag names.


def _define_flags() -> None:
    _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "A run directory of experiments.train / experiments.study.")
    _FLAGS["out"] = flags.DEFINE_string("out", None, "The HF model directory to write (new or empty).")
    _FLAGS["step"] = flags.DEFINE_integer("step", None, "Checkpoint to export (default: the latest; 0: the start).")
    flags.mark_flags_as_required(["workdir", "out"])


def export_run(workdir: str | os.PathLike, out: str | os.PathLike, step: int | None = None) -> tuple[str, int]:
    """Writes the policy of the run in ``workdir`` at checkpoint ``step`` as an HF model directory.

    Returns:
      ``(out, step)``: the directory's absolute path and the step exported.

    Raises:
      FileExistsError: ``out`` exists and is not an empty directory (checked before anything is loaded).
      FileNotFoundError: no checkpoint for ``step``, or the run's model source is gone.
      ValueError: no run in ``workdir``, no checkpoint yet, a negative step, an unreadable checkpoint.
    """
    from rl_mismatch import experiment
    from rl_mismatch.experiment_config import TINY_MODEL
    from rl_mismatch.models import loading

    if step is not None and step < 0:
        raise ValueError(f"--step={step}: a checkpoint step is >= 0 (0 is the starting model).")
    target = loading.check_save_target(out)  # Before the restore, which takes a while.
    cfg, model, tok, step = experiment.load_trained(workdir, step)
    tokenizer_dir = None
    if cfg.model.source != TINY_MODEL:
        source = loading.resolve_source(cfg.model.source)
        tokenizer_dir = source if os.path.isdir(source) else None
    return loading.save_pretrained(model, tok, target, tokenizer_dir=tokenizer_dir), step


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
    from rl_mismatch import console

    console.quiet_library_logs()
    workdir = _FLAGS["workdir"].value
    try:
        out, step = export_run(workdir, _FLAGS["out"].value, _FLAGS["step"].value)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")  # What is wrong and what to do; a traceback would bury it.
    print(f"Exported step {step} of {workdir} to {out} ({', '.join(sorted(os.listdir(out)))}).\n"
          f"Load it with transformers.AutoModelForCausalLM.from_pretrained({out!r}), or serve it: vllm serve {out}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
