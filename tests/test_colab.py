"""The Colab notebooks run end to end (at tiny size, with their parameters overridden).

Code cells are executed in order in one namespace, which is what a notebook kernel does; shell
lines (``!pip ...``) are Colab set-up and are skipped. No Jupyter kernel is needed.
"""

import json
import pathlib

import matplotlib
import pytest

COLAB = pathlib.Path(__file__).resolve().parent.parent / "colab"
TINY = {
    "fp16_vs_bf16_mismatch.ipynb": {"MODEL": "tiny", "N_PROMPTS": 4, "MAX_NEW_TOKENS": 8},
}


def _run_notebook(path: pathlib.Path, overrides: dict):
    matplotlib.use("Agg")
    namespace: dict = {}
    for i, cell in enumerate(json.loads(path.read_text())["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = "".join(line for line in cell["source"] if not line.lstrip().startswith(("!", "%")))
        exec(compile(source, f"{path.name}[cell {i}]", "exec"), namespace)
        # Parameters are overridden right after the cell that defines them.
        namespace.update({k: v for k, v in overrides.items() if k in namespace})
    return namespace


def test_every_notebook_has_tiny_parameters():
    assert sorted(p.name for p in COLAB.glob("*.ipynb")) == sorted(TINY)


@pytest.mark.parametrize("name", sorted(TINY))
def test_notebook_runs(name):
    ns = _run_notebook(COLAB / name, TINY[name])
    if name.startswith("fp16"):
        assert set(ns["results"]) == {"float32", "bfloat16", "float16"}
        assert all(float(m["mismatch/n_tokens"]) > 0 for m in ns["results"].values())
