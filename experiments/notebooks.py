r"""Executes the notebooks in ``colab/`` and saves them with their outputs.

  python -m experiments.notebooks [--only=length_triggered_lr] [--timeout=3600]

Each notebook runs top to bottom in a fresh Jupyter kernel (nbclient and ipykernel, the
``notebooks`` extra: ``pip install -e ".[experiments,notebooks]" -c constraints.txt``) with the repository root as its working
directory, so its set-up cell finds the checkout and installs nothing. It is then written back in
place with its outputs: figures as ``image/png``, printed tables as text. A notebook that raises
is not written: the command names the cell and exits non-zero, and the committed file stays as
it was.

What would make a rerun differ without a real change is left out: no execution timestamps
(nbclient's and the Jupyter front ends'), no front-end metadata, cell ids fixed by position
where a notebook has none. The notebooks print the host they ran on (``host``, that is
:func:`experiments.host.cpu_line`) and their own run time, so those travel with the outputs.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from collections.abc import Sequence

from experiments.host import cpu_line as host  # the notebooks import it from here

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO / "colab"

# Cell metadata that records when or where a cell ran rather than what it is: nbclient's and
# JupyterLab's timing ("execution"), the ExecuteTime extension's, Colab's output bookkeeping.
VOLATILE_CELL_METADATA = ("execution", "ExecuteTime", "colab", "outputId")


def notebook_paths(only: list[str] | None = None) -> list[pathlib.Path]:
    """The notebooks of ``colab/`` (sorted), or those named in ``only`` (an error names the ones
    that do not exist and lists what does)."""
    available = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    if not only:
        return available
    by_name = {p.stem: p for p in available}
    wanted = [name.removesuffix(".ipynb") for name in only]
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        raise ValueError(f"no notebook {', '.join(map(repr, unknown))} in {NOTEBOOK_DIR.relative_to(REPO)}/; "
                         f"there are: {', '.join(sorted(by_name))}")
    return [by_name[name] for name in wanted]


def strip_volatile(nb) -> None:
    """Removes in place what differs between two runs of the same notebook without a change in
    its results (see the module docstring), gives cells without an id one fixed by position, and
    joins consecutive pieces of the same output stream into one output (a front end shows them
    as one; how a stream was cut into messages depends on timing)."""
    for key in ("widgets", "papermill"):
        nb.metadata.pop(key, None)
    for i, cell in enumerate(nb.cells):
        for key in VOLATILE_CELL_METADATA:
            cell.metadata.pop(key, None)
        if not cell.get("id"):
            cell["id"] = f"cell-{i}"
        if "outputs" not in cell:
            continue
        outputs = []
        for output in cell.outputs:
            output.get("metadata", {}).pop("execution", None)
            last = outputs[-1] if outputs else None
            if output.output_type == "stream" and last is not None and last.output_type == "stream" \
                    and last.name == output.name:
                last.text += output.text
            else:
                outputs.append(output)
        cell.outputs = outputs


def execute(path: pathlib.Path, *, timeout: int | None = 3600, cwd: pathlib.Path = REPO,
            kernel_name: str = "python3"):
    """Runs the notebook at ``path`` in a fresh kernel started in ``cwd`` and returns it with its
    outputs, volatile metadata stripped. A cell that raises raises nbclient's
    ``CellExecutionError`` (which holds the cell's traceback) and nothing is returned."""
    import nbclient
    import nbformat
    import zmq
    from traitlets.config import Config

    nb = nbformat.read(path, as_version=4)
    strip_volatile(nb)  # ids first, so the kernel sees the cells as they will be saved
    for cell in nb.cells:  # stale outputs of a cell that no longer runs would survive otherwise
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    # The kernel talks to this process over local TCP: encrypted where libzmq can (the kernel
    # warns otherwise).
    encryption = "auto" if zmq.has("curve") else "disabled"
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name=kernel_name, record_timing=False,
                                     resources={"metadata": {"path": str(cwd)}},
                                     config=Config({"KernelManager": {"transport_encryption": encryption}}))
    client.execute()
    strip_volatile(nb)
    nbformat.validate(nb)
    return nb


def save(nb, path: pathlib.Path) -> None:
    """Writes ``nb`` to ``path`` atomically (a reader never sees half a notebook)."""
    import nbformat

    tmp = path.with_name(f".{path.name}.tmp")
    nbformat.write(nb, tmp)
    os.replace(tmp, path)


def count_outputs(nb) -> dict[str, int]:
    """``{"image/png": n, "text": n, "error": n}`` over the notebook's code-cell outputs."""
    counts = {"image/png": 0, "text": 0, "error": 0}
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "error":
                counts["error"] += 1
            elif output.output_type == "stream" or "text/plain" in output.get("data", {}):
                counts["text"] += 1
            if "image/png" in output.get("data", {}):
                counts["image/png"] += 1
    return counts


def _children_cpu_seconds() -> float:
    """CPU seconds of this process's finished child processes (the kernels): on a host shared
    with other work, wall time measures the neighbours too, CPU time much less so."""
    try:
        import resource
    except ImportError:  # not POSIX
        return 0.0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="A notebook to run, by name with or without .ipynb (repeatable; default: all of colab/).")
    parser.add_argument("--timeout", type=int, default=3600, help="Seconds one cell may run (default: %(default)s).")
    args = parser.parse_args(argv)
    try:
        paths = notebook_paths(args.only)
        import nbclient  # noqa: F401 (only to fail early, with the fix, when the extra is missing)
        import nbformat  # noqa: F401
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    except ImportError as e:
        parser.exit(2, f"error: {e.name} is not installed; install the notebooks extra: pip install -e \".[experiments,notebooks]\" -c constraints.txt\n")
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    print(f"host: {host()}", flush=True)
    for path in paths:
        name = path.relative_to(REPO)
        print(f"{name}: running ...", flush=True)
        start, cpu = time.perf_counter(), _children_cpu_seconds()
        try:
            nb = execute(path, timeout=args.timeout)
        except CellTimeoutError as e:
            parser.exit(1, f"error: {name}: a cell ran past --timeout={args.timeout} s ({e}); {name} is unchanged\n")
        except CellExecutionError as e:
            print(e, file=sys.stderr)
            parser.exit(1, f"error: {name} raised in a cell (above); {name} is unchanged\n")
        seconds, cpu = time.perf_counter() - start, _children_cpu_seconds() - cpu
        save(nb, path)
        counts = count_outputs(nb)
        print(f"{name}: ran in {seconds / 60:.1f} min ({cpu / 60:.1f} CPU-minutes in its kernel); saved with "
              f"{counts['image/png']} figures and {counts['text']} text outputs", flush=True)


if __name__ == "__main__":
    main()
