"""Packing runs of rows end to end: where each row's own columns go when the rows of a run (a
GRPO group sharing its prompt) are laid one after another after the shared columns.

`Decoder.packed_hidden_states` lays its input out with `pack_runs` and returns the `RunPacking`,
whose ``unpack`` puts per-slot results back by row and column; `run_spans` sizes the width.
Index arithmetic only (traced, integer): no model code.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class RunPacking(NamedTuple):
    """Where each row's own columns sit when a run's rows are packed end to end
    (`pack_runs`, `Decoder.packed_hidden_states`).

    A run is ``group`` consecutive rows that share their first ``prefix`` columns; each row's
    own columns ``[prefix, T)`` hold its tokens up to its last valid one (its span), then
    padding. Packed, the run's spans lie one after another in ``width`` slots, the rest empty.

    Attributes:
      slot_BO: int32 [B, T − prefix], the slot own column j of row b takes in its run's packed
        row; ``width`` for a column past the row's span or one that does not fit.
      source_UW: int32 [B/group, width], for each slot, the column of the run's rows laid end to
        end (``row_in_run · (T − prefix) + j``) it holds; 0 for an empty slot.
      segment_UW: int32 [B/group, width], the row of the run (0 … group − 1) each slot holds;
        ``group`` for an empty slot.
    """

    slot_BO: jax.Array
    source_UW: jax.Array
    segment_UW: jax.Array

    def pack(self, x_BO: jax.Array) -> jax.Array:
        """[B, T − prefix, ...] own-column values -> [B/group, width, ...] in packed order (an empty
        slot takes the run's first value: mask it with ``segment_UW``)."""
        runs = self.source_UW.shape[0]
        rows = x_BO.reshape(runs, -1, *x_BO.shape[2:])
        return jax.vmap(lambda r, i: r[i])(rows, self.source_UW)

    def unpack(self, y_UW: jax.Array, fill) -> jax.Array:
        """[B/group, width, ...] packed values -> [B, T − prefix, ...] by row and column; ``fill``
        where a column has no slot (past its row's span, or cut off by a too-small ``width``)."""
        runs, width = self.source_UW.shape
        B, O = self.slot_BO.shape
        rows = jnp.repeat(y_UW, B // runs, axis=0)
        got = jax.vmap(lambda r, i: r[i])(rows, jnp.minimum(self.slot_BO, width - 1))
        has_slot = (self.slot_BO < width).reshape(B, O, *([1] * (got.ndim - 2)))
        return jnp.where(has_slot, got, jnp.asarray(fill, got.dtype))


def row_spans(valid_BO: jax.Array) -> jax.Array:
    """[B] int32: each row's own columns up to its last valid one."""
    cols = jnp.arange(valid_BO.shape[1], dtype=jnp.int32)
    return jnp.max(jnp.where(valid_BO.astype(bool), cols + 1, 0), axis=1)


def run_spans(valid_BO: jax.Array, group: int) -> jax.Array:
    """[B/group] int32: the packed width each run needs, the sum of its rows' spans (own columns
    up to the last valid one) over ``valid_BO`` [B, T − prefix]."""
    return jnp.sum(row_spans(valid_BO).reshape(-1, group), axis=1)


def pack_runs(valid_BO: jax.Array, group: int, width: int) -> RunPacking:
    """The `RunPacking` of runs of ``group`` rows into ``width`` slots each, from the validity of
    the rows' own columns ``valid_BO`` [B, T − prefix]. Traced; a run whose spans exceed
    ``width`` loses its last columns (`RunPacking.unpack` fills them): size ``width`` by
    `run_spans`."""
    B, O = valid_BO.shape
    cols = jnp.arange(O, dtype=jnp.int32)
    span_B = row_spans(valid_BO)
    span_UG = span_B.reshape(-1, group)
    start_B = (jnp.cumsum(span_UG, axis=1) - span_UG).reshape(B)
    slot_BO = start_B[:, None] + cols
    slot_BO = jnp.where((cols < span_B[:, None]) & (slot_BO < width), slot_BO, width)
    run_B = jnp.arange(B, dtype=jnp.int32) // group
    member_BO = jnp.broadcast_to((jnp.arange(B, dtype=jnp.int32) % group)[:, None], (B, O))
    where = (run_B[:, None], slot_BO)  # slot `width` is out of range: dropped
    source_UW = jnp.zeros((B // group, width), jnp.int32).at[where].set(member_BO * O + cols, mode="drop")
    segment_UW = jnp.full((B // group, width), group, jnp.int32).at[where].set(member_BO, mode="drop")
    return RunPacking(slot_BO, source_UW, segment_UW)
