"""Predict and evaluate with any finished run, without Ray (``python -m ray_train predict`` and
``ray_train.predict``): the run's network(s) from its folder (ray_train/run/reload.py), inputs of
the shape it trained on, its standardisation, its class names.

    rows = ray_train.predict("runs/my-run", ["new.npy", "photos/"])["rows"]

An ensemble combines its members by the vote (``vote``: "hard", the default, or "soft") for
classes, and by the weighted average of their outputs for regression (a vote needs classes)."""
from __future__ import annotations

import numpy as np

from ray_train.errors import UserError
from ray_train.run.reload import Inputs, Predictor, load_run, read_inputs, read_labels

VOTES = ("hard", "soft")


def predict(run_dir: str, inputs=None, *, labels=None, model=None, file: str = "model.pt",
            vote: str | None = None) -> dict:
    """Predictions of the run in ``run_dir`` on ``inputs`` (a path, a list of paths, or an array
    [N, ...]); None evaluates on the run's own test split. ``labels`` (a path or an array) gives
    the accuracy, or for regression the loss-free mean absolute error; ``model`` the network's
    factory for a run that trained a callable. Returns {"rows": one dict per input, "accuracy"
    or "mae" where labels are known, ...}."""
    if vote is not None and vote not in VOTES:
        raise UserError(f"--vote: unknown value {vote!r}; allowed: {', '.join(VOTES)}")
    p = load_run(run_dir, model, file)
    if vote is not None and p.regression:
        from ray_train.strategies.ensemble.voting import VOTE_NEEDS_CLASSES

        raise UserError(f"--vote: {VOTE_NEEDS_CLASSES}")
    if vote is not None and not p.ensemble:
        raise UserError(f"--vote: {run_dir} holds one network, not an ensemble; there is nothing to vote")
    ins = _inputs(p, inputs)
    if labels is not None:
        y = (read_labels(labels, len(ins.x), p.class_names, p.regression) if isinstance(labels, str)
             else np.asarray(labels))
        ins.labels = y
    outs = p.outputs(ins.x)
    result = {"run": run_dir, "inputs": len(ins.x), "ensemble": p.ensemble, "regression": p.regression,
              "class_names": p.class_names}
    if p.regression:
        from ray_train.strategies.ensemble.voting import average

        preds = average(outs, p.weights) if p.ensemble else outs[0].astype(np.float64)
        result["rows"] = [{"input": n, "prediction": np.ravel(v).tolist()} for n, v in zip(ins.names, preds)]
        if ins.labels is not None:
            y = ins.labels.astype(np.float64).reshape(preds.shape)
            result["mae"] = float(np.abs(preds - y).reshape(len(y), -1).mean(1).mean()) if len(y) else 0.0
            for row, t in zip(result["rows"], y):
                row["label"] = np.ravel(t).tolist()
        return result
    preds, probability, votes = _classes(p, outs, vote or "hard")
    rows = []
    for i, name in enumerate(ins.names):
        row = {"input": name, "prediction": int(preds[i]), "class": p.name_of(int(preds[i])),
               "probability": float(probability[i])}
        if votes is not None:
            row["votes"] = [p.name_of(int(v)) for v in votes[:, i]]
        if ins.labels is not None:
            row["label"] = p.name_of(int(ins.labels[i]))
        rows.append(row)
    result["rows"] = rows
    if ins.labels is not None:
        y = ins.labels.astype(np.int64)
        errors = int((preds != y).sum())
        result.update(accuracy=1.0 - errors / max(len(y), 1), errors=errors)
        if p.ensemble:
            result["members"] = [{"index": m["index"], "model": m["model"], "seed": m["seed"],
                                  "accuracy": float((o.argmax(1) == y).mean()) if len(y) else 0.0}
                                 for m, o in zip(p.members, outs)]
    return result


def _classes(p: Predictor, outs: np.ndarray, vote: str):
    """(predicted class, its probability, each member's vote or None) per input."""
    if not p.ensemble:
        return outs[0].argmax(1), outs[0].max(1), None
    from ray_train.strategies.ensemble.voting import majority_vote, soft_vote

    soft, mean = soft_vote(outs, p.weights)
    preds = soft if vote == "soft" else majority_vote(outs, p.weights)
    return preds, mean[np.arange(len(preds)), preds], outs.argmax(2)


def _inputs(p: Predictor, inputs) -> Inputs:
    from ray_train.run.reload import fit_shape

    if inputs is None:
        return _test_split(p)
    if isinstance(inputs, np.ndarray):
        x = fit_shape(inputs, p.input_shape, "inputs")
        return Inputs(x, [f"[{i}]" for i in range(len(x))])
    return read_inputs([inputs] if isinstance(inputs, str) else list(inputs), p.input_shape, p.class_names)


def _test_split(p: Predictor) -> Inputs:
    """The run's own test split, raw: the stored standardisation is applied by the predictor."""
    from ray_train.config import build_config
    from ray_train.data.loaders import load_dataset

    cfg = p.config
    if cfg.get("data", {}).get("dataset") == "custom":
        raise UserError(f"--run: {p.run_dir} trained on arrays handed to ray_train.fit; they are not in the run "
                        "folder: give the inputs to predict (and --labels for the accuracy)")
    config = {**cfg, "data": {**cfg.get("data", {}), "expand": False, "standardize": False}}
    try:
        built = build_config({k: v for k, v in config.items() if k in ("data",)})
    except UserError as exc:
        raise UserError(f"--run: {p.run_dir}'s run.json: {exc}") from None
    data = load_dataset(built.data, seed=cfg.get("run", {}).get("seed", 0))
    return Inputs(data.x_test, [f"test[{i}]" for i in range(len(data.y_test))], data.y_test)
