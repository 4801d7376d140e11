"""Meshes and parameter placement: logical axis names -> mesh axes.

Model parameters carry logical axis names (``rl_mismatch.models.decoder``: layers, vocab, embed,
heads, kv_heads, head_dim, mlp) as ``out_sharding`` metadata. A *rule set* maps them to the two
mesh axes, ``data`` and ``model``:

* ``SAMPLER_RULES``: tensor parallelism. Heads, MLP and vocab split over ``model``; parameters
  replicated over ``data`` (each data shard decodes its own slice of the batch).
* ``TRAINER_RULES``: tensor parallelism plus FSDP. As above, and the ``embed`` axis of every
  weight is split over ``data`` too; XLA all-gathers weights for the forward and reduce-scatters
  gradients.

The sampler and the trainer thus hold the same values in different layouts; the move between
them is ``rl_mismatch.sampler.sync_weights``. By default both use one mesh; ``make_meshes`` can
also give the sampler devices of its own (the trainer FSDP over some devices, the sampler
tensor-parallel over the others), and the sync then copies the weights device to device.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"

SAMPLER_RULES: Mapping[str, str | None] = {
    "layers": None, "vocab": MODEL, "embed": None, "heads": MODEL, "kv_heads": MODEL,
    "head_dim": None, "mlp": MODEL,
}
TRAINER_RULES: Mapping[str, str | None] = {**SAMPLER_RULES, "embed": DATA}


def make_mesh(data: int = -1, model: int = 1, *, devices=None) -> jax.sharding.Mesh:
    """A ``(data, model)`` mesh over the first ``data * model`` of ``devices`` (default: all).

    ``data=-1`` takes every device not used by ``model``. Axis types are Auto: shardings are
    given explicitly at jit boundaries and XLA propagates them inside, which is what the step
    functions here are written for. (``jax.make_mesh`` now defaults to Explicit axes, under
    which every intermediate's sharding must be typed.)
    """
    devices = list(jax.devices() if devices is None else devices)
    if model <= 0 or (data == -1 and len(devices) % model):
        raise ValueError(f"The mesh's model axis ({model}) must be positive and divide the {len(devices)} devices.")
    if data == -1:
        data = len(devices) // model
    if data <= 0 or data * model > len(devices):
        raise ValueError(f"A ({data}, {model}) mesh needs {data * model} devices; {len(devices)} are available. "
                         "Lower mesh.data or mesh.model (data=-1 takes every device).")
    return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices[: data * model])


def make_meshes(data: int = -1, model: int = 1, sampler_data: int = 0, sampler_model: int = 0, *,
                devices=None) -> tuple[jax.sharding.Mesh, jax.sharding.Mesh]:
    """``(trainer_mesh, sampler_mesh)``.

    With ``sampler_data = sampler_model = 0`` the sampler shares the trainer's ``(data, model)``
    mesh. Otherwise the sampler gets a ``(sampler_data, sampler_model)`` mesh of its own on the
    *last* ``sampler_data * sampler_model`` devices, and the trainer's mesh is built from the
    devices before them (``data=-1``: all of those). The two device sets never overlap.

    A separate sampler mesh needs one process: the rollout would otherwise live on devices that
    some processes cannot address, and the loop reads it on every host.
    """
    devices = list(jax.devices() if devices is None else devices)
    if (sampler_data > 0) != (sampler_model > 0) or sampler_data < 0 or sampler_model < 0:
        raise ValueError(f"A separate sampler mesh needs sampler_data >= 1 and sampler_model >= 1 (got "
                         f"{sampler_data} x {sampler_model}); 0 x 0 shares the trainer's mesh.")
    if not sampler_data:
        mesh = make_mesh(data, model, devices=devices)
        return mesh, mesh
    if jax.process_count() > 1:
        raise ValueError(f"A separate sampler mesh runs in one process; this run has {jax.process_count()}. "
                         "Share the trainer's mesh (sampler_data = sampler_model = 0) on several hosts.")
    n_sampler = sampler_data * sampler_model
    if n_sampler >= len(devices):
        raise ValueError(f"The sampler's ({sampler_data}, {sampler_model}) mesh takes {n_sampler} of the "
                         f"{len(devices)} devices and leaves none to the trainer. Use a smaller sampler mesh.")
    trainer_devices, sampler_devices = devices[: len(devices) - n_sampler], devices[len(devices) - n_sampler:]
    try:
        trainer = make_mesh(data, model, devices=trainer_devices)
    except ValueError as e:
        raise ValueError(f"The trainer's mesh must fit the {len(trainer_devices)} devices the sampler's "
                         f"({sampler_data}, {sampler_model}) mesh leaves: {e}") from None
    return trainer, make_mesh(sampler_data, sampler_model, devices=sampler_devices)


def logical_to_spec(axes, rules: Mapping[str, str | None]) -> P:
    """Maps a tuple of logical axis names to a ``PartitionSpec`` of mesh axes."""
    mesh_axes = []
    for name in axes:
        if name is not None and name not in rules:
            raise ValueError(f"Logical axis {name!r} has no mesh rule; rules cover {sorted(rules)}.")
        mesh_axes.append(None if name is None else rules[name])
    return P(*mesh_axes)


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules: Mapping[str, str | None]):
    """``NamedSharding`` for every variable of an NNX state, from its logical-axis metadata.

    Raises:
      ValueError: a dimension is not divisible by the size of the mesh axis it is split over
        (e.g. a model axis of 4 with 3 KV heads), naming the parameter and the remedy.
    """

    def one(path, var):
        axes = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
        shape = var.shape if hasattr(var, "shape") else np.shape(var[...])
        if axes is None:
            return NamedSharding(mesh, P())
        spec = logical_to_spec(axes, rules)
        for dim, (size, mesh_axis, name) in enumerate(zip(shape, spec, axes)):
            if mesh_axis is not None and size % mesh.shape[mesh_axis]:
                raise ValueError(
                    f"Parameter {'/'.join(map(str, path))} axis {dim} ({name}, size {size}) is not "
                    f"divisible by mesh axis {mesh_axis!r} of size {mesh.shape[mesh_axis]}. Choose a "
                    f"'{mesh_axis}' axis size that divides {size}.")
        return NamedSharding(mesh, spec)

    return jax.tree.map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis over ``data``, the rest replicated."""
    return NamedSharding(mesh, P(DATA, *([None] * (ndim - 1))))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def abstract_argument(x, sharding=None) -> jax.ShapeDtypeStruct:
    """``x``'s shape and dtype with the placement a jitted call gives it, for compiling the call
    ahead (``jit(f).lower(...).compile()``): ``sharding`` where the caller places the argument
    itself; otherwise an abstract argument's own, a device array's own where it is committed to
    devices, and none for an uncommitted or host array (jit places those). A placement other
    than the call's is another program: the call would compile again."""
    if sharding is None:
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        sharding = x.sharding if isinstance(x, jax.Array) and x.committed else None
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
