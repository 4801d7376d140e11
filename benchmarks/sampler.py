r"""Sampler throughput on SmolLM2-135M-Instruct vs HF transformers ``generate``, and vs the matmul peak.

    python benchmarks/sampler.py                                   # everything (long on 2 cores)
    python benchmarks/sampler.py --batches=64 --dtypes=bfloat16 --lengths=   # one cell
    python benchmarks/sampler.py --cpu_devices=2                   # ours on 2 CPU devices (a (2, 1) mesh)

For every (dtype, batch): ``batch`` prompts of ``--prompt_len`` tokens, ``--new_tokens`` new
tokens forced (no EOS: ``eos_ids=()`` here, ``min_new_tokens=max_new_tokens`` in HF), sampling
at temperature 1 with no top-k / top-p on both sides (HF's default ``top_k=50`` is switched
off). New tokens/s = batch x new tokens / wall time of one whole generate call (prefill
included, compilation excluded: our program is compiled beforehand, HF runs one untimed
generation of the same shape first), the fastest of ``--repeats`` calls on each side.

HF runs ``LlamaForCausalLM`` (torch, eager; its default thread count, one per physical core,
unless ``--threads``) built from
the same state dict our loader produces (``rl_mismatch.models.load_state_dict``), on
``--torch_device`` (``cpu``; ``cuda`` to compare on a GPU with ours on JAX's GPU backend; each
timed call then waits for the GPU's queued work).

Peak: the best of a few large matmuls measured in the same run, float32 x float32 and bf16 x
bf16 -> float32 (``preferred_element_type``, the decoder's choice). FLOPs per decoded token =
2 x (body params + LM head) + attention 4 x layers x heads x head_dim x (mean context); a prompt
token costs the same without the LM head, which the prefill runs on the last prompt position
only. The fraction of peak is the FLOPs of the whole generate call (prefill + decoding steps)
per second over the peak of its dtype.

Then, per cell, the decoding step's matrix products alone, in XLA and in torch
(`decode_products`), beside each side's whole call per new token (batch / tokens per second):
whether a framework's own dot bounds its sampler on this host.

Finally tokens/s at ``--lengths`` new tokens (batch ``--length_batch``, dtype ``--length_dtype``)
to show the per-token cost does not grow with the length (beyond the attention term).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from rl_mismatch import sampler as smp
from rl_mismatch.models import decoder, from_hf_state_dict, load_state_dict
from rl_mismatch.models.config import ModelConfig

from _common import (cpu_data_mesh, hf_llama, machine, matmul_params, matmul_peak, projection_shapes,
                     restart_with_huge_pages, timed)

_BATCHES = flags.DEFINE_list("batches", ["1", "16", "64"], "Batch sizes.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Sampler dtypes.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "New tokens per sequence (forced).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per sequence.")
_LENGTHS = flags.DEFINE_list("lengths", ["32", "128", "512"], "New-token counts of the linearity check.")
_LENGTH_BATCH = flags.DEFINE_integer("length_batch", 16, "Batch of the linearity check.")
_LENGTH_DTYPE = flags.DEFINE_string("length_dtype", "bfloat16", "Dtype of the linearity check.")
_SKIP_HF = flags.DEFINE_bool("skip_hf", False, "Time only our sampler.")
_THREADS = flags.DEFINE_integer("threads", 0, "torch intra-op threads for HF (0: torch's default, one per "
                                "physical core; XLA uses every core it sees).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per cell, the fastest reported (both sides). The first "
                                "call after compiling runs ~5% slower (its buffers are faulted in), and one call "
                                "carries the machine's whole run-to-run spread.")
_TORCH_DEVICE = flags.DEFINE_enum("torch_device", "cpu", ["cpu", "cuda"],
                                  "Where HF runs: cpu, or cuda on a GPU host (ours runs on JAX's default backend).")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 1, "XLA:CPU devices (jax_num_cpu_devices) over the same cores; N > 1 runs our sampler on a "
    "(N, 1) mesh, each device decoding B/N rows as its own program (batch padded to a multiple of N).")


def _prompts(batch, length, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(100, vocab - 100, (batch, length)).astype(np.int32)


def flops_per_token(c: ModelConfig, context: float, lm_head: bool = True) -> float:
    """Forward FLOPs of one position attending to ``context`` positions, with or without the LM head."""
    body, head = matmul_params(c)
    attention = 4 * c.n_layers * c.n_heads * c.head_dim * context
    return 2 * body + (2 * head if lm_head else 0) + attention


def ours(master, dtype, prompts_BP, new_tokens, repeats, mesh=None):
    """New tokens/s of ``rl_mismatch.sampler.generate`` (compiled beforehand), on ``mesh`` if given."""
    model = smp.sync_weights(master, dtype, mesh)
    cfg = smp.SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, eos_ids=(), prompt_bucket=64)
    B, P = prompts_BP.shape
    valid = np.ones_like(prompts_BP, bool)
    smp.precompile(model, (prompts_BP, valid), cfg, mesh=mesh)  # the timed calls compile no sampler program
    best = np.inf
    for i in range(repeats):
        wall, _, out = timed(smp.generate, model, (prompts_BP, valid), jax.random.key(i), cfg, mesh=mesh)
        best = min(best, wall)
        assert int(out.response_lengths_B.min()) == new_tokens
    return B * new_tokens / best


def decode_products(config, dtype: str, rows: int, repeats: int, with_torch: bool) -> tuple[float, float | None]:
    """(XLA s, torch s): the matrix products of one decoding step of ``rows`` rows alone, each
    framework's own dot, best of ``repeats`` per product kind.

    Every projection of every layer and the LM head, one new token per row
    (`_common.projection_shapes`); no attention, elementwise work or token draw. Each product
    kind multiplies by ``count`` distinct weights, one per layer, as a decoding step does: the
    weights stream from memory (a single weight multiplied ``count`` times would stay in the
    CPU's cache and time a product no decoding step runs). XLA: the ``count`` products as one
    jitted program (a decoding step is one program, with no dispatch per product), ``dtype``
    operands accumulated into float32 as the decoder runs them, the down projection in the
    weight-on-the-left form where the decoder takes it (`decoder._left_down_projection`).
    torch: ``x @ w`` in ``dtype``, an eager loop over the weights, as HF's forward runs them.
    If a framework's sum is a large part of its whole decoding step, its dot is the limit on
    this host. torch is None when not asked for.
    """
    operand, f32 = jnp.dtype(dtype), jnp.float32
    plain = lambda x, w: jnp.dot(x, w, preferred_element_type=f32)
    left = lambda x, w_NK: jax.lax.dot_general(w_NK, x, (((1,), (1,)), ((), ())), preferred_element_type=f32)
    xla = 0.0
    for name, M, K, N, count in projection_shapes(config, rows, rows):
        product, shape = plain, (K, N)
        if name == "down" and decoder._left_down_projection(rows, operand):
            product, shape = left, (N, K)
        x, weights = jnp.ones((M, K), operand), [jnp.ones(shape, operand) for _ in range(count)]
        step = jax.jit(lambda x, weights, product=product: [product(x, w) for w in weights])
        timed(step, x, weights)  # compiles
        xla += min(timed(step, x, weights)[0] for _ in range(repeats))
        del weights
    if not with_torch:
        return xla, None
    import torch

    torch_dtype, total = getattr(torch, dtype), 0.0
    with torch.no_grad():
        for _, M, K, N, count in projection_shapes(config, rows, rows):
            x = torch.ones(M, K, dtype=torch_dtype)
            weights = [torch.ones(K, N, dtype=torch_dtype) for _ in range(count)]
            [x @ w for w in weights]  # warm-up
            total += min(timed(lambda: [x @ w for w in weights])[0] for _ in range(repeats))
            del weights
    return xla, total


def _synced(fn, device):
    """``fn`` followed by a wait for ``device``'s queued work (CUDA runs asynchronously)."""
    import torch

    def call(*args, **kwargs):
        out = fn(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return call


def hf(model, prompts_BP, new_tokens, repeats, pad_id):
    import torch

    ids = torch.from_numpy(prompts_BP.astype(np.int64)).to(model.device)
    generate = _synced(model.generate, model.device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
              pad_token_id=pad_id, eos_token_id=None)
    with torch.inference_mode():
        # Warm-up at the full length: oneDNN creates a kernel for every new shape (each KV
        # length), so a first call is up to 20x slower (measured: 19 vs 382 tok/s, bf16, batch 64).
        generate(ids, min_new_tokens=new_tokens, max_new_tokens=new_tokens, **kw)
        best = np.inf
        for _ in range(repeats):
            wall, _, out = timed(generate, ids, min_new_tokens=new_tokens, max_new_tokens=new_tokens, **kw)
            best = min(best, wall)
            assert out.shape[1] == prompts_BP.shape[1] + new_tokens
    return prompts_BP.shape[0] * new_tokens / best


def main(argv):
    del argv
    mesh = cpu_data_mesh(_CPU_DEVICES.value)  # first: before any JAX computation
    hf_config, state_dict, tok = load_state_dict("smollm2-135m-instruct")
    config = ModelConfig.from_hf_config(hf_config)
    master = from_hf_state_dict(config, state_dict, dtype=jnp.float32, param_dtype=jnp.float32)
    threads = ""
    if not _SKIP_HF.value:
        import torch
        if _THREADS.value:
            torch.set_num_threads(_THREADS.value)
        threads = f"; torch {torch.__version__}, {torch.get_num_threads()} threads, HF on {_TORCH_DEVICE.value}"
    peak = {dtype: matmul_peak(dtype) for dtype in ("float32", "bfloat16")}
    print(f"machine: {machine()}")
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind} x{jax.device_count()}"
          f"{'' if mesh is None else f', our sampler on a {dict(mesh.shape)} mesh'}, {len(os.sched_getaffinity(0))} "
          f"cores visible{threads}; matmul peak GFLOP/s: "
          + ", ".join(f"{k} {v:.0f}" for k, v in peak.items()))
    N, P = _NEW_TOKENS.value, _PROMPT_LEN.value
    fpt = flops_per_token(config, P + N / 2)
    # N decoding steps, and the prefill: P positions, the LM head on the last one only.
    flops_per_seq = N * fpt + P * flops_per_token(config, P / 2, lm_head=False) + 2 * matmul_params(config)[1]
    print(f"decode FLOPs/token ≈ {fpt / 1e9:.3f} GFLOP (2 x {config.n_params / 1e6:.1f}M params + attention)")
    print(f"\n| dtype | batch | ours tok/s | HF tok/s | ours / HF | ours % of {'/'.join(peak)} peak |")
    print("|---|---|---|---|---|---|")
    floors = []
    for dtype in _DTYPES.value:
        hf_m = None if _SKIP_HF.value else hf_llama(hf_config, state_dict, dtype).to(_TORCH_DEVICE.value)
        for b in map(int, _BATCHES.value):
            prompts = _prompts(b, P, config.vocab_size)
            ours_tps = ours(master, dtype, prompts, N, _REPEATS.value, mesh)
            hf_tps = np.nan if hf_m is None else hf(hf_m, prompts, N, _REPEATS.value, tok.pad_id)
            frac = ours_tps / N * flops_per_seq / (peak[dtype] * 1e9)
            print(f"| {dtype} | {b} | {ours_tps:.0f} | {hf_tps:.0f} | {ours_tps / hf_tps:.2f}x | "
                  f"{100 * frac:.1f}% |", flush=True)
            floors.append((dtype, b, ours_tps, hf_tps, *decode_products(
                config, dtype, b, _REPEATS.value, with_torch=not _SKIP_HF.value and _TORCH_DEVICE.value == "cpu")))
        del hf_m
    print("\nthe decoding step's matrix products alone (every projection and the LM head, one token per row; "
          "no attention, elementwise work or token draw), against each side's whole call per new token:")
    print("| dtype | batch | ours ms per step | XLA products ms | HF ms per step | torch products ms | XLA / torch |")
    print("|---|---|---|---|---|---|---|")
    for dtype, b, ours_tps, hf_tps, xla_s, torch_s in floors:
        torch_ms = np.nan if torch_s is None else 1e3 * torch_s
        print(f"| {dtype} | {b} | {1e3 * b / ours_tps:.1f} | {1e3 * xla_s:.1f} | {1e3 * b / hf_tps:.1f} | "
              f"{torch_ms:.1f} | {1e3 * xla_s / torch_ms:.2f}x |", flush=True)
    if _LENGTHS.value:
        b, dtype = _LENGTH_BATCH.value, _LENGTH_DTYPE.value
        print(f"\nlength check ({dtype}, batch {b}; marginal = extra time per extra decode step "
              "from the previous length, i.e. without the prefill):")
        print("| new tokens | tok/s | s per call | marginal ms per decode step |\n|---|---|---|---|")
        prompts = _prompts(b, P, config.vocab_size)
        prev = None
        for n in sorted(map(int, _LENGTHS.value)):
            tps = ours(master, dtype, prompts, n, _REPEATS.value, mesh)
            secs = b * n / tps
            marginal = "" if prev is None else f"{1e3 * (secs - prev[1]) / (n - prev[0]):.1f}"
            print(f"| {n} | {tps:.0f} | {secs:.2f} | {marginal} |", flush=True)
            prev = (n, secs)


if __name__ == "__main__":
    restart_with_huge_pages()  # as the main job runs (rl_mismatch.host_memory)
    app.run(main)
