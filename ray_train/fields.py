"""The field validators every config section uses, each naming the field and what is allowed,
and the optimizer table (OPTIMIZERS, DEFAULT_LR)."""
from __future__ import annotations

import difflib
import math
from typing import Any

from models import MODEL_NAMES
from ray_train.errors import ConfigError

# the costs by name (ray_train/worker/losses.py): for class labels, then for float targets
CLASSIFICATION_LOSSES = ("log_likelihood", "cross_entropy", "quadratic")
REGRESSION_LOSSES = ("mse", "l1")
LOSSES = CLASSIFICATION_LOSSES + REGRESSION_LOSSES
CUSTOM_LOSS = "custom"  # model.loss of a callable handed to fit(loss=...)
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam", "amsgrad", "lbfgs")


def did_you_mean(word: Any, candidates) -> str:
    """" (did you mean 'x'?)" for the closest candidate, or ""."""
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _choice(section: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{section}.{name}: unknown value {value!r}{did_you_mean(value, allowed)}; allowed: "
                          f"{', '.join(map(str, allowed))}")


# annotation word -> (accepts, how the error names it); YAML's true/false are the only booleans
_TYPES = {
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "list": (lambda v: isinstance(v, list), "a list"),
    "None": (lambda v: v is None, "null"),
}


def check_type(section: str, name: str, value: Any, annotation: Any) -> None:
    """``value`` fits the field's annotation ("int", "float | None", ...; a field typed Any takes
    anything), else a ConfigError: ``expand: "no"`` is a string, not false."""
    words = [w.strip() for w in str(annotation).split("|")]
    if any(w not in _TYPES for w in words):
        return
    if not any(_TYPES[w][0](value) for w in words):
        expected = " or ".join(_TYPES[w][1] for w in words)
        raise ConfigError(f"{section}.{name}: expected {expected}, got {value!r}")


def _positive(section: str, name: str, value: Any, zero_ok: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{section}.{name}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{section}.{name}: must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ConfigError(f"{section}.{name}: must be {bound}, got {value!r}")


def _model_name(field_name: str, name: Any) -> None:
    if not isinstance(name, str) or (name not in MODEL_NAMES and name != "custom" and not _factory_spec(name)):
        raise ConfigError(f"{field_name}: unknown value {name!r}; allowed: {', '.join(MODEL_NAMES)}, "
                          "or package.module:function for your own network")


def _factory_spec(name: str) -> bool:
    """'package.module:function' (checked without importing it: the CLI's --help must stay fast)."""
    module, _, attr = name.partition(":")
    return bool(module and attr) and all(p.isidentifier() for p in module.split(".")) and attr.isidentifier()


def _integer(section: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{section}.{name}: expected an integer, got {value!r}")


DEFAULT_LR = {"sgd": 0.05, "momentum": 0.05, "nesterov": 0.05, "adagrad": 0.01, "rmsprop": 0.001,
              "adadelta": 1.0, "adam": 0.001, "amsgrad": 0.001, "lbfgs": 1.0}
