"""Reading llama.cpp GGUF files into an HF-layout config, state dict and vocabulary.

A GGUF file holds three things this module turns into their HF equivalents:

* metadata (``llama.block_count``, ``llama.attention.head_count``, ...) -> an HF ``config.json``
  dict that :meth:`ModelConfig.from_hf_config` accepts;
* tensors, possibly quantized, under llama.cpp names (``blk.3.attn_q.weight``) -> float32 NumPy
  arrays in the torch ``[out, in]`` layout under HF names
  (``model.layers.3.self_attn.q_proj.weight``);
* the tokenizer pieces (``tokenizer.ggml.tokens``, ``merges``, ``token_type``, special ids, chat
  template) -> a :class:`GGUFVocab`, from which :mod:`rl_mismatch.models.tokenizer` builds a
  ``tokenizers`` BPE.

Dequantization is the ``gguf`` package's own (``gguf.quants.dequantize``): F32, F16, BF16, Q4_0,
Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, the IQ/TQ families and MXFP4 in gguf 0.19. Any other type
raises a ``ValueError`` naming the tensor and the type.

RoPE layout: ``convert_hf_to_gguf.py`` permutes the rows of ``q_proj``/``k_proj`` for the
``llama`` architecture only, so that llama.cpp can rotate adjacent pairs (GPT-J style) where HF
rotates the two halves of each head (GPT-NeoX style). Within each head of width ``hd`` it maps
HF row ``i*hd/2 + j`` (half ``i`` in {0, 1}, pair ``j``) to GGUF row ``2*j + i``. We invert that
exactly (:func:`unpermute_rope_rows`). ``qwen2``/``qwen3`` use NeoX RoPE in llama.cpp too and are
written unpermuted, so their tensors are taken as they are.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

# llama.cpp `general.architecture` -> (HF architecture, HF model_type, q/k rows permuted for RoPE).
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", False),
}

# llama.cpp per-block tensor name -> HF per-layer module path.
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GLOBAL_NAME = re.compile(r"^([a-z_]+)\.(weight|bias)$")

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
TOKEN_TYPE_NORMAL, TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 1, 2, 3, 4


@dataclasses.dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer a GGUF file describes (``tokenizer.*`` metadata).

    Attributes:
      model: ``tokenizer.ggml.model``; ``"gpt2"`` is byte-level BPE (the only kind supported).
      pre: ``tokenizer.ggml.pre``, the pre-tokenizer (how text is split before BPE).
      tokens: the vocabulary, token id = list index, spelled in the byte-level alphabet.
      merges: BPE merges, ``"left right"``, highest priority first.
      token_types: per-token llama.cpp type (3 = control, 4 = user-defined), or ``None``.
      bos_id, eos_id, pad_id, unk_id: special token ids, ``None`` when the file has none.
      add_bos, add_eos: whether plain encoding adds BOS / EOS.
      chat_template: the Jinja chat template, or ``None``.
    """

    model: str
    pre: str | None
    tokens: list[str]
    merges: list[str]
    token_types: list[int] | None
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None


@dataclasses.dataclass(frozen=True)
class GGUFCheckpoint:
    """Everything :func:`read_gguf` extracts from one file."""

    hf_config: dict[str, Any]
    state_dict: dict[str, np.ndarray]
    vocab: GGUFVocab


def hf_tensor_name(gguf_name: str) -> str:
    """Maps a llama.cpp tensor name to its HF name.

    >>> hf_tensor_name("blk.7.attn_q.weight")
    'model.layers.7.self_attn.q_proj.weight'
    >>> hf_tensor_name("output_norm.weight")
    'model.norm.weight'

    Raises:
      ValueError: a tensor this decoder has no slot for (its weights would be silently lost).
    """
    if m := _BLOCK_NAME.match(gguf_name):
        layer, kind, suffix = m.groups()
        if kind in _BLOCK_TENSORS:
            return f"model.layers.{layer}.{_BLOCK_TENSORS[kind]}.{suffix}"
    elif m := _GLOBAL_NAME.match(gguf_name):
        kind, suffix = m.groups()
        if kind in _GLOBAL_TENSORS:
            return f"{_GLOBAL_TENSORS[kind]}.{suffix}"
    if gguf_name == "rope_freqs.weight":
        raise ValueError(
            "The GGUF file carries 'rope_freqs.weight' (Llama-3.1-style RoPE frequency scaling), "
            "which this decoder does not implement.")
    raise ValueError(
        f"GGUF tensor {gguf_name!r} has no counterpart in the Llama/Qwen2/Qwen3 decoder "
        "(unsupported architecture variant?).")


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation for interleaved RoPE (see module docstring).

    Per head, GGUF row ``2*j + i`` goes back to HF row ``i*hd/2 + j``. Works on weights
    ``[n_heads*hd, d]`` and biases ``[n_heads*hd]``.

    >>> unpermute_rope_rows(np.array([0, 2, 1, 3, 4, 6, 5, 7]), n_heads=2).tolist()
    [0, 1, 2, 3, 4, 5, 6, 7]
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"Cannot undo the RoPE permutation: {rows} rows are not {n_heads} heads of even width.")
    half = rows // n_heads // 2
    return np.ascontiguousarray(w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def read_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Reads a GGUF file: HF config dict, float32 HF state dict, and vocabulary.

    Raises:
      FileNotFoundError: no such file.
      ValueError: not a GGUF file, truncated or corrupt; an architecture other than
        llama/qwen2/qwen3; a quantization type ``gguf`` cannot dequantize; an unknown tensor.
    """
    import gguf  # Only needed on a cache miss; the cached path never imports it.

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path!r}.")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path!r} is not a GGUF file (its first bytes are {magic!r}, expected b'GGUF').")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # The reader raises bare ValueError/IndexError/struct errors on bad bytes.
        raise ValueError(f"{path!r} is truncated or corrupt: the GGUF reader failed with "
                         f"{type(e).__name__}: {e}") from e
    metadata = _read_metadata(reader)
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"Unsupported GGUF architecture {arch!r} in {path!r}; supported: "
                         f"{sorted(ARCHITECTURES)} (the Llama/Qwen2/Qwen3 decoder family).")
    hf_config = hf_config_from_metadata(metadata, {t.name: _numpy_shape(t) for t in reader.tensors})
    permuted = ARCHITECTURES[arch][2]
    n_heads = hf_config["num_attention_heads"]
    n_kv_heads = hf_config["num_key_value_heads"]
    state_dict = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        w = _dequantize(tensor, path)
        if permuted and ".self_attn.q_proj." in name:
            w = unpermute_rope_rows(w, n_heads)
        elif permuted and ".self_attn.k_proj." in name:
            w = unpermute_rope_rows(w, n_kv_heads)
        state_dict[name] = w
    return GGUFCheckpoint(hf_config=hf_config, state_dict=state_dict, vocab=vocab_from_metadata(metadata))


def hf_config_from_metadata(metadata: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]
                            ) -> dict[str, Any]:
    """Builds an HF ``config.json`` dict from GGUF metadata and the tensors' (NumPy-order) shapes.

    The vocabulary size is the embedding's row count (the tokenizer may be smaller); embeddings
    are tied iff the file has no ``output.weight``.
    """
    arch = metadata["general.architecture"]
    hf_arch, model_type, _ = ARCHITECTURES[arch]

    def get(key, default=None):
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks '{arch}.{key}', needed to build the model config.")
        if isinstance(value, list):
            raise ValueError(f"GGUF metadata '{arch}.{key}' varies per layer ({value[:4]}...); "
                             "this decoder needs one value for all layers.")
        return value

    if "token_embd.weight" not in tensor_shapes:
        raise ValueError("The GGUF file has no 'token_embd.weight' tensor.")
    vocab_size, d_model = tensor_shapes["token_embd.weight"]
    n_heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", d_model // n_heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise ValueError("GGUF attention.key_length != attention.value_length; not supported.")
    rope_dims = int(get("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ValueError(f"Partial rotary embedding (rope.dimension_count={rope_dims} < head_dim={head_dim}) "
                         "is not implemented.")
    config = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": int(vocab_size),
        "hidden_size": int(get("embedding_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "intermediate_size": int(get("feed_forward_length")),
        "rope_theta": _from_float32(get("rope.freq_base", 10000.0)),
        "rms_norm_eps": _from_float32(get("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(get("context_length")),
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        "attention_bias": "blk.0.attn_q.bias" in tensor_shapes,
        "hidden_act": "silu",
    }
    scaling = metadata.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        # Passed on so that ModelConfig.from_hf_config rejects it with its own message.
        config["rope_scaling"] = {"rope_type": scaling,
                                  "factor": metadata.get(f"{arch}.rope.scaling.factor")}
    for key, field in (("bos_token_id", "tokenizer.ggml.bos_token_id"),
                       ("eos_token_id", "tokenizer.ggml.eos_token_id"),
                       ("pad_token_id", "tokenizer.ggml.padding_token_id")):
        if field in metadata:
            config[key] = int(metadata[field])
    return config


def vocab_from_metadata(metadata: Mapping[str, Any]) -> GGUFVocab:
    """Collects the ``tokenizer.*`` metadata into a :class:`GGUFVocab`."""
    if "tokenizer.ggml.tokens" not in metadata:
        raise ValueError("The GGUF file has no tokenizer (no 'tokenizer.ggml.tokens').")

    def opt_int(key):
        return int(metadata[key]) if key in metadata else None

    types = metadata.get("tokenizer.ggml.token_type")
    return GGUFVocab(
        model=str(metadata.get("tokenizer.ggml.model", "")),
        pre=metadata.get("tokenizer.ggml.pre"),
        tokens=list(metadata["tokenizer.ggml.tokens"]),
        merges=list(metadata.get("tokenizer.ggml.merges", [])),
        token_types=[int(t) for t in types] if types is not None else None,
        bos_id=opt_int("tokenizer.ggml.bos_token_id"),
        eos_id=opt_int("tokenizer.ggml.eos_token_id"),
        pad_id=opt_int("tokenizer.ggml.padding_token_id"),
        unk_id=opt_int("tokenizer.ggml.unknown_token_id"),
        add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        add_eos=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=metadata.get("tokenizer.chat_template"),
    )


def _read_metadata(reader) -> dict[str, Any]:
    """Key -> Python value (str, int, float, bool, or list of those) for every metadata field."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # Header pseudo-fields (version, counts).
            continue
        try:
            out[key] = field.contents()
        except Exception as e:
            raise ValueError(f"GGUF metadata field {key!r} is corrupt: {type(e).__name__}: {e}") from e
    return out


def _from_float32(value) -> float:
    """The shortest decimal that a float32 metadata value came from: 1e-5 stored as float32 reads
    back as 9.99999974e-06; the converter was given 1e-5, and HF configs say 1e-5.

    >>> _from_float32(9.999999747378752e-06)
    1e-05
    """
    return float(str(np.float32(value)))


def _numpy_shape(tensor) -> tuple[int, ...]:
    # GGUF stores ggml's `ne` (fastest dimension first); NumPy/torch order is the reverse.
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def _dequantize(tensor, path: str) -> np.ndarray:
    """One tensor as float32 in NumPy (torch) order; unsupported types name tensor and type."""
    from gguf.quants import dequantize

    qtype = tensor.tensor_type
    try:
        w = dequantize(tensor.data, qtype)
    except NotImplementedError:
        raise ValueError(
            f"GGUF tensor {tensor.name!r} in {path!r} uses quantization type {qtype.name}, which the "
            "gguf package cannot dequantize; supported include F32, F16, BF16, Q4_0, Q4_1, Q5_0, "
            "Q5_1, Q8_0, Q2_K-Q6_K. Re-quantize the model to one of those.") from None
    except Exception as e:  # Short data from a truncated file surfaces here as a reshape error.
        raise ValueError(f"GGUF tensor {tensor.name!r} in {path!r} could not be decoded ({qtype.name}): "
                         f"{type(e).__name__}: {e}. The file is probably truncated or corrupt.") from e
    shape = _numpy_shape(tensor)
    if w.shape != shape:
        raise ValueError(f"GGUF tensor {tensor.name!r} in {path!r} decoded to shape {w.shape}, but its header "
                         f"says {shape}; the file is probably truncated or corrupt.")
    # Copy out of the memory map (and out of float16 etc.) so the file can be closed/replaced.
    return np.array(w, dtype=np.float32, copy=True)
