"""The Colab notebooks run end to end (at tiny size, with their parameters overridden).

Code cells are executed in order in one namespace, which is what a notebook kernel does; shell
lines (``!pip ...``) are Colab set-up and are skipped. No Jupyter kernel is needed.
"""

import json
import pathlib
import tempfile

import matplotlib
import pytest

COLAB = pathlib.Path(__file__).resolve().parent.parent / "colab"
TINY = {
    "fp16_vs_bf16_mismatch.ipynb": {"MODEL": "tiny", "N_PROMPTS": 4, "MAX_NEW_TOKENS": 8},
    # A threshold below 1 fires at the first step after the tiny config's baseline (steps 1-2), so
    # the multiplier first halves at step 1 + round(1.8 * 3) = 6.
    "length_triggered_lr.ipynb": {"MODEL": "tiny", "STEPS": 8, "TRIGGER_THRESHOLD": 0.5},
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
def test_notebook_runs(name, tmp_path, monkeypatch):
    # The notebook's own default run directory (a mkdtemp, made before the override) goes under
    # tmp_path too, not into the system's temporary directory.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ns = _run_notebook(COLAB / name, {**TINY[name], "RUN_DIR": str(tmp_path)})
    if name.startswith("fp16"):
        assert set(ns["results"]) == {"float32", "bfloat16", "float16"}
        assert all(float(m["mismatch/n_tokens"]) > 0 for m in ns["results"].values())
    if name.startswith("length"):
        # The synthetic surge (from ~step 60) fires the rule once, after the baseline is complete.
        assert ns["WARMUP"] + ns["WINDOW"] <= ns["surge"] < 75 and min(ns["scales"]) < 1
        assert 190 < ns["baseline"] < 210  # The trace's flat part: 200 tokens +- 5% noise.
        const, decayed = ns["rows"]["constant"], ns["rows"]["length_triggered"]
        assert [r["step"] for r in const] == [r["step"] for r in decayed] == list(range(8))
        assert ns["rl_surge"] == int(const[-1]["lr/surge_step"]) == 3 and ns["lowered"] == 6
        assert all(r["lr/scale"] == 1 for r in const) and decayed[6]["lr/scale"] == 0.5
        # Same seed: the runs agree until the first update taken with a smaller LR, which is that
        # update halved (the multiplier scales Adam's update; the gradients are still the same).
        for a, b in zip(const[:7], decayed):
            assert a["rollout/response_length_mean"] == b["rollout/response_length_mean"]
            assert a["mismatch/k3"] == b["mismatch/k3"] and a["opt/grad_norm"] == b["opt/grad_norm"]
        assert decayed[6]["opt/update_norm"] == pytest.approx(0.5 * const[6]["opt/update_norm"], rel=1e-5)
        assert decayed[7]["opt/param_norm"] != const[7]["opt/param_norm"]
