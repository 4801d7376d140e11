r"""Cost of rescoring + every mismatch metric, relative to a plain forward of the same batch.

    python benchmarks/mismatch.py [--batch=16] [--seq_len=256] [--dtypes=float32,bfloat16] [--repeats=3]

Jitted programs over the same SmolLM2-135M weights and the same [B, T] tokens:

* ``forward``: ``model(tokens, valid_BT=valid)`` returning the float32 logits [B, T, V];
* ``rescore+metrics``: ``mismatch.rescore(model, ...)`` on the ``Decoder`` (hidden states, then
  the LM head and its log-softmax ``--token_chunk`` positions at a time, every column scored)
  followed by ``mismatch.compute_mismatch_metrics`` against a given sampler log-prob array (with
  sampler entropies, so the entropy bins are computed too). This is the issue's target;
* ``rescore(score_from=P)+metrics``: the same, told where the responses start (a rollout's
  ``prompt_width``), so prompt positions skip the LM head;
* ``unchunked rescore+metrics``: ``rescore`` of the model seen as a plain logits function (the
  whole [B, T, V] logits, then the log-softmax), for comparison;
* ``metrics``: ``compute_mismatch_metrics`` alone.

Each is compiled first, then they are timed in turns, ``--repeats`` times. The 2-core machine is
shared, so wall times swing by 3x with other people's jobs; the minimum wall time and the
minimum CPU time of the process (all XLA threads; robust to being descheduled) are both
reported, with the ratios of each. The issue's target is ``rescore+metrics / forward <= 1.05``.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from rl_mismatch import mismatch
from rl_mismatch.models import load_pretrained

from _common import machine, restart_with_huge_pages, timed

_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per batch.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence (prompt + response).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Leading columns outside the response mask.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Trainer compute dtypes to time.")
_TOKEN_CHUNK = flags.DEFINE_integer("token_chunk", mismatch.DEFAULT_TOKEN_CHUNK,
                                    "Positions per LM-head chunk of the rescoring.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs of each program (minimum reported).")


def main(argv):
    del argv
    master, _ = load_pretrained("smollm2-135m-instruct", dtype="float32", param_dtype="float32")
    graphdef, state = nnx.split(master)
    B, T, P = _BATCH.value, _SEQ_LEN.value, _PROMPT_LEN.value
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(100, master.config.vocab_size, (B, T)), jnp.int32)
    valid = jnp.ones((B, T), bool)
    mask = jnp.broadcast_to(jnp.arange(T) >= P, (B, T))
    sampler_logp = jnp.where(mask, jnp.asarray(-rng.exponential(2.0, (B, T)), jnp.float32), 0.0)
    sampler_ent = jnp.asarray(rng.exponential(1.0, (B, T)), jnp.float32)
    print(f"B={B} T={T} ({B * T} tokens, {B * (T - P)} scored), V={master.config.vocab_size}, "
          f"devices={jax.devices()}\nmachine: {machine()}")

    metrics = jax.jit(lambda s, t, m, e: mismatch.compute_mismatch_metrics(s, t, m, sampler_entropy_BT=e))
    for dtype in _DTYPES.value:
        def model_at(st, dtype=dtype):
            model = nnx.merge(graphdef, st)
            model.dtype = jnp.dtype(dtype)  # fp32 master weights cast in compute, as a trainer does
            return model

        forward = jax.jit(lambda st, t, v: model_at(st)(t, valid_BT=v))

        def rescore_metrics(score_from=1, chunked=True):
            @jax.jit
            def run(st, t, v, m, s_lp, s_ent):
                model = model_at(st)
                scorer = model if chunked else (lambda t, positions_BT=None, valid_BT=None: model(t, valid_BT=valid_BT))
                logp = mismatch.rescore(scorer, t, v, response_mask_BT=m, score_from=score_from,
                                        token_chunk=_TOKEN_CHUNK.value)
                return logp, metrics(s_lp, logp, m, s_ent)
            return run

        rescore_args = (state, tokens, valid, mask, sampler_logp, sampler_ent)
        programs = {
            "forward": (forward, (state, tokens, valid)),
            "rescore+metrics": (rescore_metrics(), rescore_args),
            "rescore(score_from=P)+metrics": (rescore_metrics(score_from=P), rescore_args),
            "unchunked rescore+metrics": (rescore_metrics(chunked=False), rescore_args),
            "metrics": (metrics, (sampler_logp, sampler_logp + 0.01, mask, sampler_ent)),
        }
        for fn, args in programs.values():  # compile (and warm caches)
            timed(fn, *args)
        times = {name: [] for name in programs}
        for _ in range(_REPEATS.value):
            for name, (fn, args) in programs.items():
                times[name].append(timed(fn, *args)[:2])
        best = {name: min(t[0] for t in ts) for name, ts in times.items()}
        cpu = {name: min(t[1] for t in ts) for name, ts in times.items()}
        print(f"\n[{dtype}] min wall / min CPU time (wall runs):")
        for k in programs:
            print(f"[{dtype}]   {k}: {best[k] * 1e3:.0f} ms / {cpu[k] * 1e3:.0f} ms "
                  f"({', '.join(f'{x[0] * 1e3:.0f}' for x in times[k])})")
        for name in ("rescore+metrics", "rescore(score_from=P)+metrics", "unchunked rescore+metrics"):
            print(f"[{dtype}] {name} / forward = {best[name] / best['forward']:.3f} wall, "
                  f"{cpu[name] / cpu['forward']:.3f} CPU" + (" (target <= 1.05)" if name == "rescore+metrics" else ""))
        print(f"[{dtype}] metrics alone = {best['metrics'] / best['forward']:.4f} of a forward")
        lps = {k: np.asarray(jax.device_get(programs[k][0](*programs[k][1])[0]))
               for k in ("rescore+metrics", "rescore(score_from=P)+metrics", "unchunked rescore+metrics")}
        ref = lps.pop("unchunked rescore+metrics")
        for k, lp in lps.items():
            print(f"[{dtype}] max |{k} − unchunked| log-prob = {np.abs(lp - ref).max():.2e}")

if __name__ == "__main__":
    restart_with_huge_pages()  # as the main job runs (rl_mismatch.host_memory)
    app.run(main)
