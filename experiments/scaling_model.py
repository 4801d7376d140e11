"""An analytic model of one RL step's memory and time per device, for a decoder on a mesh.

Arithmetic only (nothing is traced or compiled; the mesh rules are the project's own,
``rl_mismatch.sharding``): ``experiments/plan.py`` prints it beside XLA's memory analysis of the
compiled step, and ``docs/scaling.md`` holds its tables and where the two disagree.

The step it models is the project's (``docs/design.md`` §1), on one ``(data, model)`` mesh shared
by the sampler and the trainer:

* **Rollout phase.** The trainer's state stays resident (float32 master weights and AdamW's two
  moments, laid out by ``TRAINER_RULES``: FSDP over ``data``, tensor parallel over ``model``) while
  the sampler's copy (sampler dtype, ``SAMPLER_RULES``: replicated over ``data``, split over
  ``model``) decodes every row of the step at once into a KV cache that grows by doubling up to
  prompt + response slots (``sampler.cache_sizes``; the last growth holds both sizes at once).
* **Weight sync.** Each device receives the sampler copy's slice it lacks: the trainer holds
  ``1/data`` of it.
* **Train phase.** The trainer rescoring + backward pass over micro-batches of
  ``rows / n_microbatches`` rows (split over ``data``), with the decoder's remat policy, its
  blocked causal attention (``attention.causal_attention``: float32 scores over 128-query blocks,
  kept for the backward pass; no flash attention), and the LM head in ``token_chunk``-position
  chunks.

Step time: FLOPs over the chip's peak times an assumed utilisation (MFU) for the prefill and
the training, and for each decoding step the larger of (bytes read: weights + allocated KV
cache) / (HBM bandwidth × an assumed bandwidth utilisation) and its FLOPs / (peak × MFU). Every
response is assumed to run to the budget (the decoding loop stops when the longest has). FSDP
traffic (gathering each micro-batch's weights twice, reduce-scattering its gradients) is assumed
to overlap with the compute; it is reported, and counts only where it exceeds the compute.

What is estimated rather than counted is marked so (``Part.estimated``): the activation and
temporary terms depend on what XLA fuses and keeps, which the compiled program's memory analysis
shows. The model assumes the trainer's activations split over ``data`` with the batch, as FSDP
intends; docs/scaling.md ("Model vs compiler") shows where today's compiled step does otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

from rl_mismatch.models.config import ModelConfig
from rl_mismatch.sharding import DATA, MODEL, SAMPLER_RULES, TRAINER_RULES

GIB = 2**30
USABLE_HBM = 0.9  # of each chip's memory, assumed left to the program (runtime, fragmentation).
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_CAUSAL_BLOCK = 128  # query positions per attention block (rl_mismatch.models.attention)


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator's published figures (per chip). FLOP/s are dense peaks; ``fp32_flops`` is
    the rate of float32 matmuls computed at full float32 precision; ``link_bw`` the bytes per
    second one chip receives over its chip-to-chip links."""

    name: str
    bf16_flops: float
    fp32_flops: float
    hbm_bytes: float
    hbm_bw: float
    link_bw: float
    source: str

    def flops(self, dtype: str) -> float:
        return self.fp32_flops if dtype == "float32" else self.bf16_flops


CHIPS = {
    "tpu-v5e": Chip("TPU v5e", 197e12, 197e12 / 6, 16 * GIB, 819e9, 1600e9 / 8 / 2,
                    "Google Cloud TPU v5e spec: 197 TFLOP/s bf16, 16 GiB HBM2 at 819 GB/s, ICI 1,600 Gbps "
                    "(half of it each way); float32 matmuls assumed as six bf16 passes"),
    "h100": Chip("H100 SXM", 989e12, 67e12, 80 * GIB, 3.35e12, 450e9,
                 "NVIDIA H100 SXM datasheet: 989 TFLOP/s dense bf16, 67 TFLOP/s fp32, 80 GB HBM3 at 3.35 TB/s, "
                 "NVLink 900 GB/s (450 GB/s each way)"),
}


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """A ``(data, model)`` mesh (``rl_mismatch.sharding.make_mesh``). ``data`` is the FSDP axis of
    the trainer and the data-parallel axis of the sampler."""

    data: int
    model: int = 1

    @property
    def devices(self) -> int:
        return self.data * self.model

    def size(self, axis: str | None) -> int:
        return {DATA: self.data, MODEL: self.model, None: 1}[axis]

    @classmethod
    def parse(cls, text: str) -> MeshShape:
        """``"fsdp:16x model:4"``, ``"fsdp:64"``, ``"data:8,model:2"``, ``"fsdp:2×tp:4"``: axis:size
        pairs (``fsdp``/``data``, ``model``/``tp``) separated by x, ×, comma or space."""
        sizes = {DATA: 1, MODEL: 1}
        parts = [p for p in re.split(r"[x×,\s]+", text.strip().lower()) if p]
        names = {"fsdp": DATA, "data": DATA, "dp": DATA, "model": MODEL, "tp": MODEL}
        for part in parts:
            name, _, size = part.partition(":")
            if name not in names or not size.isdigit() or int(size) < 1:
                raise ValueError(f"Mesh {text!r}: {part!r} is not axis:size with axis one of {sorted(names)}.")
            sizes[names[name]] = int(size)
        if not parts:
            raise ValueError(f"Mesh {text!r} names no axis; e.g. fsdp:8 or fsdp:2xmodel:4.")
        return cls(sizes[DATA], sizes[MODEL])

    def __str__(self) -> str:
        return f"fsdp:{self.data}" + (f"×model:{self.model}" if self.model > 1 else "")


@dataclasses.dataclass(frozen=True)
class Workload:
    """One RL step's shapes and settings.

    Attributes:
      prompts: prompts per step; ``samples_per_prompt`` responses each (the GRPO group).
      prompt_len: prompt width in tokens (after padding); ``response_len`` the response budget.
      n_microbatches: trainer micro-batches; 0 = one row per device per micro-batch.
      remat: ``Decoder(remat=...)``: "layer", "projections" or "none".
      trainer_dtype, sampler_dtype: compute dtypes (the masters are float32 whatever the trainer's).
      token_chunk: the most LM-head positions per chunk of the rescoring (``make_train_step``'s default).
      cache_segment: the sampler's first KV-cache response capacity (``SamplingConfig``).
      keep_logits: the backward pass keeps the LM-head logits instead of recomputing them.
    """

    prompts: int = 16
    samples_per_prompt: int = 16
    prompt_len: int = 512
    response_len: int = 8192
    n_microbatches: int = 0
    remat: str = "layer"
    trainer_dtype: str = "float32"
    sampler_dtype: str = "bfloat16"
    token_chunk: int = 256
    cache_segment: int = 64
    keep_logits: bool = False

    @property
    def rows(self) -> int:
        return self.prompts * self.samples_per_prompt

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len

    def microbatches(self, mesh: MeshShape) -> int:
        return self.n_microbatches or max(1, self.rows // mesh.data)

    def micro_rows(self, mesh: MeshShape) -> int:
        """Rows one device processes per micro-batch."""
        return max(1, self.rows // (self.microbatches(mesh) * mesh.data))


# --------------------------------------------------------------------------------------------
# Parameters and their shards


def param_shapes(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...], tuple[str, ...]]]:
    """``(name, shape, logical axes)`` of every parameter of ``Decoder(cfg)``, in its stacked
    layout (tests/test_plan.py checks this against the decoder's own abstract state)."""
    D, N, K, H, F, V, L = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size,
                           cfg.n_layers)
    out = [("embed", (V, D), ("vocab", "embed")),
           ("attn_norm", (L, D), ("layers", "embed")),
           ("q", (L, D, N, H), ("layers", "embed", "heads", "head_dim")),
           ("k", (L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
           ("v", (L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
           ("o", (L, N, H, D), ("layers", "heads", "head_dim", "embed"))]
    if cfg.qkv_bias:
        out += [("q_bias", (L, N, H), ("layers", "heads", "head_dim")),
                ("k_bias", (L, K, H), ("layers", "kv_heads", "head_dim")),
                ("v_bias", (L, K, H), ("layers", "kv_heads", "head_dim"))]
    if cfg.qk_norm:
        out += [("q_norm", (L, H), ("layers", "head_dim")), ("k_norm", (L, H), ("layers", "head_dim"))]
    out += [("mlp_norm", (L, D), ("layers", "embed")),
            ("gate", (L, D, F), ("layers", "embed", "mlp")),
            ("up", (L, D, F), ("layers", "embed", "mlp")),
            ("down", (L, F, D), ("layers", "mlp", "embed")),
            ("final_norm", (D,), ("embed",))]
    if not cfg.tie_embeddings:
        out.append(("lm_head", (D, V), ("embed", "vocab")))
    return out


def shard_elements(shape, axes, rules: Mapping[str, str | None], mesh: MeshShape) -> int:
    """Elements of one device's shard. Raises ValueError where a dimension does not divide its
    mesh axis (``rl_mismatch.sharding.state_shardings`` refuses such a mesh)."""
    n = 1
    for size, name in zip(shape, axes):
        split = mesh.size(rules.get(name))
        if size % split:
            raise ValueError(f"{name} ({size}) does not divide over {rules.get(name)}:{split}")
        n *= size // split
    return n


def params_per_device(cfg: ModelConfig, mesh: MeshShape, rules) -> int:
    return sum(shard_elements(shape, axes, rules, mesh) for _, shape, axes in param_shapes(cfg))


def layer_params_per_device(cfg: ModelConfig, mesh: MeshShape) -> int:
    """One layer's parameters on one device once gathered over ``data`` (split over ``model``)."""
    shapes = [(shape[1:], axes[1:]) for _, shape, axes in param_shapes(cfg) if axes[0] == "layers"]
    return sum(shard_elements(shape, axes, SAMPLER_RULES, mesh) for shape, axes in shapes)


def matmul_params(cfg: ModelConfig) -> int:
    """Weights of the layer stack's matmuls (what 2·N FLOPs per token counts; no LM head)."""
    D, N, K, H, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    return cfg.n_layers * (D * H * (2 * N + 2 * K) + 3 * D * F)


def attention_area(T: int) -> int:
    """Query-key pairs the blocked causal attention scores for a row of ``T`` positions: each
    block of 128 queries against the keys up to its last position."""
    if T <= _CAUSAL_BLOCK:
        return T * T
    return sum(_CAUSAL_BLOCK * min(T, start + _CAUSAL_BLOCK) for start in range(0, T, _CAUSAL_BLOCK))


def cache_sizes(response_len: int, cache_segment: int) -> tuple[int, ...]:
    """The sampler's KV-cache response capacities (``rl_mismatch.sampler.cache_sizes``)."""
    sizes, size = [], cache_segment
    while 0 < size < response_len:
        sizes.append(size)
        size *= 2
    return (*sizes, response_len)


# --------------------------------------------------------------------------------------------
# Memory


@dataclasses.dataclass(frozen=True)
class Part:
    """One term of a device's memory.

    Attributes:
      name: what it is.
      bytes: per device.
      phase: ``"both"`` (resident through the step), ``"rollout"`` or ``"train"``.
      program: the compiled program that holds it, ``"train step"`` or ``"decode step"`` (one
        decoding iteration at the full cache), or ``""`` for neither (see `memory`).
      kind: in that program, ``"argument"`` or ``"temp"``.
      during: the stages of the train step it lives in (empty: all of it); the stages' peaks
        do not add up (`peak`).
      estimated: an estimate of what XLA keeps, rather than a count of arrays the code makes.
    """

    name: str
    bytes: float
    phase: str
    program: str = ""
    kind: str = ""
    during: tuple[str, ...] = ()
    estimated: bool = False


# Stages of the train step whose temporaries do not coexist: the LM head's chunks (first in the
# backward pass), the layers' backward scan, the optimizer update.
LM_HEAD, LAYERS, OPTIMIZER = "LM head", "layer backward", "optimizer"


def _trainer_parts(cfg: ModelConfig, mesh: MeshShape, work: Workload) -> list[Part]:
    cb = DTYPE_BYTES[work.trainer_dtype]
    D, N, K, H, F, V, L = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size,
                           cfg.n_layers)
    m, b, T, R = mesh.model, work.micro_rows(mesh), work.seq_len, work.response_len
    p = params_per_device(cfg, mesh, TRAINER_RULES)
    rows_dev = work.rows // mesh.data
    # One layer's forward values per token (compute dtype): x, its norm, q/k/v before and after
    # the q/k norm and RoPE, the attention output, the residual, its norm, gate/up/SiLU/product,
    # the down projection's output.
    layer_token = cb * (5 * D + H * (4 * N + 5 * K) / m + 4 * F / m)
    saved_token = {"layer": cb * D,  # the layer's input
                   "projections": cb * (3 * D + H * (N + 2 * K) / m + 2 * F / m),
                   "none": layer_token}[work.remat]
    probs = b * N / m * attention_area(T) * 4  # one layer's float32 attention probabilities
    saved = L * b * T * saved_token + (L * probs if work.remat == "none" else 0)
    temp = ("train", "train step", "temp")
    return [
        Part("trainer params (fp32 masters)", 4 * p, "both", "train step", "argument"),
        Part("AdamW moments (fp32)", 8 * p, "both", "train step", "argument"),
        Part("train batch", rows_dev * (T * (4 + 1 + 1 + 4) + 4), "train", "train step", "argument"),
        Part("gradients (fp32" + (", + micro-batch accumulator)" if work.microbatches(mesh) > 1 else ")"),
             4 * p * (2 if work.microbatches(mesh) > 1 else 1), *temp),
        Part("trainer log-probs", 2 * rows_dev * T * 4, *temp),
        Part(f"activations kept across layers (remat={work.remat})", saved, *temp, (LM_HEAD, LAYERS)),
        Part("attention mask", b * T * T + T * T, *temp, (LM_HEAD, LAYERS)),
        Part("embedding table gathered for the LM head (fp32)", 4 * V * D / m, *temp, (LM_HEAD,), estimated=True),
        Part("LM-head chunk (3x fp32 logits) + hidden states", 3 * work.token_chunk * V / m * 4 + 2 * b * R * D * cb,
             *temp, (LM_HEAD,), estimated=True),
        Part("FSDP: one layer gathered (x2) + its unreduced gradient", 3 * 4 * layer_params_per_device(cfg, mesh),
             *temp, (LAYERS,), estimated=True),
        Part("one layer's recompute + backward (3x fp32 attention scores)", 2 * b * T * layer_token + 3 * probs,
             *temp, (LAYERS,), estimated=True),
        Part("optimizer update (fp32)", 4 * p, *temp, (OPTIMIZER,), estimated=True),
    ]


def _sampler_parts(cfg: ModelConfig, mesh: MeshShape, work: Workload) -> list[Part]:
    cs = DTYPE_BYTES[work.sampler_dtype]
    P, R, S = work.prompt_len, work.response_len, work.seq_len
    rows_dev = work.rows // mesh.data
    per_slot = 2 * cfg.n_layers * rows_dev * cfg.n_kv_heads / mesh.model * cfg.head_dim * cs
    sizes = cache_sizes(R, work.cache_segment)
    growth = per_slot * (P + sizes[-2]) if len(sizes) > 1 else 0
    vocab = cfg.vocab_size / mesh.model
    layer_weights = sum(shard_elements(shape, axes, SAMPLER_RULES, mesh)
                        for _, shape, axes in param_shapes(cfg) if axes[0] == "layers")
    return [
        Part(f"sampler weights ({work.sampler_dtype})", cs * params_per_device(cfg, mesh, SAMPLER_RULES),
             "rollout", "decode step", "argument"),
        Part(f"KV cache ({S} slots)", per_slot * S + rows_dev * S, "rollout", "decode step", "argument"),
        Part("KV cache: the previous size during the last growth", growth, "rollout"),
        # Decoder.decoding_layers slices the stacked weights once per program; XLA:CPU copies them.
        Part("sampler weights sliced per layer (decoding_layers)", cs * layer_weights, "rollout", "decode step", "temp",
             estimated=True),
        Part("decoding step: fp32 logits and sampling (x4)", 4 * rows_dev * vocab * 4, "rollout", "decode step",
             "temp", estimated=True),
        Part("rollout outputs (tokens, mask, 4 fp32 per token)", rows_dev * R * (4 + 1 + 16), "rollout"),
    ]


def check_workload(cfg: ModelConfig, mesh: MeshShape, work: Workload) -> None:
    """Raises ValueError where the project would refuse this mesh or batch (named)."""
    for _, shape, axes in param_shapes(cfg):
        shard_elements(shape, axes, TRAINER_RULES, mesh)
    if work.rows % mesh.data:
        raise ValueError(f"{work.rows} rows do not divide over data:{mesh.data}")
    if work.rows % (work.microbatches(mesh) * mesh.data):
        raise ValueError(f"{work.rows} rows do not split into {work.microbatches(mesh)} micro-batches "
                         f"x data:{mesh.data}")
    if work.seq_len > cfg.max_seq_len:
        raise ValueError(f"{work.seq_len} tokens exceed the model's context of {cfg.max_seq_len}")


def memory(cfg: ModelConfig, mesh: MeshShape, work: Workload) -> list[Part]:
    """Every term of one device's memory (`Part`). Raises ValueError as `check_workload`."""
    check_workload(cfg, mesh, work)
    return _trainer_parts(cfg, mesh, work) + _sampler_parts(cfg, mesh, work)


def peak(parts: list[Part]) -> float:
    """Bytes of ``parts`` at their peak: those that live throughout, plus the largest stage."""
    stages: dict[str, float] = {}
    for p in parts:
        for stage in p.during:
            stages[stage] = stages.get(stage, 0.0) + p.bytes
    return sum(p.bytes for p in parts if not p.during) + max(stages.values(), default=0.0)


def phase_peaks(parts: list[Part]) -> dict[str, float]:
    """Bytes per device in the rollout phase and in the train phase (resident state included)."""
    return {phase: peak([p for p in parts if p.phase in (phase, "both")]) for phase in ("rollout", "train")}


def program_bytes(parts: list[Part], program: str, kind: str) -> float:
    """The model's figure for a compiled program's argument or temp size (XLA's memory analysis)."""
    return peak([p for p in parts if p.program == program and p.kind == kind])


def fits(parts: list[Part], chip: Chip) -> bool:
    return max(phase_peaks(parts).values()) <= USABLE_HBM * chip.hbm_bytes


# --------------------------------------------------------------------------------------------
# Time


@dataclasses.dataclass(frozen=True)
class Utilisation:
    """Assumed fractions of the chip's peaks: ``mfu`` of the FLOP/s for training and prefill,
    ``bandwidth`` of the HBM bandwidth for the (memory-bound) decoding steps."""

    mfu: float = 0.4
    bandwidth: float = 0.6


def train_matmul_flops(cfg: ModelConfig, *, remat: str, keep_logits: bool, body_tokens: int,
                       head_positions: int, attention_pairs: int = 0) -> int:
    """Matmul FLOPs of one train step, forward and backward, the recomputation included.

    ``body_tokens`` pass through the layers, ``head_positions`` through the LM head, and the
    blocked attention scores ``attention_pairs`` query-key pairs (``rows * attention_area(T)``).
    A product costs 2 FLOPs per weight per token in the forward and twice that in the backward
    (the input's and the weight's gradients): 6 per weight per token. On top of that:
    ``Decoder(remat="layer")`` runs every layer's forward again in the backward pass, except its
    down projection, whose output the backward does not need; ``"projections"`` keeps the
    projections' outputs and recomputes the attention scores; ``"none"`` recomputes nothing.
    Unless ``keep_logits``, the LM head's forward runs again too. Attention costs 4·heads·head_dim
    per query-key pair per pass (the scores and the weighted sum)."""
    L, D, F = cfg.n_layers, cfg.d_model, cfg.d_ff
    recomputed = {"layer": matmul_params(cfg) - L * D * F, "projections": 0, "none": 0}[remat]
    body = 2 * (3 * matmul_params(cfg) + recomputed) * body_tokens
    head = 2 * (3 if keep_logits else 4) * D * cfg.vocab_size * head_positions
    attention = 4 * L * cfg.n_heads * cfg.head_dim * attention_pairs * (3 if remat == "none" else 4)
    return body + head + attention


def step_time(cfg: ModelConfig, mesh: MeshShape, work: Workload, chip: Chip,
              util: Utilisation = Utilisation()) -> dict[str, float]:
    """Seconds of one step by phase (``generate``, ``sync``, ``train``, ``step``); the FSDP traffic
    time ``fsdp_comm`` (counted in ``train`` only where it exceeds ``train_compute``); the
    ``train_flops`` of the whole step and the weight sync's ``sync_bytes`` into each device."""
    D, N, K, H, V, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size, cfg.n_layers
    d, m, n = mesh.data, mesh.model, mesh.devices
    P, R, T = work.prompt_len, work.response_len, work.seq_len
    cs = DTYPE_BYTES[work.sampler_dtype]
    nm, rows_dev = matmul_params(cfg), work.rows / d
    sampler_peak = chip.flops(work.sampler_dtype) * util.mfu
    weights = cs * params_per_device(cfg, mesh, SAMPLER_RULES)

    prefill = work.rows * (P * 2 * nm + 2 * D * V + 4 * L * N * H * attention_area(P))
    generate, done = prefill / n / sampler_peak, 0
    for size in cache_sizes(R, work.cache_segment):
        slots = P + size  # attention reads every allocated slot
        kv = 2 * L * rows_dev * K / m * slots * H * cs
        flops = rows_dev * (2 * nm + 2 * D * V + 4 * L * N * H * slots) / m
        generate += (size - done) * max((weights + kv) / (chip.hbm_bw * util.bandwidth), flops / sampler_peak)
        done = size
    sync_bytes = weights * (1 - 1 / d)

    flops = train_matmul_flops(cfg, remat=work.remat, keep_logits=work.keep_logits, body_tokens=work.rows * T,
                               head_positions=work.rows * R, attention_pairs=work.rows * attention_area(T))
    compute = flops / n / (chip.flops(work.trainer_dtype) * util.mfu)
    # Per micro-batch each device gathers the float32 weights it lacks for the forward and the
    # recomputing backward, and reduce-scatters the gradient: ~3 x its model-split share.
    fsdp = work.microbatches(mesh) * 3 * 4 * cfg.n_params / m * (1 - 1 / d) / chip.link_bw
    train = max(compute, fsdp)
    sync = sync_bytes / chip.link_bw
    return {"generate": generate, "sync": sync, "train": train, "train_compute": compute, "fsdp_comm": fsdp,
            "step": generate + sync + train, "train_flops": flops, "sync_bytes": sync_bytes}


# --------------------------------------------------------------------------------------------
# Meshes


def mesh_shapes(devices: int) -> list[MeshShape]:
    """Every ``(data, model)`` factorisation of ``devices`` with a power-of-two model axis."""
    return [MeshShape(devices // m, m) for m in (2**i for i in range(int(math.log2(devices)) + 1))
            if devices % m == 0]


def max_prompts(cfg: ModelConfig, mesh: MeshShape, work: Workload, chip: Chip, limit: int = 4096) -> int:
    """The most prompts per step (``work.samples_per_prompt`` rows each) that fit, 0 if none."""
    best = 0
    for prompts in range(1, limit + 1):
        trial = dataclasses.replace(work, prompts=prompts)
        try:
            parts = memory(cfg, mesh, trial)
        except ValueError:
            continue
        if not fits(parts, chip):
            break
        best = prompts
    return best
