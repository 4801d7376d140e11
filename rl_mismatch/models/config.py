"""Model configuration for the Llama / Qwen2 / Qwen3 / SmolLM2 decoder family."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# HF `architectures[0]` -> (qkv_bias, qk_norm). Everything else is read from the config.
_ARCHITECTURES = {
    "LlamaForCausalLM": (False, False),
    "MistralForCausalLM": (False, False),
    "Qwen2ForCausalLM": (True, False),
    "Qwen3ForCausalLM": (False, True),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static shape and numerics of a decoder. Frozen, hashable, so it can be a jit static arg.

    Attributes:
      vocab_size: rows of the embedding table (may exceed the tokenizer's vocabulary).
      d_model: residual width.
      n_layers: number of decoder blocks.
      n_heads: query heads.
      n_kv_heads: key/value heads (grouped-query attention when < n_heads).
      head_dim: per-head width (usually d_model // n_heads; Qwen3 sets it explicitly).
      d_ff: SwiGLU hidden width.
      rope_theta: RoPE base frequency.
      rms_eps: RMSNorm epsilon.
      tie_embeddings: output projection is the transposed input embedding.
      qkv_bias: q/k/v projections carry a bias (Qwen2).
      qk_norm: RMSNorm over each head of q and k before RoPE (Qwen3).
      max_seq_len: context length the model was trained for.
      architecture: the HF architecture name this config came from (informational).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False
    max_seq_len: int = 2048
    architecture: str = "LlamaForCausalLM"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                     "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}.")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; "
                "grouped-query attention needs every KV head to serve the same number of query heads.")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings.")
        if self.rope_theta <= 0 or self.rms_eps <= 0:
            raise ValueError("rope_theta and rms_eps must be positive.")

    @property
    def n_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        attn = self.d_model * self.head_dim * (self.n_heads * 2 + self.n_kv_heads * 2)
        if self.qkv_bias:
            attn += self.head_dim * (self.n_heads + 2 * self.n_kv_heads)
        if self.qk_norm:
            attn += 2 * self.head_dim
        block = attn + 3 * self.d_model * self.d_ff + 2 * self.d_model
        emb = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        return self.n_layers * block + emb + self.d_model

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """Builds a config from a HF ``config.json`` dict.

        Raises:
          ValueError: the architecture is not one this decoder implements, or a field is
            missing.
        """
        archs = hf.get("architectures") or [None]
        arch = archs[0]
        if arch not in _ARCHITECTURES:
            raise ValueError(
                f"Unsupported architecture {arch!r}; supported: {sorted(_ARCHITECTURES)}. "
                "The decoder implements the Llama/Qwen2/Qwen3 family only.")
        qkv_bias, qk_norm = _ARCHITECTURES[arch]
        try:
            n_heads = int(hf["num_attention_heads"])
            d_model = int(hf["hidden_size"])
            rope_theta = hf.get("rope_theta")
            if rope_theta is None:  # transformers >= 5 nests it under rope_parameters.
                rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
            scaling = hf.get("rope_scaling") or (hf.get("rope_parameters") or {})
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            if rope_type not in (None, "default"):
                raise ValueError(
                    f"RoPE scaling type {rope_type!r} is not implemented; only the default "
                    "(unscaled) rotary embedding is.")
            if hf.get("use_sliding_window") and hf.get("sliding_window"):
                raise ValueError(
                    f"Sliding-window attention (use_sliding_window, window {hf['sliding_window']}) is not "
                    "implemented: this decoder attends to the whole context, so it would differ from the "
                    "model past the window.")
            return cls(
                vocab_size=int(hf["vocab_size"]),
                d_model=d_model,
                n_layers=int(hf["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
                head_dim=int(hf.get("head_dim") or d_model // n_heads),
                d_ff=int(hf["intermediate_size"]),
                rope_theta=float(rope_theta),
                rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=bool(hf.get("attention_bias", qkv_bias)) or qkv_bias,
                qk_norm=qk_norm,
                max_seq_len=int(hf.get("max_position_embeddings", 2048)),
                architecture=arch,
            )
        except KeyError as e:
            raise ValueError(f"config.json lacks the field {e.args[0]!r} needed for {arch}.") from None

    def to_hf_config(self) -> dict[str, Any]:
        """The HF ``config.json`` fields that describe this model (inverse of ``from_hf_config``)."""
        model_type = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                      "MistralForCausalLM": "mistral"}.get(self.architecture, "llama")
        # Mistral's and Qwen's configs default to (or may carry) a sliding window; this decoder
        # attends to the whole context, so the config says so.
        window = {"mistral": {"sliding_window": None}, "qwen2": {"use_sliding_window": False},
                  "qwen3": {"use_sliding_window": False}}.get(model_type, {})
        return {
            "architectures": [self.architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.d_ff,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": self.qkv_bias,
            "max_position_embeddings": self.max_seq_len,
            "hidden_act": "silu",
            **window,
        }


def tiny_config(**overrides) -> ModelConfig:
    """A small random-init config for unit tests and the ``tiny`` experiment."""
    fields = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                  d_ff=128, rope_theta=10000.0, rms_eps=1e-6, tie_embeddings=True, max_seq_len=512)
    fields.update(overrides)
    return ModelConfig(**fields)


# Published ``config.json`` values of known models (the Qwen/Qwen3-4B and Qwen/Qwen3-1.7B model
# cards on the Hugging Face Hub), the fields `ModelConfig.from_hf_config` reads. For shapes
# without weights: memory and step-time planning (experiments/plan.py), abstract compilation.
_QWEN3_SHARED = {
    "architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936, "head_dim": 128, "num_key_value_heads": 8,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "attention_bias": False,
    "max_position_embeddings": 40960, "use_sliding_window": False,
}
KNOWN_CONFIGS: Mapping[str, Mapping[str, Any]] = {
    "qwen3-4b": {**_QWEN3_SHARED, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
                 "num_attention_heads": 32},
    "qwen3-1.7b": {**_QWEN3_SHARED, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
                   "num_attention_heads": 16},
}


def known_config(name: str, **overrides) -> ModelConfig:
    """The `ModelConfig` of a model in ``KNOWN_CONFIGS`` (name case-insensitive), fields replaced
    by ``overrides`` (e.g. ``max_seq_len``).

    >>> cfg = known_config("qwen3-4b")
    >>> cfg.n_layers, cfg.qk_norm, round(cfg.n_params / 1e9, 2)
    (36, True, 4.02)

    Raises:
      ValueError: an unknown name.
    """
    hf = KNOWN_CONFIGS.get(name.lower())
    if hf is None:
        raise ValueError(f"No known config {name!r}; known: {sorted(KNOWN_CONFIGS)} (or 'tiny' for tiny_config()).")
    return dataclasses.replace(ModelConfig.from_hf_config(hf), **overrides)
