r"""Runs an RL experiment: sample -> reward -> rescore -> mismatch metrics -> train step -> LR transform.

  python -m experiments.train --config=experiments/configs/default.py --workdir=/tmp/default_run
  python -m experiments.train --config=experiments/configs/tiny.py --workdir=/tmp/tiny \
      --config.steps=20 --config.sampler.dtype=fp16

The config file's ``get_config(arg)`` (``--config=path.py:arg``) gives the settings; any of them
can be overridden with ``--config.<key>=<value>``; ``--print_config`` prints the resolved settings
and exits. Rerunning the same command on the same
``--workdir`` resumes from the latest checkpoint. Outputs: ``metrics.jsonl``,
``tensorboard/``, ``checkpoints/``, ``config.json``; plot with ``python -m experiments.plot``.

Multi-host: start one process per host with ``--coordinator_address=host0:port
--num_processes=N --process_id=i`` (or ``--distributed`` to let ``jax.distributed.initialize``
read a cluster environment such as SLURM or a TPU pod), all with the same ``--workdir`` on a
shared file system.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the imports below: the restart runs this script anew
    from rl_mismatch.host_memory import restart_with_huge_pages

    restart_with_huge_pages()  # huge-page-backed malloc mappings, see rl_mismatch.host_memory

import json
import os
import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import compile_cache
from rl_mismatch import console, experiment, host_memory
from rl_mismatch.experiment_config import ExperimentConfig
from rl_mismatch.workdir_lock import WorkdirBusyError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, experiments/configs/<name>.py[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; an existing run in it is resumed.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with the cluster environment's settings.")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print the resolved settings (the config file, its overrides and every default) as "
    "JSON and exit; no --workdir needed.")
flags.mark_flags_as_required(["config"])


def _config_file_problem(argv: list[str]) -> str | None:
    """What is wrong with the ``--config`` file itself (missing, or no ``get_config``), if anything.

    ml_collections reports a missing file as a multi-line "Failed loading config file" and a file
    without ``get_config`` as an unknown key ``'module'``; checked here first, both get one line.
    """
    values = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
    values += [argv[i + 1] for i, a in enumerate(argv[1:-1], 1) if a == "--config"]
    if not values:
        return None
    path = values[-1].split(":", 1)[0]
    configs = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
    choices = ", ".join(sorted(n for n in os.listdir(configs) if n.endswith(".py") and not n.startswith("_")
                               and n != "base.py"))
    if not os.path.isfile(path):
        return f"--config={values[-1]}: there is no file {path!r}. The configs are in experiments/configs/: {choices}."
    with open(path, encoding="utf-8") as f:
        if not re.search(r"^def get_config\(", f.read(), re.MULTILINE):
            shared = " (base.py holds the settings the configs share)" if os.path.basename(path) == "base.py" else ""
            return (f"--config={values[-1]}: {path} defines no get_config(arg=None), so it is not a config "
                    f"file{shared}. Pick one of experiments/configs/: {choices}.")
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with one clear line for a bad ``--config`` file or argument, and for a
    ``--config.<key>`` that names no setting (ml_collections reports that as a bare
    ``AttributeError: "'key'"`` traceback)."""
    problem = _config_file_problem(argv)
    if problem:
        sys.exit(f"error: {problem}")
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        # An error raised by get_config() arrives as the whole traceback text: keep its last line.
        text = str(e)
        if "Traceback (most recent call last)" in text:
            last = [line for line in text.strip().splitlines() if line.strip()][-1]
            where = re.match(r"flag (--\S+): ", text)
            text = f"{where.group(1) if where else 'a flag'}: {last.split(': ', 1)[-1]}"
        sys.exit(f"error: {text}")
    except (AttributeError, KeyError) as e:
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        # ml_collections' message: the quoted key, possibly re-quoted with escapes, then maybe a
        # 'Did you mean "x" instead of "y"?' line.
        text = str(e.args[0] if e.args else e)
        key = re.search(r"[A-Za-z_]\w*", text)
        hint = re.search(r'Did you mean "[^"]*" instead of "[^"]*"\?', text)
        sys.exit(f"error: unknown config key '{key.group() if key else text}' (in {', '.join(overrides)}): no "
                 f"setting of the config file has that name.{' ' + hint.group() if hint else ''} The settings "
                 "are listed in experiments/configs/base.py.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
    console.quiet_library_logs()
    try:
        # Typed and validated before anything heavy happens: a bad setting fails in a second.
        cfg = ExperimentConfig.from_dict(_CONFIG.value.to_dict())
        if _PRINT_CONFIG.value:
            print(json.dumps(cfg.to_dict(), indent=1, sort_keys=True))
            return
        if not _WORKDIR.value:
            raise ValueError("--workdir is required: the run directory (a run already in it is resumed).")
        if _COORDINATOR.value or _DISTRIBUTED.value:
            jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                       num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
        logging.info("Process %d/%d, %d devices; workdir %s; malloc: %s.", jax.process_index(), jax.process_count(),
                     jax.device_count(), _WORKDIR.value, host_memory.malloc_pages())
        logging.info("XLA compilation cache: %s.", compile_cache.enable())
        experiment.run(cfg, _WORKDIR.value)
    except (ValueError, OSError, WorkdirBusyError) as e:
        # Bad input or a failed write: the message says what, where and how to go on; a traceback
        # would only bury it.
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
