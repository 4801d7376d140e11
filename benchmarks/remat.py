"""Time and memory of the layer stack's gradient under each ``Decoder(remat=...)`` policy.

    python benchmarks/remat.py [--dtypes=fp32,bf16] [--remats=layer,projections,none]
                               [--repeats=5] [--batch=8] [--seq_len=256]

The policies are each other's peers: what a trainer on this machine should pick. For each
compute dtype one process compiles ``jax.grad`` of a scalar of ``Decoder.hidden_states``
(SmolLM2-135M's shapes, random weights: the values do not matter) once per policy, then runs
the compiled gradients in turn, ``--repeats`` rounds, so that a slow phase of a shared machine
hits every policy alike. Printed per policy: best and median seconds, the best time relative to
``"layer"``, the median system CPU seconds of a call, and the compiled program's temporary
memory (XLA's ``memory_analysis``), the other half of the trade: ``"layer"`` keeps one [B, T, D]
input per layer, ``"none"`` every intermediate.

Running the policies in turn is also how an RL loop runs its train step, between sampling calls:
on a VM that takes freed memory back (free page reporting, ``refault.py``), each call faults its
temporaries in again at the host's price, which the system seconds show. A policy timed alone
in its process, call after call, does not pay it (benchmarks/README.md, section "Remat policies").

The LM head, the loss and the optimizer are left out: they do not depend on the policy
(``benchmarks/train_step.py --remat=...`` measures the whole step).
"""

import resource

import numpy as np
from absl import app, flags

from _common import machine, restart_with_huge_pages, timed

_DTYPES = flags.DEFINE_list("dtypes", ["fp32", "bf16"], "Compute dtypes to measure (fp32, bf16, fp16).")
_REMATS = flags.DEFINE_list("remats", ["layer", "projections", "none"], "Decoder(remat=...) policies to compare.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds over all policies (after one untimed call each).")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")

_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from rl_mismatch.models import Decoder, load_state_dict
    from rl_mismatch.models.config import ModelConfig
    from rl_mismatch.models.decoder import check_remat

    for remat in _REMATS.value:
        check_remat(remat)
    for name in _DTYPES.value:
        if name not in _DTYPE_NAMES:
            raise ValueError(f"--dtypes: {name!r} is not one of {sorted(_DTYPE_NAMES)}.")
    hf_config, _, _ = load_state_dict("smollm2-135m-instruct")
    config = ModelConfig.from_hf_config(hf_config)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (_BATCH.value, _SEQ_LEN.value)),
                         jnp.int32)
    print(f"model: random init, SmolLM2-135M config, {config.n_layers} layers; batch {_BATCH.value} x "
          f"{_SEQ_LEN.value} tokens; gradient of the layer stack (Decoder.hidden_states); "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}\nmachine: {machine()}")

    for name in _DTYPES.value:
        compiled = {}
        for remat in _REMATS.value:
            graphdef, params = nnx.split(Decoder(config, dtype=_DTYPE_NAMES[name], remat=remat, rngs=nnx.Rngs(0)))

            def loss(p, graphdef=graphdef):
                return jnp.mean(nnx.merge(graphdef, p).hidden_states(tokens).astype(jnp.float32) ** 2)

            grad = jax.jit(jax.grad(loss)).lower(params).compile()
            timed(grad, params)  # faults in the buffers; the first call is a few % slower
            compiled[remat] = grad, params
        times = {remat: [] for remat in compiled}
        system = {remat: [] for remat in compiled}
        for _ in range(_REPEATS.value):
            for remat, (grad, params) in compiled.items():
                before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
                times[remat].append(timed(grad, params)[0])
                system[remat].append(resource.getrusage(resource.RUSAGE_SELF).ru_stime - before)
        base = min(times["layer"]) if "layer" in times else None
        print(f"[{name}]")
        for remat, (grad, _) in compiled.items():
            best = min(times[remat])
            rel = f"{best / base:5.2f}x layer" if base else ""
            temp = grad.memory_analysis().temp_size_in_bytes / 2 ** 20
            print(f"  {remat:12s} {best:6.3f} s best, {np.median(times[remat]):6.3f} s median  {rel}  "
                  f"system {np.median(system[remat]):5.2f} s  temporaries {temp:7.0f} MiB", flush=True)


if __name__ == "__main__":
    restart_with_huge_pages()  # as the main job runs (rl_mismatch.host_memory)
    app.run(main)
