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
and the files are written in a background thread while training goes on. Call
:meth:`Checkpointer.wait` (or :meth:`Checkpointer.close`) before the process exits.

Multi-host: every process calls every method (orbax synchronises them); each writes its own
shards. Every leaf must then be a global ``jax.Array`` (place small leaves with a replicated
sharding on the mesh).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

_STATE, _META = "state", "meta"


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
        )
        self._manager = ocp.CheckpointManager(self.directory, item_names=(_STATE, _META), options=options)
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
        """
        if step in self._manager.all_steps():
            return
        self._manager.save(
            step,
            args=ocp.args.Composite(**{
                _STATE: ocp.args.StandardSave(state),
                _META: ocp.args.JsonSave(dict(metadata)),
            }),
            force=True,  # The caller decides when to save; no interval policy here.
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores ``step`` (default: the latest) into the structure of ``abstract_state``.

        Args:
          abstract_state: a pytree like the saved one, e.g. ``abstract_like(fresh_state)``; its
            leaves' shardings say where the restored arrays go.
          step: which checkpoint; None for the latest.

        Returns:
          ``(state, metadata)``.

        Raises:
          FileNotFoundError: there is no (such) checkpoint.
          ValueError: the checkpoint does not match ``abstract_state`` (another model or
            optimizer), with orbax's explanation.
        """
        step = self.latest_step() if step is None else step
        if step is None or step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"No checkpoint{'' if step is None else f' for step {step}'} in {self.directory!r}; "
                f"complete checkpoints: {self.all_steps()}.")
        # Compare against the checkpoint's tree metadata first: the error then names every leaf
        # that differs, and no read starts (orbax, failing on the first bad array, abandons the
        # reads of the others it already began).
        problems = _mismatches(self._manager.item_metadata(step)[_STATE], abstract_state)
        if problems:
            listed = "; ".join(problems[:_MAX_LISTED])
            more = f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
            raise ValueError(
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
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"Checkpoint {step} in {self.directory!r} does not match this run's state (a different "
                f"model, optimizer or loss scaling?): {e}") from e
        return restored[_STATE], dict(restored[_META])

    def wait(self) -> None:
        """Blocks until the pending save (if any) is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the pending save and releases the manager (orbax's close() waits first)."""
        self._manager.close()
