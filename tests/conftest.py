"""Test-suite set-up: 8 fake CPU devices before JAX starts, so sharded code runs on a real mesh."""

import os

# Must happen before any backend is initialised; the env var covers subprocesses too.
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.extend  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Tests compare against float64 NumPy only where they say so; default stays float32.

# The runs the tests start as subprocesses (tiny experiments, chaos kills, studies, benchmarks)
# reuse each other's compiled programs through JAX's persistent compilation cache: a tiny run
# spends ~9 of its ~20 s compiling. One directory per xdist worker (its tests run one at a time),
# removed at exit. This process keeps the cache off, whatever the environment says:
# `count_compiles` counts backend compilations, and a cache hit would hide a recompilation.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

jax.config.update("jax_compilation_cache_dir", None)
_SUBPROCESS_CACHE = tempfile.mkdtemp(prefix=f"rl_mismatch_jax_cache_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}_")
atexit.register(shutil.rmtree, _SUBPROCESS_CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _SUBPROCESS_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import collections  # noqa: E402
import contextlib  # noqa: E402
import threading  # noqa: E402

import pytest  # noqa: E402

# jax.monitoring events of the three stages of a (re)compilation -> counter attribute.
_STAGES = {"/jax/core/compile/jaxpr_trace_duration": "traces",
           "/jax/core/compile/jaxpr_to_mlir_module_duration": "lowerings",
           "/jax/core/compile/backend_compile_duration": "n"}
_totals = dict.fromkeys(_STAGES.values(), 0)
_compiled_names = collections.Counter()  # backend compilations per (jitted function's name, thread's name)


def _on_duration_event(name, *args, **kwargs):
    if name in _STAGES:
        _totals[_STAGES[name]] += 1
    if name == "/jax/core/compile/backend_compile_duration":
        _compiled_names[kwargs.get("fun_name"), threading.current_thread().name] += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration_event)


class _Counter:
    """``n``: XLA backend compilations; ``traces``, ``lowerings``: jaxpr traces, MLIR lowerings;
    ``names``: the backend compilations per jitted function's name (e.g. ``"jit(_train_step)"``);
    ``threads``: per (name, the compiling thread's name)."""

    n = traces = lowerings = 0
    names: collections.Counter
    threads: collections.Counter


@contextlib.contextmanager
def _count_compiles():
    counter, start, start_names = _Counter(), dict(_totals), collections.Counter(_compiled_names)
    try:
        yield counter
    finally:
        for stage, total in _totals.items():
            setattr(counter, stage, total - start[stage])
        counter.threads = _compiled_names - start_names
        counter.names = collections.Counter()
        for (fun_name, _), count in counter.threads.items():
            counter.names[fun_name] += count


@pytest.fixture
def count_compiles():
    """``with count_compiles() as c: ...; assert c.n == 0``: XLA compilations inside the block.

    Counts real backend compilations (jax.monitoring), which is what "compiles nothing" means;
    a jitted function's ``_cache_size()`` is not reliable across a long pytest process.
    ``c.traces`` and ``c.lowerings`` count the earlier stages (a retrace that hits the
    compilation cache still shows there); ``c.names["jit(_train_step)"]``, one function's compilations
    (from any thread), ``c.threads["jit(_train_step)", "MainThread"]`` those from one thread.
    """
    return _count_compiles


def _jaxpr_eqns(closed_jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside it, each with how many times it runs per
    call of the whole: the product of the lengths of the scans around it (1 elsewhere)."""
    todo = [(closed_jaxpr.jaxpr, 1)]
    while todo:
        jaxpr, times = todo.pop()
        for e in jaxpr.eqns:
            inner = times * (e.params["length"] if e.primitive.name == "scan" else 1)
            todo.extend((j.jaxpr if hasattr(j, "jaxpr") else j, inner)
                        for j in jax.extend.core.jaxprs_in_params(e.params))
            yield e, times


@pytest.fixture
def jaxpr_eqns():
    """``for eqn, times in jaxpr_eqns(jax.make_jaxpr(f)(...)): ...``: every equation, nested ones
    included, with its repeat count per call (`_jaxpr_eqns`)."""
    return _jaxpr_eqns


def _lay_out_hf_cache(cache, repo_id, files, *, commit=None, refs=("main",)):
    """Writes ``files`` ({name: source path}) into ``cache`` as huggingface_hub lays a download out.

    ``models--<org>--<name>/blobs/<etag>`` holds each file once (etag: the SHA-256 of an LFS file
    such as weights, the git blob SHA-1 of a small one), ``snapshots/<commit>/<name>`` is a
    relative symlink to its blob, and ``refs/<ref>`` holds the commit hash. Returns the snapshot.
    """
    import hashlib

    repo = os.path.join(os.fspath(cache), "models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
    snapshot = os.path.join(repo, "snapshots", commit)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(snapshot, exist_ok=True)
    for name, source in files.items():
        with open(source, "rb") as f:
            data = f.read()
        if name.endswith(".safetensors"):
            etag = hashlib.sha256(data).hexdigest()
        else:
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = os.path.join(repo, "blobs", etag)
        if not os.path.exists(blob):
            with open(blob, "wb") as f:
                f.write(data)
        link = os.path.join(snapshot, name)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    for ref in refs:
        os.makedirs(os.path.dirname(os.path.join(repo, "refs", ref)), exist_ok=True)
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit)  # huggingface_hub writes the bare hash, no newline.
    return snapshot


@pytest.fixture
def hf_cache_layout():
    """``hf_cache_layout(cache, repo_id, {name: path}, commit=None, refs=("main",)) -> snapshot dir``:
    a local Hugging Face cache laid out as ``huggingface_hub`` lays out a download."""
    return _lay_out_hf_cache


def _tiny_experiment_config(**overrides):
    """``experiments/configs/tiny.py``'s config with dotted overrides applied, as an
    ``ExperimentConfig`` (validated: a bad value raises ``ValueError`` here)."""
    import importlib

    from rl_mismatch.experiment_config import ExperimentConfig

    values = importlib.import_module("experiments.configs.tiny").get_config(None).to_dict()
    for dotted, value in overrides.items():
        *groups, key = dotted.split(".")
        node = values
        for g in groups:
            node = node[g]
        node[key] = value
    return ExperimentConfig.from_dict(values)


@pytest.fixture(scope="session")
def tiny_cfg():
    """``tiny_cfg(steps=2, **{"sampler.dtype": "fp16"}) -> ExperimentConfig``: the tiny
    experiment config with dotted overrides. Session-scoped, so module fixtures can use it."""
    return _tiny_experiment_config
