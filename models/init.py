"""Nielsen's initialisation: weights N(0, 1/n_in), biases N(0, 1); the softmax layer of his
network3.py starts at zero."""
import torch
from torch import nn


@torch.no_grad()
def nielsen_init_(layer: nn.Linear | nn.Conv2d, zero: bool = False) -> None:
    """Initialise ``layer`` in place from torch's global RNG, so ``torch.manual_seed`` fixes it."""
    if zero:
        layer.weight.zero_()
        layer.bias.zero_()
        return
    fan_in = layer.weight[0].numel()  # in_features, or in_channels * kh * kw for a conv
    layer.weight.normal_(0.0, fan_in**-0.5)
    layer.bias.normal_(0.0, 1.0)
