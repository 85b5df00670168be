"""Model averaging (local SGD; Jubatus-style mixing in the seed article): every replica trains on
its own shard with its own optimizer, and every ``--average-every H`` steps (counted across epoch
boundaries) the replicas mix their parameters. Between mixes nothing moves: H times fewer bytes
than sync SGD. The model the run loop sees (evaluation, model.pt, weights histograms,
checkpoints' model) is the one of the last mix, which exists without any extra message; it lacks
the at most H - 1 steps the replicas took since. Three ways to mix (``local`` section):

- average (default): every replica takes the mean. With H = 1 and plain SGD this is sync SGD:
  the mean of w - eta g_i is w - eta mean(g_i) (tests/test_local.py holds it to 1e-5).
- outer sgd / nesterov (DiLoCo, Douillard et al. 2023): the mean's move away from the last
  mixed parameters is an outer gradient, applied by an outer optimizer (outer_lr, Nesterov
  outer_momentum) that every replica runs identically on the allreduced mean; outer sgd at 1.0
  is the plain average.
- elastic (EASGD, Zhang et al. 2015; ``elastic_alpha``): each replica moves alpha of the way
  toward a centre variable, and the centre moves alpha times the replicas' summed distance to it
  (beta = N alpha). The replicas stay apart; the centre is the model. Every replica keeps an
  identical copy of the centre, updated from the allreduced mean, so nothing more moves than for
  an average.

The engine is the sync engine with another replica class: the same group, process group and
shared-memory averaging. Checkpoints (at epoch ends) keep every replica's own parameters and
optimizer state beside the shared ones, so a resumed run continues exactly."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ray_train.strategies.sync.engine import SyncEngine
from ray_train.worker.comm import allreduce_bytes, flatten_params
from ray_train.worker.device import to_host
from ray_train.worker.replica import Replica


class LocalReplica(Replica):
    overlap_grads = False  # the process group averages parameters, not gradients

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        local = self.cfg.local
        self.flat = flatten_params(self.params)  # mixed in place, like sync's gradients
        self.since_average = 0
        self.outer = local.outer_optimizer if local.elastic_alpha is None else "elastic"
        # the parameters of the last mix (EASGD: the centre), identical on every replica
        self.anchor = self.flat.clone()
        self.momentum = torch.zeros_like(self.flat) if self.outer == "nesterov" else None

    def step(self, idx):
        loss, hits = self.gradients(*self.batch(idx))
        self.precision.step()
        self.since_average += 1
        if self.since_average == self.cfg.local.average_every:
            self.average()
        return loss, hits

    def average(self) -> None:
        if self.outer == "elastic":
            self._elastic()
        else:
            self._mean_(self.flat)
            if self.outer == "average":
                self.anchor.copy_(self.flat)
            else:
                self._outer_step()
        self.since_average = 0

    def _mean_(self, flat: torch.Tensor) -> None:
        if self.comm is not None:
            self.comm.mean_(flat)
            self.comm_bytes += allreduce_bytes(flat, self.ctx.world_size)

    def _outer_step(self) -> None:
        """DiLoCo's outer step on the mean now in ``flat``: delta = anchor - mean is the outer
        gradient; torch's SGD (Nesterov) update rule, applied to the anchor."""
        local = self.cfg.local
        delta = self.anchor - self.flat
        if self.momentum is not None:
            self.momentum.mul_(local.outer_momentum).add_(delta)
            delta = delta.add(self.momentum, alpha=local.outer_momentum)
        self.flat.copy_(self.anchor.sub_(delta, alpha=local.outer_lr))

    def _elastic(self) -> None:
        alpha, centre = self.cfg.local.elastic_alpha, self.anchor
        mean = self.flat.clone()
        self._mean_(mean)
        self.flat.sub_(self.flat - centre, alpha=alpha)  # x_i -= alpha (x_i - centre), with the old centre
        centre.add_(mean - centre, alpha=alpha * self.ctx.world_size)  # centre += alpha sum_i (x_i - centre)

    # -- the model the loop sees: the last mix -----------------------------------------------
    @contextmanager
    def centred(self):
        """The parameters swapped for the last mix (EASGD: the centre) while the block runs."""
        own = self.flat.clone()
        self.flat.copy_(self.anchor)
        try:
            yield
        finally:
            self.flat.copy_(own)

    def evaluate(self, split: str = "test", shard=None) -> dict:
        with self.centred():
            return super().evaluate(split, shard)

    def weights(self):
        with self.centred():
            return super().weights()

    def state(self) -> dict:
        with self.centred():
            return super().state()

    def local_state(self) -> dict:
        """What differs between replicas or lives outside the model: the replica's own parameters
        and optimizer state, the steps since the last mix, the outer momentum."""
        own = {"params": self.flat.clone(), "optimizer": self.opt.state_dict(),
               "since_average": self.since_average, "anchor": self.anchor.clone()}
        if self.momentum is not None:
            own["momentum"] = self.momentum.clone()
        return to_host(own)

    def load_local_state(self, own: dict) -> None:
        self.flat.copy_(own["params"])
        self.opt.load_state_dict(own["optimizer"])
        self.since_average = int(own["since_average"])
        for name in ("anchor", "momentum"):
            if getattr(self, name) is not None:
                getattr(self, name).copy_(own[name])

    def load_state(self, state: dict, rng=None) -> None:
        super().load_state(state, rng)
        self.anchor.copy_(self.flat)  # the checkpoint's model is the last mix


class LocalEngine(SyncEngine):
    replica_cls = LocalReplica

    def start(self, state):
        super().start(state)
        owns = (state or {}).get("local") or []
        if len(owns) == len(self.group.actors):
            self.group.get([a.load_local_state.remote(own) for a, own in zip(self.group.actors, owns)])

    def describe(self) -> str:
        n, local = self.ctx.cfg.resources.replicas, self.ctx.cfg.local
        mix = {"average": "averaged",
               "sgd": f"outer SGD step (DiLoCo, outer lr {local.outer_lr:g})",
               "nesterov": f"outer Nesterov step (DiLoCo, outer lr {local.outer_lr:g}, "
                           f"momentum {local.outer_momentum:g})"}[local.outer_optimizer]
        if local.elastic_alpha is not None:
            mix = f"elastic pull toward a centre (EASGD, alpha {local.elastic_alpha:g})"
        return (f"model averaging (local SGD): {n} replica{'s' if n != 1 else ''} on "
                f"{sorted({i['device'] for i in self.group.info})}, every {local.average_every} steps: {mix} "
                f"(through {self.group.averaging()})")

    def state(self) -> dict:
        return {**super().state(), "local": self.group.get([a.local_state.remote() for a in self.group.actors])}
