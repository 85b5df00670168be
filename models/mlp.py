"""Nielsen's fully connected sigmoid networks (chapters 1 and 3) and network A (chapter 6)."""
import math

import torch
from torch import nn

from models.init import nielsen_init_


class MLP(nn.Module):
    """Flatten -> [Linear -> sigmoid -> dropout]* -> Linear; returns raw logits."""

    def __init__(self, sizes: tuple[int, ...], dropout: float = 0.0, init: str = "scaled", zero_output: bool = False):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for n_in, n_out in zip(sizes[:-2], sizes[1:-1]):
            layers += [nn.Linear(n_in, n_out), nn.Sigmoid(), nn.Dropout(dropout)]
        layers.append(nn.Linear(sizes[-2], sizes[-1]))
        self.net = nn.Sequential(*layers)
        # network2.py draws every layer, the output included, from its initializer; network3.py's
        # softmax layer (network A) starts at zero.
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        for m in linears:
            nielsen_init_(m, zero=zero_output and m is linears[-1], init=init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _sizes(hidden: int, input_shape: tuple[int, ...], num_classes: int) -> tuple[int, int, int]:
    return math.prod(input_shape), hidden, num_classes


def mlp30(dropout: float = 0.0, input_shape=(1, 28, 28), num_classes: int = 10, init: str = "scaled") -> MLP:
    """Nielsen ch.1/ch.3 [784, 30, 10] sigmoid: 95.49% (cross-entropy), 96.49% with L2 and N(0,1) init."""
    return MLP(_sizes(30, input_shape, num_classes), dropout, init)


def mlp100(dropout: float = 0.0, input_shape=(1, 28, 28), num_classes: int = 10, init: str = "scaled") -> MLP:
    """Nielsen ch.1/ch.3 [784, 100, 10] sigmoid: 96.59% (ch.1), ~98% with L2."""
    return MLP(_sizes(100, input_shape, num_classes), dropout, init)


def net_a(dropout: float = 0.0, input_shape=(1, 28, 28), num_classes: int = 10, init: str = "scaled") -> MLP:
    """Nielsen's network A (ch. 6): FC 784 -> 100 sigmoid, then a softmax layer that starts at zero
    (network3.py); log-likelihood cost, eta 0.1, 60 epochs: 97.80%."""
    return MLP(_sizes(100, input_shape, num_classes), dropout, init, zero_output=True)
