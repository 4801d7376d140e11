"""experiments/compile_cache.py: the scripts' default persistent compilation cache."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from experiments import compile_cache

REPO = pathlib.Path(__file__).resolve().parent.parent

_ZEN5 = {"model name": "AMD EPYC", "cpu family": "26", "model": "2", "flags": "fpu sse2 avx512f avx512_bf16"}


def test_one_directory_per_kind_of_cpu():
    key = compile_cache.cpu_key(_ZEN5)
    assert key == compile_cache.cpu_key(dict(_ZEN5, flags="avx512_bf16 sse2 fpu avx512f"))  # flag order
    assert "AMD-EPYC" in key
    others = [dict(_ZEN5, flags="fpu sse2 avx512f"),  # the same model without AVX512-BF16
              dict(_ZEN5, model="1"), dict(_ZEN5, **{"cpu family": "25"}),
              dict(_ZEN5, **{"model name": "Intel(R) Xeon(R) Platinum 8481C"})]
    assert len({key, *(compile_cache.cpu_key(f) for f in others)}) == 1 + len(others)


def test_default_directory_follows_xdg_cache_home(tmp_path):
    assert compile_cache.default_dir({"XDG_CACHE_HOME": str(tmp_path)}, _ZEN5) == str(
        tmp_path / "rl_mismatch" / "xla" / compile_cache.cpu_key(_ZEN5))
    assert compile_cache.default_dir({}, _ZEN5).startswith(os.path.join(os.path.expanduser("~"), ".cache", ""))


_ENABLE = """
import json, sys
import jax
from experiments import compile_cache
line = compile_cache.enable()
jax.jit(lambda x: x * 2)(1.0).block_until_ready()  # a compilation: written to the cache if there is one
print(json.dumps([line, jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size]))
"""


def _fresh_env(tmp_path, **changes):
    """This environment without any cache setting (the test suite's own included), with the cache
    home in ``tmp_path/xdg`` and every compilation kept, however short."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", compile_cache.OPT_OUT))}
    return {**env, "XDG_CACHE_HOME": str(tmp_path / "xdg"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            **changes}


def _enable_in_subprocess(tmp_path, **env_changes):
    """compile_cache.enable() and one compilation in a fresh process (JAX's cache settings are
    per process); returns (log line, cache dir, max size)."""
    env = _fresh_env(tmp_path, PYTHONPATH=str(REPO), **env_changes)
    proc = subprocess.run([sys.executable, "-c", _ENABLE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_enable_turns_the_cache_on_in_the_cpu_directory(tmp_path):
    line, directory, max_size = _enable_in_subprocess(tmp_path)
    expected = compile_cache.default_dir({"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert directory == expected and line.startswith(expected) and "RL_MISMATCH_COMPILATION_CACHE=0" in line
    assert max_size == compile_cache.MAX_BYTES
    assert any(p.name.endswith("-cache") for p in pathlib.Path(expected).iterdir())  # the program, on disk


def test_a_directory_the_user_chose_wins_and_the_opt_out_turns_it_off(tmp_path):
    chosen = str(tmp_path / "mine")
    line, directory, max_size = _enable_in_subprocess(tmp_path, JAX_COMPILATION_CACHE_DIR=chosen)
    assert (line, directory, max_size) == (f"{chosen} (set by the user)", chosen, -1)
    line, directory, _ = _enable_in_subprocess(tmp_path, RL_MISMATCH_COMPILATION_CACHE="0")
    assert (line, directory) == ("off (RL_MISMATCH_COMPILATION_CACHE=0)", None)
    assert not (tmp_path / "xdg").exists()


@pytest.mark.slow
def test_a_second_run_reads_its_programs_from_the_cache(tmp_path):
    """Two tiny runs of experiments/train.py on the default cache: the second compiles nothing new
    (no program is added) and reads the first one's programs (their access times move)."""
    env = _fresh_env(tmp_path)
    cache = pathlib.Path(compile_cache.default_dir({"XDG_CACHE_HOME": str(tmp_path / "xdg")}))

    def run(name):
        proc = subprocess.run([sys.executable, "-m", "experiments.train", "--config=experiments/configs/tiny.py:2",
                               f"--workdir={tmp_path / name}"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"XLA compilation cache: {cache} (one per kind of CPU" in proc.stderr
        return ({p.name for p in cache.glob("*-cache")},
                {p.name: p.read_bytes() for p in cache.glob("*-atime")})

    programs, accessed = run("first")
    assert programs
    programs_again, accessed_again = run("second")
    assert programs_again == programs
    assert any(accessed_again[name] != stamp for name, stamp in accessed.items())
