"""Load time of SmolLM2-135M-Instruct: ``load_pretrained`` (cold and cached) vs transformers' GGUF loading.

    python benchmarks/load.py [--cache_dir=/tmp/x] [--skip_transformers]

The numbers are the loading itself: both sides are timed after a first, untimed load that
imports everything they import lazily (transformers imports its model, GGUF and tokenizer code
on first use, ~1.6 s here), and both report the best of ``--repeats`` loads. The cached load is
the figure the project promises to keep under 3 s on a 2-core CPU.
transformers' ``from_pretrained(gguf_file=...)`` requires ``accelerate``; when that is missing the
same steps are timed by hand (config from the GGUF, model init, ``load_gguf_checkpoint``,
``load_state_dict``) together with its GGUF tokenizer.
"""

import os
import tempfile

from absl import app, flags

from _common import machine, restart_with_huge_pages, timed

_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Cache directory (default: a fresh temporary one, so "
                                 "the first load is a real cold conversion).")
_SKIP_TRANSFORMERS = flags.DEFINE_bool("skip_transformers", False, "Time only rl_mismatch.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Loads to time on each side, after an untimed one (the minimum is reported).")


def _transformers_load(path):
    import torch
    import transformers

    directory, name = os.path.split(path)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    except ValueError as e:
        if "accelerate" not in str(e):
            raise
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = transformers.AutoConfig.from_pretrained(directory, gguf_file=name)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"],
                              strict=False)
        model.tie_weights()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return model, tokenizer


def main(argv):
    del argv
    from rl_mismatch.models import load_pretrained
    from rl_mismatch.models.loading import resolve_source

    path = resolve_source("smollm2-135m-instruct")
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = _CACHE_DIR.value or tmp
        cold, _, _ = timed(load_pretrained, path, cache_dir=cache_dir)
        cached = min(timed(load_pretrained, path, cache_dir=cache_dir)[0] for _ in range(_REPEATS.value))
    print(f"machine: {machine()}")
    print(f"rl_mismatch load_pretrained, first load (dequantize + write cache): {cold:6.2f} s")
    print(f"rl_mismatch load_pretrained, cached load (min of {_REPEATS.value}):          {cached:6.2f} s")
    if _SKIP_TRANSFORMERS.value:
        return
    _transformers_load(path)  # untimed: imports (as ours were, above) and the OS file cache
    theirs = min(timed(_transformers_load, path)[0] for _ in range(_REPEATS.value))
    print(f"transformers GGUF load (model + tokenizer, min of {_REPEATS.value}):         {theirs:6.2f} s")
    print(f"speed-up of the cached load: {theirs / cached:5.1f}x")


if __name__ == "__main__":
    restart_with_huge_pages()  # as the main job runs (rl_mismatch.host_memory)
    app.run(main)
