"""Train-step throughput on SmolLM2-135M: rl_mismatch's jitted step vs HF transformers + torch AdamW.

    python benchmarks/train_step.py [--dtypes=fp32,bf16] [--steps=3] [--batch=8] [--seq_len=256]
                                    [--prompt_len=0] [--group=1] [--microbatches=1]
                                    [--response_lengths=] [--pack_multiple=32] [--packed_widths=]
                                    [--keep_logits] [--remat=layer] [--skip_hf] [--random_init]
                                    [--cpu_devices=1] [--torch_device=cpu]

One process measures, for each compute dtype:

* ours: ``rl_mismatch.train_step`` (PPO-clip token-mean policy loss, ``optax.adamw``), float32
  master weights, forward/backward in the compute dtype (bf16: matmuls accumulate in float32),
  one micro-batch, mismatch metrics included (they are part of the step); the backward pass
  recomputes each LM-head chunk's logits unless ``--keep_logits`` (then it keeps them all, as
  HF's autograd does);
* HF: ``LlamaForCausalLM`` built from the same config and loaded with the same weights,
  the same loss written in torch (log-softmax gather, ratio against its detached self, clipped
  surrogate, token mean), ``loss.backward()``, ``torch.optim.AdamW(fused=True).step()``. Both
  sides run the LM head only on the positions that predict response tokens (ours:
  ``TrainBatch.score_from``, HF: ``logits_to_keep``, as an RL trainer does). bf16 is
  ``torch.autocast(<device>, bfloat16)`` over float32 weights, torch's counterpart of bf16
  compute over float32 master weights. HF runs on ``--torch_device`` (``cpu``; ``cuda`` to
  compare on a GPU with ours on JAX's GPU backend: each HF step then waits for the GPU);
* the machine's matmul peak as XLA reaches it: the best GFLOP/s of square float32 matmuls
  (for fp32), and of bfloat16 matmuls accumulating in float32 (for bf16);
* the step's matrix products alone, in XLA and in torch (``_gemm_floor``): every projection and
  the LM head at the step's shapes, forward and both backward products, best of 3 each. It says
  whether a framework's own dot is the limit on the host: its floor against the other's.

With ``--group=G`` the batch is GRPO-shaped: its prompts come in runs of G identical rows
(``TrainBatch.group``). Ours then computes each prompt once (``share_prompts``, its default) and
is measured a second time computing every row in full (``share_prompts=False``), to show what the
sharing saves; HF computes every row, as TRL's GRPO trainer does. The FLOP rates count every row
in full (the work a trainer without sharing does), so with sharing they are effective rates; the
line "FLOPs computed" gives ours on the matmul FLOPs it does run, its body counting each group's
shared prompt columns once (its first P - 1: the last prompt column stays each row's own), when
the step holds whole groups (``train_step.holds_whole_runs``).

With ``--response_lengths=LO,HI`` each response but the first is LO to HI tokens long (uniform,
seeded), the rest of its columns padding, and the first fills its columns, as in a rollout whose
replies end at EOS, trimmed to its longest reply (``Rollout.trimmed``): HF masks the padding
(``attention_mask``) and computes it, as TRL does; ours is timed unpacked (as HF) and packed
(``TrainBatch.packed_width`` from ``train_step.packed_width``, multiples of ``--pack_multiple``:
each group's responses end to end; ``--packed_widths`` adds widths of your choice), and each line
"packed" gives the packed step's speed-up over the unpacked one.

Throughput is tokens (batch × sequence length) per second over ``--steps`` timed steps after
one untimed step (compilation / warm-up). The achieved FLOP rate counts the forward and
backward matmuls both sides run: 6 × body parameters per token, plus 6 × the LM head's V × D per
scored position (attention's T² terms and our recomputation left out), reported as a fraction of
the peak. The line "FLOPs computed" counts the matmuls our step runs (its own tokens through the
body, each group's shared prompt once, see above), the recomputation included: under
``--remat=layer`` the layers' forward again in the backward pass but for the down projection,
without ``--keep_logits`` the LM head's forward again (``experiments.scaling_model.train_matmul_flops``;
attention left out here too).
"""

import typing

import numpy as np
from absl import app, flags

from rl_mismatch.models.decoder import Remat

from _common import (cpu_data_mesh, hf_llama, machine, matmul_params, matmul_peak, projection_shapes,
                     restart_with_huge_pages, timed)
from experiments.scaling_model import train_matmul_flops  # importable once _common has put the checkout on sys.path

_DTYPES = flags.DEFINE_list("dtypes", ["fp32", "bf16"], "Compute dtypes to measure.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per configuration (after one untimed step).")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence (prompt + response).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 0, "Prompt tokens per sequence (0: min(64, seq_len / 4)).")
_GROUP = flags.DEFINE_integer("group", 1, "Rows per prompt: the prompts come in runs of this many identical rows "
                              "(GRPO's group); ours is then also timed computing every row in full.")
_MICROBATCHES = flags.DEFINE_integer("microbatches", 1, "Our make_train_step(n_microbatches=...).")
_RESPONSE_LENGTHS = flags.DEFINE_list("response_lengths", [], "LO,HI: response lengths drawn uniformly from "
                                      "[LO, HI] but the first's (the longest, filling its columns), padding after "
                                      "them; ours is then also timed packed (--group > 1).")
_PACKED_WIDTHS = flags.DEFINE_list("packed_widths", [], "With --response_lengths: also time ours packed into each "
                                    "of these widths (at least the longest run's), whatever train_step.packed_width "
                                    "would choose: where packing starts to pay on this host.")
_PACK_MULTIPLE = flags.DEFINE_integer("pack_multiple", 32, "train_step.packed_width(multiple=...) with "
                                      "--response_lengths (the experiments' trainer.pack_multiple).")
_SKIP_HF = flags.DEFINE_bool("skip_hf", False, "Measure only rl_mismatch.")
_RANDOM_INIT = flags.DEFINE_bool("random_init", False, "Random weights of SmolLM2's config instead of the "
                                 "pretrained ones (throughput does not depend on the values).")
_KEEP_LOGITS = flags.DEFINE_bool("keep_logits", False, "make_train_step(keep_logits=True): keep every LM-head chunk's "
                                  "logits for the backward pass, as HF does, instead of recomputing them.")
_REMAT = flags.DEFINE_enum("remat", "layer", typing.get_args(Remat),
                           "Decoder(remat=...): what our backward pass recomputes of each layer.")
_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0: torch's default).")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 1, "XLA:CPU devices (jax_num_cpu_devices) over the same cores; N > 1 runs our step on a "
    "(N, 1) mesh: batch over N devices, parameters FSDP-sharded (N must divide the batch).")
_TORCH_DEVICE = flags.DEFINE_enum("torch_device", "cpu", ["cpu", "cuda"],
                                  "Where HF runs: cpu, or cuda on a GPU host (ours runs on JAX's default backend).")
_FUSED = flags.DEFINE_bool("hf_fused_adamw", True, "torch.optim.AdamW(fused=True): torch's fastest CPU AdamW "
                           "(~3x faster than its default per-tensor loop here), so the baseline is not handicapped.")


def _batch_arrays(vocab: int, batch: int, seq_len: int, prompt: int, group: int, lengths=None, seed: int = 0):
    """A rollout-shaped batch ``(tokens, valid, response, sampler_logp, advantages)``: ``prompt``-token
    prompts, each repeated in a run of ``group`` rows, then the response; with ``lengths`` (lo, hi)
    each response but the first is lo..hi tokens and padding after it, else it fills its columns."""
    if batch % group or not 0 < prompt < seq_len:
        raise ValueError(f"--group={group} must divide --batch={batch}, and --prompt_len={prompt} lie in "
                         f"(0, --seq_len={seq_len}).")
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq_len)).astype(np.int32)
    tokens[:, :prompt] = np.repeat(tokens[::group, :prompt], group, axis=0)
    col = np.arange(seq_len)[None]
    ends = np.full((batch, 1), seq_len)
    if lengths is not None:  # the first reply is the longest: the batch's columns are trimmed to it
        ends[1:] = prompt + rng.integers(*lengths, endpoint=True, size=(batch - 1, 1))
    if np.any(ends > seq_len) or np.any(ends <= prompt):
        raise ValueError(f"--response_lengths={lengths} must lie in [1, seq_len - prompt_len = {seq_len - prompt}].")
    valid = col < ends
    response = valid & (col >= prompt)
    sampler_logp = np.where(response, -rng.uniform(0.5, 8.0, (batch, seq_len)), 0.0).astype(np.float32)
    advantages = rng.normal(size=batch).astype(np.float32)
    return tokens, valid, response, sampler_logp, advantages


def _first_response_column(response: np.ndarray) -> int:
    """Both sides run the LM head only where it predicts a response token: ours via
    ``TrainBatch.score_from``, HF via ``logits_to_keep`` (as TRL's GRPO trainer does)."""
    return int(np.argmax(response.any(axis=0)))


def _time_steps(run_step, steps: int) -> tuple[float, float, float]:
    """(best wall s, median wall s, best CPU s) per step over ``steps`` timed steps.

    The minimum is the step least disturbed by other load on a shared machine; CPU seconds
    (all threads of this process) are reported too, because under contention wall time
    measures the neighbours as much as the code.
    """
    walls, cpus, _ = zip(*(timed(run_step) for _ in range(steps)))
    return min(walls), float(np.median(walls)), min(cpus)


def _ours(model, dtype_name, arrays, steps, mesh=None, share_prompts=True, packed_width=0):
    import jax
    import jax.numpy as jnp
    import optax

    from rl_mismatch import losses
    from rl_mismatch import train_step as ts

    opt = optax.adamw(1e-6, weight_decay=0.0)
    graphdef, state = ts.init_train_state(model, opt, compute_dtype=dtype_name, key=jax.random.key(0), mesh=mesh)
    step = ts.make_train_step(graphdef, opt, losses.LossConfig(), compute_dtype=dtype_name,
                              keep_logits=_KEEP_LOGITS.value, mesh=mesh, n_microbatches=_MICROBATCHES.value,
                              share_prompts=share_prompts)
    tokens, valid, response, sampler_logp, advantages = arrays
    batch = ts.TrainBatch(jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(response),
                          jnp.asarray(sampler_logp), jnp.asarray(advantages),
                          score_from=_first_response_column(response), group=_GROUP.value, packed_width=packed_width)
    holder = {"state": state}  # the step donates its input state: always pass the newest

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        return holder["state"].params, metrics

    first, _, _ = timed(run)  # compiles
    return (first, *_time_steps(run, steps))


def _hf(state_dict, hf_config, dtype_name, arrays, steps):
    import torch

    device = torch.device(_TORCH_DEVICE.value)
    model = hf_llama(hf_config, state_dict, "float32").to(device).train()  # bf16: autocast over float32 weights
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0, fused=_FUSED.value)
    tokens, valid, response, sampler_logp, advantages = (torch.from_numpy(a).to(device) for a in arrays)
    tokens, valid = tokens.long(), valid.long()
    P = _first_response_column(arrays[2])
    mask = response[:, P:].float()
    adv = advantages[:, None]
    autocast = dtype_name == "bf16"

    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            # The logits of positions P − 1 … T − 2, those that predict the response tokens.
            logits = model(input_ids=tokens, attention_mask=valid,
                           logits_to_keep=tokens.shape[1] - P + 1).logits[:, :-1]
        # The same PPO-clip token-mean loss; log-probs in float32 as ours.
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, P:, None])[..., 0]
        ratio = torch.exp(logp - logp.detach())
        pg = -torch.minimum(ratio * adv, torch.clamp(ratio, 0.8, 1.2) * adv)
        loss = (pg * mask).sum() / mask.sum()
        loss.backward()
        opt.step()
        if device.type == "cuda":  # The step's queued GPU work, done.
            torch.cuda.synchronize(device)

    first, _, _ = timed(run)  # warm-up (allocator, oneDNN kernels)
    timings = _time_steps(run, steps)
    return (first, *timings)


def _gemm_floor(config, dtype_name: str, rows: int, scored_rows: int, repeats: int = 3) -> tuple[float, float | None]:
    """(XLA s, torch s): the step's matrix products alone, each framework's own dot, best of ``repeats``.

    Every projection of every layer over ``rows`` tokens (those the step's body computes: with
    shared prompts, each prompt once) and the LM head over ``scored_rows``, each as its forward
    product y = x W and its two backward products dx = dy W^T and dW = x^T dy; no attention, no
    elementwise work, no layer recomputation. bf16: bf16 operands, XLA accumulating into a float32
    result as the decoder does, torch's bf16 matmul as ``autocast`` runs it. If a framework's
    floor is near or above the other's whole step, its dot is the limit on this host. torch is None
    when the peer is not measured on the CPU.

    XLA's dW takes x^T as a [K, M] row-major array, the layout the compiled step gives its weight
    gradients (a cheap transposed copy, not timed). Given x itself, XLA:CPU has no bf16 kernel
    for a left operand contracted along its rows: it converts both operands to float32 and runs
    a float32 product, less than half as fast, which the step never does (tests/test_train_step.py
    checks the step's program).
    """
    import jax
    import jax.numpy as jnp

    shapes = [shape[1:] for shape in projection_shapes(config, rows, scored_rows)]  # (M, K, N, count)
    dtype = jnp.bfloat16 if dtype_name == "bf16" else jnp.float32
    forward = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
    d_input = jax.jit(lambda dy, w: jax.lax.dot_general(dy, w, (((1,), (1,)), ((), ())),
                                                         preferred_element_type=jnp.float32))
    d_weight = forward  # x^T [K, M] @ dy [M, N], x^T laid out as the step lays it out
    xla = 0.0
    for M, K, N, count in shapes:
        x, w, dy, x_t = (jnp.ones(shape, dtype) for shape in ((M, K), (K, N), (M, N), (K, M)))
        for fn, args in ((forward, (x, w)), (d_input, (dy, w)), (d_weight, (x_t, dy))):
            timed(fn, *args)  # compiles
            xla += count * min(timed(fn, *args)[0] for _ in range(repeats))
    if _SKIP_HF.value or _TORCH_DEVICE.value != "cpu":
        return xla, None
    import torch

    torch_dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    total = 0.0
    with torch.no_grad():
        for M, K, N, count in shapes:
            x, w, dy = (torch.ones(shape, dtype=torch_dtype) for shape in ((M, K), (K, N), (M, N)))
            for fn in (lambda: x @ w, lambda: dy @ w.T, lambda: x.T @ dy):
                fn()  # warm-up
                total += count * min(timed(fn)[0] for _ in range(repeats))
    return xla, total


def main(argv):
    del argv
    import jax
    import torch

    from rl_mismatch.models import Decoder, load_pretrained, to_hf_state_dict

    mesh = cpu_data_mesh(_CPU_DEVICES.value)  # first: before any JAX computation
    if _THREADS.value:
        torch.set_num_threads(_THREADS.value)
    if _RANDOM_INIT.value:
        from flax import nnx

        from rl_mismatch.models import load_state_dict
        from rl_mismatch.models.config import ModelConfig

        hf_config, _, _ = load_state_dict("smollm2-135m-instruct")
        model = Decoder(ModelConfig.from_hf_config(hf_config), remat=_REMAT.value, rngs=nnx.Rngs(0))
        source = "random init, SmolLM2-135M config"
    else:
        model, _ = load_pretrained("smollm2-135m-instruct", remat=_REMAT.value)
        source = "pretrained SmolLM2-135M-Instruct"
    config = model.config
    hf_config = config.to_hf_config()
    state_dict = to_hf_state_dict(model)
    tokens_per_step = _BATCH.value * _SEQ_LEN.value
    lengths = tuple(int(x) for x in _RESPONSE_LENGTHS.value) or None
    if lengths is not None and (len(lengths) != 2 or not 1 <= lengths[0] <= lengths[1]):
        raise app.UsageError(f"--response_lengths={','.join(_RESPONSE_LENGTHS.value)} must be LO,HI with "
                             "1 <= LO <= HI.")
    arrays = _batch_arrays(config.vocab_size, _BATCH.value, _SEQ_LEN.value,
                           _PROMPT_LEN.value or min(64, _SEQ_LEN.value // 4), _GROUP.value, lengths)
    body, head = matmul_params(config)
    scored = _SEQ_LEN.value - _first_response_column(arrays[2])  # positions whose logits are computed
    flops_per_token = 6 * (body + head * scored / _SEQ_LEN.value)
    print(f"model: {source}, {config.n_params / 1e6:.1f}M parameters; batch {_BATCH.value} x {_SEQ_LEN.value} "
          f"tokens; jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads, HF on {_TORCH_DEVICE.value}); "
          f"ours keep_logits={_KEEP_LOGITS.value}, "
          f"remat={_REMAT.value}, mesh={None if mesh is None else dict(mesh.shape)}, "
          f"n_microbatches={_MICROBATCHES.value}; prompt {_first_response_column(arrays[2])} tokens in runs of "
          f"{_GROUP.value} rows; responses {'filling their columns' if lengths is None else lengths} tokens\n"
          f"machine: {machine()}")

    body_tokens = tokens_per_step  # tokens through the layers per step: each prompt once when shared
    if _GROUP.value > 1:
        from rl_mismatch.train_step import holds_whole_runs

        data = 1 if mesh is None else mesh.devices.size
        if holds_whole_runs(_BATCH.value, _GROUP.value, _MICROBATCHES.value, data):
            prefix = _first_response_column(arrays[2]) - 1
            body_tokens = _BATCH.value // _GROUP.value * prefix + _BATCH.value * (_SEQ_LEN.value - prefix)

    computed_flops = train_matmul_flops(config, remat=_REMAT.value, keep_logits=_KEEP_LOGITS.value,
                                        body_tokens=body_tokens, head_positions=_BATCH.value * scored)
    computed_what = (f"{'each prompt once: ' if body_tokens != tokens_per_step else ''}{body_tokens} tokens "
                     f"through the body, recomputation included")
    for dtype_name in _DTYPES.value:
        peak = matmul_peak({"fp32": "float32", "bf16": "bfloat16"}[dtype_name])
        first, best, median, cpu = _ours(model, dtype_name, arrays, _STEPS.value, mesh)
        ours_tps = tokens_per_step / best
        gflops = ours_tps * flops_per_token / 1e9
        msg = (f"[{dtype_name}] XLA matmul peak {peak:6.1f} GFLOP/s\n"
               f"  ours: {ours_tps:6.1f} tok/s  (step {best:5.2f} s best, {median:5.2f} s median, {cpu:5.2f} CPU-s; "
               f"first step {first:5.1f} s)  {gflops:6.1f} GFLOP/s = {gflops / peak:5.1%} of peak")
        computed = computed_flops / best / 1e9
        msg += (f"\n  FLOPs computed ({computed_what}): {computed:6.1f} GFLOP/s = {computed / peak:5.1%} of peak")
        if _GROUP.value > 1:
            _, full_best, full_median, _ = _ours(model, dtype_name, arrays, _STEPS.value, mesh, share_prompts=False)
            msg += (f"\n  ours computing every row in full (share_prompts=False): {tokens_per_step / full_best:6.1f} "
                    f"tok/s  (step {full_best:5.2f} s best, {full_median:5.2f} s median); each prompt once: "
                    f"{full_best / best:.2f}x")
        pack_best = None
        if lengths is not None and _GROUP.value > 1:
            from rl_mismatch import train_step as ts

            response_width = _SEQ_LEN.value - _first_response_column(arrays[2])
            width = ts.packed_width(arrays[2].sum(axis=1), _GROUP.value, response_width,
                                    multiple=_PACK_MULTIPLE.value)
            unpacked = _GROUP.value * (response_width + 1)
            if not width:
                msg += f"\n  ours would not pack these responses (train_step.packed_width: 0 of {unpacked} columns)"
            for w in [width] * bool(width) + [int(x) for x in _PACKED_WIDTHS.value if int(x) != width]:
                _, w_best, w_median, _ = _ours(model, dtype_name, arrays, _STEPS.value, mesh, packed_width=w)
                msg += (f"\n  ours packing each group's responses end to end (packed_width={w} of {unpacked} "
                        f"columns{'' if w == width else ', given'}): {tokens_per_step / w_best:6.1f} tok/s  "
                        f"(step {w_best:5.2f} s best, {w_median:5.2f} s median); packed: {best / w_best:.2f}x")
                if w == width:
                    pack_best = w_best
        if not _SKIP_HF.value:
            hf_first, hf_best, hf_median, hf_cpu = _hf(state_dict, hf_config, dtype_name, arrays, _STEPS.value)
            hf_tps = tokens_per_step / hf_best
            hf_gflops = hf_tps * flops_per_token / 1e9
            msg += (f"\n  HF:   {hf_tps:6.1f} tok/s  (step {hf_best:5.2f} s best, {hf_median:5.2f} s median, "
                    f"{hf_cpu:5.2f} CPU-s; first step {hf_first:5.1f} s)  {hf_gflops:6.1f} GFLOP/s = "
                    f"{hf_gflops / peak:5.1%} of peak\n"
                    f"  ours/HF = {ours_tps / hf_tps:.2f}x (wall), {hf_cpu / cpu:.2f}x (CPU time)"
                    + (f"; ours packed/HF = {hf_best / pack_best:.2f}x (wall)" if pack_best else ""))
        xla_gemm, torch_gemm = _gemm_floor(config, dtype_name, body_tokens, _BATCH.value * scored)
        msg += (f"\n  the step's matrix products alone ({body_tokens} tokens through the body; forward + "
                f"backward, no attention, elementwise or recomputation): XLA {xla_gemm:5.2f} s = {xla_gemm / best:.0%} of our step")
        if torch_gemm is not None:  # HF computes every row: its floor is comparable when ours does too
            msg += f", torch {torch_gemm:5.2f} s" + (f" = {torch_gemm / hf_best:.0%} of HF's step"
                                                    if not _SKIP_HF.value and body_tokens == tokens_per_step else "")
            msg += f"; XLA/torch = {xla_gemm / torch_gemm:.2f}x"
        print(msg, flush=True)


if __name__ == "__main__":
    restart_with_huge_pages()  # as the main job runs (rl_mismatch.host_memory)
    app.run(main)
