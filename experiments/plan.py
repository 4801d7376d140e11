r"""Plans an RL run at scale: per-device memory and step time, proven by compiling the real programs.

  python -m experiments.plan --model=qwen3-4b --devices=64 --mesh=fsdp:16xmodel:4 --chip=tpu-v5e
  python -m experiments.plan --model=qwen3-1.7b --devices=8 --mesh=fsdp:8 --chip=h100
  python -m experiments.plan --model=qwen3-4b --devices=64 --mesh=fsdp:64 --compile   # minutes, GBs of RAM

Prints the analytic model of ``experiments.scaling_model`` for one mesh (each part of a device's
memory, the rollout- and train-phase peaks against the chip's memory, the step time at the stated
utilisation) and a table of every ``(data, model)`` mesh of ``--devices``: which fit, and the most
prompts per step that do.

``--compile`` proves the plan the way JAX allows without the chips: ``--devices`` fake CPU
devices, abstract parameters (``jax.eval_shape``: no weight is ever made), the project's
shardings for the mesh, and ``lower().compile()`` of the real train step (``make_train_step``'s,
through ``TrainStep.lower``) and of one sampler decoding step (``Decoder.decode`` of one token
per row against the full KV cache, then ``sampler.select_tokens``, with the sampler's layout).
XLA's ``memory_analysis()`` of each (per device) is printed beside the model's figures, with the
compile times. XLA:CPU's buffer assignment stands in for the accelerator's: its figures are the
arrays the program keeps, not an accelerator's fusion choices (docs/scaling.md).

``--model`` is a name of ``rl_mismatch.models.config.KNOWN_CONFIGS``, or ``reduced`` (a Qwen3-shaped
decoder of ~3M parameters, for tests). ``--json`` also writes every figure to a file.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments import scaling_model as sm
from rl_mismatch import sampler, train_step
from rl_mismatch import sharding as shd
from rl_mismatch.experiment_config import ExperimentConfig
from rl_mismatch.models.config import ModelConfig, known_config, tiny_config
from rl_mismatch.models.decoder import Decoder
from rl_mismatch.models.kv_cache import KVCache, init_cache
from rl_mismatch.precision import make_loss_scale, parse_dtype

_MODEL = flags.DEFINE_string("model", "qwen3-4b", "A known config name (qwen3-4b, qwen3-1.7b) or 'reduced'.")
_DEVICES = flags.DEFINE_integer("devices", 64, "Devices (chips) of the run; --compile fakes this many CPU devices.")
_MESH = flags.DEFINE_string("mesh", None, "The mesh, e.g. fsdp:64 or fsdp:16xmodel:4 (default: fsdp:<devices>).")
_CHIP = flags.DEFINE_enum("chip", "tpu-v5e", sorted(sm.CHIPS), "The accelerator of the analytic model.")
_BATCH = flags.DEFINE_integer("batch", sm.Workload.prompts, "Prompts per step.")
_SAMPLES = flags.DEFINE_integer("samples_per_prompt", sm.Workload.samples_per_prompt, "Responses per prompt.")
_SEQ = flags.DEFINE_integer("seq", sm.Workload.prompt_len, "Prompt width in tokens.")
_RESPONSE = flags.DEFINE_integer("response_len", sm.Workload.response_len, "Response budget in tokens.")
_MICRO = flags.DEFINE_integer("n_microbatches", 0, "Trainer micro-batches (0: one row per device per micro-batch).")
_REMAT = flags.DEFINE_enum("remat", "layer", ["layer", "projections", "none"], "Decoder(remat=...) of the trainer.")
_TRAINER_DTYPE = flags.DEFINE_string("trainer_dtype", "float32", "Trainer compute dtype.")
_SAMPLER_DTYPE = flags.DEFINE_string("sampler_dtype", "bfloat16", "Sampler dtype.")
_MFU = flags.DEFINE_float("mfu", sm.Utilisation.mfu, "Assumed fraction of peak FLOP/s (training, prefill).")
_BANDWIDTH = flags.DEFINE_float("bw_util", sm.Utilisation.bandwidth, "Assumed fraction of HBM bandwidth (decoding).")
_COMPILE = flags.DEFINE_bool("compile", False, "Compile the train step and a decoding step on fake CPU devices.")
_JSON = flags.DEFINE_string("json", None, "Also write every figure to this JSON file.")

# A Qwen3-shaped decoder small enough to compile in seconds (tests/test_plan.py).
REDUCED = dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, d_ff=512,
               qk_norm=True, max_seq_len=4096, architecture="Qwen3ForCausalLM")


def model_config(name: str) -> ModelConfig:
    return tiny_config(**REDUCED) if name == "reduced" else known_config(name)


# --------------------------------------------------------------------------------------------
# Compilation with abstract arguments


def _abstract_decoder(cfg: ModelConfig, *, dtype, param_dtype, remat: str = "layer") -> Decoder:
    return nnx.eval_shape(lambda: Decoder(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0)))


def _sds(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


def compile_train_step(cfg: ModelConfig, mesh: jax.sharding.Mesh, work: sm.Workload):
    """``(compiled, seconds)``: the experiment's train step (its default optimizer and loss:
    AdamW + the length trigger, GRPO's PPO loss) for ``work``'s batch, from abstract arguments."""
    dtype = parse_dtype(work.trainer_dtype)
    graphdef, params = nnx.split(_abstract_decoder(cfg, dtype=dtype, param_dtype=jnp.float32, remat=work.remat))
    defaults = ExperimentConfig()
    optimizer, loss_scale = defaults.optim.optimizer(), make_loss_scale(dtype)
    state = train_step.TrainState(step=_sds((), jnp.int32), params=params,
                                  opt_state=jax.eval_shape(optimizer.init, params),
                                  loss_scale=jax.eval_shape(loss_scale.init), key=None)
    shape = sm.MeshShape(mesh.shape[shd.DATA], mesh.shape[shd.MODEL])
    step = train_step.make_train_step(graphdef, optimizer, defaults.loss, compute_dtype=dtype,
                                      n_microbatches=work.microbatches(shape), mesh=mesh, loss_scale=loss_scale,
                                      token_chunk=work.token_chunk, keep_logits=work.keep_logits)
    B, T = work.rows, work.seq_len
    batch = train_step.TrainBatch(_sds((B, T), jnp.int32), _sds((B, T), bool), _sds((B, T), bool),
                                  _sds((B, T), jnp.float32), _sds((B,), jnp.float32), score_from=work.prompt_len)
    start = time.perf_counter()
    compiled = step.lower(state, batch, response_length=_sds((), jnp.float32)).compile()
    return compiled, time.perf_counter() - start


def compile_decode_step(cfg: ModelConfig, mesh: jax.sharding.Mesh, work: sm.Workload):
    """``(compiled, seconds)``: one iteration of the sampler's decoding loop at its largest cache
    (prompt + response slots): every row's next token through ``Decoder.decode`` and
    ``sampler.select_tokens``, the cache donated as the loop carries it, in the sampler's layout."""
    dtype = parse_dtype(work.sampler_dtype)
    graphdef, state = nnx.split(_abstract_decoder(cfg, dtype=dtype, param_dtype=dtype))
    cache = jax.eval_shape(lambda: init_cache(cfg, batch=work.rows, max_len=work.seq_len, dtype=dtype))
    kv = NamedSharding(mesh, P(shd.DATA, shd.MODEL, None, None))  # as sampler.decode_loop constrains it
    rows, replicated = shd.batch_sharding(mesh), shd.replicated(mesh)
    cache_sh = KVCache(jax.tree.map(lambda _: kv, cache.k), jax.tree.map(lambda _: kv, cache.v), rows, replicated)
    sampling = sampler.SamplingConfig(max_new_tokens=work.response_len)

    def step(state, tokens_B1, cache, key):
        model = nnx.merge(graphdef, state)
        logits_B1V, cache = model.decode(tokens_B1, cache, layers=model.decoding_layers())  # no CPU-only layout
        tokens_B, logp_B, *_ = sampler.select_tokens(logits_B1V[:, 0], key, sampling)
        return tokens_B, logp_B, cache

    jitted = jax.jit(step, in_shardings=(shd.state_shardings(state, mesh, shd.SAMPLER_RULES), rows, cache_sh,
                                         replicated),
                     out_shardings=(shd.batch_sharding(mesh, 1), shd.batch_sharding(mesh, 1), cache_sh),
                     donate_argnums=2)
    key = jax.eval_shape(lambda: jax.random.key(0))
    start = time.perf_counter()
    compiled = jitted.lower(state, _sds((work.rows, 1), jnp.int32), cache, key).compile()
    return compiled, time.perf_counter() - start


_XLA_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
               "generated_code_size_in_bytes")


def compile_programs(cfg: ModelConfig, mesh_shape: sm.MeshShape, work: sm.Workload) -> dict:
    """Both programs compiled on the first ``mesh_shape.devices`` devices: per program, XLA's
    memory analysis (bytes per device), the model's argument and temp figures, compile seconds."""
    mesh = shd.make_mesh(mesh_shape.data, mesh_shape.model)
    parts = sm.memory(cfg, mesh_shape, work)
    out = {}
    for program, compile_fn in (("train step", compile_train_step), ("decode step", compile_decode_step)):
        compiled, seconds = compile_fn(cfg, mesh, work)
        stats = compiled.memory_analysis()
        out[program] = {"compile_s": round(seconds, 1),
                        "xla": {f: int(getattr(stats, f)) for f in _XLA_FIELDS},
                        "model": {kind: sm.program_bytes(parts, program, kind) for kind in ("argument", "temp")}}
    return out


# --------------------------------------------------------------------------------------------
# Tables


UNIT = ["GiB", sm.GIB]  # the tables' unit: MiB for a model whose resident state is under 1 GiB


def _gib(x: float) -> str:
    value = x / UNIT[1]
    return f"{value:.2f}" if value >= 0.01 or value == 0 else f"{value:.1e}"


def memory_table(parts: list[sm.Part], chip: sm.Chip) -> str:
    lines = [f"| part | {UNIT[0]} / device | phase | in program | stages | |", "|---|---|---|---|---|---|"]
    for p in parts:
        where = f"{p.program} {p.kind}" if p.program else "-"
        lines.append(f"| {p.name} | {_gib(p.bytes)} | {p.phase} | {where} | {', '.join(p.during) or 'all'} | "
                     f"{'estimate' if p.estimated else ''} |")
    peaks = sm.phase_peaks(parts)
    usable = sm.USABLE_HBM * chip.hbm_bytes
    for phase, total in peaks.items():
        verdict = "fits" if total <= usable else "does NOT fit"
        lines.append(f"| **{phase} phase peak** | **{_gib(total)}** | {verdict} in {_gib(usable)} "
                     f"({sm.USABLE_HBM:.0%} of {chip.name}'s {_gib(chip.hbm_bytes)}) | | | |")
    return "\n".join(lines)


def time_table(times: dict[str, float], chip: sm.Chip, util: sm.Utilisation, work: sm.Workload) -> str:
    rows = [("generate (prefill + decoding)", times["generate"]), ("weight sync", times["sync"]),
            ("train step", times["train"]), ("**step**", times["step"])]
    lines = [f"Step time on {chip.name} at MFU {util.mfu:.0%} (trainer {work.trainer_dtype}, sampler "
             f"{work.sampler_dtype}), decoding at {util.bandwidth:.0%} of HBM bandwidth:", "",
             "| phase | seconds |", "|---|---|"]
    lines += [f"| {name} | {value:.1f} |" if value >= 1 else f"| {name} | {value:.2g} |" for name, value in rows]
    lines.append(f"\nWeight sync: {_gib(times['sync_bytes'])} {UNIT[0]} into each device. Train FLOPs "
                 f"{times['train_flops']:.3g}; FSDP traffic {times['fsdp_comm']:.1f} s (overlapped with "
                 f"{times['train_compute']:.1f} s of compute).")
    return "\n".join(lines)


_MOST_PROMPTS = 4096  # the search's limit


def mesh_table(cfg: ModelConfig, devices: int, work: sm.Workload, chip: sm.Chip, util: sm.Utilisation) -> str:
    work = dataclasses.replace(work, n_microbatches=0)  # every mesh with one row per device per micro-batch
    lines = [f"| mesh | rollout {UNIT[0]} | train {UNIT[0]} | fits {chip.name} | step s | "
             f"most prompts x{work.samples_per_prompt} |", "|---|---|---|---|---|---|"]
    for mesh in sm.mesh_shapes(devices):
        try:
            parts = sm.memory(cfg, mesh, work)
        except ValueError as e:
            lines.append(f"| {mesh} | | | no: {e} | | |")
            continue
        peaks = sm.phase_peaks(parts)
        step = sm.step_time(cfg, mesh, work, chip, util)["step"]
        most = sm.max_prompts(cfg, mesh, work, chip, limit=_MOST_PROMPTS)
        lines.append(f"| {mesh} | {_gib(peaks['rollout'])} | {_gib(peaks['train'])} | "
                     f"{'yes' if sm.fits(parts, chip) else 'no'} | {step:.0f} | "
                     f"{most if most < _MOST_PROMPTS else f'≥ {most}'} |")
    return "\n".join(lines)


def compile_table(results: dict) -> str:
    lines = ["| program | figure | model | XLA | XLA / model |", "|---|---|---|---|---|"]
    for program, r in results.items():
        for field in _XLA_FIELDS:
            kind = field.split("_")[0]
            xla = r["xla"][field]
            model = r["model"].get(kind)
            ratio = f"{xla / model:.2f}" if model else ""
            lines.append(f"| {program} | {kind} | {_gib(model) if model is not None else ''} | {_gib(xla)} | {ratio} |")
        lines.append(f"| {program} | compile seconds | | {r['compile_s']} | |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line


def _workload() -> sm.Workload:
    for name in (_TRAINER_DTYPE.value, _SAMPLER_DTYPE.value):
        parse_dtype(name)  # a clear error for a bad name
    canonical = lambda name: jnp.dtype(parse_dtype(name)).name
    return sm.Workload(prompts=_BATCH.value, samples_per_prompt=_SAMPLES.value, prompt_len=_SEQ.value,
                       response_len=_RESPONSE.value, n_microbatches=_MICRO.value, remat=_REMAT.value,
                       trainer_dtype=canonical(_TRAINER_DTYPE.value), sampler_dtype=canonical(_SAMPLER_DTYPE.value))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
    try:
        cfg, work = model_config(_MODEL.value), _workload()
        mesh = sm.MeshShape.parse(_MESH.value or f"fsdp:{_DEVICES.value}")
        if mesh.devices != _DEVICES.value:
            raise ValueError(f"--mesh={mesh} has {mesh.devices} devices, --devices={_DEVICES.value}.")
        chip, util = sm.CHIPS[_CHIP.value], sm.Utilisation(_MFU.value, _BANDWIDTH.value)
        parts = sm.memory(cfg, mesh, work)
    except ValueError as e:
        sys.exit(f"error: {e}")
    times = sm.step_time(cfg, mesh, work, chip, util)
    if 12 * cfg.n_params < sm.GIB:
        UNIT[:] = ["MiB", 2**20]
    size = f"{cfg.n_params / 1e9:.2f}B" if cfg.n_params >= 1e9 else f"{cfg.n_params / 1e6:.1f}M"
    print(f"# {_MODEL.value} ({size} parameters) on {mesh.devices} x {chip.name}, mesh {mesh}\n\n"
          f"{work.prompts} prompts x {work.samples_per_prompt} samples = {work.rows} rows of {work.prompt_len} + "
          f"{work.response_len} tokens; {work.microbatches(mesh)} micro-batches ({work.micro_rows(mesh)} row(s) per "
          f"device each); remat={work.remat}.\n")
    print(memory_table(parts, chip), "\n")
    print(time_table(times, chip, util, work), "\n")
    print(f"Every mesh of {mesh.devices} devices (micro-batches of one row per device):\n\n"
          f"{mesh_table(cfg, mesh.devices, work, chip, util)}\n")
    report = {"model": _MODEL.value, "n_params": cfg.n_params, "mesh": str(mesh), "chip": chip.name,
              "workload": dataclasses.asdict(work), "memory": {p.name: p.bytes for p in parts},
              "peaks": sm.phase_peaks(parts), "fits": sm.fits(parts, chip), "time": times}
    if _COMPILE.value:
        # Before anything starts a JAX backend: this many fake CPU devices, whatever the host has.
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", _DEVICES.value)
        report["compiled"] = compile_programs(cfg, mesh, work)
        print(f"Compiled on {_DEVICES.value} fake CPU devices ({UNIT[0]} per device):\n\n"
              f"{compile_table(report['compiled'])}")
    if _JSON.value:
        with open(_JSON.value, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    app.run(main)
