"""Tests for rl_mismatch.checkpointing: round trips, types, and crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rl_mismatch import host_memory, optim
from rl_mismatch import sharding as shd
import orbax.checkpoint as ocp

from rl_mismatch.checkpointing import (
    Checkpointer,
    CheckpointSaveError,
    CheckpointUnreadableError,
    abstract_like,
)
from rl_mismatch.models.config import tiny_config
from rl_mismatch.models.decoder import Decoder
from rl_mismatch.precision import DynamicLossScale, LossScaleState


def _state(seed: int = 0, mesh=None):
    """A train-state-like pytree: nnx params, a chained optax state with NamedTuples, a typed key."""
    params = nnx.split(Decoder(tiny_config(n_layers=1), rngs=nnx.Rngs(seed)))[1]
    if mesh is not None:
        params = jax.device_put(params, shd.state_shardings(params, mesh, shd.TRAINER_RULES))
    opt = optax.chain(optax.adam(1e-3), optim.length_triggered_decay())
    opt_state = opt.init(params)
    return {"params": params, "opt_state": opt_state, "loss_scale": DynamicLossScale().init(),
            "key": jax.random.key(seed), "step": jnp.int32(seed)}


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_keeps_types_values_and_shardings(tmp_path):
    mesh = shd.make_mesh(4, 2)
    state = _state(1, mesh)
    ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=2)
    ckpt.save(3, state, {"data_position": 3, "note": "x"})
    ckpt.close()

    ckpt = Checkpointer(tmp_path / "ckpt")
    assert ckpt.latest_step() == 3
    restored, meta = ckpt.restore(abstract_like(_state(0, mesh)))
    assert meta == {"data_position": 3, "note": "x"}
    _assert_same(restored, state)
    # Types survive through the abstract target, not through a generic dict/list rebuild.
    assert isinstance(restored["params"], nnx.State)
    assert isinstance(restored["opt_state"][1], optim.TriggeredDecayState)
    assert isinstance(restored["loss_scale"], LossScaleState)
    assert jnp.issubdtype(restored["key"].dtype, jax.dtypes.prng_key)
    emb = restored["params"]["embed"][...]
    assert emb.sharding == state["params"]["embed"][...].sharding
    ckpt.close()


def test_keeps_only_the_newest_and_rejects_a_mismatched_target(tmp_path):
    ckpt = Checkpointer(tmp_path, max_to_keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, _state(step), {"data_position": step})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]
    restored, meta = ckpt.restore(abstract_like(_state(0)), step=2)
    assert meta["data_position"] == 2 and int(restored["step"]) == 2
    with pytest.raises(FileNotFoundError, match="No checkpoint for step 7"):
        ckpt.restore(abstract_like(_state(0)), step=7)

    other = _state(0)
    other["params"] = nnx.split(Decoder(tiny_config(n_layers=1, d_model=32), rngs=nnx.Rngs(0)))[1]
    with pytest.raises(ValueError, match="does not match this run's state") as err:
        ckpt.restore(abstract_like(other))
    # Each differing leaf is named with both shapes; the list stops after eight.
    assert "params/blocks/attn_norm/value has shape (1, 64) in the checkpoint, (1, 32) here" in str(err.value)
    assert "and 3 more" in str(err.value)

    no_scaling = _state(0)
    del no_scaling["loss_scale"]
    no_scaling["extra"] = jnp.zeros(2)
    with pytest.raises(ValueError, match="does not match") as err:
        ckpt.restore(abstract_like(no_scaling))
    assert str(err.value).count("is only in the checkpoint") == 3  # The three loss-scale leaves.
    assert "extra is not in the checkpoint" in str(err.value)

    # The rejected attempts left the checkpoints usable.
    restored, meta = ckpt.restore(abstract_like(_state(0)))
    assert meta["data_position"] == 3
    _assert_same(restored, _state(3))
    ckpt.close()


def test_unfinished_temporary_directory_is_ignored(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(2, _state(2), {"data_position": 2})
    ckpt.close()
    # What a process killed in the middle of saving step 4 leaves behind.
    partial = tmp_path / "4.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\0" * 100)

    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() == 2
    restored, meta = ckpt.restore(abstract_like(_state(0)))
    assert meta["data_position"] == 2
    _assert_same(restored, _state(2))
    ckpt.close()


_KILL_DURING_SAVE = textwrap.dedent("""
    import os, shutil, signal, sys
    import jax, jax.numpy as jnp
    from rl_mismatch.checkpointing import Checkpointer
    ckpt = Checkpointer(sys.argv[1])
    ckpt.save(1, {"w": jnp.ones((4, 4))}, {"data_position": 1})
    ckpt.wait()

    # Die at the worst moment, deterministically: step 2's files are all written and only the
    # final rename of its temporary directory to ".../2" is left.
    def die_before_publishing(rename):
        def wrapped(src, dst, *args, **kwargs):
            if os.path.basename(os.fspath(dst)) == "2":
                os.kill(os.getpid(), signal.SIGKILL)
            return rename(src, dst, *args, **kwargs)
        return wrapped

    os.rename, os.replace, shutil.move = map(die_before_publishing, (os.rename, os.replace, shutil.move))
    ckpt.save(2, {"w": jnp.zeros((4, 4))}, {"data_position": 2})
    ckpt.wait()
    print("the save finished without reaching the patched rename")
""")


def test_kill_during_save_leaves_the_last_good_checkpoint(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.run([sys.executable, "-c", _KILL_DURING_SAVE, str(tmp_path)], env=env,
                          capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, (proc.stdout + proc.stderr).decode()[-2000:]
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert "1" in leftovers and "2" not in leftovers, leftovers  # step 2 never finished ...
    assert any(name.startswith("2.orbax-checkpoint-tmp") for name in leftovers), leftovers  # ... but began

    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() == 1
    restored, meta = ckpt.restore({"w": jax.ShapeDtypeStruct((4, 4), jnp.float32)})
    assert meta == {"data_position": 1}
    np.testing.assert_array_equal(restored["w"], np.ones((4, 4)))
    ckpt.close()
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]  # cleaned up


def _largest_file(directory) -> str:
    files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


def test_damaged_newest_checkpoint_falls_back_to_the_older_one(tmp_path, caplog):
    ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=3)
    for step in (2, 4, 6):
        ckpt.save(step, _state(step), {"data_position": step})
    ckpt.close()
    victim = _largest_file(tmp_path / "ckpt" / "6" / "state")  # the arrays' data file
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    os.remove(tmp_path / "ckpt" / "4" / "state" / "_METADATA")  # the tree metadata

    ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=3)
    with pytest.raises(CheckpointUnreadableError, match="Checkpoint 6 .* cannot be read"):
        ckpt.restore(abstract_like(_state(0)), step=6)  # a named step never falls back
    with caplog.at_level("WARNING", logger="absl"):
        restored, meta = ckpt.restore(abstract_like(_state(0)))
    # 6 cannot be read. 4 without its tree metadata either restores (the abstract target gives
    # the structure) or is skipped as damaged; it is never "a different model".
    log = caplog.text
    assert "Checkpoint 6" in log and "is unreadable" in log and "does not match" not in log
    if meta["data_position"] == 4:
        _assert_same(restored, _state(4))
        moved = [6]
    else:
        assert meta["data_position"] == 2 and "Checkpoint 4" in log
        _assert_same(restored, _state(2))
        moved = [4, 6]
    # The unreadable ones are kept aside, out of the way of the saves that will replace them.
    assert sorted(int(p) for p in os.listdir(tmp_path / "ckpt.unreadable")) == moved
    assert max(ckpt.all_steps()) == meta["data_position"]
    ckpt.save(6, _state(6), {"data_position": 6})
    ckpt.wait()
    assert ckpt.restore(abstract_like(_state(0)))[1]["data_position"] == 6
    ckpt.close()


def test_no_readable_checkpoint_names_each_and_its_error(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt")
    for step in (1, 2):
        ckpt.save(step, _state(step), {"data_position": step})
    ckpt.close()
    for step in (1, 2):
        victim = _largest_file(tmp_path / "ckpt" / str(step) / "state")
        with open(victim, "r+b") as f:
            f.truncate(10)
    ckpt = Checkpointer(tmp_path / "ckpt")
    with pytest.raises(CheckpointUnreadableError) as err:
        ckpt.restore(abstract_like(_state(0)))
    message = str(err.value)
    assert "No checkpoint in" in message and "checkpoint 2: " in message and "checkpoint 1: " in message
    assert "does not match" not in message
    assert ckpt.all_steps() == [1, 2]  # nothing is moved when there is nothing to resume from
    ckpt.close()


def test_a_failed_background_save_is_reported(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(1, _state(1), {"data_position": 1})
    ckpt.wait()

    class FullDisk:  # A write future of the background thread that fails as a full disk does.
        def result(self, timeout=None):
            raise OSError(28, "No space left on device")

    async def fail(self, *args, **kwargs):
        return [FullDisk()]

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", fail)
    ckpt.save(2, _state(2), {"data_position": 2})  # returns: the write happens in the background
    while ckpt._manager.is_saving_in_progress():
        time.sleep(0.01)
    with pytest.raises(CheckpointSaveError, match="No space left on device"):
        ckpt.check()  # without waiting
    monkeypatch.undo()
    assert ckpt.all_steps() == [1]
    ckpt.check()  # reported once
    ckpt.save(3, _state(3), {"data_position": 3})
    ckpt.close()
    assert Checkpointer(tmp_path / "ckpt").all_steps() == [1, 3]


def test_a_chosen_wait_is_not_reported_as_a_save_waiting_for_the_previous(tmp_path, monkeypatch, caplog):
    """The run waits for each save before its update (on CPU); orbax would count that wait as the
    next save's wait for the previous one and warn "consider checkpointing less frequently"."""
    from orbax.checkpoint import checkpoint_manager

    class Slow:  # The background write takes at least 0.4 s.
        def result(self, timeout=None):
            time.sleep(0.4)

    async_save = ocp.StandardCheckpointHandler.async_save

    async def slow_save(self, *args, **kwargs):
        return [*await async_save(self, *args, **kwargs), Slow()]

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", slow_save)
    monkeypatch.setattr(checkpoint_manager, "_WAIT_FOR_PREV_SAVE_WARNING_THRESHOLD_SECS", 0.2)
    ckpt = Checkpointer(tmp_path / "ckpt")
    with caplog.at_level("WARNING"):
        ckpt.save(1, _state(), {})
        ckpt.wait()
        ckpt.save(2, _state(), {})
        ckpt.close()
    assert ckpt.all_steps() == [1, 2]
    assert not [r for r in caplog.records if "Waiting for previous save" in r.getMessage()]


def test_wait_reports_a_failed_background_save(tmp_path, monkeypatch):
    class FullDisk:
        def result(self, timeout=None):
            raise OSError(28, "No space left on device")

    async def fail(self, *args, **kwargs):
        return [FullDisk()]

    ckpt = Checkpointer(tmp_path / "ckpt")
    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", fail)
    ckpt.save(1, _state(1), {"data_position": 1})
    with pytest.raises(CheckpointSaveError, match="No space left on device"):
        ckpt.close()


@pytest.mark.parametrize("async_save", [True, False])
def test_a_written_save_hands_its_host_memory_back(tmp_path, monkeypatch, async_save):
    # The save's copy of the arrays is freed once its files are written; its pages must then go back to the
    # OS (rl_mismatch.host_memory), after the write, not while the arrays are still being written.
    calls = []
    ckpt_dir = tmp_path / "ckpt"

    def release():
        calls.append(sorted(p.name for p in ckpt_dir.iterdir()))
        return True

    monkeypatch.setattr(host_memory, "release_free_memory", release)
    ckpt = Checkpointer(ckpt_dir, async_save=async_save)
    ckpt.save(1, _state(), {"data_position": 1})
    ckpt.wait()
    assert len(calls) == 1
    ckpt.save(2, _state(), {"data_position": 2})
    ckpt.close()
    assert len(calls) == 2
    # At the second release the second save's arrays were written (its step directory exists,
    # finished or about to be renamed into place).
    assert any(name.startswith("2") for name in calls[1]), calls
