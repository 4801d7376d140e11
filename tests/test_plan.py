"""The scaling plan: known model configs, the analytic model (experiments/scaling_model.py), and the
proof by compilation (experiments/plan.py) at a reduced size on 8 fake CPU devices."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from experiments import plan
from experiments import scaling_model as sm
from rl_mismatch import mismatch, sampler
from rl_mismatch.models import Decoder
from rl_mismatch.models.config import ModelConfig, known_config, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The reduced run: 2 prompts x 4 samples = 8 rows of 32 + 32 tokens.
WORK = sm.Workload(prompts=2, samples_per_prompt=4, prompt_len=32, response_len=32)


def _close_args(xla: int, model: float) -> bool:
    """The compiled program's argument bytes against the model's. The model counts every array of
    the program's arguments but the replicated scalars (the step, the loss scale, Adam's count, the
    length trigger's detector, the sampling key, the cache index: well under 4 KiB) and the
    decoding step's [rows, 1] input tokens (4 bytes a row): 4 KiB plus 0.5% covers those and any
    alignment padding, and still catches one parameter-sized array too many or too few."""
    return abs(xla - model) <= 4096 + 0.005 * model


# --------------------------------------------------------------------------------------------
# Known configs


@pytest.mark.parametrize("name, total, non_embedding", [("qwen3-4b", 4.0e9, 3.6e9), ("qwen3-1.7b", 1.7e9, 1.4e9)])
def test_known_configs_have_the_published_parameter_counts(name, total, non_embedding):
    cfg = known_config(name)
    # The model cards give 4.0B / 3.6B non-embedding and 1.7B / 1.4B, to two significant digits.
    assert abs(cfg.n_params - total) < 0.05 * total
    assert abs(cfg.n_params - cfg.vocab_size * cfg.d_model - non_embedding) < 0.05 * non_embedding
    assert (cfg.vocab_size, cfg.head_dim, cfg.n_kv_heads) == (151936, 128, 8) and cfg.tie_embeddings and cfg.qk_norm
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg
    assert known_config(name.upper(), max_seq_len=1024).max_seq_len == 1024
    with pytest.raises(ValueError, match="No known config 'qwen3-5b'"):
        known_config("qwen3-5b")


# --------------------------------------------------------------------------------------------
# The analytic model


@pytest.mark.parametrize("cfg", [plan.model_config("reduced"), tiny_config(qkv_bias=True, tie_embeddings=False)])
def test_parameter_table_is_the_decoders(cfg):
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    _, state = nnx.split(model)
    actual = {}
    for path, var in jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        actual[str(path[-1].key)] = (tuple(var.shape), tuple(var.get_metadata()["out_sharding"]))
    assert actual == {name: (shape, axes) for name, shape, axes in sm.param_shapes(cfg)}
    assert sum(int(jnp.prod(jnp.array(s))) for s, _ in actual.values()) == cfg.n_params


def test_mesh_shapes_parse_and_refuse():
    assert sm.MeshShape.parse("fsdp:16xmodel:4") == sm.MeshShape.parse("fsdp:16×model:4") == sm.MeshShape(16, 4)
    assert sm.MeshShape.parse("fsdp:64") == sm.MeshShape(64, 1) and str(sm.MeshShape(2, 4)) == "fsdp:2×model:4"
    with pytest.raises(ValueError, match="axis:size"):
        sm.MeshShape.parse("fsdp=8")
    cfg, work = known_config("qwen3-4b"), sm.Workload()
    with pytest.raises(ValueError, match=r"kv_heads \(8\) does not divide over model:16"):
        sm.memory(cfg, sm.MeshShape(4, 16), work)
    with pytest.raises(ValueError, match="do not divide over data:64"):
        sm.memory(cfg, sm.MeshShape(64, 1), sm.Workload(prompts=1, samples_per_prompt=16))


def test_analytic_model_counts():
    cfg, work = known_config("qwen3-4b"), sm.Workload()
    parts = {p.name: p.bytes for p in sm.memory(cfg, sm.MeshShape(16, 4), work)}
    # Every weight divides over all 64 devices but the norm scales: those over `embed` split over
    # data (16) only, the per-head q/k norms are replicated.
    norms, qk_norms = 2 * 36 * 2560 + 2560, 2 * 36 * 128
    expected = (cfg.n_params - norms - qk_norms) / 64 + norms / 16 + qk_norms
    assert parts["trainer params (fp32 masters)"] == 4 * expected
    assert parts["AdamW moments (fp32)"] == 2 * parts["trainer params (fp32 masters)"]
    # The KV cache: 256 rows over 16 data shards, 8 KV heads over 4, 8704 slots, bf16 k and v.
    assert parts["KV cache (8704 slots)"] == 2 * 36 * 16 * 2 * 8704 * 128 * 2 + 16 * 8704
    for n in (1, 64, 100, 8192):
        for segment in (0, 64, 100):
            assert sm.cache_sizes(n, segment) == sampler.cache_sizes(n, segment)
    assert sm.attention_area(100) == 100 * 100 and sm.attention_area(256) == 128 * 128 + 128 * 256
    times = sm.step_time(cfg, sm.MeshShape(16, 4), work, sm.CHIPS["tpu-v5e"])
    assert 0 < times["sync"] < times["generate"] and times["step"] == times["generate"] + times["sync"] + times["train"]
    # Training FLOPs: more than 6 N per token (forward, backward) plus the forward recomputed under
    # remat="layer", all of it but the down projection (the products' count: the jaxpr test below).
    recomputed = sm.matmul_params(cfg) - cfg.n_layers * cfg.d_model * cfg.d_ff
    assert times["train_flops"] > (6 * sm.matmul_params(cfg) + 2 * recomputed) * work.rows * work.seq_len


@pytest.mark.parametrize("remat", ["layer", "projections", "none"])
@pytest.mark.parametrize("keep_logits", [False, True])
def test_train_matmul_flops_are_the_programs_products(remat, keep_logits, jaxpr_eqns):
    """train_matmul_flops against the products in the jaxpr of the rescoring's gradient (what the
    train step differentiates), counted one by one: 2 FLOPs per multiply-add of every
    dot_general, times the length of each scan around it. This checks the recomputation each remat
    policy leaves in the program (under "layer" the layers' forward again but for the down
    projection) and the LM head's recomputed chunks, not the formula against itself."""
    cfg = tiny_config()
    B, T, P = 3, 20, 10  # T <= 128: one attention block, T x T query-key pairs per row
    graphdef, params = nnx.split(Decoder(cfg, remat=remat, rngs=nnx.Rngs(0)))
    tokens = jnp.ones((B, T), jnp.int32)

    def loss(params):
        return mismatch.rescore(nnx.merge(graphdef, params), tokens, score_from=P, keep_logits=keep_logits).sum()

    flops = 0
    for e, times in jaxpr_eqns(jax.make_jaxpr(jax.grad(loss))(params)):
        if e.primitive.name == "dot_general" and e.outvars[0].aval.ndim > 1:  # 1-D: a norm scale's gradient
            out = e.outvars[0].aval.shape
            (contracted, _), _ = e.params["dimension_numbers"]
            flops += times * 2 * math.prod(out) * math.prod(e.invars[0].aval.shape[d] for d in contracted)
    assert flops == sm.train_matmul_flops(cfg, remat=remat, keep_logits=keep_logits, body_tokens=B * T,
                                          head_positions=B * (T - P), attention_pairs=B * sm.attention_area(T))


# --------------------------------------------------------------------------------------------
# Proof by compilation, reduced size


def _check_compiled(results: dict) -> None:
    for program in ("train step", "decode step"):
        r = results[program]
        assert r["compile_s"] > 0 and r["xla"]["temp_size_in_bytes"] > 0, (program, r)
        assert _close_args(r["xla"]["argument_size_in_bytes"], r["model"]["argument"]), (program, r)
        # The donated state and cache come back in place.
        assert r["xla"]["alias_size_in_bytes"] > 0.9 * r["xla"]["output_size_in_bytes"], (program, r)
        # Temporaries: the model estimates what XLA keeps (docs/scaling.md compares them); the same
        # order of magnitude, or the model or the program has changed.
        assert 0.25 < r["xla"]["temp_size_in_bytes"] / r["model"]["temp"] < 4, (program, r)


def test_reduced_plan_compiles_on_fsdp8():
    assert jax.device_count() >= 8  # conftest's fake devices
    results = plan.compile_programs(plan.model_config("reduced"), sm.MeshShape(8, 1), WORK)
    _check_compiled(results)
    # The train step keeps each micro-batch's rows split over data (the decoder's
    # activation_sharding): without it XLA spread the FSDP layout of the embedding table into the
    # activations and held every row on every device, 0.98x the model here (10.5 MiB with it,
    # 17.6 without; 1.6x at 1024 tokens, docs/scaling.md).
    train = results["train step"]
    assert train["xla"]["temp_size_in_bytes"] < 0.8 * train["model"]["temp"], train


def test_plan_command_compiles_on_fake_devices(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)  # the command sets its own device count
    out = tmp_path / "plan.json"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.plan", "--model=reduced", "--devices=8", "--mesh=fsdp:4xmodel:2",
         f"--batch={WORK.prompts}", f"--samples_per_prompt={WORK.samples_per_prompt}", f"--seq={WORK.prompt_len}",
         f"--response_len={WORK.response_len}", "--chip=h100", "--compile", f"--json={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Compiled on 8 fake CPU devices" in proc.stdout and "| train step | temp |" in proc.stdout
    report = json.loads(out.read_text())
    assert report["mesh"] == "fsdp:4×model:2" and report["fits"]
    _check_compiled(report["compiled"])
