"""ray-train: sync SGD, Downpour async SGD and voting ensembles of PyTorch models on Ray actors.

    import ray_train
    summary = ray_train.fit("configs/default.yaml", model=my_factory, data=ray_train.Dataset(...))

``fit`` and ``Dataset`` load on first use, so that ``python -m ray_train --help`` starts without torch.
"""
from __future__ import annotations

__all__ = ["fit", "predict", "Dataset", "Streams", "TrainConfig"]


def __getattr__(name: str):
    if name == "fit":
        from ray_train.api import fit

        return fit
    if name == "predict":
        from ray_train.prediction import predict

        return predict
    if name == "Dataset":
        from ray_train.data.dataset import Dataset

        return Dataset
    if name == "Streams":
        from ray_train.data.streams import Streams

        return Streams
    if name == "TrainConfig":
        from ray_train.config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module 'ray_train' has no attribute {name!r}")
