"""The config section of --strategy ensemble (YAML section ``ensemble``) and the members it describes."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from ray_train.errors import ConfigError
from ray_train.fields import DEFAULT_LR, OPTIMIZERS, _choice, _integer, _model_name, _positive

if TYPE_CHECKING:  # the config assembles this module's section: no import of it at run time
    from ray_train.config import TrainConfig

MEMBER_KEYS = ("model", "seed", "optimizer", "lr", "bagging", "dropout", "weight")


@dataclass(frozen=True)
class EnsembleConfig:
    """Voting ensembles (``--strategy ensemble``)."""

    members: Any = 5
    """K (K copies of model.name with seeds seed, seed+1, ...) or a list of member mappings with
    keys model, seed, optimizer, lr, bagging, dropout, weight (missing keys take the run's)."""
    replicas_per_member: int = 1
    """Each member is a sync group of this many replicas."""
    bagging: bool = False
    """Every member trains on its own seeded bootstrap sample of the training set."""
    weights: list | None = None
    """Optional vote weight per member (same length as the members)."""

    def __post_init__(self) -> None:
        _integer("ensemble", "replicas_per_member", self.replicas_per_member)
        _positive("ensemble", "replicas_per_member", self.replicas_per_member)
        if isinstance(self.members, list):
            if not self.members:
                raise ConfigError("ensemble.members: the member list is empty; give at least one member")
            for i, m in enumerate(self.members):
                if not isinstance(m, Mapping):
                    raise ConfigError(f"ensemble.members[{i}]: expected a mapping, got {m!r}")
                unknown = sorted(set(m) - set(MEMBER_KEYS))
                if unknown:
                    raise ConfigError(f"ensemble.members[{i}]: unknown key {unknown[0]!r}; "
                                      f"allowed: {', '.join(MEMBER_KEYS)}")
                if "model" in m:
                    _model_name(f"ensemble.members[{i}].model", m["model"])
                if "optimizer" in m:
                    _choice(f"ensemble.members[{i}]", "optimizer", m["optimizer"], OPTIMIZERS)
                if "lr" in m:
                    _positive(f"ensemble.members[{i}]", "lr", m["lr"])
            count = len(self.members)
        else:
            _integer("ensemble", "members", self.members)
            _positive("ensemble", "members", self.members)
            count = self.members
        if self.weights is not None:
            if not isinstance(self.weights, list) or len(self.weights) != count:
                raise ConfigError(f"ensemble.weights: expected a list of {count} numbers (one per member), "
                                  f"got {self.weights!r}")
            for w in self.weights:
                _positive("ensemble", "weights", w, zero_ok=True)

    @property
    def count(self) -> int:
        return len(self.members) if isinstance(self.members, list) else int(self.members)


@dataclass(frozen=True)
class MemberSpec:
    """What makes one member differ from the others; stored next to its weights."""

    index: int
    model: str
    seed: int
    optimizer: str
    lr: float
    bagging: bool
    dropout: float | None
    weight: float


def member_specs(cfg: TrainConfig) -> list[MemberSpec]:
    """K copies of the run's model with seeds seed..seed+K-1, or the configured member list with
    missing keys taken from the run (a member with another optimizer and no lr takes that
    optimizer's DEFAULT_LR); the user's values are checked here, naming the member."""
    ens, raw = cfg.ensemble, cfg.ensemble.members
    entries = raw if isinstance(raw, list) else [{} for _ in range(int(raw))]
    specs = []
    for i, m in enumerate(entries):
        optimizer = m.get("optimizer", cfg.optim.optimizer)
        lr = m.get("lr", cfg.optim.lr if optimizer == cfg.optim.optimizer else DEFAULT_LR.get(optimizer))
        spec = MemberSpec(i, m.get("model", cfg.model.name), m.get("seed", cfg.run.seed + i), optimizer, lr,
                          m.get("bagging", ens.bagging), m.get("dropout", cfg.model.dropout),
                          ens.weights[i] if ens.weights is not None else m.get("weight", 1.0))
        if not isinstance(spec.bagging, bool):
            raise ConfigError(f"ensemble.members[{i}].bagging: expected true or false, got {spec.bagging!r}")
        if isinstance(spec.weight, bool) or not isinstance(spec.weight, (int, float)) or not spec.weight >= 0:
            raise ConfigError(f"ensemble.members[{i}].weight: expected a number >= 0, got {spec.weight!r}")
        try:
            member_config(cfg, spec)
        except ConfigError as exc:  # e.g. "run.seed: ..." -> "ensemble.members[2]: run.seed: ..."
            raise ConfigError(f"ensemble.members[{i}]: {exc}") from None
        specs.append(spec)
    if not any(s.weight > 0 for s in specs):
        raise ConfigError("ensemble.weights: at least one member weight must be > 0")
    return specs


def member_config(cfg: TrainConfig, spec: MemberSpec) -> TrainConfig:
    """The run's config as one member sees it; the replicas read everything from it."""
    rep = dataclasses.replace
    return rep(cfg, model=rep(cfg.model, name=spec.model, dropout=spec.dropout),
               optim=rep(cfg.optim, optimizer=spec.optimizer, lr=spec.lr),
               run=rep(cfg.run, seed=spec.seed),
               resources=rep(cfg.resources, replicas=cfg.ensemble.replicas_per_member),
               ensemble=rep(cfg.ensemble, bagging=spec.bagging))
