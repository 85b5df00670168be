"""Networks by name. ``build_model(name)`` is the only way the training code makes a registry model.

The names are plain data, so that ray_train.config (and with it the CLI's --help and its error
messages) can check a model name without importing torch; the builders are imported on first use.
A user's own network comes as a zero-argument factory: ``ImportedFactory("package.module:function")``
from the command line, any callable from ray_train.fit(model=...).
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
    "net_a": ("models.mlp", "net_a"),
    "net_d_maxout": ("models.conv", "net_d_maxout"),
}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, dropout: float | None = None, input_shape=(1, 28, 28), num_classes: int = 10,
                init: str = "scaled", pieces: int | None = None):
    """Build network ``name`` (an nn.Module) with fresh weights drawn from torch's global RNG, for
    inputs of ``input_shape`` (without the batch dimension) and ``num_classes`` outputs.

    ``dropout`` None keeps the network's own default (0.5 for net_h, 0 elsewhere); otherwise it is
    the drop probability on the inputs of the fully connected layers (MLPs: on the hidden layer).
    ``init``: "scaled" (N(0, 1/n_in) weights) or "normal" (N(0, 1)). ``pieces``: maxout pieces of
    net_d_maxout (default 2)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODEL_NAMES)}")
    module, function = _BUILDERS[name]
    builder = getattr(importlib.import_module(module), function)
    options = {"input_shape": tuple(input_shape), "num_classes": num_classes, "init": init}
    if pieces is not None:
        if name != "net_d_maxout":
            raise ValueError(f"model.pieces applies to net_d_maxout only, not {name}")
        options["pieces"] = pieces
    if dropout is None:
        return builder(**options)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.dropout must be in [0, 1), got {dropout}")
    return builder(dropout=dropout, **options)


class RegistryFactory:
    """A registry network as a zero-argument factory (picklable: replicas build their own copy)."""

    def __init__(self, name: str, **options) -> None:
        self.name, self.options = name, options

    def __call__(self):
        return build_model(self.name, **self.options)


class ImportedFactory:
    """A user's "package.module:function": imported where it is called (the driver, every replica),
    called with no arguments, and checked to return an nn.Module (a list of stage modules comes
    back as ``models.staged.Stages``)."""

    def __init__(self, spec: str) -> None:
        self.spec = spec

    def __call__(self):
        import torch

        from models.staged import whole_network

        model = whole_network(import_factory(self.spec)())
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{self.spec} returned a {type(model).__name__}, not a torch.nn.Module "
                            "(or a list of them: the stages of a pipeline)")
        return model


def import_factory(spec: str):
    """The callable that ``spec`` ("package.module:function") names; ValueError saying what is wrong."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{spec!r} is not of the form package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"cannot import {module_name!r} ({exc}); the module must be importable from the working "
                         "directory or PYTHONPATH (with ray job submit: inside --working-dir)") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise ValueError(f"{spec} is a {type(factory).__name__}, not a function returning an nn.Module")
    return factory
