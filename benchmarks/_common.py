"""What the benchmark scripts share: timing, XLA's matmul peak, the HF transformers peer model.

The scripts run as ``python benchmarks/<name>.py``, which puts this directory on ``sys.path``.
"""

import time

import numpy as np


def timed(fn, *args, **kwargs):
    """``(wall s, process CPU s, result)`` of one call ``fn(*args, **kwargs)``, JAX results waited for.

    CPU time covers every thread of the process (XLA's and torch's pools): under contention wall
    time measures the neighbours as much as the code, CPU time much less so.
    """
    import jax

    start, cpu = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return time.perf_counter() - start, time.process_time() - cpu, out


def matmul_peak(dtype: str, sizes=(1024, 2048, 3072), repeats: int = 3) -> float:
    """Best GFLOP/s of XLA square matmuls of the given sizes.

    ``dtype`` "float32": float32 operands; "bfloat16": bf16 operands accumulated in and returned
    as float32 (``preferred_element_type``), the decoder's choice (XLA:CPU's bf16 matmul with a
    bf16 result is ~4x slower on AVX-512 BF16 / AMX machines).
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
