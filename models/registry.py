"""Networks by name. ``build_model(name)`` is the only way the training code makes a model.

The names are plain data, so that ray_train.config (and with it the CLI's --help and its error
messages) can check a model name without importing torch; the builders are imported on first use.
"""
from __future__ import annotations

import importlib

# name -> (module under models/, builder function)
_BUILDERS: dict[str, tuple[str, str]] = {
    "mlp30": ("models.mlp", "mlp30"),
    "mlp100": ("models.mlp", "mlp100"),
    "net_b": ("models.conv", "net_b"),
    "net_c": ("models.conv", "net_c"),
    "net_d": ("models.conv", "net_d"),
    "net_h": ("models.conv", "net_h"),
}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, dropout: float | None = None):
    """Build network ``name`` (an nn.Module) with fresh weights drawn from torch's global RNG.

    ``dropout`` None keeps the network's own default (0.5 for net_h, 0 elsewhere); otherwise it is
    the drop probability on the inputs of the fully connected layers (MLPs: on the hidden layer).
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODEL_NAMES)}")
    module, function = _BUILDERS[name]
    builder = getattr(importlib.import_module(module), function)
    if dropout is None:
        return builder()
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.dropout must be in [0, 1), got {dropout}")
    return builder(dropout=dropout)
