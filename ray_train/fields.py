"""The errors a user can fix and the field validators every config section uses: each names
the field and what is allowed (ray_train/config.py re-exports them)."""
from __future__ import annotations

import math
from typing import Any

from models import MODEL_NAMES
from ray_train.errors import ConfigError

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam", "amsgrad", "lbfgs")


def _choice(section: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{section}.{name}: unknown value {value!r}; allowed: {', '.join(map(str, allowed))}")


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
