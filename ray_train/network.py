"""The network a run trains: the zero-argument factory replicas build it with (a registry network,
a user's "package.module:function" or a callable handed to fit), and one check on the driver that
it builds and fits the data before any actor starts."""
from __future__ import annotations

from ray_train import strategies
from ray_train.config import TrainConfig
from ray_train.data.dataset import Dataset
from ray_train.errors import ConfigError, UserError
from ray_train.worker.batches import steps_per_epoch

CUSTOM = "custom"  # model.name / data.dataset of a callable or arrays handed to fit()


def model_factory(cfg: TrainConfig, data: Dataset, custom=None):
    """The zero-argument callable replicas build their network with."""
    from models import ImportedFactory, RegistryFactory

    if custom is not None:
        return custom
    if cfg.model.name == CUSTOM:
        raise ConfigError("model.name: 'custom' means a callable handed to ray_train.fit(model=...); none was "
                          "given (from the command line use a registry name or --model package.module:function)")
    if ":" in cfg.model.name:
        return ImportedFactory(cfg.model.name)
    return RegistryFactory(cfg.model.name, dropout=cfg.model.dropout, input_shape=tuple(data.input_shape),
                           num_classes=output_size(data), init=cfg.model.init)


class StagedFactory:
    """A callable handed to fit that returns a list of stage modules, as a factory of the whole
    network (models.staged.Stages of them), which every stage actor builds and cuts at the list's
    boundaries."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self):
        from models.staged import whole_network

        return whole_network(self.inner())


def with_stages(cfg: TrainConfig, factory):
    """(cfg, factory) for a user's factory that returns a list of stage modules: the factory wrapped
    to build the whole network, and pipeline.stages set to the list's length (a --stages that says
    otherwise, or --split-at, is an error). Anything else comes back unchanged; a factory that does
    not build is left to check_model to report."""
    import dataclasses

    import torch

    from models.staged import Stages, whole_network

    with torch.random.fork_rng():
        try:
            built = factory()
        except Exception:
            return cfg, factory
    net = whole_network(built)
    if not isinstance(net, Stages):
        return cfg, factory
    count, pipe = len(net), cfg.pipeline
    if count == 1:
        return cfg, factory if net is built else StagedFactory(factory)
    if not strategies.get(cfg.run.strategy).pipelined:
        takers = ", ".join(s.name for s in strategies.all_strategies() if s.pipelined)
        raise ConfigError(f"model: {cfg.model.name} returns {count} stage modules (a pipeline), but run.strategy "
                          f"{cfg.run.strategy!r} does not take stages; {takers} do (or return one nn.Module)")
    if pipe.stages not in (1, count):
        raise ConfigError(f"pipeline.stages: {pipe.stages}, but model {cfg.model.name} returns {count} stage "
                          f"modules; leave --stages out (it is the list's length) or make them agree")
    if pipe.split_at:
        raise ConfigError(f"pipeline.split_at: model {cfg.model.name} returns its {count} stages as a list, which "
                          "says where each begins; leave --split-at out")
    cfg = dataclasses.replace(cfg, pipeline=dataclasses.replace(pipe, stages=count))
    return cfg, factory if net is built else StagedFactory(factory)


def output_size(data: Dataset) -> int:
    """The outputs per example a network gives: one logit per class, or one per target element."""
    if not data.regression:
        return data.num_classes
    size = 1
    for d in data.target_shape:
        size *= d
    return size


def check_model(factory, data: Dataset, cfg: TrainConfig) -> None:
    """Build the network once on the driver and run two test examples through it, so that a model
    that cannot be built or does not fit the data is one clear error before any actor starts. Also
    checks that every replica gets at least one batch per epoch."""
    import torch

    from ray_train.worker.batches import to_tensor

    with torch.random.fork_rng():
        try:
            net = factory()
            if not isinstance(net, torch.nn.Module):
                raise TypeError(f"it returned a {type(net).__name__}, not a torch.nn.Module")
            with torch.no_grad():
                out = net.eval()(to_tensor(data.head_inputs()))
        except Exception as exc:
            shape = data.input_shape
            # images channels-last ([N, H, W, C], as PIL and most image libraries give them)
            hint = ("; inputs are [N, C, H, W] (channels first): an array [N, H, W, C] becomes one with "
                    "x.transpose(0, 3, 1, 2)" if len(shape) == 3 and shape[-1] in (1, 3, 4) and shape[0] > 4 else "")
            raise UserError(f"model: {cfg.model.name} does not build or run on {data.name}'s inputs of shape "
                            f"{list(shape)}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                            f"{hint}") from exc
    want = (min(2, len(data.y_test)), data.num_classes)
    if data.regression:
        if out.shape[:1] != want[:1] or out[:1].numel() != output_size(data):
            raise UserError(f"model: {cfg.model.name} gives outputs of shape {list(out.shape)} for {want[0]} examples; "
                            f"{data.name}'s regression targets have shape {list(data.target_shape)} each, so expected "
                            f"{[want[0], *data.target_shape]} (or [{want[0]}, {output_size(data)}])")
    elif tuple(out.shape) != want:
        raise UserError(f"model: {cfg.model.name} gives outputs of shape {list(out.shape)} for {want[0]} examples; "
                        f"{data.name} has {data.num_classes} classes, so expected {list(want)} (one logit per class)")
    if cfg.pipeline.stages > 1 or cfg.pipeline.split_at:
        from ray_train.worker.stages import SplitError, cut

        try:
            cut(net, cfg.pipeline.stages, cfg.pipeline.split_names, to_tensor(data.x_test[:2]))
        except SplitError as exc:
            raise UserError(f"model: {cfg.model.name} cannot be cut as asked: {exc}") from None
    workers = strategies.get(cfg.run.strategy).epoch_shards(cfg)
    if workers is None:  # no SGD batches (the engine checks its own when it starts)
        return
    if steps_per_epoch(len(data.y_train), workers, cfg.run.batch_size) == 0:
        share = len(data.y_train) // workers
        raise ConfigError(f"run.batch_size: {cfg.run.batch_size} is larger than a replica's share of the training "
                          f"set ({share} examples with {workers} replica(s)); lower --batch-size or --replicas")
