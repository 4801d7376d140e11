"""docs/metrics.md lists exactly the keys tiny runs log: every logged key has a row, every row
is logged under the settings its "logged" column names."""

from __future__ import annotations

import os
import re

import pytest

from rl_mismatch import corrections, experiment, mismatch
from rl_mismatch.experiment_config import ExperimentConfig
from rl_mismatch.metric_writing import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOSSARY = os.path.join(REPO, "docs", "metrics.md")
TAGS = ("always", "eval", "entropy", "k3 LR rule", "IS weight", "batch_norm", "criterion", "token criterion",
        "dual_clip")
# Everything optional at once: eval, sampler entropy, the k3 LR rule, an IS weighting with batch
# normalisation, a token and a sequence criterion, dual clip.
EVERYTHING = {"eval.every": 1, "sampler.return_entropy": True, "optim.k3_trigger_threshold": 2.0,
              "loss.correction": "token_is(2, batch_norm) + token_k3(0.01) + seq_max_k2(0.5)", "loss.dual_clip": 3.0}


def _rows() -> list[tuple[list[str], str]]:
    """(keys of the first cell, logged tag) of every row of the glossary's key tables."""
    rows, in_table = [], False
    with open(GLOSSARY, encoding="utf-8") as f:
        for line in f:
            if line.startswith("| key | logged |"):
                in_table = True
            elif not line.startswith("|"):
                in_table = False
            elif in_table and line.startswith("| `"):
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                rows.append((_keys(re.findall(r"`([^`]+)`", cells[0])), cells[1]))
    return rows


def _keys(items: list[str]) -> list[str]:
    """A cell's keys: the first in full, then `_suffix` (replacing the first's last `_part`) or a
    name under the first's group."""
    first, keys = items[0], [items[0]]
    for item in items[1:]:
        if "/" in item:
            keys.append(item)
        elif item.startswith("_"):
            keys.append(first.rsplit("_", 1)[0] + item)
        else:
            keys.append(first.rsplit("/", 1)[0] + "/" + item)
    return keys


def _expected(tags: set[str], correction: corrections.Correction) -> set[str]:
    names = {"<s>": mismatch.BINNED_KEYS}
    out = set()
    for keys, tag in _rows():
        if tag not in tags:
            continue
        criteria = [r.criterion for r in correction.reject if tag != "token criterion" or r.level == "token"]
        for key in keys:
            values = {**names, "<criterion>": criteria}
            expanded = [key]
            for placeholder, options in values.items():
                expanded = [k.replace(placeholder, o) for k in expanded for o in options] if any(
                    placeholder in k for k in expanded) else expanded
            out.update(expanded)
    return out


def _logged_keys(cfg: ExperimentConfig, tmp_path) -> set[str]:
    experiment.run(cfg, tmp_path)
    return set().union(*(row.keys() for row in read_metrics(tmp_path)))


def test_every_row_is_well_formed():
    rows = _rows()
    assert len(rows) > 80
    assert {tag for _, tag in rows} <= set(TAGS), {tag for _, tag in rows} - set(TAGS)
    keys = [k for ks, _ in rows for k in ks]
    assert len(keys) == len(set(keys)), [k for k in keys if keys.count(k) > 1]
    assert set(mismatch.METRIC_KEYS) <= set(keys)


@pytest.mark.slow
@pytest.mark.parametrize("settings", ["defaults", "everything"])
def test_glossary_lists_exactly_the_keys_a_tiny_run_logs(tmp_path, settings, tiny_cfg):
    overrides = EVERYTHING if settings == "everything" else {}
    cfg = tiny_cfg(**{"steps": 1, **overrides})
    logged = _logged_keys(cfg, tmp_path)
    tags = {"always"} if settings == "defaults" else set(TAGS)
    expected = _expected(tags, cfg.loss.resolved_correction)
    assert logged - expected == set(), "logged but not in docs/metrics.md"
    assert expected - logged == set(), "in docs/metrics.md but not logged"
