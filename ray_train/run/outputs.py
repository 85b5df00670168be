"""What a run leaves in its folder besides checkpoints and event files: the folder itself with
run.json, and the networks (model.pt, model-last.pt) with what ``python -m ray_train predict`` needs."""
from __future__ import annotations

import os

from ray_train.config import TrainConfig
from ray_train.data.dataset import Dataset
from ray_train.errors import UserError
from ray_train.run import storage
from ray_train.run.checkpoint import RUN_FILE, write_run_file
from ray_train.run.files import save_atomic


def make_run_dir(cfg: TrainConfig, name: str) -> str:
    run_dir = os.path.join(cfg.run.storage, name)
    if cfg.run.resume:
        return run_dir  # the CLI checked it is a run folder of this strategy
    if storage.exists(os.path.join(run_dir, RUN_FILE)):
        raise UserError(f"run.run_name: {run_dir} already holds a run; choose another --run-name "
                        f"or continue it with --resume {run_dir}")
    if storage.exists(cfg.run.storage) and not storage.isdir(cfg.run.storage):
        raise UserError(f"run.storage: {cfg.run.storage} is a file; --storage needs a folder")
    try:
        storage.makedirs(run_dir)
    except OSError as exc:
        raise UserError(f"run.storage: cannot create {run_dir}: {exc.strerror or exc}") from None
    write_run_file(run_dir, cfg.run.strategy, cfg.to_dict())
    return run_dir


def save_models(run_dir: str, summary, data: Dataset, extra: dict, vote: bool = False) -> None:
    """model.pt: the network of the best-validation epoch (the figure the texts report), and
    model-last.pt the final one. An ensemble member (``vote``) votes with its final network, so
    there model.pt is the final network and model-best.pt the best-validation one. Each file
    carries what predict needs to rebuild and feed the network: the input shape, the classes (and
    their names) or the regression targets' shape, and the standardisation."""
    import torch

    stats = {k: torch.from_numpy(v) for k, v in data.standardize.items()} if data.standardize else None
    # class names: an in-memory dataset's (npz class_names) or an image folder's (sorted folder names)
    classes = getattr(data, "class_names", None) or getattr(data, "classes", None)
    meta = {**extra, "input_shape": list(data.input_shape), "num_classes": data.num_classes, "standardize": stats,
            "class_names": list(classes) if classes else None,
            "regression": bool(getattr(data, "regression", False)),
            "target_shape": list(getattr(data, "target_shape", ()))}
    if classes:
        from ray_train.run.files import write_json

        write_json(os.path.join(run_dir, "classes.json"), list(classes))
    best = {**(summary.best_model_state or summary.model_state), **meta, "epoch": summary.best_epoch or summary.epochs}
    last = {**summary.model_state, **meta, "epoch": summary.epochs}
    names = (("model.pt", last), ("model-best.pt", best)) if vote else (("model.pt", best), ("model-last.pt", last))
    for name, state in names:
        save_atomic(os.path.join(run_dir, name), state)
