"""Every setting of an experiment with its default: the base the other config files change.

The settings, their defaults and their meaning are declared once, in
``rl_mismatch.experiment_config`` (one frozen dataclass per group, documented and validated
there). `get_base_config` turns ``ExperimentConfig()`` into an ``ml_collections.ConfigDict`` so
that config files and the command line can change any key, e.g. ``--config.sampler.dtype=fp16``;
``python -m experiments.train --config=<file> --print_config`` prints the result.

Not a runnable config itself (it has no ``get_config``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from rl_mismatch.experiment_config import ExperimentConfig


def get_base_config() -> ml_collections.ConfigDict:
    """``ExperimentConfig()``'s settings as a ConfigDict, one group per dataclass."""
    return _as_config_dict(ExperimentConfig().to_dict(), ExperimentConfig)


def _as_config_dict(values: Mapping[str, Any], settings_type: type) -> ml_collections.ConfigDict:
    """``values`` (a ``to_dict()``) with each key typed by ``settings_type``'s annotation.

    A None default becomes a typed placeholder, so ``--config.loss.correction_high=2`` can set
    it; a float setting holds a float even when its default is written as an int, so the
    command line can give it a fraction.
    """
    hints = typing.get_type_hints(settings_type)
    c = ml_collections.ConfigDict()
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            c[name] = _as_config_dict(value, hint)
        elif value is None:
            (value_type,) = [h for h in typing.get_args(hint) if h is not type(None)]
            c[name] = config_dict.placeholder(value_type)
        elif _is_float(hint) and not isinstance(value, bool):
            c[name] = float(value)
        else:
            c[name] = value
    return c


def _is_float(hint: Any) -> bool:
    return hint is float or (isinstance(hint, types.UnionType) and float in typing.get_args(hint))


def steps_from_arg(arg: str | None, default: int) -> int:
    """The ``:arg`` of ``--config=file.py:arg`` as a step count (empty: ``default``)."""
    if not arg:
        return default
    try:
        steps = int(arg)
    except ValueError:
        raise ValueError(f"The config argument {arg!r} must be a number of steps, e.g. file.py:40.") from None
    if steps < 1:
        raise ValueError(f"The config argument (steps) must be >= 1, got {steps}.")
    return steps
