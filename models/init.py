"""Nielsen's initialisations: "scaled" draws weights from N(0, 1/n_in) and biases from N(0, 1)
(network2.py's default_weight_initializer, network3.py); "normal" draws both from N(0, 1)
(large_weight_initializer, chapter 1 and the 96.49% run of chapter 3). His network3.py starts its
softmax layers at zero."""
import torch
from torch import nn

INITS = ("scaled", "normal")


@torch.no_grad()
def nielsen_init_(layer: nn.Linear | nn.Conv2d, zero: bool = False, init: str = "scaled") -> None:
    """Initialise ``layer`` in place from torch's global RNG, so ``torch.manual_seed`` fixes it."""
    if zero:
        layer.weight.zero_()
        layer.bias.zero_()
        return
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; allowed: {', '.join(INITS)}")
    fan_in = layer.weight[0].numel()  # in_features, or in_channels * kh * kw for a conv
    layer.weight.normal_(0.0, fan_in**-0.5 if init == "scaled" else 1.0)
    layer.bias.normal_(0.0, 1.0)
