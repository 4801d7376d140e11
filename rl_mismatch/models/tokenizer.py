"""Tokenizer: HF ``tokenizers`` for text <-> ids, plus the model's Jinja chat template.

The interface follows HF ``transformers`` tokenizers where it overlaps, so users' habits carry
over: ``encode``/``decode``, ``bos_id``/``eos_id``/``pad_id`` and
``apply_chat_template(messages, add_generation_prompt=True)`` with HF message dicts
(``{"role": "user", "content": "..."}``). It is built either from an HF ``tokenizer.json``
(+ ``tokenizer_config.json`` / ``chat_template.jinja``) or from the vocabulary and merges inside
a GGUF file, and can be saved back to the HF files (which is how the GGUF cache stores it).

Chat templates are untrusted code from model files: they run in Jinja's immutable sandbox with
the same extras HF provides (``raise_exception``, ``strftime_now``, a non-escaping ``tojson``).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

if TYPE_CHECKING:
    from rl_mismatch.models.gguf_file import GGUFVocab

# GPT-2's split (what ByteLevel(use_regex=True) applies), spelled out for combining with others.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp `tokenizer.ggml.pre` -> the regexes applied in order before byte-level BPE (as in
# llama.cpp's llama-vocab.cpp). SmolLM's ("smollm") isolates every digit, then splits like GPT-2.
_GGUF_PRE_SPLITS = {
    "default": (_GPT2_SPLIT,),
    "gpt2": (_GPT2_SPLIT,),
    "smollm": (r"\p{N}", _GPT2_SPLIT),
    "starcoder": (r"\p{N}", _GPT2_SPLIT),
    "llama-bpe": (_LLAMA3_SPLIT,),
    "llama3": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
}

_CONTROL, _USER_DEFINED = 3, 4

# ChatML, the template of SmolLM2 and Qwen, for the tiny byte-level tokenizer.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Tokenizer:
    """Text <-> token ids, special ids, and chat-template rendering.

    Args:
      backend: the ``tokenizers.Tokenizer`` doing the work.
      bos_token, eos_token, pad_token, unk_token: special token strings (or ``None``).
      chat_template: Jinja source of the chat template (or ``None``).

    Example:
      >>> tok = Tokenizer.from_pretrained_dir("path/to/model")         # doctest: +SKIP
      >>> ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])  # doctest: +SKIP
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None, unk_token: str | None = None,
                 chat_template: str | None = None):
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.chat_template = chat_template
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            token = getattr(self, name)
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"The tokenizer's {name} {token!r} is not in its vocabulary.")

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_files(cls, tokenizer_json: str | os.PathLike, tokenizer_config: str | os.PathLike | None = None,
                   chat_template_file: str | os.PathLike | None = None,
                   defaults: Mapping[str, Any] | None = None) -> Tokenizer:
        """Loads ``tokenizer.json`` (+ optional ``tokenizer_config.json`` and ``chat_template.jinja``).

        Args:
          defaults: special token *ids* to fall back on (``bos_token_id`` ... from ``config.json``)
            where ``tokenizer_config.json`` names none.

        Raises:
          FileNotFoundError / ValueError: missing or unreadable files.
        """
        tokenizer_json = os.fspath(tokenizer_json)
        if not os.path.isfile(tokenizer_json):
            raise FileNotFoundError(f"Tokenizer file not found: {tokenizer_json!r} (a fast-tokenizer "
                                    "tokenizer.json is required; slow/sentencepiece-only tokenizers are not supported).")
        try:
            backend = tokenizers.Tokenizer.from_file(tokenizer_json)
        except Exception as e:
            raise ValueError(f"{tokenizer_json!r} is not a readable tokenizer.json: {e}") from e
        cfg: dict[str, Any] = {}
        if tokenizer_config is not None and os.path.isfile(tokenizer_config):
            cfg = _read_json(tokenizer_config)
        template = cfg.get("chat_template")
        if isinstance(template, list):  # Named templates: [{"name": "default", "template": ...}, ...].
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default", next(iter(named.values()), None))
        if chat_template_file is not None and os.path.isfile(chat_template_file):
            with open(chat_template_file, encoding="utf-8") as f:  # transformers >= 4.50 saves it apart.
                template = f.read()
        specials = {}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            token = cfg.get(name)
            if isinstance(token, dict):  # Serialized AddedToken.
                token = token.get("content")
            if token is None and defaults and defaults.get(f"{name}_id") is not None:
                token = backend.id_to_token(int(defaults[f"{name}_id"]))
            specials[name] = token
        return cls(backend, chat_template=template, **specials)

    @classmethod
    def from_pretrained_dir(cls, directory: str | os.PathLike, defaults: Mapping[str, Any] | None = None
                            ) -> Tokenizer:
        """Loads the tokenizer files of an HF model directory."""
        d = os.fspath(directory)
        return cls.from_files(os.path.join(d, "tokenizer.json"), os.path.join(d, "tokenizer_config.json"),
                              os.path.join(d, "chat_template.jinja"), defaults=defaults)

    @classmethod
    def from_gguf_vocab(cls, vocab: GGUFVocab) -> Tokenizer:
        """Builds a byte-level BPE from a GGUF file's vocabulary, merges and token types.

        Control tokens (type 3, e.g. ``<|im_start|>``) become special added tokens, user-defined
        ones (type 4) plain added tokens, so that both are matched whole in text.

        Raises:
          ValueError: a tokenizer model other than ``gpt2`` (byte-level BPE), an unknown
            pre-tokenizer, or malformed merges.
        """
        if vocab.model != "gpt2":
            raise ValueError(f"GGUF tokenizer model {vocab.model!r} is not supported; only byte-level BPE "
                             "('gpt2', used by SmolLM2, Llama 3 and Qwen) is.")
        pre = vocab.pre or "default"
        if pre not in _GGUF_PRE_SPLITS:
            raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: {sorted(_GGUF_PRE_SPLITS)}.")
        merges = []
        for merge in vocab.merges:
            parts = merge.split(" ")
            if len(parts) != 2:
                raise ValueError(f"Malformed BPE merge {merge!r} in the GGUF file (expected 'left right').")
            merges.append((parts[0], parts[1]))
        token_ids = {token: i for i, token in enumerate(vocab.tokens)}
        if len(token_ids) != len(vocab.tokens):
            raise ValueError("The GGUF vocabulary has duplicate tokens.")
        backend = tokenizers.Tokenizer(models.BPE(vocab=token_ids, merges=merges, fuse_unk=False,
                                                  ignore_merges=False))
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _GGUF_PRE_SPLITS[pre]]
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        types = vocab.token_types or [1] * len(vocab.tokens)
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, ty in zip(vocab.tokens, types) if ty == _CONTROL])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, ty in zip(vocab.tokens, types) if ty == _USER_DEFINED])

        def token(i):
            return vocab.tokens[i] if i is not None and 0 <= i < len(vocab.tokens) else None

        bos, eos = token(vocab.bos_id), token(vocab.eos_id)
        if vocab.add_bos or vocab.add_eos:  # Plain encoding adds them, as llama.cpp does.
            single = " ".join(([bos] if vocab.add_bos and bos else []) + ["$A"] + ([eos] if vocab.add_eos and eos else []))
            backend.post_processor = processors.TemplateProcessing(
                single=single, special_tokens=[(t, token_ids[t]) for t in {bos, eos} if t is not None])
        return cls(backend, bos_token=bos, eos_token=eos, pad_token=token(vocab.pad_id),
                   unk_token=token(vocab.unk_id), chat_template=vocab.chat_template)

    def save(self, directory: str | os.PathLike) -> None:
        """Writes ``tokenizer.json`` and ``tokenizer_config.json`` (HF-readable) into ``directory``."""
        d = os.fspath(directory)
        self.backend.save(os.path.join(d, "tokenizer.json"))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
               "eos_token": self.eos_token, "pad_token": self.pad_token, "unk_token": self.unk_token,
               "chat_template": self.chat_template}
        with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, ensure_ascii=False, indent=1)

    # ----------------------------------------------------------------- ids
    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        """The pad token's id; the EOS id where the model defines no pad token (padding is masked anyway)."""
        pad = self._id(self.pad_token)
        return self.eos_id if pad is None else pad

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # ----------------------------------------------------------------- text
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds BOS/EOS where the tokenizer's
        post-processor does (as HF's ``encode``)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = True, **kwargs) -> list[int] | str:
        """Renders ``messages`` with the model's chat template (HF semantics).

        The rendered text already contains the template's special tokens, so it is tokenized with
        ``add_special_tokens=False``, as HF does. Extra keyword arguments (``tools``,
        ``documents``, template-specific flags) are passed to the template.

        Raises:
          ValueError: the tokenizer has no chat template.
          jinja2.TemplateError: the template rejects the conversation (``raise_exception``).
        """
        if not self.chat_template:
            raise ValueError("This tokenizer has no chat template; pass plain text to encode() instead.")
        plain = json.loads(json.dumps(list(messages)))  # Plain dicts/lists: the template cannot mutate ours.
        context = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                   "pad_token": self.pad_token or "", "unk_token": self.unk_token or "",
                   "tools": None, "documents": None}
        context.update(kwargs)
        text = _compile(self.chat_template).render(messages=plain, add_generation_prompt=add_generation_prompt,
                                                   **context)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"pad={self.pad_token!r}, chat_template={'yes' if self.chat_template else 'no'})")


def tiny_chat_tokenizer() -> Tokenizer:
    """A byte-level tokenizer (one token per byte, no merges) with ChatML special tokens.

    Ids 0-255 are the bytes, then ``<|im_start|>``, ``<|im_end|>`` (EOS) and ``<pad>``: the
    tokenizer of the random ``tiny`` model of the experiments and tests.

    >>> tok = tiny_chat_tokenizer()
    >>> tok.vocab_size, tok.eos_id
    (259, 257)
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = tokenizers.Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>", "<pad>"])
    return Tokenizer(backend, eos_token="<|im_end|>", pad_token="<pad>", chat_template=CHATML_TEMPLATE)


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    """Compiles a chat template in an immutable sandbox with HF's globals and trimming rules."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant spans for HF's masks; render the body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson HTML-escapes; chat templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def _read_json(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{os.fspath(path)!r} is not valid JSON: {e}") from e
