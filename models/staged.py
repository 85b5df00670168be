"""A network given as a list of stage modules: a user's factory may return one (docs/pipeline.md),
and each module is then one stage of the pipeline. Nothing here knows about distribution."""
from __future__ import annotations

from torch import nn


class Stages(nn.Sequential):
    """The stage modules of a factory's list, run one after the other: the whole network. Its
    state_dict is an nn.Sequential's (keys "0.", "1.", ...), so model.pt loads into
    ``nn.Sequential(*factory())``. The split takes each module as one stage, whatever is inside."""


def whole_network(built):
    """What a factory built as one nn.Module: a non-empty list (or tuple) of nn.Modules becomes
    ``Stages`` of them; anything else is returned as it is."""
    if isinstance(built, (list, tuple)) and built and all(isinstance(m, nn.Module) for m in built):
        return Stages(*built)
    return built
