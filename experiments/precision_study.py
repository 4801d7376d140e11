r"""Where does the sampler/trainer mismatch come from? Samples once, rescores every way.

    python -m experiments.precision_study --out=/tmp/precision_study
    python -m experiments.precision_study --model=tiny --num_prompts=8 --max_new_tokens=16 --out=/tmp/ps

Writes results.json, results.md and log_ratios.png into --out. The computation is
``rl_mismatch.precision_study`` (read its docstring for what each row compares), the tables and
the plot ``experiments.precision_report``.
``--model=tiny`` uses a random tiny decoder and random prompts (a smoke test of the pipeline).
"""

if __name__ == "__main__":  # first, before the imports below: the restart runs this script anew
    from rl_mismatch.host_memory import restart_with_huge_pages

    restart_with_huge_pages()  # huge-page-backed malloc mappings, see rl_mismatch.host_memory

import os
import time

import jax
from absl import app, flags
from flax import nnx
from tqdm import tqdm

from experiments import compile_cache, precision_report
from rl_mismatch import precision_study as ps
from rl_mismatch.models import Decoder, load_pretrained, tiny_config

_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct",
                             "load_pretrained source (name, .gguf, HF dir) or 'tiny'.")
_TASK = flags.DEFINE_string("task", "chain_sum", "reasoning-gym task the prompts come from.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 64, "Prompts (one response each).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "Response budget.")
_TOP_P = flags.DEFINE_float("top_p", 0.9, "Truncation of the second sample set (1: skip that factor).")
_BATCH1_ROWS = flags.DEFINE_integer("batch1_rows", 16, "Rows rescored alone for the batch-shape factor.")
_DTYPES = flags.DEFINE_list("dtypes", list(ps.DTYPES), "Precisions of the grid (must include float32).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampler key and task-generation seed.")
_OUT = flags.DEFINE_string("out", "/tmp/precision_study", "Output directory.")
_EXCESS_PRECISION = flags.DEFINE_bool(
    "xla_excess_precision", True,
    "XLA's default (True): fusions may keep bf16/fp16 intermediates in float32, and which ones depends "
    "on the shapes. False sets --xla_allow_excess_precision=false so every rounding happens.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the task dataset is prepared (default: <out>/data).")


def main(argv):
    del argv
    start = time.perf_counter()
    if not _EXCESS_PRECISION.value:
        # Read when the XLA backend starts, which is below (nothing has touched a device yet).
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false"
    # JAX's cache key includes XLA_FLAGS: programs compiled without that flag are never read here.
    print(f"XLA compilation cache: {compile_cache.enable()}.")
    if _MODEL.value == "tiny":
        model = Decoder(tiny_config(), rngs=nnx.Rngs(_SEED.value))
        prompts = ps.random_prompts(_NUM_PROMPTS.value, model.config.vocab_size, seed=_SEED.value)
        eos_ids, pad_id = (), 0
    else:
        model, tok = load_pretrained(_MODEL.value, dtype="float32", param_dtype="float32")
        data_dir = _DATA_DIR.value or os.path.join(_OUT.value, "data")
        prompts = ps.render_task_prompts(tok, _TASK.value, _NUM_PROMPTS.value, data_dir, seed=_SEED.value)
        eos_ids, pad_id = (tok.eos_id,), tok.pad_id
    cfg = ps.StudyConfig(dtypes=tuple(_DTYPES.value), max_new_tokens=_MAX_NEW_TOKENS.value, top_p=_TOP_P.value,
                         eos_ids=eos_ids, pad_id=pad_id, batch1_rows=_BATCH1_ROWS.value, seed=_SEED.value)
    with tqdm(total=len(ps.study_stages(cfg, len(prompts))), desc="precision study", unit="stage") as bar:
        def progress(stage):
            bar.set_postfix_str(stage)
            bar.update()
        results = ps.run_study(model, prompts, jax.random.key(_SEED.value), cfg, progress=progress)
    results["model"] = _MODEL.value
    results["task"] = None if _MODEL.value == "tiny" else _TASK.value
    results["xla_allow_excess_precision"] = _EXCESS_PRECISION.value
    results["wall_s"] = round(time.perf_counter() - start, 1)
    paths = precision_report.write_report(results, _OUT.value)
    print(precision_report.markdown_table(results))
    print(f"wrote {', '.join(paths.values())} in {results['wall_s']} s")


if __name__ == "__main__":
    app.run(main)
