"""Reload a finished run from its folder and use it, without Ray: a thin wrapper over
``python -m ray_train predict`` (docs/predict.md), kept for the commands people already type.

    python scripts/evaluate.py --run runs/<name>                   # re-evaluate on the run's test set
    python scripts/evaluate.py --run runs/<name> --images x.npy    # predict: one line per input
    python scripts/evaluate.py --run runs/<ensemble> --json        # an ensemble's full vote report

Any run folder works (every strategy); --images takes whatever predict does (.npy, .npz, IDX,
PNG or JPEG files or folders) of the shape the run trained on. A user mistake prints one line on
stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ray_train.errors import UserError  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise UserError(f"{message} (see --help)")


def ensemble_report(run_dir: str) -> dict:
    """An ensemble on its test set: every member, the hard and soft vote, the oracle."""
    from ray_train.prediction import _test_split
    from ray_train.run.reload import load_run
    from ray_train.strategies.ensemble.voting import VOTE_NEEDS_CLASSES, accuracy, vote_report

    p = load_run(run_dir)
    if p.regression:
        raise UserError(f"--run: {VOTE_NEEDS_CLASSES}; python -m ray_train predict --run {run_dir} gives it")
    ins = _test_split(p)
    probs = p.outputs(ins.x)  # each member standardises as it was trained
    report = vote_report(probs, p.weights, ins.labels)
    members = [{"index": m["index"], "model": m["model"], "seed": m["seed"],
                "test_accuracy": accuracy(o.argmax(1), ins.labels)[0], "test_errors": accuracy(o.argmax(1), ins.labels)[1]}
               for m, o in zip(p.members, probs)]
    return {"test_images": int(len(ins.labels)), "members": members,
            **{k: v for k, v in report.items() if k not in ("vote_preds", "disagreement")}}


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="scripts/evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, metavar="DIR", help="a run folder (runs/<name>), any strategy")
    p.add_argument("--images", metavar="FILE", help="inputs to predict (default: the run's test set)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the lines")
    try:
        args = p.parse_args(argv)
        if args.json and args.images is None and os.path.isfile(os.path.join(args.run, "ensemble.json")):
            print(json.dumps(ensemble_report(args.run)))
            return 0
    except UserError as exc:
        print(f"ray_train: error: {exc}", file=sys.stderr)
        return 2
    from ray_train.cli import main as cli

    return cli(["predict", "--run", args.run, *([args.images] if args.images else []), *(["--json"] if args.json else [])])


if __name__ == "__main__":
    sys.exit(main())
