"""Checkpoints of an RL run: an orbax ``CheckpointManager`` with a pytree and a JSON record.

Each checkpoint ``<directory>/<step>/`` holds two items:

* ``state``: any pytree of ``jax.Array`` -- for the RL loop the ``TrainState`` (float32 master
  params, optimizer state with the LR transform's state, loss-scale state, step, PRNG key) and
  the rollout PRNG key;
* ``meta``: a JSON dict -- the data position, the config, anything small and host-side.

Restoring needs an *abstract target* (:func:`abstract_like`: shapes, dtypes and shardings of a
freshly initialised state). Orbax then rebuilds exactly that tree, so ``NamedTuple`` optimizer
states, ``flax.struct`` nodes, ``nnx.State`` and typed PRNG keys come back as the same types,
laid out on the same mesh.

Crash safety. Orbax writes a step into ``<step>.orbax-checkpoint-tmp-*`` and renames it to
``<step>`` only once every file is written (on a POSIX file system the rename is atomic), so a
process killed during a save leaves the previous checkpoint as the latest one; the next
manager ignores -- and deletes -- the unfinished temporary directory.

Saving is asynchronous: :meth:`Checkpointer.save` copies the arrays to host memory and returns,
and the files are written in a background thread while training goes on; once they are, the
save's freed host memory goes back to the operating system (:mod:`rl_mismatch.host_memory`).
:meth:`Checkpointer.check` raises if a background save has failed (call it every step, so a failed
save stops the run at once, not at the next save); call :meth:`Checkpointer.wait` (or
:meth:`Checkpointer.close`) before the process exits, and before saying that a save is done.

Damage. With no step given, :meth:`Checkpointer.restore` falls back from an unreadable checkpoint
(a truncated or missing file) to the next older one, logs why, and moves the unreadable one to
``<directory>.unreadable/``; a checkpoint of another structure (another model or optimizer) is
an error of its own, never confused with damage. A multi-host run must fall back in the same way
on every process; :func:`rl_mismatch.experiment.run` therefore restores a named step there.

Multi-host: every process calls every method (orbax synchronises them); each writes its own
shards. Every leaf must then be a global ``jax.Array`` (place small leaves with a replicated
sharding on the mesh).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import jax
from absl import logging
import orbax.checkpoint as ocp

from rl_mismatch import host_memory

_STATE, _META = "state", "meta"
_UNREADABLE = ".unreadable"  # Suffix of the directory that unreadable checkpoints are moved to.


class CheckpointMismatchError(ValueError):
    """The checkpoint holds another structure than the one asked for (another configuration)."""


class CheckpointUnreadableError(ValueError):
    """A checkpoint (or every checkpoint) cannot be read: a damaged or missing file.

    Attributes:
      reason: the first line of each underlying error, for a one-line report.
    """

    def __init__(self, message: str, *, reason: str):
        super().__init__(message)
        self.reason = reason


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (a full disk, a read-only file system, ...)."""


_MAX_LISTED = 8  # Differing leaves named in a mismatch error.


def _mismatches(stored: Any, abstract_state: Any) -> list[str]:
    """How ``abstract_state`` differs from a checkpoint's tree metadata, one line per leaf.

    Leaves are compared by their path in orbax's serialised form (NamedTuples by field name, lists
    by index) and by global shape; a dtype may differ (orbax casts on restore). Returns [] when
    the checkpoint has no tree metadata to compare with.
    """
    tree = getattr(stored, "tree", None)
    if tree is None:
        return []
    have = ocp.tree.to_flat_dict(tree)
    want = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(abstract_state, keep_empty_nodes=True))
    problems = []
    for path in sorted(have.keys() | want.keys(), key=lambda p: tuple(map(str, p))):
        name = "/".join(map(str, path))
        if path not in want:
            problems.append(f"{name} is only in the checkpoint")
        elif path not in have:
            problems.append(f"{name} is not in the checkpoint")
        elif tuple(have[path].shape) != tuple(want[path].shape):
            problems.append(f"{name} has shape {tuple(have[path].shape)} in the checkpoint, "
                            f"{tuple(want[path].shape)} here")
    return problems


def abstract_like(tree: Any) -> Any:
    """Shapes, dtypes and shardings of ``tree`` as ``jax.ShapeDtypeStruct`` leaves."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Saves and restores ``(state pytree, JSON metadata)`` pairs by step.

    Args:
      directory: where the step directories go (created if missing).
      max_to_keep: the newest this many checkpoints are kept; older ones are deleted.
      async_save: write files in the background (see the module docstring).

    Example::

      ckpt = Checkpointer(workdir / "checkpoints")
      if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(abstract_like(state))
      ...
      ckpt.save(step, state, {"data_position": step})
      ckpt.close()
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2, async_save: bool = True):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep={max_to_keep} must be >= 1.")
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            # Unfinished saves of a killed process are deleted rather than mistaken for steps.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
            # The save's copy of the arrays is freed once the files are written; hand its pages back
            # to the OS then, or they stay resident (`rl_mismatch.host_memory`).
            async_options=ocp.AsyncOptions(post_finalization_callback=host_memory.release_free_memory)
            if async_save else None,
        )
        self._async = async_save
        # The handlers named up front: a fresh manager can then read a checkpoint's tree metadata
        # (and does not warn that the items "could not be restored" before the first restore).
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={_STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()})
        # Orbax 0.12.8 starts that cleanup in a background thread and never joins it, so a save
        # could race the deletion and the directory could still hold the debris after close().
        # Join it here: the cleanup is a directory listing plus an rmtree per unfinished step.
        await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()

    def all_steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, metadata: Mapping[str, Any]) -> None:
        """Starts saving ``state`` and ``metadata`` (JSON-able) as ``step``.

        Returns once the arrays are on the host; the state may be donated or changed after.
        A step that already exists is left as it is (the same run saved it).

        Raises:
          CheckpointSaveError: the save could not start (e.g. its directory cannot be created);
            a failure of the background write is raised by `check`, `wait` or `close`.
        """
        if step in self._manager.all_steps():
            return
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(**{
                    _STATE: ocp.args.StandardSave(state),
                    _META: ocp.args.JsonSave(dict(metadata)),
                }),
                force=True,  # The caller decides when to save; no interval policy here.
            )
        except OSError as e:
            raise CheckpointSaveError(f"Saving checkpoint {step} in {self.directory!r} failed: {_first_line(e)}") from e
        if not self._async:  # Written already: its copy of the arrays is freed.
            host_memory.release_free_memory()

    def metadata(self, step: int) -> dict[str, Any]:
        """The JSON record of checkpoint ``step`` alone (no arrays are read).

        Raises:
          CheckpointUnreadableError: it cannot be read.
        """
        try:
            return dict(self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META])
        except Exception as e:
            raise CheckpointUnreadableError(f"Checkpoint {step} in {self.directory!r} cannot be read: {_first_line(e)}",
                                            reason=_first_line(e)) from e

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores ``step``, or with no step the newest checkpoint that can be read.

        With ``step=None`` the checkpoints are tried from the newest down. One that cannot be
        read (a truncated or missing file) is logged with the reason, moved to
        ``<directory>.unreadable/`` (kept for inspection, and out of the way of the save that
        will replace it) and the next older one is tried. A checkpoint whose structure differs
        from ``abstract_state`` is not damage but another configuration: that stops at once.

        Args:
          abstract_state: a pytree like the saved one, e.g. ``abstract_like(fresh_state)``; its
            leaves' shardings say where the restored arrays go.
          step: which checkpoint; None for the newest readable one.

        Returns:
          ``(state, metadata)``.

        Raises:
          FileNotFoundError: there is no (such) checkpoint.
          CheckpointMismatchError: the checkpoint does not match ``abstract_state`` (another
            model, optimizer or loss scaling), naming the leaves that differ.
          CheckpointUnreadableError: ``step`` (or, with no step, every checkpoint) cannot be
            read; the message names each checkpoint and its first error.
        """
        steps = self.all_steps()
        if step is not None or not steps:
            if step is None or step not in steps:
                raise FileNotFoundError(
                    f"No checkpoint{'' if step is None else f' for step {step}'} in {self.directory!r}; "
                    f"complete checkpoints: {steps}.")
            return self._restore_step(step, abstract_state)
        failures: list[tuple[int, str]] = []
        for candidate in reversed(steps):
            try:
                restored = self._restore_step(candidate, abstract_state)
            except CheckpointUnreadableError as e:
                failures.append((candidate, e.reason))
                older = [s for s in steps if s < candidate]
                logging.warning("Checkpoint %d in %s is unreadable (%s); %s.", candidate, self.directory,
                                e.reason, f"trying checkpoint {older[-1]}" if older else "no older checkpoint")
                continue
            for bad, _ in failures:
                self._set_aside(bad)
            if failures:
                logging.warning("Resuming from checkpoint %d; the unreadable newer checkpoint(s) %s were moved "
                                "to %s.", candidate, [b for b, _ in failures], self.directory + _UNREADABLE)
            return restored
        listed = "; ".join(f"checkpoint {s}: {reason}" for s, reason in failures)
        raise CheckpointUnreadableError(
            f"No checkpoint in {self.directory!r} can be read ({listed}). Move that directory aside to start "
            "the run afresh, or restore it from a backup.", reason=listed)

    def _restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """One checkpoint: a structure check from its metadata, then the read."""
        try:
            stored = self._manager.item_metadata(step)[_STATE]
        except Exception as e:  # A damaged metadata file; the read below says whether it matters.
            stored, metadata_error = None, e
        else:
            metadata_error = None if stored is not None else "its state metadata is missing"
        # Compare against the checkpoint's tree metadata first: the error then names every leaf
        # that differs, and no read starts (orbax, failing on the first bad array, abandons the
        # reads of the others it already began).
        problems = _mismatches(stored, abstract_state)
        if problems:
            listed = "; ".join(problems[:_MAX_LISTED])
            more = f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
            raise CheckpointMismatchError(
                f"Checkpoint {step} in {self.directory!r} does not match this run's state (a different "
                f"model, optimizer or loss scaling?): {listed}{more}. Restore with the configuration "
                f"that wrote it, or start from a fresh directory.")
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(**{
                    _STATE: ocp.args.StandardRestore(abstract_state),
                    _META: ocp.args.JsonRestore(),
                }),
            )
        except Exception as e:  # The structure matched (or could not be read): this is damage.
            reason = _first_line(e)
            if metadata_error is not None:
                reason = f"{_first_line(metadata_error)}; then the read failed: {reason}"
            raise CheckpointUnreadableError(
                f"Checkpoint {step} in {self.directory!r} cannot be read: {reason}", reason=reason) from e
        return restored[_STATE], dict(restored[_META])

    def _set_aside(self, step: int) -> None:
        aside = self.directory + _UNREADABLE
        os.makedirs(aside, exist_ok=True)
        target = os.path.join(aside, str(step))
        if os.path.exists(target):
            target += f".{time.strftime('%Y%m%dT%H%M%S')}"
        os.replace(os.path.join(self.directory, str(step)), target)
        self._manager.reload()

    def check(self) -> None:
        """Raises if a background save has failed since the last call (cheap: no waiting).

        Raises:
          CheckpointSaveError: the failed save's step directory and reason.
        """
        # Orbax 0.12.8's manager finalises each save in a thread of its own, which takes the
        # checkpointer's error over; check_for_errors() then sees nothing, and only a join of that
        # thread (wait_until_finished) raises it. A finished thread joins at once.
        finalize = getattr(self._manager, "_finalize_thread", None)
        if finalize is not None and finalize.map(lambda t: t is not None and not t.is_alive() and
                                                 t.exception is not None):
            self.wait()
        try:
            self._manager.check_for_errors()
        except Exception as e:
            raise CheckpointSaveError(f"Saving a checkpoint in {self.directory!r} failed: {_first_line(e)}") from e

    def wait(self) -> None:
        """Blocks until the pending save (if any) is on disk.

        Raises:
          CheckpointSaveError: it failed.
        """
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:
            raise CheckpointSaveError(f"Saving a checkpoint in {self.directory!r} failed: {_first_line(e)}") from e
        finally:
            # Orbax 0.12.8 adds this wait to the next save's "waiting for the previous save" time,
            # and warns there when it exceeds 1 s ("consider checkpointing less frequently"). A
            # wait the caller chose is not one: the next save found nothing pending.
            if hasattr(self._manager, "_wait_for_prev_save_duration"):
                self._manager._wait_for_prev_save_duration = 0.0

    def close(self) -> None:
        """Waits for the pending save and releases the manager (also when the save failed).

        Raises:
          CheckpointSaveError: the pending save failed.
        """
        try:
            self.wait()
        finally:
            self._manager.close()


def _first_line(e: BaseException | str) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
