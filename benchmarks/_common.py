"""What the benchmark scripts share: timing, XLA's matmul peak, the HF transformers peer model.

The scripts run as ``python benchmarks/<name>.py``, which puts this directory on ``sys.path``.
"""

import os
import sys
import time

import numpy as np

# experiments/ runs from the checkout (it is not installed), and `python benchmarks/<name>.py` puts
# only benchmarks/ on sys.path: the repository root is added for experiments.host.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from experiments.host import cpu_line  # noqa: E402
from rl_mismatch.host_memory import malloc_pages, restart_with_huge_pages  # noqa: E402, F401  (the scripts' first call)


def machine() -> str:
    """One line naming the CPU the figures come from (:func:`experiments.host.cpu_line`: model,
    cores, AVX-512 and the bf16 instructions) and how malloc maps large blocks. Recorded with
    every benchmark because the ratios depend on it: the same code measured 0.73x HF on a
    Sapphire Rapids host (AMX) and 1.68x on a Zen 5 host (AVX512-BF16, no AMX) in the fp32 train
    step. Every script restarts under huge-page-backed malloc mappings first, as the main job
    does, where the host allows it (`rl_mismatch.host_memory`); both sides of a comparison run
    under it.
    """
    return f"{cpu_line()}; malloc: {malloc_pages()}"


def cpu_data_mesh(n: int):
    """``n`` > 1: asks JAX for ``n`` XLA:CPU devices over the same cores (``jax_num_cpu_devices``)
    and returns a ``(data=n, model=1)`` mesh over them; otherwise None (one device, no mesh).

    Call it before any JAX computation: the CPU backend reads the device count once, when it starts.
    """
    if n <= 1:
        return None
    import jax

    from rl_mismatch import sharding

    jax.config.update("jax_num_cpu_devices", n)
    return sharding.make_mesh(data=n, model=1)


def timed(fn, *args, **kwargs):
    """``(wall s, process CPU s, result)`` of one call ``fn(*args, **kwargs)``, JAX results waited for.

    CPU time covers every thread of the process (XLA's and torch's pools): under contention wall
    time measures the neighbours as much as the code, CPU time much less so.
    """
    import jax

    start, cpu = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return time.perf_counter() - start, time.process_time() - cpu, out


def matmul_params(config) -> tuple[int, int]:
    """(body, head): the parameters a token's forward multiplies by, split into the transformer
    body (everything but the embeddings: a lookup costs no FLOPs) and the LM head (V x D).

    A forward over T positions that runs the LM head on T' of them costs
    2 * (body * T + head * T') FLOPs, plus attention's T^2 terms.
    """
    head = config.vocab_size * config.d_model
    return config.n_params - head * (1 if config.tie_embeddings else 2), head


def projection_shapes(config, rows: int, head_rows: int) -> list[tuple[str, int, int, int, int]]:
    """``(name, M, K, N, count)`` of every matrix product of one forward: ``y[M, N] = x[M, K] @
    W[K, N]``, ``count`` times (once per layer, the LM head once): q, k, v, o, gate, up and down
    over ``rows`` positions, the LM head over ``head_rows``. Attention's own products (scores,
    values) are not in it: they have no weight operand."""
    D, F, L = config.d_model, config.d_ff, config.n_layers
    qo, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    return [("q", rows, D, qo, L), ("k, v", rows, D, kv, 2 * L), ("o", rows, qo, D, L),
            ("gate, up", rows, D, F, 2 * L), ("down", rows, F, D, L), ("lm head", head_rows, D, config.vocab_size, 1)]


def matmul_peak(dtype: str, sizes=(1024, 2048, 3072), repeats: int = 3) -> float:
    """Best GFLOP/s of XLA square matmuls of the given sizes.

    ``dtype`` "float32": float32 operands; "bfloat16": bf16 operands accumulated in and returned
    as float32 (``preferred_element_type``), the decoder's choice (XLA:CPU's bf16 matmul with a
    bf16 result is 2-3x slower on an AVX512-BF16 Zen 5 host and ~4x on an AMX Sapphire Rapids one).
    """
    import jax
    import jax.numpy as jnp

    operand = jnp.dtype(dtype)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    best = 0.0
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(operand)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(operand)
        timed(mm, a, b)  # compile
        for _ in range(repeats):
            best = max(best, 2 * n ** 3 / timed(mm, a, b)[0] / 1e9)
    return best


def hf_llama(hf_config: dict, state_dict, dtype: str = "float32"):
    """``transformers.LlamaForCausalLM`` with our loader's (HF-named, float32) weights, in ``dtype``.

    Embeddings are tied as in SmolLM2 (the state dict carries no ``lm_head.weight``). The model
    comes back in eval mode; call ``.train()`` to differentiate through it.
    """
    import torch
    import transformers

    config = transformers.LlamaConfig(**{k: v for k, v in hf_config.items() if k != "architectures"})
    config.pad_token_id = None
    model = transformers.LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.array(v, np.float32)) for k, v in state_dict.items()}, strict=False)
    if unexpected or not set(missing) <= {"lm_head.weight"}:
        raise ValueError(f"HF model and state dict disagree: missing {missing}, unexpected {unexpected}.")
    model.tie_weights()
    return model.to({"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]).eval()
