"""``python -m ray_train predict``: predict with any finished run (every strategy) on new inputs,
or evaluate it on its own test split, without Ray. One line per input, a CSV with --csv, the
accuracy (mean absolute error for regression) where labels are known."""
from __future__ import annotations

import argparse
import csv
import json
import sys

from ray_train.cli import exit_status
from ray_train.cli.flags import Parser
from ray_train.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m ray_train predict", description=(
        "Predict with a finished run (any strategy; an ensemble votes, or averages its regressors) on inputs of "
        "the shape it trained on: .npy or .npz arrays (an .npz's y labels them), IDX files, PNG or JPEG images "
        "and folders of them (a sub-folder named after a class labels its images). The run's standardisation "
        "and class names apply. Without inputs it evaluates the run on its own test split. Prints one line per "
        "input and, with labels, the accuracy (mean absolute error for regression)."),
        epilog="Example: python -m ray_train predict --run runs/my-run photos/ new.npy --csv predictions.csv")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="files or folders to predict (default: the run's own test split, evaluated)")
    p.add_argument("--run", required=True, metavar="DIR", help="the run folder (<storage>/<run-name>)")
    p.add_argument("--labels", metavar="FILE", help="labels of the inputs, for the accuracy: .npy, an IDX label "
                   "file, or text with one class index or class name (regression: numbers) per line")
    p.add_argument("--csv", metavar="FILE", help="also write one row per input to this CSV file")
    p.add_argument("--model-file", default="model.pt", choices=("model.pt", "model-last.pt"),
                   help="which network of a single run: model.pt (the best validation epoch, default) or "
                   "model-last.pt (the final one)")
    p.add_argument("--vote", choices=("hard", "soft"), default=None,
                   help="how an ensemble of classifiers combines its members (default hard: plurality; soft: the "
                   "highest mean probability); a regression ensemble averages and takes no vote")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the lines")
    return p


def main(argv: list[str] | None = None) -> int:
    return exit_status(lambda: _run(build_parser().parse_args(argv)))


def _run(args) -> int:
    from ray_train.prediction import predict

    result = predict(args.run, args.inputs or None, labels=args.labels, file=args.model_file, vote=args.vote)
    if args.csv:
        write_csv(args.csv, result)
    if args.json:
        print(json.dumps(result))
        return 0
    out = sys.stdout
    if args.inputs:
        for row in result["rows"]:
            print(line(row, result), file=out)
    else:
        print(f"{args.run}: its test split, {result['inputs']} inputs", file=out)
    for member in result.get("members", []):
        print(f"  member {member['index']}  {member['model']}  seed {member['seed']}: accuracy "
              f"{member['accuracy']:.4f}", file=out)
    if "accuracy" in result:
        what = f"{args.vote or 'hard'} vote " if result["ensemble"] else ""
        print(f"{what}accuracy {result['accuracy']:.4f} ({result['errors']} errors of {result['inputs']})", file=out)
    if "mae" in result:
        what = "average of the members: " if result["ensemble"] else ""
        print(f"{what}mean absolute error {result['mae']:.4g} on {result['inputs']} inputs", file=out)
    if args.csv:
        print(f"predictions in {args.csv}", file=out)
    return 0


def line(row: dict, result: dict) -> str:
    if result["regression"]:
        text = f"{row['input']}: " + " ".join(f"{v:.4g}" for v in row["prediction"])
        return text + ("  (label " + " ".join(f"{v:.4g}" for v in row["label"]) + ")" if "label" in row else "")
    text = f"{row['input']}: {row['class']} (p={row['probability']:.3f})"
    if "votes" in row:
        text += "  votes " + " ".join(row["votes"])
    if "label" in row:
        text += f"  label {row['label']}" + ("" if row["label"] == row["class"] else "  WRONG")
    return text


def write_csv(path: str, result: dict) -> None:
    rows = result["rows"]
    if result["regression"]:
        width = len(rows[0]["prediction"]) if rows else 1
        header = ["input"] + [f"prediction_{j}" for j in range(width)]
        header += [f"label_{j}" for j in range(width)] if rows and "label" in rows[0] else []
        table = [[r["input"], *r["prediction"], *r.get("label", [])] for r in rows]
    else:
        header = ["input", "prediction", "class", "probability"]
        extra = [k for k in ("votes", "label") if rows and k in rows[0]]
        header += extra
        table = [[r["input"], r["prediction"], r["class"], f"{r['probability']:.6f}"]
                 + [" ".join(r[k]) if k == "votes" else r[k] for k in extra] for r in rows]
    try:
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(table)
    except OSError as exc:
        raise UserError(f"--csv: cannot write {path}: {exc.strerror or exc}") from None
