"""For engines whose parameters live outside any replica: Downpour's parameter shards and
Sandblaster's coordinator. A copy of the network on the driver, loaded from ``driver_params()``,
serves evaluation, the weights histograms and model.pt."""
from __future__ import annotations

import warnings

import numpy as np
import torch

from ray_train.worker import losses
from ray_train.worker.evaluation import EvalResult, combine, predict


class DriverModel:
    model: torch.nn.Module  # built by the engine's start() from ctx.model

    def driver_params(self) -> torch.Tensor:
        """The current flat parameter vector (the network's trainable parameters, in order)."""
        raise NotImplementedError

    def _load_params(self) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        torch.nn.utils.vector_to_parameters(self.driver_params(), params)

    def evaluate(self, split: str) -> EvalResult:
        data = self.ctx.data
        self._load_params()
        objective = losses.Objective.of(self.ctx.cfg.model, data)
        y = getattr(data, f"y_{split}")
        if getattr(data, "streamed", False):  # the split streamed through the driver, a batch at a time
            from ray_train.data.streams import quiet_context
            from ray_train.worker.stream import evaluate_shard

            quiet_context()
            with warnings.catch_warnings():  # Ray Data's copy of its context warns of its own deprecated fields
                warnings.simplefilter("ignore", DeprecationWarning)
                loss_sum, probs, labels = evaluate_shard(self.model, data, data.splits[split].iterator(), objective,
                                                         torch.device("cpu"))
            return combine([{"start": 0, "loss_sum": loss_sum, "probs": probs, "labels": labels}], y)
        loss_sum, probs = predict(self.model, getattr(data, f"x_{split}"), y, objective, torch.device("cpu"))
        return combine([{"start": 0, "loss_sum": loss_sum, "probs": probs}], y)

    def weights(self) -> dict[str, np.ndarray]:
        self._load_params()
        return {n: p.detach().numpy().copy() for n, p in self.model.named_parameters()}

    def model_state(self) -> dict:
        self._load_params()
        return {"model": {k: v.clone() for k, v in self.model.state_dict().items()}}
