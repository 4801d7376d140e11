"""Per-step metrics to a JSONL file and TensorBoard event files, fetched one step late.

One JSON object per line in ``<workdir>/metrics.jsonl``: ``{"step": s, "reward/mean": ...,
"mismatch/k3": ..., ...}``; scalar metrics also go to TensorBoard (tensorboardX) under
``<workdir>/tensorboard``. Array-valued metrics (``mismatch/by_position/*``) are written to the
JSONL as lists and skipped in TensorBoard. A non-finite scalar (a NaN loss, the documented +inf of
``opt/grad_noise_scale`` when the signal is indistinguishable from noise) keeps its exact value
in the JSONL and goes to TensorBoard as NaN, which TensorBoard marks on the curve; tensorboardX's
generic "NaN or Inf found in input tensor." warning is silenced for these writes only (it names
neither the metric nor the step, and the value is expected).

Fetching one step late. The train step returns its metrics as device arrays while the device
may still be computing them. :meth:`MetricWriter.write` therefore only *holds* step ``s``'s
row; it fetches and writes the row of step ``s - 1`` (finished long since), so the host never
waits on the device just to log. :meth:`MetricWriter.flush` writes the held row right away --
call it before a checkpoint so that the file and the checkpoint always agree.

Resuming. ``MetricWriter(..., resume_step=n)`` drops every row with ``step >= n`` (rows that a
killed run wrote after its last checkpoint; the resumed run writes them again) by rewriting
the file atomically, and opens the TensorBoard writer with ``purge_step=n`` so TensorBoard
discards the stale events too. The file therefore never holds a step twice. It also checks what
it keeps: a malformed line is reported with its line number, and a step below ``n`` with no row
(one the checkpoint covers, so it is never written again) is reported as an error; both go to
``metrics_gaps.json`` beside the file. Only a last line cut short by a kill is routine.

Writing. A failed write (a full disk) raises :class:`MetricsWriteError` naming the step and the
file, and leaves no cut-off line; :meth:`MetricWriter.sync` forces the file to disk before a
checkpoint that covers its rows.

Sampled replies. :meth:`MetricWriter.write_samples` appends a few of a step's rollouts (prompt,
reply, reward) to ``<workdir>/samples.jsonl``, one object per reply with its ``step``, and to
TensorBoard as text (tag ``samples``); a resumed run drops the replies of steps it will run
again, as it does rows.

Multi-host: every process calls :meth:`write` and :meth:`flush` (fetching may need a
collective); only the one created with ``enabled=True`` (process 0) writes files.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

JSONL_NAME = "metrics.jsonl"
SAMPLES_NAME = "samples.jsonl"
GAPS_NAME = "metrics_gaps.json"  # Steps a resumed run found without a row, and malformed lines.
TENSORBOARD_DIR = "tensorboard"

Row = dict[str, Any]


class _DropNonFiniteWarning(logging.Filter):
    """Drops tensorboardX's "NaN or Inf found in input tensor." record (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("NaN or Inf found")


_TBX_LOGGER = logging.getLogger("tensorboardX.x2num")


def _summary_writer_class():
    """tensorboardX's ``SummaryWriter``, imported without importing torch.

    Where torch is installed, importing tensorboardX imports it too (its writer also accepts
    torch tensors): ~1 s and ~200 MiB of resident memory in the main job's process
    (benchmarks/README.md), for a writer that is only ever given floats here. Unless torch is
    already imported, tensorboardX is imported with torch marked absent (``sys.modules["torch"]
    = None`` makes ``import torch`` raise ImportError, which tensorboardX handles), and the mark
    is removed at once, so that a later ``import torch`` works.
    """
    mark = "torch" not in sys.modules
    if mark:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        from tensorboardX import SummaryWriter
    finally:
        if mark and sys.modules.get("torch", False) is None:
            del sys.modules["torch"]
    return SummaryWriter


def fetch_to_host(tree: Any) -> Any:
    """``jax.device_get`` that also works on multi-host global arrays.

    A leaf this process can see entirely is copied; a fully replicated one is read from a
    local replica; any other is gathered from all processes (a collective: every process must
    call this with the same tree).
    """

    def one(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def to_json_value(x: Any) -> Any:
    """A host value as a JSON value: scalars to float/int, arrays to lists."""
    a = np.asarray(x)
    if a.ndim == 0:
        v = a.item()
        return v if isinstance(v, (bool, int)) else float(v)
    return a.tolist()


def _metrics_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    return os.path.join(path, JSONL_NAME) if os.path.isdir(path) else path


def scan_metrics(path: str | os.PathLike) -> tuple[list[Row], list[tuple[int, str]]]:
    """The rows of a metrics JSONL file (or of a workdir's), and its malformed lines.

    Returns:
      ``(rows, malformed)``: the parsed rows in file order, and ``(line number, text)`` of each
      line that is not a JSON object with a ``step`` (1-based numbers; a missing file has none).
    """
    path = _metrics_path(path)
    if not os.path.exists(path):
        return [], []
    rows, malformed = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
            else:
                malformed.append((number, line.rstrip("\n")))
    return rows, malformed


def read_metrics(path: str | os.PathLike) -> list[Row]:
    """The rows of a metrics JSONL file or a workdir's; malformed lines (a last line cut short by
    a kill) are skipped -- :class:`MetricWriter` reports them when it resumes a run."""
    return scan_metrics(path)[0]


def _resume_file(path: str, keep_below: int) -> None:
    """Rewrites ``path`` with the rows of steps < ``keep_below`` (atomic), and checks them.

    A line cut short at the end of the file is the trace of a kill during a write: logged at
    INFO. Any other malformed line is reported with its line number, and a step below
    ``keep_below`` without a row (the checkpoint covers it, so it is never written again) is
    reported as an error; both are recorded in ``metrics_gaps.json`` beside the file, with the
    malformed lines' text, so that nothing is dropped without a trace.
    """
    rows, malformed = scan_metrics(path)
    with open(path, encoding="utf-8", errors="replace") as f:
        n_lines = sum(1 for _ in f)
    # Only a last line without its closing brace is the trace of a kill mid-write.
    cut_short = {n for n, t in malformed if n == n_lines and not t.endswith("}")}
    for number, text in malformed:
        log = logging.info if number in cut_short else logging.warning
        log("%s line %d is malformed%s and is dropped: %.120r", path, number,
            " (cut short: the run was stopped while writing it)" if number in cut_short else "", text)
    kept = [r for r in rows if r["step"] < keep_below]
    missing = sorted(set(range(keep_below)) - {r["step"] for r in kept})
    if missing:
        logging.error("%s has no row for step(s) %s, which the checkpoint covers: they will not be written "
                      "again. Recorded in %s.", path, _ranges(missing), GAPS_NAME)
    if missing or len(malformed) > len(cut_short):
        record_path = os.path.join(os.path.dirname(path), GAPS_NAME)
        history = []
        if os.path.exists(record_path):
            with open(record_path, encoding="utf-8") as f:
                history = json.load(f)
        history.append({"resumed_at_step": keep_below, "missing_steps": missing,
                        "malformed_lines": [{"line": n, "text": t} for n, t in malformed]})
        _write_atomically(record_path, json.dumps(history, indent=1) + "\n")
    _write_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))


def _ranges(steps: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    parts, start = [], None
    for i, s in enumerate(steps):
        start = s if start is None else start
        if i + 1 == len(steps) or steps[i + 1] != s + 1:
            parts.append(str(s) if s == start else f"{start}-{s}")
            start = None
    return ", ".join(parts)


def _write_atomically(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _resume_samples(path: str, keep_below: int) -> None:
    """Rewrites ``path`` with the replies of steps < ``keep_below`` (atomic); a line cut short by a
    kill is dropped with them (the replies are a sample for reading, not a record to audit)."""
    kept = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                if int(json.loads(line)["step"]) < keep_below:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    _write_atomically(path, "".join(kept))


def samples_markdown(samples: Sequence[Mapping[str, Any]]) -> str:
    """Sampled replies as Markdown (TensorBoard's text plugin renders it): per reply its reward,
    length, the prompt's question and the reply in a code block."""
    parts = []
    for i, sample in enumerate(samples):
        head = ", ".join(f"{k} {sample[k]}" for k in ("reward", "correct", "length", "finished") if k in sample)
        parts.append(f"**{i}** ({head})\n\n> {sample.get('question', '')}\n\n```\n{sample.get('response', '')}\n```")
    return "\n\n".join(parts)


class MetricsWriteError(OSError):
    """Writing a metrics row failed (a full disk, a read-only file system, ...)."""


class MetricWriter:
    """Writes one row per step to JSONL and TensorBoard, one step late.

    Args:
      workdir: the run directory (the JSONL file and the TensorBoard dir go in it).
      resume_step: the first step this run will write; rows from ``resume_step`` on are
        removed from an existing file.
      enabled: write files (False on processes other than 0).
      tensorboard: also write TensorBoard event files.
      on_row: called with every row as it is written (e.g. to log progress).
    """

    def __init__(self, workdir: str | os.PathLike, *, resume_step: int = 0, enabled: bool = True,
                 tensorboard: bool = True, on_row: Callable[[Row], None] | None = None):
        self.path = os.path.join(os.fspath(workdir), JSONL_NAME)
        self.enabled = enabled
        self._on_row = on_row
        # Rows held but not yet written, oldest first: one in steady state.
        self._held: collections.deque[tuple[int, Mapping[str, Any], Any]] = collections.deque()
        self._file = None
        self._tb = None
        if not enabled:
            return
        if os.path.exists(self.path):
            _resume_file(self.path, resume_step)
        self.samples_path = os.path.join(os.fspath(workdir), SAMPLES_NAME)
        if os.path.exists(self.samples_path):
            _resume_samples(self.samples_path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            # Imported here: only the writing process needs it.
            self._tb = _summary_writer_class()(os.path.join(os.fspath(workdir), TENSORBOARD_DIR),
                                               purge_step=resume_step if resume_step > 0 else None)

    def write(self, step: int, host_metrics: Mapping[str, Any], device_metrics: Any = None) -> Row | None:
        """Holds step ``step``'s metrics and writes the previously held row (`hold`, then
        ``flush(keep_newest=True)``).

        Args:
          step: the step the metrics belong to.
          host_metrics: values already on the host (floats, numpy).
          device_metrics: a dict of device arrays, fetched when the row is written.

        Returns:
          The row written now (the previous step's), or None.
        """
        self.hold(step, host_metrics, device_metrics)
        return self.flush(keep_newest=True)

    def hold(self, step: int, host_metrics: Mapping[str, Any], device_metrics: Any = None) -> None:
        """Holds step ``step``'s metrics (arguments as in `write`) without writing anything.

        A held row is written by the next `flush`, also after an error or interrupt while an
        older row was being written.
        """
        self._held.append((int(step), dict(host_metrics), device_metrics))

    def amend(self, step: int, host_metrics: Mapping[str, Any]) -> None:
        """Adds host values to step ``step``'s row while it is still held (e.g. timings of work
        done after the row was held).

        Raises:
          KeyError: no row of that step is held (it was written already, or never held).
        """
        for held_step, host, _ in self._held:
            if held_step == step:
                host.update(host_metrics)
                return
        raise KeyError(f"No row of step {step} is held; amend it before the flush that writes it.")

    def flush(self, keep_newest: bool = False) -> Row | None:
        """Fetches and writes the held rows, oldest first; returns the last written (or None).

        ``keep_newest``: leave the newest row held, so that its device metrics are fetched only
        when the next step has been dispatched (the host does not wait for the step).
        """
        row = None
        while len(self._held) > int(keep_newest):
            row = self._write_oldest()
        return row

    def _write_oldest(self) -> Row:
        step, host, device = self._held[0]
        values = dict(host)
        if device is not None:
            try:
                values.update(fetch_to_host(device))
            except Exception:  # A failed device computation: this row can never be written.
                self._held.popleft()
                raise  # (An interrupt while fetching keeps the row held, for the next flush.)
        row: Row = {"step": step}
        row.update({k: to_json_value(v) for k, v in sorted(values.items())})
        if self.enabled:
            self._append(step, json.dumps(row) + "\n")  # A failed write keeps the row held.
        self._held.popleft()
        if self._tb is not None:
            self._write_tensorboard(step, row)
        if self._on_row is not None:
            self._on_row(row)
        return row

    def _append(self, step: int, line: str) -> None:
        start = self._file.tell()
        try:
            self._file.write(line)
            self._file.flush()  # A kill -9 loses nothing that was written (the OS holds it).
        except OSError as e:
            # No cut-off line is left behind: the file ends with the last complete row.
            try:
                self._file.truncate(start)
                self._file.seek(start)
            except OSError:
                pass
            raise MetricsWriteError(f"Writing step {step}'s metrics to {self.path} failed: "
                                    f"{e.strerror or e}.") from e

    def write_samples(self, step: int, samples: Sequence[Mapping[str, Any]]) -> None:
        """Appends step ``step``'s sampled replies (JSON-able dicts, e.g. ``question``,
        ``response``, ``reward``) to ``samples.jsonl`` and to TensorBoard as text.

        Raises:
          MetricsWriteError: the write failed (the file is left without a cut-off line).
        """
        if not self.enabled or not samples:
            return
        text = "".join(json.dumps({"step": int(step), **{k: v if isinstance(v, str) else to_json_value(v)
                                                          for k, v in s.items()}}) + "\n" for s in samples)
        try:
            with open(self.samples_path, "a", encoding="utf-8") as f:
                start = f.tell()
                try:
                    f.write(text)
                    f.flush()
                except OSError:
                    f.truncate(start)
                    raise
        except OSError as e:
            raise MetricsWriteError(f"Writing step {step}'s sampled replies to {self.samples_path} failed: "
                                    f"{e.strerror or e}.") from e
        if self._tb is not None:
            self._tb.add_text("samples", samples_markdown(samples), step)

    def sync(self) -> None:
        """Writes the held rows and forces the file to disk (before a checkpoint that covers them)."""
        self.flush()
        if self._file is not None:
            try:
                os.fsync(self._file.fileno())
            except OSError as e:
                raise MetricsWriteError(f"Syncing {self.path} to disk failed: {e.strerror or e}.") from e

    def _write_tensorboard(self, step: int, row: Row) -> None:
        quiet = _DropNonFiniteWarning()
        _TBX_LOGGER.addFilter(quiet)  # only around these writes: other tensorboardX users keep it
        try:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value if math.isfinite(value) else float("nan"), step)
        finally:
            _TBX_LOGGER.removeFilter(quiet)
        self._tb.flush()

    def close(self) -> None:
        """Writes the held rows and closes the files (also when writing a row fails)."""
        try:
            self.flush()
        finally:
            if self._file is not None:
                self._file.close()
                self._file = None
            if self._tb is not None:
                self._tb.close()
                self._tb = None
