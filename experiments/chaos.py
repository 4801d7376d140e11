r"""Chaos check: kill a tiny run with SIGKILL at random moments, resume it each time, and compare
its metrics with an uninterrupted run's.

  python -m experiments.chaos --kills=5 --seed=0              # what the test suite runs
  python -m experiments.chaos --kills=50 --seed=7 --steps=24  # a longer soak

It runs ``experiments/configs/tiny.py`` for ``--steps`` steps (a checkpoint every 2) once without
interruption, then again in another workdir as a series of processes: each is started with the
same command and killed with SIGKILL at a moment drawn from ``--seed``: once it has written 0-3
rows past the checkpoint it resumed from (0: while it starts up), either then or inside the
next checkpoint save (while orbax's temporary directory exists), plus a drawn delay of up to
50 ms. After ``--kills`` kills one last process
finishes the run. Every value of the final ``metrics.jsonl`` except wall-clock timings must
equal the uninterrupted run's: each step once, bit for bit. Exit status 0 when they do; 1 with
the first difference otherwise. Each kill is printed with its moment and what the next process
resumed from.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from rl_mismatch.metric_writing import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TIMEOUT_S = 600  # One process of a tiny run takes ~15 s, most of it importing and compiling.

_FLAGS: dict = {}  # Defined only when run as a command: importing chaos() must not claim flag names.


def _define_flags() -> None:
    _FLAGS["kills"] = flags.DEFINE_integer("kills", 5, "Number of SIGKILLs.")
    _FLAGS["seed"] = flags.DEFINE_integer("seed", 0, "Seed of the kill moments.")
    _FLAGS["steps"] = flags.DEFINE_integer("steps", 12, "Steps of the tiny run.")
    _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "Where the two runs go (default: a temporary directory).")


@dataclasses.dataclass
class Kill:
    """One kill: once the process has written ``rows`` metrics rows past the checkpoint it
    resumes from (0: during start-up), inside a save or not, then ``delay_s`` later."""

    rows: int
    in_save: bool
    delay_s: float

    def __str__(self) -> str:
        where = "inside the first save after" if self.in_save else "after"
        return f"{where} {self.rows} new row(s) + {self.delay_s * 1e3:.0f} ms"


def draw_kills(n: int, seed: int) -> list[Kill]:
    """``n`` kill moments; at least one inside a save and one outside when ``n >= 2``."""
    rng = random.Random(seed)
    in_save = [True, False][:n] + [rng.random() < 0.5 for _ in range(n - 2)]
    rng.shuffle(in_save)
    return [Kill(rows=rng.randrange(4), in_save=s, delay_s=rng.uniform(0, 0.05)) for s in in_save]


def _latest_checkpoint(workdir: str) -> int:
    ckpt = os.path.join(workdir, "checkpoints")
    steps = [int(n) for n in os.listdir(ckpt) if n.isdigit()] if os.path.isdir(ckpt) else []
    return max(steps, default=0)


def _command(workdir: str, steps: int) -> list[str]:
    return [sys.executable, "-m", "experiments.train", f"--config=experiments/configs/tiny.py:{steps}",
            f"--workdir={workdir}"]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env


def _saving(workdir: str) -> bool:
    ckpt = os.path.join(workdir, "checkpoints")
    return os.path.isdir(ckpt) and any("tmp" in name for name in os.listdir(ckpt))


def _inode(workdir: str) -> int | None:
    try:
        return os.stat(os.path.join(workdir, "metrics.jsonl")).st_ino
    except FileNotFoundError:
        return None


def _rows(workdir: str, stale_inode: int | None = None) -> int:
    """Rows in the metrics file; 0 while it is still the previous process's file (a resumed run
    rewrites it, as a new file, once it has read its checkpoint)."""
    try:
        with open(os.path.join(workdir, "metrics.jsonl"), "rb") as f:
            if stale_inode is not None and os.fstat(f.fileno()).st_ino == stale_inode:
                return 0
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def _run_until(workdir: str, steps: int, kill: Kill | None, log_path: str) -> str:
    """Starts the run; kills it at ``kill`` (None: lets it finish). Returns what happened."""
    stale, start = _inode(workdir), _latest_checkpoint(workdir)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_command(workdir, steps), cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + _TIMEOUT_S
        while kill is not None and proc.poll() is None and time.monotonic() < deadline:
            if _rows(workdir, stale) >= start + kill.rows and (not kill.in_save or _saving(workdir)):
                time.sleep(kill.delay_s)
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            raise RuntimeError(f"The run in {workdir} did not finish in {_TIMEOUT_S} s; see {log_path}.") from None
    text = open(log_path, errors="replace").read()
    if code not in (0, -signal.SIGKILL):
        raise RuntimeError(f"The run in {workdir} failed with exit status {code}:\n{text[-3000:]}")
    resumed = re.search(r"Resuming from checkpoint (\d+)", text)
    start = f"resumed from checkpoint {resumed.group(1)}" if resumed else "started afresh"
    return f"{start}, {'killed' if code else 'finished'} with {_rows(workdir)} rows written"


def comparable(rows: list[dict]) -> list[dict]:
    """Rows without wall-clock timings (the only values that may differ between equal runs)."""
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def first_difference(got: list[dict], want: list[dict]) -> str | None:
    if [r["step"] for r in got] != [r["step"] for r in want]:
        return f"steps {[r['step'] for r in got]} != {[r['step'] for r in want]}"
    for g, w in zip(comparable(got), comparable(want)):
        for key in sorted(g.keys() | w.keys()):
            if g.get(key, "<missing>") != w.get(key, "<missing>"):
                return f"step {g['step']}, {key}: {g.get(key, '<missing>')!r} != {w.get(key, '<missing>')!r}"
    return None


def chaos(kills: int, seed: int, steps: int, workdir: str, echo=print) -> str | None:
    """Runs the check (see the module docstring); returns the first difference, or None."""
    os.makedirs(workdir, exist_ok=True)
    reference, chaotic = os.path.join(workdir, "reference"), os.path.join(workdir, "chaos")
    echo(f"reference: {_run_until(reference, steps, None, reference + '.log')}")
    for i, kill in enumerate(draw_kills(kills, seed)):
        echo(f"kill {i + 1}/{kills} ({kill}): {_run_until(chaotic, steps, kill, f'{chaotic}.{i}.log')}")
    echo(f"last: {_run_until(chaotic, steps, None, chaotic + '.last.log')}")
    return first_difference(read_metrics(chaotic), read_metrics(reference))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
    kills, seed = _FLAGS["kills"].value, _FLAGS["seed"].value
    workdir = _FLAGS["workdir"].value or tempfile.mkdtemp(prefix="rl_mismatch_chaos_")
    difference = chaos(kills, seed, _FLAGS["steps"].value, workdir)
    if difference:
        sys.exit(f"error: after {kills} kills the metrics differ from the uninterrupted run's: {difference} "
                 f"(runs in {workdir}).")
    print(f"ok: {kills} kills (seed {seed}); every step's metrics equal the uninterrupted run's (runs in {workdir}).")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
