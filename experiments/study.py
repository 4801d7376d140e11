r"""Runs a study: every arm x seed of a study file, one RL run at a time, each resumable.

  python -m experiments.study --study=experiments/studies/main.py --workdir=/tmp/main_study
  python -m experiments.report --workdir=/tmp/main_study

A study file defines ``get_study(arg=None)`` returning an ``rl_mismatch.study.Study`` (a base
config, arms of config overrides, seeds); ``--study=file.py:arg`` passes ``arg``. Runs go to
``<workdir>/<arm>/seed<k>``, seed by seed. Rerunning the same command continues an interrupted
study: finished runs are skipped and an unfinished one resumes from its checkpoint.
``--arms`` / ``--seeds`` run a part of the study (e.g. one sitting per seed); the report merges
whatever runs the workdir holds.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the imports below: the restart runs this script anew
    from rl_mismatch.host_memory import restart_with_huge_pages

    restart_with_huge_pages()  # huge-page-backed malloc mappings, see rl_mismatch.host_memory

import sys

from absl import app, flags, logging

from experiments import compile_cache
from rl_mismatch import console, experiment, study
from rl_mismatch.workdir_lock import WorkdirBusyError

_STUDY = flags.DEFINE_string("study", None, "Study file, experiments/studies/<name>.py[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Study directory; runs already in it are continued or skipped.")
_ARMS = flags.DEFINE_list("arms", [], "Only these arm labels (default: every arm).")
_SEEDS = flags.DEFINE_list("seeds", [], "Only these seeds (default: every seed of the study).")
flags.mark_flags_as_required(["study", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
    console.quiet_library_logs()
    try:
        logging.info("XLA compilation cache: %s.", compile_cache.enable())
        spec, path = study.load_study(_STUDY.value)
        try:
            seeds = [int(s) for s in _SEEDS.value]
        except ValueError:
            raise ValueError(f"--seeds={','.join(_SEEDS.value)} must be comma-separated integers.") from None
        logging.info("Study %s (%s): %d arms x %d seeds, into %s.", spec.name, path, len(spec.arms),
                     len(spec.seeds), _WORKDIR.value)
        study.run_study(spec, _WORKDIR.value, arms=_ARMS.value or None, seeds=seeds or None, study_file=path)
    except (ValueError, OSError, WorkdirBusyError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
