"""Networks by name. ``build_model(name)`` is the only way the training code makes a model."""
from collections.abc import Callable

from torch import nn

from models.conv import net_b, net_c, net_d, net_h
from models.mlp import mlp30, mlp100

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp30": mlp30,
    "mlp100": mlp100,
    "net_b": net_b,
    "net_c": net_c,
    "net_d": net_d,
    "net_h": net_h,
}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, dropout: float | None = None) -> nn.Module:
    """Build network ``name`` with fresh weights drawn from torch's global RNG.

    ``dropout`` None keeps the network's own default (0.5 for net_h, 0 elsewhere); otherwise it is
    the drop probability on the inputs of the fully connected layers (MLPs: on the hidden layer).
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODEL_NAMES)}")
    if dropout is None:
        return _BUILDERS[name]()
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.dropout must be in [0, 1), got {dropout}")
    return _BUILDERS[name](dropout=dropout)
