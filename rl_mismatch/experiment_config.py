"""Typed, validated experiment settings: what an ``ml_collections`` config file becomes.

``experiments/configs/*.py`` return ``ml_collections.ConfigDict``s so that every field can be
overridden from the command line (``--config.sampler.dtype=fp16``). At the top of ``main`` the
config becomes an :class:`ExperimentConfig` with :meth:`ExperimentConfig.from_dict` (a plain
nested ``dict``: library code never sees a ``ConfigDict``). Construction checks everything that
can be checked without loading a model or a dataset, and names the offending key:

* an unknown key (``config.sampler.dtyp``) -> ``ValueError`` listing the known keys;
* a wrongly typed value (``config.steps='ten'``) -> ``ValueError``;
* an invalid dtype name (``config.sampler.dtype='bf17'``) -> ``ValueError`` listing valid names;
* an invalid sampling / LR-trigger setting -> the library's own ``ValueError``, prefixed with
  the config path; the ``loss`` group *is* the library's :class:`~rl_mismatch.losses.LossConfig`,
  whose errors name their field, prefixed here with the group (``config.loss.clip_eps_low = ...``).

The dataclasses are frozen and hashable; :meth:`ExperimentConfig.to_dict` gives the JSON that
is stored next to the checkpoints and compared on resume.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

import optax

from rl_mismatch import losses, optim
from rl_mismatch.models.decoder import Remat
from rl_mismatch.precision import parse_dtype
from rl_mismatch.sampler import SamplingConfig

LrSchedule = Literal["constant", "length_triggered"]
SamplerLogp = Literal["full", "truncated"]

TINY_MODEL = "tiny"  # model.source for a random tiny decoder with a byte-level ChatML tokenizer.
JSONL_TASK_NAME = "jsonl"  # task.name for a user's JSONL file (task.jsonl_path).


def _require(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise ValueError(f"config.{path} {message}")


def _check_literal(value: Any, literal: Any, path: str) -> None:
    options = typing.get_args(literal)
    _require(value in options, path, f"= {value!r} is not one of {list(options)}.")


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """Which model the trainer starts from.

    Attributes:
      source: ``"tiny"`` (random :func:`~rl_mismatch.models.config.tiny_config` decoder with a
        byte-level ChatML tokenizer built in code), a known name such as
        ``"smollm2-135m-instruct"``, a ``.gguf`` file, an HF model directory, or a Hugging Face
        Hub id (``"org/name"`` or ``"org/name@revision"``) already in the local HF cache.
      tiny_max_seq_len: context length of the tiny model (ignored otherwise).
      cache_dir: where dequantized GGUF files are cached ("" = ``~/.cache/rl_mismatch``).
    """

    source: str = "smollm2-135m-instruct"
    tiny_max_seq_len: int = 256
    cache_dir: str = ""

    def __post_init__(self):
        _require(bool(self.source), "model.source", "must name a model (e.g. 'smollm2-135m-instruct' or 'tiny').")
        _require(self.tiny_max_seq_len >= 2, "model.tiny_max_seq_len", f"= {self.tiny_max_seq_len} must be >= 2.")


@dataclasses.dataclass(frozen=True)
class TaskSettings:
    """The task: dataset, prompt and reward.

    Attributes:
      name: a reasoning-gym task (``basic_arithmetic``, ``countdown``, ...) or ``"jsonl"``.
      jsonl_path: the JSONL file of ``{question, answer}`` lines when ``name == "jsonl"``.
      train_size, eval_size: examples per generated split (reasoning-gym).
      seed: dataset generation seed.
      kwargs: reasoning-gym config fields, e.g. ``{"max_numbers": 3}`` for countdown.
      data_dir: where the ArrayRecord files go ("" = ``<workdir>/data``).
      system_prompt: optional system message ("" = the chat template's default).
      format_weight: reward for a well-formed ``<answer>`` block (see ``tasks.rewards``).
      overlong_buffer: DAPO's soft overlong penalty buffer ``L_cache`` in tokens (0 = off):
        ``−overlong_weight · clip((|y| − (N − L_cache)) / L_cache, 0, 1)`` with ``N`` the
        response budget, so a truncated response gets ``−overlong_weight``.
      overlong_weight: scale of that penalty.
    """

    name: str = "basic_arithmetic"
    jsonl_path: str = ""
    train_size: int = 500
    eval_size: int = 50
    seed: int = 0
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    data_dir: str = ""
    system_prompt: str = ""
    format_weight: float = 0.1
    overlong_buffer: int = 0
    overlong_weight: float = 1.0

    def __post_init__(self):
        # Sorted, so that equal settings compare and hash equal whatever their order.
        object.__setattr__(self, "kwargs", dict(sorted(dict(self.kwargs).items())))
        _require(bool(self.name), "task.name", "must name a reasoning-gym task or 'jsonl'.")
        if self.name == JSONL_TASK_NAME:
            _require(bool(self.jsonl_path), "task.jsonl_path", "must be set when task.name='jsonl'.")
        _require(self.train_size >= 1 and self.eval_size >= 1, "task.train_size",
                 f"= {self.train_size} / eval_size = {self.eval_size}: a split needs at least one example.")
        _require(self.seed >= 0, "task.seed", f"= {self.seed} must be >= 0.")
        _require(math.isfinite(self.format_weight), "task.format_weight", "must be finite.")
        _require(self.overlong_buffer >= 0, "task.overlong_buffer", f"= {self.overlong_buffer} must be >= 0.")
        _require(math.isfinite(self.overlong_weight) and self.overlong_weight >= 0, "task.overlong_weight",
                 "must be finite and >= 0.")

    def __hash__(self):
        return hash((self.name, self.jsonl_path, self.train_size, self.eval_size, self.seed,
                     tuple(self.kwargs.items()), self.data_dir, self.system_prompt))


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    """Prompts per step and samples per prompt.

    Attributes:
      prompts_per_step: prompts per RL step over all processes (``B``).
      group_size: samples per prompt (``G`` >= 2, the GRPO group).
      prompt_bucket: prompt widths are padded to a multiple of this; 0 = one width for the
        whole run, the longest prompt of the split rounded up to 8 (no recompilation ever).
      max_prompt_len: longest prompt allowed; 0 = the model's context minus the response budget.
    """

    prompts_per_step: int = 4
    group_size: int = 4
    prompt_bucket: int = 0
    max_prompt_len: int = 0

    def __post_init__(self):
        _require(self.prompts_per_step >= 1, "rollout.prompts_per_step", f"= {self.prompts_per_step} must be >= 1.")
        _require(self.group_size >= 2, "rollout.group_size",
                 f"= {self.group_size} must be >= 2 (a GRPO group of one has zero advantage).")
        _require(self.prompt_bucket >= 0 and self.max_prompt_len >= 0, "rollout.prompt_bucket",
                 "and rollout.max_prompt_len must be >= 0.")


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """The rollout engine: its precision and how it samples.

    Attributes:
      dtype: sampler weights / activations / KV cache: ``bf16``, ``fp16`` or ``fp32``.
      max_new_tokens: response budget ``N``.
      temperature: sampling temperature (> 0); the trainer rescores with the same temperature.
      top_k, top_p: truncation (0 / 1.0 = off).
      logp: which sampler log-prob the loss sees as ``μ``: ``"full"`` (the untruncated
        distribution) or ``"truncated"`` (the renormalised distribution actually sampled).
      return_entropy: record the sampler's entropy (``rollout/entropy_mean``).
      cache_segment: the KV cache's first size in response tokens, doubled up to ``max_new_tokens``
        (`rl_mismatch.sampler.cache_sizes`; 0: the budget at once). These sizes are also the
        response widths the update runs on (`rl_mismatch.sampler.response_bucket`): a smaller
        segment gives the update narrower batches when every reply is short, at one more
        compilation of the train step per size reached.
    """

    dtype: str = "bfloat16"
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    logp: str = "full"
    return_entropy: bool = False
    cache_segment: int = 64

    def __post_init__(self):
        try:
            parse_dtype(self.dtype)
        except ValueError as e:
            raise ValueError(f"config.sampler.dtype: {e}") from None
        _check_literal(self.logp, SamplerLogp, "sampler.logp")
        _require(self.temperature > 0, "sampler.temperature",
                 f"= {self.temperature} must be > 0: greedy decoding gives every sample of a GRPO group the "
                 "same response (zero advantages).")
        try:
            SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                           top_k=self.top_k, top_p=self.top_p, cache_segment=self.cache_segment)
        except ValueError as e:
            raise ValueError(f"config.sampler: {e}") from None


@dataclasses.dataclass(frozen=True)
class TrainerSettings:
    """The trainer's precision, and what its backward pass recomputes.

    Attributes:
      dtype: compute dtype of the forward/backward (master weights stay float32).
      n_microbatches: gradient accumulation steps per RL step (divides the batch).
      loss_scale_initial, loss_scale_growth_interval: dynamic loss scaling (float16 only).
      remat: ``Decoder(remat=...)``: "layer" keeps each layer's input and recomputes the rest,
        "projections" also keeps the projections' outputs, "none" keeps everything but SiLU's
        float32 intermediates.
      keep_logits: ``make_train_step(keep_logits=...)``: keep every LM-head chunk's float32
        logits for the backward pass instead of recomputing them.
      share_prompts: ``make_train_step(share_prompts=...)``: compute each GRPO group's prompt
        once in the forward and backward, not once per response.
      pack_multiple: with ``share_prompts``, lay each group's responses end to end after its
        prompt in the update (``train_step.packed_width(multiple=...)``), so the padding after
        short responses is not computed: the packed width is rounded up to a multiple of this
        (one compilation per multiple reached); 0 never packs.
      The last four trade memory, compute or compilations and change no number beyond summation
      order, so a run may resume with other values (benchmarks/README.md has CPU timings).
    """

    dtype: str = "float32"
    n_microbatches: int = 1
    loss_scale_initial: float = 2.0**15
    loss_scale_growth_interval: int = 2000
    remat: str = "layer"
    keep_logits: bool = False
    share_prompts: bool = True
    pack_multiple: int = 32

    def __post_init__(self):
        try:
            parse_dtype(self.dtype)
        except ValueError as e:
            raise ValueError(f"config.trainer.dtype: {e}") from None
        _check_literal(self.remat, Remat, "trainer.remat")
        _require(self.n_microbatches >= 1, "trainer.n_microbatches", f"= {self.n_microbatches} must be >= 1.")
        _require(self.pack_multiple >= 0, "trainer.pack_multiple",
                 f"= {self.pack_multiple} must be >= 0 (0: never pack).")
        _require(self.loss_scale_initial > 0 and self.loss_scale_growth_interval >= 1,
                 "trainer.loss_scale_initial", "must be > 0 and loss_scale_growth_interval >= 1.")


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """AdamW with gradient clipping and an LR multiplier (``rl_mismatch.optim``).

    ``lr_schedule="length_triggered"`` chains :func:`rl_mismatch.optim.length_triggered_decay`
    with the ``trigger_*`` constants; ``"constant"`` chains the same detector with
    ``decay_base = floor = 1`` so no surge moves the LR but ``lr/scale`` and the would-be surge
    step are still logged.

    The defaults (warmup 10, baseline window 50, threshold 3, period factor 1.8, floor 0.1) are
    those of a public re-implementation of arXiv 2602.01826; the paper gives no values.
    ``trigger_smoothing = 0`` compares the raw mean length with the threshold, as that
    re-implementation does; > 0 compares an EMA of it instead. ``trigger_warmup`` steps are
    ignored by the detector; ``trigger_linear_warmup = True`` also ramps the LR linearly over
    them (multiplier ``(t + 1) / trigger_warmup`` at step ``t < trigger_warmup``: the
    re-implementation's meaning of warmup), in both schedules, so a constant-LR run stays the
    twin of a length-triggered one up to the first decayed update.

    ``k3_trigger_threshold > 0`` chains a second detector, the same rule on the mismatch
    (:func:`rl_mismatch.optim.signal_triggered_decay` fed the previous step's ``mismatch/k3``):
    it fires when the (smoothed, if ``trigger_smoothing > 0``) k3 exceeds
    ``k3_trigger_threshold`` times its baseline. Both multipliers multiply. The ``trigger_*``
    window and decay constants apply to both; the linear warmup ramp only to the length
    detector (applied twice it would square).
    """

    learning_rate: float = 1e-6
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lr_schedule: str = "length_triggered"
    trigger_warmup: int = 10
    trigger_baseline_window: int = 50
    trigger_threshold: float = 3.0
    trigger_smoothing: float = 0.0
    trigger_decay_base: float = 0.5
    trigger_period_factor: float = 1.8
    trigger_floor: float = 0.1
    trigger_max_triggers: int = 1
    trigger_linear_warmup: bool = False
    k3_trigger_threshold: float = 0.0

    def __post_init__(self):
        _check_literal(self.lr_schedule, LrSchedule, "optim.lr_schedule")
        _require(self.k3_trigger_threshold >= 0, "optim.k3_trigger_threshold",
                 f"= {self.k3_trigger_threshold} must be >= 0 (0 = off).")
        _require(not (self.lr_schedule == "constant" and self.k3_trigger_threshold > 0),
                 "optim.k3_trigger_threshold", "must be 0 with lr_schedule='constant' (a constant LR "
                 "cannot decay on a k3 surge).")
        _require(self.learning_rate > 0 and math.isfinite(self.learning_rate), "optim.learning_rate",
                 f"= {self.learning_rate} must be a finite number > 0.")
        _require(self.grad_clip > 0, "optim.grad_clip", f"= {self.grad_clip} must be > 0.")
        for name in ("b1", "b2"):
            value = getattr(self, name)
            _require(0 <= value < 1, f"optim.{name}", f"= {value} must be in [0, 1) (an Adam moment decay).")
        _require(self.eps >= 0 and math.isfinite(self.eps), "optim.eps", f"= {self.eps} must be finite and >= 0.")
        _require(self.weight_decay >= 0 and math.isfinite(self.weight_decay), "optim.weight_decay",
                 f"= {self.weight_decay} must be finite and >= 0.")
        try:  # The detectors check the trigger_* constants themselves.
            self.optimizer()
        except ValueError as e:
            raise ValueError(f"config.optim (the trigger_* settings): {e}") from None

    def optimizer(self) -> optax.GradientTransformationExtraArgs:
        """``clip -> AdamW -> LR multiplier(s)``, an ``optax.named_chain``.

        Its ``update`` needs ``response_length=`` (the batch's mean response length) and, with
        ``k3_trigger_threshold > 0``, ``k3=`` (the previous step's ``mismatch/k3``). The
        multipliers scale the whole Adam update, i.e. they multiply the learning rate. The step logs
        ``lr/scale`` (their product) and each detector's ``lr/<name>/scale`` and
        ``lr/<name>/surge_step`` by its chain name, ``length_trigger`` or ``k3_trigger``
        (``rl_mismatch.train_step``); the experiment adds ``lr/value``.
        """
        constant = self.lr_schedule == "constant"
        window = dict(warmup=self.trigger_warmup, baseline_window=self.trigger_baseline_window,
                      smoothing=self.trigger_smoothing, period_factor=self.trigger_period_factor,
                      max_triggers=self.trigger_max_triggers)
        triggers = [("length_trigger", optim.length_triggered_decay(
            threshold=self.trigger_threshold,
            # A constant LR keeps the detector (lr/scale and the would-be surge step are logged)
            # but a multiplier pinned at 1 (after the linear warmup ramp, if any).
            decay_base=1.0 if constant else self.trigger_decay_base,
            floor=1.0 if constant else self.trigger_floor,
            linear_warmup=self.trigger_linear_warmup, **window))]
        if self.k3_trigger_threshold > 0:
            triggers.append(("k3_trigger", optim.signal_triggered_decay(
                "k3", threshold=self.k3_trigger_threshold, decay_base=self.trigger_decay_base,
                floor=self.trigger_floor, **window)))
        return optax.named_chain(
            ("clip", optax.clip_by_global_norm(self.grad_clip)),
            ("adamw", optax.adamw(self.learning_rate, b1=self.b1, b2=self.b2, eps=self.eps,
                                  weight_decay=self.weight_decay)),
            *triggers,
        )


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    """Attributes: every: save every N steps (and after the last); max_to_keep: kept on disk."""

    every: int = 10
    max_to_keep: int = 2

    def __post_init__(self):
        _require(self.every >= 1 and self.max_to_keep >= 1, "checkpoint.every",
                 "and checkpoint.max_to_keep must be >= 1.")


@dataclasses.dataclass(frozen=True)
class LogSettings:
    """Attributes:
    every: a progress log line every N steps.
    tensorboard: write event files.
    samples_every: every N-th step (from step 0) writes some of its rollouts to
      ``samples.jsonl`` and TensorBoard; 0: never.
    samples_per_step: how many rollouts (one reply to each prompt first, then a second, ...).
    profile_step: take a ``jax.profiler`` trace of this step (0-based: the sampling, scoring and
      update, waited for) into ``<workdir>/profile``; -1 = off. A step the run does not take
      (past ``steps``, or before a resumed run's start) is never traced. See docs/profiling.md.
    """

    every: int = 1
    tensorboard: bool = True
    samples_every: int = 10
    samples_per_step: int = 4
    profile_step: int = -1

    def __post_init__(self):
        _require(self.every >= 1, "log.every", f"= {self.every} must be >= 1.")
        _require(self.samples_every >= 0, "log.samples_every", f"= {self.samples_every} must be >= 0 (0: off).")
        _require(self.samples_per_step >= 1, "log.samples_per_step", f"= {self.samples_per_step} must be >= 1.")
        _require(self.profile_step >= -1, "log.profile_step",
                 f"= {self.profile_step} must be a step (>= 0), or -1 for no trace.")


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    """Where the trainer and the sampler run (``rl_mismatch.sharding.make_meshes``).

    Attributes:
      data, model: the trainer's ``(data, model)`` mesh over the first ``data * model`` devices;
        ``data=-1``: every device the sampler does not take.
      sampler_data, sampler_model: 0, 0 (default): the sampler shares the trainer's mesh. Both
        >= 1: the sampler gets a ``(sampler_data, sampler_model)`` mesh of its own on the last
        devices, e.g. on 8 devices ``data=-1, model=1, sampler_data=1, sampler_model=4`` trains
        FSDP over 4 devices while sampling tensor-parallel over the other 4. One process only.
    """

    data: int = -1
    model: int = 1
    sampler_data: int = 0
    sampler_model: int = 0

    def __post_init__(self):
        _require(self.model >= 1 and (self.data >= 1 or self.data == -1), "mesh.data",
                 f"= {self.data} / mesh.model = {self.model}: need data >= 1 (or -1) and model >= 1.")
        _require(self.sampler_data >= 0 and self.sampler_model >= 0
                 and (self.sampler_data > 0) == (self.sampler_model > 0), "mesh.sampler_data",
                 f"= {self.sampler_data} / mesh.sampler_model = {self.sampler_model}: both >= 1 for a "
                 "sampler mesh of its own, or both 0 to share the trainer's.")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Held-out evaluation (``rl_mismatch.evaluation``): greedy accuracy on the eval split.

    Attributes:
      every: evaluate before the update of every step ``s`` with ``s % every == 0`` (the policy
        that samples step ``s``: ``eval/*`` of step 0 is the starting model), and the trained
        policy after the last update (a row of its own at step ``steps``); 0 = off.
      batch_size: eval prompts per decode call, over all processes (0 = the whole split at once).
      max_new_tokens: the reply budget (0 = ``sampler.max_new_tokens``).
    """

    every: int = 0
    batch_size: int = 0
    max_new_tokens: int = 0

    def __post_init__(self):
        _require(self.every >= 0, "eval.every", f"= {self.every} must be >= 0 (0 = off).")
        _require(self.batch_size >= 0 and self.max_new_tokens >= 0, "eval.batch_size",
                 "and eval.max_new_tokens must be >= 0 (0 = the default).")


# Settings that may change between a run and its resumption (they do not change the training
# numbers: evaluation draws nothing and leaves the state alone; the data and model-cache
# directories are places, and what is stored there is a function of the other settings, so a
# run or study workdir can be moved); dotted for a setting in a group.
RESUMABLE_KEYS = ("steps", "checkpoint", "log", "eval", "trainer.remat", "trainer.keep_logits",
                  "trainer.share_prompts", "trainer.pack_multiple", "task.data_dir", "model.cache_dir")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One RL experiment. Build with :meth:`from_dict`; every field has a default.

    Attributes:
      seed: root of every PRNG key (model init, sampling, train step).
      steps: RL steps to run in total (a resumed run continues up to this).
    """

    seed: int = 0
    steps: int = 10
    model: ModelSettings = ModelSettings()
    task: TaskSettings = TaskSettings()
    rollout: RolloutSettings = RolloutSettings()
    sampler: SamplerSettings = SamplerSettings()
    trainer: TrainerSettings = TrainerSettings()
    optim: OptimSettings = OptimSettings()
    # The library's own config, in the spelling of a config file: the correction as a string.
    loss: losses.LossConfig = losses.LossConfig(correction="none")
    checkpoint: CheckpointSettings = CheckpointSettings()
    log: LogSettings = LogSettings()
    eval: EvalSettings = EvalSettings()
    mesh: MeshSettings = MeshSettings()

    def __post_init__(self):
        _require(self.seed >= 0, "seed", f"= {self.seed} must be >= 0.")
        _require(self.steps >= 1, "steps", f"= {self.steps} must be >= 1.")
        _require(self.task.overlong_buffer <= self.sampler.max_new_tokens, "task.overlong_buffer",
                 f"= {self.task.overlong_buffer} must be <= sampler.max_new_tokens = {self.sampler.max_new_tokens}: "
                 "the penalty ramps over the last overlong_buffer tokens of the budget (a longer buffer "
                 "penalises every response, even an empty one).")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ExperimentConfig:
        """Builds and validates a config from nested plain dicts (``ConfigDict.to_dict()``).

        Raises:
          ValueError: an unknown key, a value of the wrong type, or an invalid setting; the
            message names the key (``config.sampler.dtype``).
        """
        return _build(cls, values, "", cls())

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dicts of JSON types (the inverse of :meth:`from_dict`)."""
        return dataclasses.asdict(self)


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Checks ``value`` against a field's type hint; ints are accepted for floats.

    Of a union, the JSON type is checked (``str`` of ``str | CorrectionConfig | Correction``:
    a config file spells a correction as a string); a ``Literal`` is left to the dataclass.
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        options = [h for h in typing.get_args(hint) if h is not type(None)]
        plain = [h for h in options if h in (bool, int, float, str)]
        if len(plain) != 1:
            return value  # No single JSON type to check; the dataclass checks it.
        hint = plain[0]
        origin = typing.get_origin(hint)
    if origin is Literal:
        return value
    if hint is bool:
        _require(isinstance(value, bool), path, f"must be a bool, got {value!r}.")
    elif hint is int:
        _require(isinstance(value, int) and not isinstance(value, bool), path, f"must be an int, got {value!r}.")
    elif hint is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), path,
                 f"must be a number, got {value!r}.")
        value = float(value)
    elif hint is str:
        _require(isinstance(value, str), path, f"must be a string, got {value!r}.")
    elif origin is not None and issubclass(origin, Mapping):
        _require(isinstance(value, Mapping), path, f"must be a mapping, got {value!r}.")
        value = {str(k): (tuple(v) if isinstance(v, list) else v) for k, v in value.items()}
    return value


def _build(cls: type, values: Any, prefix: str, default: Any) -> Any:
    """``cls`` from ``values``, a key that ``values`` lacks taking its value in ``default``."""
    if not isinstance(values, Mapping):
        raise ValueError(f"config.{prefix.rstrip('.')} must be a group of settings, got {values!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        where = f"config.{prefix.rstrip('.')}" if prefix else "config"
        raise ValueError(f"Unknown config key(s) {[prefix + k for k in unknown]}; the keys of {where} are {names}.")
    kwargs = {name: getattr(default, name) for name in names if name not in values}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.", getattr(default, name))
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        if cls.__module__ == __name__:
            raise  # The settings defined here name their keys themselves.
        # A library class (losses.LossConfig) names the field first.
        raise ValueError(f"config.{prefix}{e}") from None


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "", *,
                       defaults: Mapping[str, Any] | None = None) -> list[str]:
    """``"key: old -> new"`` for every setting that differs, ignoring :data:`RESUMABLE_KEYS`.

    A setting that ``old`` lacks (a run made before the setting existed) counts as its default,
    so adding a setting with a default that keeps today's behaviour does not orphan old runs.
    """
    if defaults is None:
        defaults = ExperimentConfig().to_dict() if not prefix else {}
    out = []
    for key in sorted(set(old) | set(new)):
        if f"{prefix}{key}" in RESUMABLE_KEYS:
            continue
        default = defaults.get(key) if isinstance(defaults, Mapping) else None
        a, b = old.get(key, default), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping) and key != "kwargs":
            out += config_differences(a, b, f"{prefix}{key}.", defaults=default or {})
        elif _jsonable(a) != _jsonable(b):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
