"""Nielsen's convolutional networks B, C, D and H (chapter 6, network3.py), and D with maxout units."""
import torch
from torch import nn

from models.init import nielsen_init_

KERNEL = 5
POOL = 2


class Maxout(nn.Module):
    """Goodfellow et al.'s maxout unit: the maximum of ``pieces`` linear pieces. The layer before it
    has ``pieces`` times the units (or channels); unit j is the max over features j*pieces ...
    (j+1)*pieces-1 of dimension 1."""

    def __init__(self, pieces: int) -> None:
        super().__init__()
        if pieces < 2:
            raise ValueError(f"maxout needs at least 2 pieces, got {pieces}")
        self.pieces = pieces

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        return x.reshape(n, c // self.pieces, self.pieces, *x.shape[2:]).amax(dim=2)


class ConvNet(nn.Module):
    """[conv 5x5 -> act -> maxpool 2x2]* -> [dropout -> FC -> act]* -> dropout -> FC to logits.

    Dropout sits on the input of every fully connected layer, as in network3.py's ``p_dropout``;
    nn.Dropout is inverted, so eval mode needs no rescaling. With ``pieces`` the activation is a
    maxout over that many linear pieces (each conv and hidden layer has ``pieces`` times the units).
    """

    def __init__(self, channels: tuple[int, ...], hidden: tuple[int, ...], activation: type[nn.Module] | None,
                 dropout: float = 0.0, input_shape=(1, 28, 28), num_classes: int = 10, init: str = "scaled",
                 pieces: int = 1, name: str = "network"):
        super().__init__()
        width = pieces if activation is None else 1
        act = (lambda: Maxout(pieces)) if activation is None else activation
        features: list[nn.Module] = []
        in_ch, (h, w) = input_shape[0], input_shape[1:]
        for out_ch in channels:
            features += [nn.Conv2d(in_ch, out_ch * width, KERNEL), act(), nn.MaxPool2d(POOL)]
            in_ch, h, w = out_ch, (h - KERNEL + 1) // POOL, (w - KERNEL + 1) // POOL
        if h < 1 or w < 1:
            side = 1
            for _ in channels:
                side = side * POOL + KERNEL - 1
            raise ValueError(f"{name} needs images of at least {side}x{side} ({len(channels)} 5x5 convolution(s), "
                             f"each followed by 2x2 pooling); got {input_shape[1]}x{input_shape[2]}")
        self.features = nn.Sequential(*features, nn.Flatten())

        classifier: list[nn.Module] = []
        n_in = in_ch * h * w
        for n_out in hidden:
            classifier += [nn.Dropout(dropout), nn.Linear(n_in, n_out * width), act()]
            n_in = n_out
        output = nn.Linear(n_in, num_classes)
        self.classifier = nn.Sequential(*classifier, nn.Dropout(dropout), output)

        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nielsen_init_(m, zero=m is output, init=init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def net_b(dropout: float = 0.0, **shape) -> ConvNet:
    """Nielsen's network B: conv 20@5x5 -> pool -> FC 100, sigmoid: 98.78%."""
    return ConvNet((20,), (100,), nn.Sigmoid, dropout, name="net_b", **shape)


def net_c(dropout: float = 0.0, **shape) -> ConvNet:
    """Nielsen's network C: B plus conv 40@5x5 -> pool, sigmoid: 99.06%."""
    return ConvNet((20, 40), (100,), nn.Sigmoid, dropout, name="net_c", **shape)


def net_d(dropout: float = 0.0, **shape) -> ConvNet:
    """Nielsen's network D: C with ReLU everywhere: 99.23% (99.37% as E on expanded data)."""
    return ConvNet((20, 40), (100,), nn.ReLU, dropout, name="net_d", **shape)


def net_h(dropout: float = 0.5, **shape) -> ConvNet:
    """Nielsen's network H: D's conv-pools -> FC 1000 -> FC 1000, ReLU, dropout 0.5: 99.60%."""
    return ConvNet((20, 40), (1000, 1000), nn.ReLU, dropout, name="net_h", **shape)


def net_d_maxout(dropout: float = 0.0, pieces: int = 2, **shape) -> ConvNet:
    """Net D with maxout units (Goodfellow et al. 2013; the seed article's 'maxout') of ``pieces``
    linear pieces in place of every ReLU."""
    return ConvNet((20, 40), (100,), None, dropout, pieces=pieces, name="net_d_maxout", **shape)
