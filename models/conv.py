"""Nielsen's convolutional networks B, C, D and H (chapter 6, network3.py)."""
import torch
from torch import nn

from models.init import nielsen_init_

IMAGE_SIDE = 28
KERNEL = 5
POOL = 2


class ConvNet(nn.Module):
    """[conv 5x5 -> act -> maxpool 2x2]* -> [dropout -> FC -> act]* -> dropout -> FC to logits.

    Dropout sits on the input of every fully connected layer, as in network3.py's
    ``p_dropout``; nn.Dropout is inverted, so eval mode needs no rescaling.
    """

    def __init__(
        self,
        channels: tuple[int, ...],
        hidden: tuple[int, ...],
        activation: type[nn.Module],
        dropout: float = 0.0,
        n_classes: int = 10,
    ):
        super().__init__()
        features: list[nn.Module] = []
        in_ch, side = 1, IMAGE_SIDE
        for out_ch in channels:
            features += [nn.Conv2d(in_ch, out_ch, KERNEL), activation(), nn.MaxPool2d(POOL)]
            in_ch, side = out_ch, (side - KERNEL + 1) // POOL
        self.features = nn.Sequential(*features, nn.Flatten())

        classifier: list[nn.Module] = []
        n_in = in_ch * side * side
        for n_out in hidden:
            classifier += [nn.Dropout(dropout), nn.Linear(n_in, n_out), activation()]
            n_in = n_out
        output = nn.Linear(n_in, n_classes)
        self.classifier = nn.Sequential(*classifier, nn.Dropout(dropout), output)

        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nielsen_init_(m, zero=m is output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def net_b(dropout: float = 0.0) -> ConvNet:
    """Nielsen's network B: conv 20@5x5 -> pool -> FC 100, sigmoid: 98.78%."""
    return ConvNet((20,), (100,), nn.Sigmoid, dropout)


def net_c(dropout: float = 0.0) -> ConvNet:
    """Nielsen's network C: B plus conv 40@5x5 -> pool, sigmoid: 99.06%."""
    return ConvNet((20, 40), (100,), nn.Sigmoid, dropout)


def net_d(dropout: float = 0.0) -> ConvNet:
    """Nielsen's network D: C with ReLU everywhere: 99.23% (99.37% as E on expanded data)."""
    return ConvNet((20, 40), (100,), nn.ReLU, dropout)


def net_h(dropout: float = 0.5) -> ConvNet:
    """Nielsen's network H: D's conv-pools -> FC 1000 -> FC 1000, ReLU, dropout 0.5: 99.60%."""
    return ConvNet((20, 40), (1000, 1000), nn.ReLU, dropout)
