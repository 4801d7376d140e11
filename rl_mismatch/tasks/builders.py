"""Task datasets as tensorflow-datasets builders, written as ArrayRecord files (no tensorflow).

Two builders, both with a ``train`` and an ``eval`` split and the same features:

* :class:`ReasoningGym` generates problems with ``reasoning_gym.create_dataset`` (countdown,
  gsm_symbolic, basic_arithmetic, chain_sum, ... any registered reasoning-gym task).
* :class:`JsonlQA` imports a user's own JSONL file of ``{"question", "answer"}`` lines (GSM8K
  style: the answer may end with ``#### 42``; the text after the last ``####`` is the final
  answer that is stored and scored).

Every example has the features

* ``question`` (text), ``answer`` (text, the final answer),
* ``task`` (text: the reasoning-gym task name, or ``"jsonl_qa"``) -- it picks the scorer in
  :mod:`rl_mismatch.tasks.rewards`,
* ``metadata`` (text: a JSON object; for reasoning-gym the entry's own metadata, which its
  ``score_answer`` reads, e.g. countdown's ``numbers`` and ``target``),
* ``index`` (int64: the example's position in its split as generated or read, used to name it
  in error messages; tfds writes the records in the order of a hash of their keys, so it is
  not the on-disk order).

Build with :func:`prepare_reasoning_gym` or :func:`prepare_jsonl` (idempotent: a dataset that is
already on disk is reused; each logs one line saying which, in place of tfds' progress bars and
banners), then read with ``tfds.data_source(name, split=..., data_dir=...)``
or :func:`rl_mismatch.tasks.pipeline.load_split`. The builders skip tfds' global registry on
purpose: reading goes through the files alone (``dataset_info.json`` + ArrayRecord shards), so a
second import of this module (pytest doctests, a re-run notebook cell) cannot collide, and
reading a dataset needs none of this code.

Multi-host: generation is deterministic, so each host may build into its own local data dir; on
a shared file system let one process build and the others wait (tfds finalises a dataset by
renaming a temporary directory, and two concurrent renames of the same dataset race).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import re
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from tensorflow_datasets.core.utils import tqdm_utils

# The feature set shared by every task builder; see the module docstring.
_FEATURES = {
    "question": tfds.features.Text(),
    "answer": tfds.features.Text(),
    "task": tfds.features.Text(),
    "metadata": tfds.features.Text(),
    "index": np.int64,
}
TRAIN_SPLIT = "train"
EVAL_SPLIT = "eval"
JSONL_TASK = "jsonl_qa"
# Reasoning-gym tasks this project tests; any other registered reasoning-gym name also works.
REASONING_GYM_TASKS = ("countdown", "gsm_symbolic", "basic_arithmetic", "chain_sum")


def _stable_json(obj: Any) -> str:
    """JSON with sorted keys; values JSON lacks (Fraction, set, numpy scalars) become strings.

    reasoning-gym metadata holds e.g. ``fractions.Fraction`` (gsm_symbolic); its scorers only
    read JSON-native fields (countdown's ``numbers``/``target``), so a string is a safe stand-in.
    """

    def default(o: Any) -> Any:
        if isinstance(o, (set, frozenset)):
            return sorted(o, key=str)
        if isinstance(o, np.generic):
            return o.item()
        return str(o)

    return json.dumps(obj, sort_keys=True, default=default)


def _split_seed(seed: int, split: str) -> int:
    """A generator seed for one split, far from the other split's.

    reasoning-gym draws item ``i`` from ``Random(seed + i)``, so seeds ``s`` and ``s + 1`` give
    the same items shifted by one. Hashing (seed, split) puts the two splits' seed ranges about
    2**31 apart on average instead of next to each other.
    """
    digest = hashlib.sha256(f"rl_mismatch/{seed}/{split}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1


# --------------------------------------------------------------------------------------------
# reasoning-gym


@dataclasses.dataclass(eq=False)
class ReasoningGymConfig(tfds.core.BuilderConfig):
    """Which reasoning-gym task, how many examples per split, and the seed.

    Build it with :func:`reasoning_gym_config`, which validates it and names it after its
    contents (so two sizes or seeds never share a directory).

    Attributes:
      task: reasoning-gym dataset name, e.g. ``"countdown"``.
      train_size: number of train examples (>= 1).
      eval_size: number of eval examples (>= 1).
      seed: generation seed; train and eval use different seeds derived from it.
      task_kwargs: extra reasoning-gym config fields as sorted ``(key, value)`` pairs,
        e.g. ``(("max_numbers", 3),)`` for an easier countdown.
    """

    task: str = "basic_arithmetic"
    train_size: int = 1000
    eval_size: int = 100
    seed: int = 0
    task_kwargs: tuple[tuple[str, Any], ...] = ()


def reasoning_gym_config(
    task: str, *, train_size: int = 1000, eval_size: int = 100, seed: int = 0, **task_kwargs: Any
) -> ReasoningGymConfig:
    """Validates the arguments and returns a config named after them.

    The name is ``{task}-train{N}-eval{M}-seed{S}`` plus a hash of ``task_kwargs`` if any, so the
    data dir holds one directory per distinct dataset.

    Raises:
      ValueError: unknown task, a size < 1 (a dataset with no examples), a negative seed, or
        task_kwargs that reasoning-gym rejects.
    """
    import reasoning_gym  # Lazy: importing reasoning-gym (sympy et al.) is slow.

    known = reasoning_gym.factory.DATASETS
    if task not in known:
        close = [name for name in sorted(known) if task.split("_")[0] in name][:8]
        raise ValueError(
            f"Unknown reasoning-gym task {task!r}; similar names: {close or sorted(known)[:8]}. "
            f"Tested tasks: {REASONING_GYM_TASKS}."
        )
    for label, size in (("train_size", train_size), ("eval_size", eval_size)):
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(
                f"{label}={size!r}: a task split needs at least one example (a dataset with no "
                "examples cannot be trained or evaluated on); pass a positive integer."
            )
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer.")
    try:  # Fail now, with the task named, rather than halfway through generation.
        reasoning_gym.create_dataset(task, size=1, seed=0, **task_kwargs)
    except (TypeError, AssertionError, ValueError) as e:
        raise ValueError(
            f"reasoning-gym rejected task_kwargs {task_kwargs} for task {task!r}: {e!r}"
        ) from e
    name = f"{task}-train{int(train_size)}-eval{int(eval_size)}-seed{int(seed)}"
    items = tuple(sorted(task_kwargs.items()))
    if items:
        name += "-" + hashlib.sha256(_stable_json(items).encode()).hexdigest()[:10]
    return ReasoningGymConfig(
        name=name,
        description=f"reasoning-gym {task!r}, kwargs {dict(items)}",
        task=task,
        train_size=int(train_size),
        eval_size=int(eval_size),
        seed=int(seed),
        task_kwargs=items,
    )


def generate_reasoning_gym_split(
    task: str,
    size: int,
    seed: int,
    *,
    exclude_questions: frozenset[str] = frozenset(),
    task_kwargs: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Generates ``size`` distinct reasoning-gym entries, skipping ``exclude_questions``.

    Deterministic in (task, size, seed, exclude_questions, task_kwargs): items are drawn in
    index order from ``create_dataset(task, seed=seed)`` and duplicates are skipped, so the
    result does not depend on the process or on ``PYTHONHASHSEED``.

    Returns:
      A list of ``{"question", "answer", "metadata"}`` dicts (metadata a dict).

    Raises:
      ValueError: the task cannot produce ``size`` distinct questions (tiny problem space).
    """
    import reasoning_gym  # Lazy; see reasoning_gym_config.

    # Slack for skipped duplicates. gsm_symbolic picks its templates with
    # Random(seed).choices(k=size), whose prefix does not depend on k, so the slack does not
    # change which items come first.
    pool = 2 * size + 64
    dataset = reasoning_gym.create_dataset(task, size=pool, seed=seed, **dict(task_kwargs or {}))
    seen = set(exclude_questions)
    entries = []
    for i in range(pool):
        entry = dataset[i]
        if entry["question"] in seen:
            continue
        seen.add(entry["question"])
        entries.append(entry)
        if len(entries) == size:
            return entries
    raise ValueError(
        f"reasoning-gym task {task!r} produced only {len(entries)} distinct questions out of "
        f"{pool} draws (need {size}); lower the split size or widen the task's ranges."
    )


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    """DatasetInfo of a dataset generated here, never published to tfds' GCS bucket."""

    def initialize_from_bucket(self) -> None:
        # tfds calls this for every builder whose data_dir has no dataset_info.json yet: it makes a
        # temporary directory for the bucket's metadata files and, finding none, leaves it behind
        # (one empty /tmp/tmp*tfds per fresh build). There is nothing to fetch for these datasets.
        pass


class _TaskBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared plumbing: ArrayRecord by default, the common features, no code-side metadata."""

    _CONFIG_TYPE: type = tfds.core.BuilderConfig
    _CONFIG_HINT = ""

    def __init__(self, *, config: tfds.core.BuilderConfig, **kwargs: Any):
        if not isinstance(config, self._CONFIG_TYPE):
            raise ValueError(f"{type(self).__name__} needs config={self._CONFIG_HINT}.")
        kwargs.setdefault("file_format", "array_record")  # What tfds.data_source reads.
        super().__init__(config=config, **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        # tfds 4.9.10 resolves the builder's source path to find a checksums file, and on the
        # way needs the `importlib_resources` backport, which is not a dependency. These
        # builders download nothing, so there are no checksums to find.
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: dataset_info_from_configs reads metadata files next to the
        # builder's module, which a library module does not ship.
        return _LocalDatasetInfo(
            builder=self,
            description=self.builder_config.description,
            features=tfds.features.FeaturesDict(dict(_FEATURES)),
        )


class ReasoningGym(_TaskBuilder, skip_registration=True):
    """reasoning-gym problems as a tfds dataset with disjoint ``train`` and ``eval`` splits.

    The eval split is generated first; train skips any question that eval holds, so the splits
    never share a question even when the task's problem space is small.

    Use :func:`prepare_reasoning_gym`; direct use needs a :func:`reasoning_gym_config`::

      builder = ReasoningGym(config=reasoning_gym_config("countdown"), data_dir=d)
      builder.download_and_prepare()
    """

    name = "reasoning_gym"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    _CONFIG_TYPE = ReasoningGymConfig
    _CONFIG_HINT = "reasoning_gym_config(task, ...)"

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager  # Generated locally; nothing to download.
        cfg = self.builder_config
        kwargs = dict(cfg.task_kwargs)
        eval_entries = generate_reasoning_gym_split(
            cfg.task, cfg.eval_size, _split_seed(cfg.seed, EVAL_SPLIT), task_kwargs=kwargs
        )
        train_entries = generate_reasoning_gym_split(
            cfg.task,
            cfg.train_size,
            _split_seed(cfg.seed, TRAIN_SPLIT),
            exclude_questions=frozenset(e["question"] for e in eval_entries),
            task_kwargs=kwargs,
        )
        return {
            TRAIN_SPLIT: self._generate_examples(cfg.task, train_entries),
            EVAL_SPLIT: self._generate_examples(cfg.task, eval_entries),
        }

    def _generate_examples(self, task: str, entries: list[dict[str, Any]]) -> Iterator:
        for index, entry in enumerate(entries):
            yield index, {
                "question": entry["question"],
                "answer": str(entry["answer"]),
                "task": task,
                "metadata": _stable_json(entry.get("metadata", {})),
                "index": index,
            }


def _prepare(builder: _TaskBuilder) -> None:
    """``builder.download_and_prepare()``, saying in one log line what it did.

    tfds' own output for a local dataset of a few hundred examples is noise: progress bars per
    split, a "downloading and preparing" banner and 250-character shuffling lines. They are
    swallowed here (the bars switched off, the banners printed to a buffer) and the dataset is
    named once, with its split sizes.
    """
    if builder.is_prepared():
        builder.download_and_prepare()  # Reads and checks what is on disk.
        logging.info("Reusing the dataset %s/%s in %s.", builder.name, builder.builder_config.name, builder.data_dir)
        return
    t0 = time.perf_counter()
    bars = getattr(tqdm_utils, "_active", True)  # tfds keeps its switch private; restored below.
    tfds.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare()
    finally:
        tfds.display_progress_bar(bars)
    sizes = ", ".join(f"{builder.info.splits[s].num_examples} {s}" for s in sorted(builder.info.splits))
    logging.info("Generated the dataset %s/%s (%s examples) in %s, %.1f s.", builder.name,
                 builder.builder_config.name, sizes, builder.data_dir, time.perf_counter() - t0)


def prepare_reasoning_gym(
    task: str,
    data_dir: str | os.PathLike,
    *,
    train_size: int = 1000,
    eval_size: int = 100,
    seed: int = 0,
    **task_kwargs: Any,
) -> str:
    """Builds (or reuses) a reasoning-gym dataset under ``data_dir``; returns its tfds name.

    Args:
      task: reasoning-gym task name, e.g. ``"countdown"``, ``"gsm_symbolic"``.
      data_dir: where the ArrayRecord files go (e.g. ``workdir/data`` or a shared cache).
      train_size, eval_size: examples per split.
      seed: generation seed (same seed, same examples, on any machine).
      **task_kwargs: reasoning-gym config fields, e.g. ``max_numbers=4`` for countdown.

    Returns:
      The name to pass to ``tfds.data_source(name, split=..., data_dir=data_dir)``, e.g.
      ``"reasoning_gym/countdown-train1000-eval100-seed0"``.
    """
    config = reasoning_gym_config(
        task, train_size=train_size, eval_size=eval_size, seed=seed, **task_kwargs
    )
    builder = ReasoningGym(config=config, data_dir=os.fspath(data_dir))
    _prepare(builder)
    return f"{ReasoningGym.name}/{config.name}"


# --------------------------------------------------------------------------------------------
# A user's JSONL file


def extract_final_answer(answer: str) -> str:
    """The final answer of a GSM8K-style solution: the text after the last ``####``.

    Thousands separators are dropped (GSM8K writes ``1,000``). Without ``####`` the whole
    answer, stripped, is the final answer.

    >>> extract_final_answer("3 + 4 = <<3+4=7>>7 apples.\\n#### 7")
    '7'
    >>> extract_final_answer(" 1,250 ")
    '1250'
    """
    final = answer.rsplit("####", 1)[-1].strip()
    return re.sub(r"(?<=\d),(?=\d{3})", "", final)


def read_jsonl_examples(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads and validates a JSONL file of ``{"question": str, "answer": str | number}`` lines.

    Blank lines are skipped. Extra fields are kept in the metadata.

    Returns:
      ``[{"question", "answer" (final answer), "metadata" (dict)}]`` in file order.

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file has no examples, a line is not a JSON object, a field is missing,
        or a question / final answer is empty. The message names the file and line.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL task file {str(path)!r} does not exist.")
    examples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}).") from e
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}.")
            missing = [k for k in ("question", "answer") if k not in record]
            if missing:
                raise ValueError(
                    f"{where}: missing field(s) {missing}; every line needs "
                    '{"question": ..., "answer": ...}.'
                )
            question, solution = record["question"], record["answer"]
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"{where}: 'question' must be a non-empty string.")
            if isinstance(solution, bool) or not isinstance(solution, (str, int, float)):
                raise ValueError(f"{where}: 'answer' must be a string or a number.")
            final = extract_final_answer(str(solution))
            if not final:
                raise ValueError(f"{where}: the final answer (after '####') is empty.")
            extra = {k: v for k, v in record.items() if k not in ("question", "answer")}
            examples.append(
                {
                    "question": question,
                    "answer": final,
                    "metadata": {"solution": str(solution), "line": lineno, **extra},
                }
            )
    if not examples:
        raise ValueError(
            f"JSONL task file {str(path)!r} contains no examples; expected one JSON object per "
            'line like {"question": "...", "answer": "... #### 42"}.'
        )
    return examples


def _question_key(example: Mapping[str, Any]) -> str:
    return " ".join(example["question"].split())  # whitespace-insensitive


def _distinct_questions(examples: list[dict[str, Any]]) -> list[str]:
    """The examples' question keys, each once, in order of first appearance."""
    return list(dict.fromkeys(_question_key(e) for e in examples))


@dataclasses.dataclass(eq=False)
class JsonlQAConfig(tfds.core.BuilderConfig):
    """A JSONL task file and how to get an eval split from it.

    Build it with :func:`jsonl_config`, which names it after the files' contents (an edited file
    becomes a new dataset instead of silently reusing the old one).

    Attributes:
      path: the train JSONL file.
      eval_path: an optional eval JSONL file (e.g. GSM8K test).
      eval_size: without ``eval_path``, hold out this many distinct questions of ``path`` for
        eval (chosen with ``seed``; every copy of a repeated question goes to the same split,
        so eval never holds a question trained on); 0 means no eval split.
      seed: seed for the hold-out choice.
    """

    path: str = ""
    eval_path: str | None = None
    eval_size: int = 0
    seed: int = 0


def jsonl_config(
    path: str | os.PathLike,
    *,
    eval_path: str | os.PathLike | None = None,
    eval_size: int = 0,
    seed: int = 0,
) -> JsonlQAConfig:
    """Validates the files and returns a config named ``{file stem}-{content hash}``.

    Raises:
      FileNotFoundError / ValueError: see :func:`read_jsonl_examples`; also a negative
        ``eval_size``, ``eval_size`` with ``eval_path``, a hold-out that leaves no train
        examples, or an eval file that repeats questions of the train file.
    """
    train_questions = _distinct_questions(read_jsonl_examples(path))
    n = len(train_questions)
    if eval_path is not None:
        if eval_size:
            raise ValueError("Pass either eval_path or eval_size, not both.")
        train_questions = set(train_questions)
        shared = [e["metadata"]["line"] for e in read_jsonl_examples(eval_path)
                  if _question_key(e) in train_questions]
        if shared:
            raise ValueError(
                f"{eval_path} repeats {len(shared)} question(s) of {path} (eval lines {shared[:5]}"
                f"{' ...' if len(shared) > 5 else ''}): an eval on trained-on questions measures "
                "memorisation. Remove them from one of the files.")
    if eval_size < 0:
        raise ValueError(f"eval_size={eval_size} must be >= 0.")
    if eval_size >= n:
        raise ValueError(
            f"eval_size={eval_size} leaves no train examples: {path} has only {n} distinct questions."
        )
    digest = hashlib.sha256()
    for p in (path, eval_path):
        digest.update(pathlib.Path(p).read_bytes() if p is not None else b"-")
    digest.update(f"{eval_size}/{seed}".encode())
    stem = re.sub(r"[^\w\-.]", "_", pathlib.Path(path).stem)
    return JsonlQAConfig(
        name=f"{stem}-{digest.hexdigest()[:10]}",
        description=f"JSONL task from {os.fspath(path)!r}",
        path=os.fspath(path),
        eval_path=None if eval_path is None else os.fspath(eval_path),
        eval_size=int(eval_size),
        seed=int(seed),
    )


class JsonlQA(_TaskBuilder, skip_registration=True):
    """A user's JSONL question/answer file as a tfds dataset (``train`` and optional ``eval``).

    Scored by comparing the extracted answer with the final answer (numbers numerically), see
    :func:`rl_mismatch.tasks.rewards.score_final_answer`. Use :func:`prepare_jsonl`.
    """

    name = JSONL_TASK
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    _CONFIG_TYPE = JsonlQAConfig
    _CONFIG_HINT = "jsonl_config(path, ...)"

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager
        cfg = self.builder_config
        train = read_jsonl_examples(cfg.path)
        splits = {}
        if cfg.eval_path is not None:
            splits[EVAL_SPLIT] = read_jsonl_examples(cfg.eval_path)
        elif cfg.eval_size:
            # Held out by question: the copies of a repeated question stay together. (Without
            # repeats this is a hold-out of eval_size examples.)
            questions = _distinct_questions(train)
            chosen = np.random.default_rng(cfg.seed).permutation(len(questions))[: cfg.eval_size]
            held_out = {questions[i] for i in chosen}
            splits[EVAL_SPLIT] = [e for e in train if _question_key(e) in held_out]
            train = [e for e in train if _question_key(e) not in held_out]
        splits[TRAIN_SPLIT] = train
        return {name: self._generate_examples(entries) for name, entries in splits.items()}

    def _generate_examples(self, entries: list[dict[str, Any]]) -> Iterator:
        for index, entry in enumerate(entries):
            yield index, {
                "question": entry["question"],
                "answer": entry["answer"],
                "task": JSONL_TASK,
                "metadata": _stable_json(entry["metadata"]),
                "index": index,
            }


def prepare_jsonl(
    path: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    eval_path: str | os.PathLike | None = None,
    eval_size: int = 0,
    seed: int = 0,
) -> str:
    """Builds (or reuses) a dataset from a JSONL file under ``data_dir``; returns its tfds name.

    Args:
      path: JSONL file, one ``{"question": ..., "answer": ...}`` object per line; the answer may
        be a GSM8K solution ending in ``#### <final answer>``.
      data_dir: where the ArrayRecord files go.
      eval_path: optional JSONL eval file.
      eval_size: without ``eval_path``, examples of ``path`` held out as the eval split.
      seed: seed for the hold-out.

    Returns:
      The name for ``tfds.data_source``, e.g. ``"jsonl_qa/gsm8k-0123456789"``.
    """
    config = jsonl_config(path, eval_path=eval_path, eval_size=eval_size, seed=seed)
    builder = JsonlQA(config=config, data_dir=os.fspath(data_dir))
    _prepare(builder)
    return f"{JsonlQA.name}/{config.name}"
