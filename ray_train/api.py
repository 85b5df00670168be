"""The public API: ``ray_train.fit(config, model=..., data=...)`` runs one training run end to end
(the CLI comes through here too) and returns its summary as a dict.

    import numpy as np, torch.nn as nn, ray_train

    data = ray_train.Dataset("blobs", x_train, y_train, x_test, y_test)     # numpy, any shape
    summary = ray_train.fit({"run": {"strategy": "sync", "epochs": 5}},
                            model=lambda: nn.Sequential(nn.Flatten(), nn.Linear(192, 4)), data=data)

``config``: a TrainConfig, a mapping of sections (as in a YAML file), a YAML path, or None for the
defaults. ``model``: a registry name ("net_d"), a "package.module:function" string, or a zero-argument
callable returning an nn.Module (a lambda or closure works: it is pickled by value to the replicas);
either may return a list of stage modules instead, one per pipeline stage (docs/pipeline.md).
``data``: a registry name ("mnist5k", "idx:DIR", "npz:FILE") or a ray_train.Dataset (class labels, or
float targets of any shape: regression). ``loss``: a name (model.loss: "log_likelihood", "mse", ...),
"package.module:function", or any callable (outputs, targets) -> scalar batch mean, such as
``nn.CrossEntropyLoss(label_smoothing=0.1)`` (pickled to the replicas with the config).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Mapping

import numpy as np

from ray_train import strategies
from ray_train.config import TrainConfig, build_config, load_yaml
from ray_train.data.dataset import Dataset
from ray_train.data.loaders import load_dataset, streamed_source
from ray_train.data.streams import Streams
from ray_train.errors import ConfigError
from ray_train.network import CUSTOM, check_model, model_factory, with_stages
from ray_train.run import storage
from ray_train.run.checkpoint import CheckpointStore
from ray_train.run.files import write_json
from ray_train.run.outputs import make_run_dir
from ray_train.run.signals import StopSignals


def fit(config: TrainConfig | Mapping | str | None = None, model=None, data=None, *, loss=None,
        tensorboard: bool = True, progress: bool | None = None, out=None, on_epoch=None, address: str | None = None,
        verbose: bool = False, headers: bool = True) -> dict:
    """Train and return the summary (also written to <storage>/<run_name>/summary.json). Raises
    UserError (bad input), loop.Diverged, loop.Interrupted (SIGINT/SIGTERM: the run checkpointed
    where it stopped) or failure.ReplicaFailure (replicas died more often than run.max_failures).
    ``on_epoch``, if given, is called with each epoch's history record (not by ensembles).
    ``address``: the cluster (cluster.resolve_address: local, auto, HOST:PORT; default RAY_ADDRESS,
    else a local cluster of its own). Ray's own output goes to the run folder's ray.log, and to the
    terminal as well with ``verbose``. ``headers`` False leaves out the lines a command that runs
    several runs prints once itself (which cluster, where TensorBoard looks): compare."""
    from ray_train.cluster import local_resources

    cfg = as_config(config)
    storage.check(cfg.run.storage)  # a bucket that is not there, credentials refused: before Ray starts
    # a run the local cluster about to start cannot hold fails now, not after Ray's start-up
    local = local_resources(address)
    if local is not None:
        strategies.get(cfg.run.strategy).check_resources(cfg, total=local)
    cfg, custom = _with_model(cfg, model)
    cfg = _with_loss(cfg, loss)
    cluster = _cluster_for_streams(cfg, data, address, verbose)
    cfg, dataset = _with_data(cfg, data)
    if custom is not None or ":" in cfg.model.name:  # a user's factory may return a list of stage modules
        stages = cfg.pipeline.stages
        cfg, staged = with_stages(cfg, model_factory(cfg, dataset, custom))
        custom = staged if custom is not None else None
        if local is not None and cfg.pipeline.stages != stages:
            strategies.get(cfg.run.strategy).check_resources(cfg, total=local)
    check_targets(cfg, dataset)
    strategy = strategies.get(cfg.run.strategy)
    if getattr(dataset, "streamed", False) and not strategy.streams:
        takers = ", ".join(s.name for s in strategies.all_strategies() if s.streams)
        raise ConfigError(f"run.strategy: {strategy.name} cannot train on a streamed dataset ({cfg.data.dataset}) yet; "
                          f"use {takers}, or arrays (npz:FILE, ray_train.Dataset)")
    if getattr(dataset, "streamed", False) and cfg.pipeline.stages > 1:
        raise ConfigError(f"pipeline.stages: a streamed dataset ({cfg.data.dataset}) trains whole replicas, not "
                          f"pipelines of {cfg.pipeline.stages} stages; leave --stages unset, or give arrays")
    cfg = _with_lambda(cfg, dataset)
    # every mistake that the config and the data show is reported before Ray starts
    runs = strategies.get(cfg.run.strategy).model_configs(cfg)
    for checked in {(c.model.name, c.model.dropout): c for c in runs}.values():
        check_model(model_factory(checked, dataset, custom), dataset, checked)
    factory = model_factory(cfg, dataset, custom)
    return _run(cfg, dataset, factory, custom, tensorboard, progress, out or sys.stdout, on_epoch, address, verbose,
                headers, cluster)


def as_config(config) -> TrainConfig:
    if config is None:
        return build_config()
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        return build_config(load_yaml(os.fspath(config)))
    if isinstance(config, Mapping):
        return build_config(config)
    raise ConfigError(f"config: expected a TrainConfig, a mapping of sections or a YAML path, got {type(config).__name__}")


def _replace(cfg: TrainConfig, section: str, **values) -> TrainConfig:
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})


def _with_model(cfg: TrainConfig, model):
    if model is None:
        return cfg, None
    if isinstance(model, str):
        return _replace(cfg, "model", name=model), None
    if callable(model):
        return _replace(cfg, "model", name=CUSTOM), model
    raise ConfigError(f"model: expected a registry name, 'package.module:function' or a zero-argument callable "
                      f"returning an nn.Module, got {type(model).__name__}")


def _with_loss(cfg: TrainConfig, loss) -> TrainConfig:
    from ray_train.fields import CUSTOM_LOSS

    if loss is None:
        return cfg
    if isinstance(loss, str):
        return _replace(cfg, "model", loss=loss, loss_fn=None)
    if callable(loss):
        return _replace(cfg, "model", loss=CUSTOM_LOSS, loss_fn=loss)
    raise ConfigError(f"loss: expected a loss name, 'package.module:function' or a callable (outputs, targets) -> "
                      f"loss, got {type(loss).__name__}")


def check_targets(cfg: TrainConfig, data: Dataset) -> None:
    """The loss and the stop rules fit the targets: class labels or float targets (regression)."""
    from ray_train.fields import CLASSIFICATION_LOSSES, REGRESSION_LOSSES
    from ray_train.worker.losses import Objective

    Objective.of(cfg.model, data)  # a "package.module:function" loss is imported here, once, on the driver
    name = cfg.model.loss
    if data.regression and name in CLASSIFICATION_LOSSES:
        raise ConfigError(f"model.loss: {name} needs integer class labels, but {data.name}'s targets are floats "
                          f"(regression); use {' or '.join(REGRESSION_LOSSES)} (--loss mse) or your own loss")
    if not data.regression and name in REGRESSION_LOSSES:
        raise ConfigError(f"model.loss: {name} is for float targets (regression), but {data.name} has class labels; "
                          f"use {', '.join(CLASSIFICATION_LOSSES)} or your own loss")
    if data.regression and cfg.run.target_accuracy is not None:
        raise ConfigError(f"run.target_accuracy: accuracy needs class labels; {data.name}'s targets are floats "
                          "(regression): stop on the validation loss with --target-loss")


def _cluster_for_streams(cfg: TrainConfig, data, address: str | None, verbose: bool) -> str | None:
    """A streamed source (images:, parquet:, ray.data Datasets) is opened through Ray Data, which
    needs Ray: the cluster ``address`` names is started or joined first (else Ray Data would start
    one with Ray's defaults, or join the one `ray start` left). Returns the line saying which
    cluster, or None for arrays (their run starts Ray later, importing meanwhile)."""
    if data is not None and not isinstance(data, (str, Dataset, Streams)):
        return None  # _with_data refuses it
    if streamed_source(data if isinstance(data, str) else cfg.data.dataset, None if isinstance(data, str) else data):
        from ray_train.cluster import init_ray

        return init_ray(address=address, verbose=verbose)
    return None


def _with_data(cfg: TrainConfig, data) -> tuple[TrainConfig, Dataset]:
    if isinstance(data, str):
        cfg = _replace(cfg, "data", dataset=data)
    elif isinstance(data, (Dataset, Streams)):
        cfg = _replace(cfg, "data", dataset=CUSTOM)
        return cfg, load_dataset(cfg.data, seed=cfg.run.seed, arrays=data)
    elif data is not None:
        raise ConfigError(f"data: expected a dataset name, a ray_train.Dataset or ray_train.Streams (ray.data "
                          f"datasets), got {type(data).__name__}")
    elif cfg.data.dataset == CUSTOM:
        raise ConfigError("data.dataset: 'custom' means arrays handed to ray_train.fit(data=Dataset(...)); "
                          "none were given")
    return cfg, load_dataset(cfg.data, seed=cfg.run.seed)


def _with_lambda(cfg: TrainConfig, data: Dataset) -> TrainConfig:
    """Nielsen's lambda (optim.l2_lambda) as the per-step weight decay, now that the training set's
    size is known (after the validation split and any expansion)."""
    from ray_train.worker.optim import weight_decay_from_lambda

    o = cfg.optim
    if o.l2_lambda is None:
        return cfg
    batch = strategies.get(cfg.run.strategy).step_examples(cfg, len(data.y_train))
    decay = weight_decay_from_lambda(o.l2_lambda, len(data.y_train), batch, o.l2_cost)
    return _replace(cfg, "optim", weight_decay=decay, l2_lambda=None)


def _run(cfg: TrainConfig, data: Dataset, factory, custom, tensorboard: bool, progress, out, on_epoch=None,
         address: str | None = None, verbose: bool = False, headers: bool = True, cluster: str | None = None) -> dict:
    from ray_train import raylog

    previous = raylog.LOG.path  # compare's own ray.log, between its regimes
    try:
        return _run_logged(cfg, data, factory, custom, tensorboard, progress, out, on_epoch, address, verbose, headers,
                           cluster)
    finally:
        raylog.LOG.to_file(previous)


def _run_logged(cfg: TrainConfig, data: Dataset, factory, custom, tensorboard: bool, progress, out, on_epoch,
                address: str | None, verbose: bool, headers: bool, cluster: str | None = None) -> dict:
    from ray_train.cluster import init_ray

    t_start = time.perf_counter()
    strategy = strategies.get(cfg.run.strategy)
    # torch and the strategy's modules load while Ray starts its processes; a stream's cluster was
    # started before Ray Data opened the data, and ``cluster`` is what was said then
    said = init_ray(preload=("ray_train.run.loop",) + strategy.modules(), address=address, verbose=verbose)
    cluster = cluster or said
    if headers:
        print(cluster, file=out, flush=True)
    strategy.check_resources(cfg)
    streamed = getattr(data, "streamed", False)
    if streamed:
        cfg = _leave_cpus_for_data(cfg, strategy, out)
    name = cfg.run_name  # a default name holds the time: taken once
    run_dir = make_run_dir(cfg, name)
    # event files and ray.log grow: with a URI for storage they are written on the driver and uploaded
    with storage.driver_folder(run_dir) as mirror:
        return _train(cfg, strategy, data, factory, custom, tensorboard, progress, out, on_epoch, headers, name,
                      run_dir, mirror, t_start)


def _train(cfg: TrainConfig, strategy, data: Dataset, factory, custom, tensorboard: bool, progress, out, on_epoch,
           headers: bool, name: str, run_dir: str, mirror, t_start: float) -> dict:
    import ray

    from ray_train import raylog
    from ray_train.cluster import factory_failure
    from ray_train.metrics.sink import MetricsSink
    from ray_train.metrics.tensorboard import NullLogger, TensorBoardLogger, logged_steps
    from ray_train.run.job import Job

    streamed = getattr(data, "streamed", False)
    logs = mirror.local if mirror else run_dir
    raylog.LOG.to_file(os.path.join(logs, "ray.log"))
    raylog.note(f"run {name} in {run_dir}")
    checkpoints = CheckpointStore(run_dir, keep=cfg.run.keep_checkpoints)
    found, skip_logged = None, {}
    if cfg.run.resume and strategy.resumes_itself:
        # Its parts resume from their own checkpoints, each at its own step: no single purge step
        # fits them all, so the points the interrupted run wrote are kept and not written again.
        skip_logged = logged_steps(run_dir)
    elif cfg.run.resume:
        found = checkpoints.load_latest()
        if found is None:
            print(f"warning: {run_dir} has no readable checkpoint; starting from scratch", file=sys.stderr, flush=True)
        else:
            print(f"resuming from {found[1]} (epoch {found[0]['epoch']}, step {found[0]['step']})", file=out, flush=True)
    # TensorBoard drops the points an interrupted run wrote after its checkpoint (purge_step)
    purge = found[0]["step"] + 1 if found else None
    logger = TensorBoardLogger(logs, purge_step=purge) if tensorboard else NullLogger()
    sink = MetricsSink(logger, out=out, progress=progress, skip_logged=skip_logged)
    if mirror:  # each epoch's points reach the bucket before the next epoch starts
        on_epoch = _then_upload(on_epoch, logger, mirror)
    print(f"run {name}: {cfg.run.strategy} {cfg.model.name} on {data.name} "
          f"({len(data.y_train)} train / " + (f"{len(data.y_val)} validation / " if data.has_validation else "")
          + f"{len(data.y_test)} test), logs in {run_dir}", file=out, flush=True)
    if streamed:
        data = data.cached(out)
    data_ref = data if streamed else ray.put(data)  # a stream is its lazy plans: the replicas read it
    try:
        with StopSignals() as stop:  # after ray.init: Ray installs its own SIGTERM handler there
            job = Job(strategy, cfg, data, data_ref, factory, custom, sink, run_dir, checkpoints, found, stop, on_epoch)
            try:
                result = strategy.run(job)
            except ray.exceptions.RayActorError as exc:
                raise factory_failure(exc) or exc
    finally:
        sink.flush()
    summary = {"run_name": name, "strategy": cfg.run.strategy, "model": cfg.model.name, "dataset": data.name,
               "replicas": cfg.resources.replicas, **result, "wall_s": time.perf_counter() - t_start,
               "config": cfg.to_dict()}
    metrics = {"hparams/wall_s": summary["wall_s"]}
    for key in ("test_accuracy", "val_accuracy", "test_loss", "val_loss", "test_mae"):
        if summary.get(key) is not None and (key.endswith("accuracy") or data.regression):
            metrics[f"hparams/{key}"] = summary[key]
    sink.finish(hparams=_flat_hparams(cfg), metrics=metrics)
    write_json(os.path.join(run_dir, "summary.json"), summary)
    if data.regression:
        _print_regression(summary, run_dir, out)
    elif summary.get("val_accuracy") is not None:
        print(f"best validation accuracy {summary['val_accuracy']:.4f} after epoch {summary['best_epoch']}: test "
              f"accuracy there {summary['best_test_accuracy']:.4f} ({summary['best_test_errors']} errors; model.pt)",
              file=out, flush=True)
    if not data.regression:
        print(f"done: test accuracy {summary['test_accuracy']:.4f} ({summary['test_errors']} errors), "
              f"{summary['samples_per_s']:,.0f} samples/s, {summary['wall_s']:.1f} s wall; "
              f"summary in {run_dir}/summary.json", file=out, flush=True)
    if tensorboard and headers:
        print(f"watch it: tensorboard --logdir {cfg.run.storage}", file=out, flush=True)
    return summary


def _then_upload(on_epoch, logger, mirror):
    def call(record: dict) -> None:
        if on_epoch is not None:
            on_epoch(record)
        logger.flush()
        mirror.sync()
    return call


def _leave_cpus_for_data(cfg: TrainConfig, strategy, out) -> TrainConfig:
    """Ray Data's reading tasks need CPUs the replicas leave free: where the replicas would take
    them all (2 replicas x 1 CPU on 2 CPUs, the defaults), each takes less, and one line says so."""
    import ray

    from ray_train.data.streams import replica_cpus

    res = cfg.resources

    def taken(per: float) -> float:
        return sum(b.get("CPU", 0.0) for b in strategy.bundles(_replace(cfg, "resources", cpus_per_replica=per)))

    bundles = round((taken(2 * res.cpus_per_replica) - taken(res.cpus_per_replica)) / res.cpus_per_replica)
    fixed = taken(res.cpus_per_replica) - bundles * res.cpus_per_replica  # parameter shards' CPUs
    total = float(ray.cluster_resources().get("CPU", 0.0))
    per = replica_cpus(total, fixed, bundles, res.cpus_per_replica)
    if per == res.cpus_per_replica:
        return cfg
    print(f"streamed data: each replica takes {per:g} CPU instead of {res.cpus_per_replica:g}, leaving 1 of the "
          f"cluster's {total:g} CPUs to Ray Data's reading tasks (--cpus-per-replica sets it)", file=out, flush=True)
    return _replace(cfg, "resources", cpus_per_replica=per)


def _print_regression(summary: dict, run_dir: str, out) -> None:
    if summary.get("val_loss") is not None:
        print(f"best validation loss {summary['val_loss']:.4g} after epoch {summary['best_epoch']}: test loss there "
              f"{summary['best_test_loss']:.4g}, mean absolute error {summary['best_test_mae']:.4g} (model.pt)",
              file=out, flush=True)
    print(f"done: test loss {summary['test_loss']:.4g}, mean absolute error {summary['test_mae']:.4g}, "
          f"{summary['samples_per_s']:,.0f} samples/s, {summary['wall_s']:.1f} s wall; "
          f"summary in {run_dir}/summary.json", file=out, flush=True)


def _flat_hparams(cfg: TrainConfig) -> dict:
    return {f"{section}.{k}": v for section, values in cfg.to_dict().items() for k, v in values.items()
            if v is not None}


OVERFIT_EXAMPLES, OVERFIT_STEPS, OVERFIT_ERROR = 100, 400, 0.01


def overfit_check(config=None, model=None, data=None, *, progress: bool | None = None, out=None,
                  address: str | None = None, verbose: bool = False) -> dict:
    """The sanity check before a long run (the seed article's section 7.1): train the model on
    about 100 training examples, without regularisation, on one replica, and see whether the
    training error goes to (near) zero. A model, loss and optimizer that cannot overfit 100
    examples will not learn the full set either. Returns {passed, train_error, examples, steps}."""
    from ray_train.data.dataset import stratified_split

    out = out or sys.stdout
    cfg = as_config(config)
    cfg, custom = _with_model(cfg, model)
    _cluster_for_streams(cfg, data, address, verbose)
    cfg, full = _with_data(cfg, data)
    share = min(1.0, OVERFIT_EXAMPLES / len(full.y_train))
    idx = stratified_split(full.y_train, share, 0)[0] if share < 1 else np.arange(len(full.y_train))
    x, y = full.x_train[idx], full.y_train[idx]
    small = Dataset(f"{full.name}-overfit", x, y, x, y, full.num_classes)  # "test" = the same examples
    batch = max(1, min(cfg.run.batch_size, len(y) // 5))
    epochs = -(-OVERFIT_STEPS // (len(y) // batch))
    rep = dataclasses.replace
    cfg = rep(cfg, run=rep(cfg.run, strategy=strategies.DEFAULT, epochs=epochs, batch_size=batch, eval_every=epochs,
                           target_accuracy=None, time_limit=None, resume=None,
                           run_name=f"overfit-{cfg.run_name}", log_every=min(cfg.run.log_every, len(y) // batch)),
              optim=rep(cfg.optim, weight_decay=0.0, l2_lambda=None, l1=0.0, schedule="constant", early_stop=0),
              model=rep(cfg.model, dropout=0.0 if custom is None and ":" not in cfg.model.name else cfg.model.dropout),
              data=rep(cfg.data, validation=0, expand=False),
              resources=rep(cfg.resources, replicas=1))
    print(f"overfit check: {cfg.model.name} on {len(y)} training examples of {full.name}, {epochs * (len(y) // batch)} "
          f"steps of batch {batch}, no regularisation", file=out, flush=True)
    summary = fit(cfg, model=custom, data=small, tensorboard=False, progress=progress, out=out, address=address,
                  verbose=verbose)
    error = 1.0 - summary["test_accuracy"]
    passed = error <= OVERFIT_ERROR
    verdict = ("passed: the model, loss and optimizer can fit the data" if passed else
               f"FAILED: training error above {OVERFIT_ERROR:.0%}; check the model's output size, the loss, the "
               "learning rate (--lr) and the labels before a long run")
    print(f"overfit check: training error {error:.1%} on {len(y)} examples; {verdict}", file=out, flush=True)
    return {"passed": passed, "train_error": error, "examples": len(y), "steps": summary["steps"],
            "run_dir": os.path.join(cfg.run.storage, cfg.run.run_name)}
