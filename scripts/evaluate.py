"""Reload a trained ensemble from its run folder and use it, without Ray:

    python scripts/evaluate.py --run runs/<name>                  # re-evaluate on the run's test set
    python scripts/evaluate.py --run runs/<name> --images x.npy   # predict: every image's votes

The run folder holds run.json (the config: which dataset), ensemble.json (members, weights) and
members/member_<k>/model.pt (weights + spec, loadable with torch.load(weights_only=True)).
--images takes an IDX file (gzipped or raw, like MNIST's t10k-images-idx3-ubyte) or a .npy array
of shape [N, 28, 28], [N, 1, 28, 28] or [N, 784]; uint8 pixels are scaled to [0, 1] as in training.
A user mistake prints one line on stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from ray_train.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise UserError(f"{message} (see --help)")


def load_ensemble(run_dir: str) -> tuple[list[dict], list, np.ndarray, dict]:
    """(member specs, eval-mode models, weights, stored config) of the members that vote."""
    from models import ImportedFactory, build_model
    from ray_train.run.checkpoint import load_checked

    if not os.path.isdir(run_dir):
        raise UserError(f"--run: no such run folder: {run_dir}")
    path = os.path.join(run_dir, "ensemble.json")
    if not os.path.isfile(path):
        raise UserError(f"--run: {run_dir} holds no ensemble (no ensemble.json); train one with --strategy ensemble")
    try:
        with open(path) as fh:
            info = json.load(fh)
        with open(os.path.join(run_dir, "run.json")) as fh:
            config = json.load(fh)["config"]
        voting = [m for m in info["members"] if m["status"] == "ok"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--run: {run_dir} has an unreadable ensemble.json or run.json ({exc})") from None
    if not voting:
        raise UserError(f"--run: {run_dir} has no member that finished training")
    models = []
    for m in voting:
        state = load_checked(os.path.join(run_dir, m["path"]))
        name, shape = state["spec"]["model"], tuple(state.get("input_shape", (1, 28, 28)))
        if name == "custom":
            raise UserError(f"--run: {run_dir}'s members are Python callables handed to ray_train.fit; "
                            "load members/member_<k>/model.pt with your own network in Python")
        model = ImportedFactory(name)() if ":" in name else build_model(
            name, dropout=state["spec"]["dropout"], input_shape=shape, num_classes=state.get("num_classes", 10))
        model.load_state_dict(state["model"])
        model.eval()
        model.standardize = state.get("standardize")  # the training split's statistics, if the run used them
        models.append(model)
    return voting, models, np.asarray(info["weights"], dtype=np.float64), config


def probabilities(models: list, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Softmax of every member, float32 [members, n, classes]."""
    import torch

    from ray_train.worker.batches import to_tensor

    def inputs(model, part):
        t = to_tensor(part)
        stats = getattr(model, "standardize", None)
        return t if stats is None else (t - stats["mean"]) / stats["std"]

    out = []
    with torch.no_grad():
        for model in models:
            parts = [torch.softmax(model(inputs(model, x[s : s + batch_size])), dim=1).numpy()
                     for s in range(0, len(x), batch_size)]
            out.append(np.concatenate(parts))
    return np.stack(out)


def read_images(path: str) -> np.ndarray:
    """Images as [N, 1, 28, 28]: uint8 kept (scaled later), floats as float32 in [0, 1]."""
    from ray_train.data.loaders import read_idx

    if not os.path.isfile(path):
        raise UserError(f"--images: file not found: {path}")
    if path.endswith(".npy"):
        try:
            x = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise UserError(f"--images: {path} is not a readable .npy array ({exc})") from None
    else:
        try:
            x = read_idx(path)
        except UserError as exc:
            raise UserError(f"--images: {str(exc).split('; ')[0]}; expected an IDX image file or a .npy array") from None
    if x.ndim == 2 and x.shape == (28, 28):
        x = x[None]
    if x.ndim == 2 and x.shape[1] == 784 or x.ndim == 3 and x.shape[1:] == (28, 28) or x.ndim == 4 and x.shape[1:] == (1, 28, 28):
        x = x.reshape(len(x), 1, 28, 28)
    else:
        raise UserError(f"--images: {path} holds an array of shape {x.shape}; expected [N, 28, 28], "
                        "[N, 1, 28, 28] or [N, 784] MNIST-sized images")
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.number):
        raise UserError(f"--images: {path} holds {x.dtype} values, not pixels")
    x = x.astype(np.float32)
    return x / 255.0 if x.size and x.max() > 1.5 else x  # 0..255 floats are scaled like uint8


def evaluate(run_dir: str, images: str | None = None) -> dict:
    from ray_train.config import build_config
    from ray_train.data.loaders import load_dataset
    from ray_train.strategies.ensemble.voting import accuracy, majority_vote, oracle_accuracy, soft_vote

    members, models, weights, config = load_ensemble(run_dir)
    if images is not None:
        x = read_images(images)
        probs = probabilities(models, x)
        soft, mean = soft_vote(probs, weights)
        votes = probs.argmax(2)
        return {"images": [{"index": i, "vote": int(v), "votes": votes[:, i].tolist(), "soft_vote": int(soft[i]),
                            "soft_probability": float(mean[i, soft[i]])}
                           for i, v in enumerate(majority_vote(probs, weights))]}
    # the test set only, raw: each member applies its own stored standardisation
    config = {**config, "data": {**config.get("data", {}), "expand": False, "standardize": False}}
    data = load_dataset(build_config(config).data, seed=config.get("run", {}).get("seed", 0))
    probs = probabilities(models, data.x_test)
    y = data.y_test
    result = {"dataset": data.name, "test_images": int(len(y)), "members": []}
    for m, p in zip(members, probs):
        acc, err = accuracy(p.argmax(1), y)
        result["members"].append({"index": m["index"], "model": m["model"], "seed": m["seed"],
                                  "test_accuracy": acc, "test_errors": err})
    result["vote_accuracy"], result["vote_errors"] = accuracy(majority_vote(probs, weights), y)
    result["soft_vote_accuracy"], result["soft_vote_errors"] = accuracy(soft_vote(probs, weights)[0], y)
    result["oracle_accuracy"] = oracle_accuracy(probs, y)
    return result


def show(result: dict, out) -> None:
    if "images" in result:
        for r in result["images"]:
            print(f"image {r['index']}: vote {r['vote']}  votes {' '.join(map(str, r['votes']))}  "
                  f"soft vote {r['soft_vote']} (p={r['soft_probability']:.3f})", file=out)
        return
    print(f"{result['dataset']} test set, {result['test_images']} images:", file=out)
    for m in result["members"]:
        print(f"  member {m['index']}  {m['model']:<6} seed {m['seed']:<4} acc {m['test_accuracy']:.4f} "
              f"({m['test_errors']} errors)", file=out)
    print(f"  hard vote: acc {result['vote_accuracy']:.4f} ({result['vote_errors']} errors)   soft vote: acc "
          f"{result['soft_vote_accuracy']:.4f} ({result['soft_vote_errors']} errors)   oracle "
          f"{result['oracle_accuracy']:.4f}", file=out)


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="scripts/evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, metavar="DIR", help="run folder of an ensemble run (runs/<name>)")
    p.add_argument("--images", metavar="FILE", help="IDX or .npy images to predict (default: the run's test set)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    try:
        args = p.parse_args(argv)
        result = evaluate(args.run, args.images)
    except UserError as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        show(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
