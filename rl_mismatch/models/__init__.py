"""The Llama / Qwen2 / Qwen3 decoder family: config, NNX decoder, KV cache, loading, tokenizer.

>>> from rl_mismatch.models import load_pretrained
>>> model, tok = load_pretrained("smollm2-135m-instruct")          # doctest: +SKIP
>>> ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])  # doctest: +SKIP
"""

from rl_mismatch.models.config import ModelConfig, tiny_config
from rl_mismatch.models.decoder import Decoder
from rl_mismatch.models.kv_cache import KVCache, grow_cache, init_cache
from rl_mismatch.models.loading import (
    from_hf_state_dict,
    load_pretrained,
    load_state_dict,
    save_pretrained,
    to_hf_state_dict,
)
from rl_mismatch.models.tokenizer import Tokenizer, tiny_chat_tokenizer

__all__ = [
    "Decoder",
    "KVCache",
    "ModelConfig",
    "Tokenizer",
    "from_hf_state_dict",
    "grow_cache",
    "init_cache",
    "load_pretrained",
    "load_state_dict",
    "save_pretrained",
    "tiny_chat_tokenizer",
    "tiny_config",
    "to_hf_state_dict",
]
