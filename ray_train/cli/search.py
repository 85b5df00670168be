"""``python -m ray_train search``: random search over config fields on Ray Tune (the seed article,
section 7.2: random search beats grid search), or ``--grid``, a grid of the same budget.

Each trial is one training run of any strategy through ray_train.fit. Its replicas run inside the
trial's resources: the trial asks Tune for a placement group of an empty head bundle (the trial's
function) and one bundle per replica, and cluster.reserve hands the engine that group instead of
making its own. Trials run in parallel as the cluster allows (or ``--concurrent K``); with
``--scheduler asha`` each epoch's validation accuracy goes to Tune, which stops the weak trials early.

Writes under ``<storage>/search-<time>/``: a run folder per trial (``tensorboard --logdir`` shows
them in the HPARAMS tab: every config field as a hyperparameter, test and validation accuracy as
metrics), results.md and results.json, and best.yaml: the best trial's full config (its sampled
values and its seed), which ``python -m ray_train --config best.yaml`` reruns.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import time
from dataclasses import dataclass

from ray_train import strategies
from ray_train.cli import exit_status, fail
from ray_train.cli.flags import (OWN_FLAGS, Parser, add_cluster_flags, add_output_flags, add_training_flags, job_values,
                                 stamp)
from ray_train.config import SECTIONS, build_config, public_fields
from ray_train.errors import ConfigError, UserError
from ray_train.run.files import write_json

KINDS = ("uniform", "loguniform", "choice", "randint")
SET_BY_SEARCH = ("run.run_name", "run.storage", "run.resume")
_SPEC = re.compile(r"^\s*([A-Za-z_]\w*)\.([A-Za-z_]\w*)\s*=\s*([A-Za-z_]\w*)\s*\((.*)\)\s*$")


@dataclass(frozen=True)
class Param:
    """One searched field: ``section.field=kind(args)``."""

    section: str
    field: str
    kind: str
    args: tuple

    @property
    def key(self) -> str:
        return f"{self.section}.{self.field}"

    def __str__(self) -> str:
        return f"{self.key}={self.kind}({', '.join(map(str, self.args))})"


def _scalar(text: str, spec: str):
    import yaml

    for number in (int, float):  # before YAML, which reads 1e-3 as a string
        try:
            return number(text.strip())
        except ValueError:
            pass
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, (int, float, str, bool)):
        raise UserError(f"--space {spec!r}: {text.strip()!r} is not a number, a word or true/false")
    return value


def parse_param(spec: str) -> Param:
    """``section.field=uniform(a,b) | loguniform(a,b) | choice(x,y,...) | randint(a,b)``; a
    UserError naming what is wrong otherwise. randint includes both ends."""
    m = _SPEC.match(spec)
    if m is None:
        raise UserError(f"--space {spec!r}: expected section.field=KIND(ARGS) with KIND one of {', '.join(KINDS)}, "
                        "e.g. 'optim.lr=loguniform(1e-3,1e-1)'")
    section, field, kind, body = m.groups()
    if section not in SECTIONS:
        raise UserError(f"--space {spec!r}: unknown section {section!r}; allowed: {', '.join(SECTIONS)}")
    fields = [f.name for f in public_fields(SECTIONS[section])]
    if field not in fields:
        raise UserError(f"--space {spec!r}: {section} has no field {field!r}; allowed: {', '.join(fields)}")
    if f"{section}.{field}" in SET_BY_SEARCH:
        raise UserError(f"--space {spec!r}: search sets {section}.{field} itself; it cannot be searched")
    if kind not in KINDS:
        raise UserError(f"--space {spec!r}: unknown distribution {kind!r}; allowed: {', '.join(KINDS)}")
    args = tuple(_scalar(a, spec) for a in body.split(",")) if body.strip() else ()
    if kind == "choice":
        if len(args) < 2:
            raise UserError(f"--space {spec!r}: choice needs at least two values (set a single value in the config)")
        if len(set(map(repr, args))) != len(args):
            raise UserError(f"--space {spec!r}: choice lists a value twice")
        return Param(section, field, kind, args)
    if len(args) != 2:
        raise UserError(f"--space {spec!r}: {kind} takes two bounds (low, high), got {len(args)} value(s)")
    numeric = all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args)
    if not numeric:
        raise UserError(f"--space {spec!r}: {kind}'s bounds must be finite numbers")
    low, high = args
    if kind == "randint" and not all(float(a).is_integer() for a in args):
        raise UserError(f"--space {spec!r}: randint's bounds must be whole numbers")
    if not low < high:
        raise UserError(f"--space {spec!r}: the low bound must be below the high one")
    if kind == "loguniform" and low <= 0:
        raise UserError(f"--space {spec!r}: loguniform's bounds must be > 0")
    if kind == "randint":
        return Param(section, field, kind, (int(low), int(high)))
    return Param(section, field, kind, (float(low), float(high)))


def parse_space(specs: list[str]) -> list[Param]:
    if not specs:
        raise UserError("--space: give at least one, e.g. --space 'optim.lr=loguniform(1e-3,1e-1)'")
    params = [parse_param(s) for s in specs]
    keys = [p.key for p in params]
    for key in keys:
        if keys.count(key) > 1:
            raise UserError(f"--space: {key} is searched twice")
    return params


def extremes(p: Param) -> list:
    return list(p.args) if p.kind == "choice" else [p.args[0], p.args[1]]


def with_values(values: dict, overrides: dict, sampled: dict) -> dict:
    """The job's sections with the flags and then the sampled ``section.field`` values applied."""
    merged = {name: dict(values.get(name) or {}) for name in SECTIONS}
    for section, fields in overrides.items():
        merged[section].update(fields)
    for key, value in sampled.items():
        section, field = key.split(".", 1)
        merged[section][field] = value
    return {k: v for k, v in merged.items() if v}


def check_space(params: list[Param], values: dict, overrides: dict) -> None:
    """Every bound and choice makes a valid config (checked before Ray starts)."""
    build_config(values, overrides)
    for p in params:
        for v in extremes(p):
            try:
                build_config(with_values(values, overrides, {p.key: v}))
            except ConfigError as exc:
                raise UserError(f"--space {p}: {p.key}={v!r} is not a valid value: {exc}") from None


def grid_points(p: Param, k: int) -> list:
    """``k`` points over ``p``'s range: evenly spaced (log-spaced for loguniform, whole numbers for
    randint, evenly picked values for choice)."""
    import numpy as np

    low, high = (p.args[0], p.args[-1])
    if p.kind == "choice":
        idx = sorted({int(round(i)) for i in np.linspace(0, len(p.args) - 1, k)}) if k > 1 else [len(p.args) // 2]
        return [p.args[i] for i in idx]
    if p.kind == "loguniform":
        pts = np.geomspace(low, high, k) if k > 1 else [math.sqrt(low * high)]
    else:
        pts = np.linspace(low, high, k) if k > 1 else [(low + high) / 2]
    if p.kind == "randint":
        return sorted({int(round(x)) for x in pts})
    return [float(x) for x in pts]


def grid_size(params: list[Param], trials: int) -> int:
    """Points per parameter: round(trials ** (1/d)), at least one."""
    return max(1, round(trials ** (1.0 / len(params))))


def tune_space(params: list[Param], trials: int, grid: bool) -> dict:
    from ray import tune

    if grid:
        k = grid_size(params, trials)
        return {p.key: tune.grid_search(grid_points(p, k)) for p in params}
    make = {"uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
            "choice": lambda a: tune.choice(list(a)), "randint": lambda a: tune.randint(a[0], a[1] + 1)}
    return {p.key: make[p.kind](p.args) for p in params}


def trial_bundles(cfg) -> list[dict]:
    """A trial's placement group: an empty head bundle for the trial's function (which only waits
    on the actors), a bundle per replica (bundle r holds replica r: cluster.reserve) and one per
    parameter shard that reserves CPUs."""
    return [{"CPU": 0}] + strategies.get(cfg.run.strategy).bundles(cfg)


def trial_name(trial_id: str) -> str:
    return "trial_" + trial_id.rsplit("_", 1)[-1]


# -- the trial (runs in a Tune worker) ----------------------------------------------------------------
def run_trial(sampled: dict, values: dict, overrides: dict, search_dir: str, cwd: str, tensorboard: bool = True) -> None:
    from ray import tune

    from ray_train.api import fit
    from ray_train.errors import Diverged

    os.chdir(cwd)  # Tune starts a trial in its own folder; the job's relative paths are the user's
    sampled = {k: _plain(v) for k, v in sampled.items()}
    name = trial_name(tune.get_context().get_trial_id())
    cfg = build_config(with_values(values, overrides, sampled), {"run": {"run_name": name, "storage": search_dir}})
    state = {"best": None, "last": None, "reports": 0, "held": None}

    def report(record: dict) -> None:
        acc = record.get("val_accuracy") if record.get("val_accuracy") is not None else record.get("test_accuracy")
        if acc is not None:
            state["last"] = acc
            state["best"] = acc if state["best"] is None else max(state["best"], acc)
        state["reports"] += 1
        metrics = {"accuracy": state["last"] or 0.0, "best_accuracy": state["best"] or 0.0, "epoch": record["epoch"],
                   "train_s": record.get("train_s"), "samples": record.get("samples")}
        if record["epoch"] >= cfg.run.epochs:  # after fit returns: Tune stops a trial at its last report
            state["held"] = metrics
        else:
            tune.report(metrics)

    os.makedirs(os.path.join(search_dir, "logs"), exist_ok=True)
    with open(os.path.join(search_dir, "logs", f"{name}.log"), "w", encoding="utf-8") as out:
        try:
            summary = fit(cfg, out=out, progress=False, on_epoch=report, tensorboard=tensorboard)
        except Diverged as exc:  # a bad point of the space, not a failed search
            tune.report({"accuracy": 0.0, "best_accuracy": state["best"] or 0.0, "diverged": str(exc)[:200]})
            return
    if state["held"] is not None:
        tune.report(state["held"])
    elif state["reports"] == 0:  # an ensemble: its members' loops report nothing per epoch
        best = summary.get("val_accuracy") or summary["test_accuracy"]
        tune.report({"accuracy": best, "best_accuracy": best, "epoch": summary.get("epochs")})


# -- the driver -----------------------------------------------------------------------------------------
def progress_lines(out):
    """A Tune callback printing a line per trial start, epoch and end (ray.tune loads on first use)."""
    from ray.tune import Callback

    class Lines(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            sampled = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.config.items())
            print(f"search: {trial_name(trial.trial_id)} started: {sampled}", file=out, flush=True)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "epoch" in result:
                print(f"search: {trial_name(trial.trial_id)} epoch {result['epoch']}: accuracy "
                      f"{result['accuracy']:.4f} (best {result['best_accuracy']:.4f})", file=out, flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            print(f"search: {trial_name(trial.trial_id)} done", file=out, flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"search: {trial_name(trial.trial_id)} FAILED (its error is in results.md)", file=out, flush=True)

    return Lines()


def _plain(v):
    """A Python number for a numpy one (the config checks for int; YAML cannot write numpy)."""
    return v.item() if hasattr(v, "item") else v


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def run_search(values: dict, overrides: dict, params: list[Param], trials: int, *, grid: bool = False,
               scheduler: str = "none", concurrent: int | None = None, seed: int | None = None, out=None,
               tensorboard: bool = True, address: str | None = None, verbose: bool = False) -> dict:
    """Run the search; returns {dir, rows, best, best_yaml}."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from ray_train import raylog
    from ray_train.cluster import init_ray, local_resources

    out = out or sys.stdout
    base = build_config(values, overrides)
    from ray_train.run.storage import local_only

    local_only(base.run.storage, "search")
    local = local_resources(address)
    if local is not None:  # one trial the local cluster cannot hold fails before it starts
        strategies.get(base.run.strategy).check_resources(base, total=local)
    search_dir = os.path.abspath(os.path.join(base.run.storage, f"search-{stamp()}"))
    os.makedirs(search_dir, exist_ok=True)
    print(init_ray(address=address, verbose=verbose), file=out, flush=True)
    raylog.LOG.to_file(os.path.join(search_dir, "ray.log"))  # Tune's messages among Ray's
    space = tune_space(params, trials, grid)
    n = math.prod(len(v["grid_search"]) for v in space.values()) if grid else trials
    seed = base.run.seed if seed is None else seed
    print(f"search: {'grid' if grid else 'random'} search, {n} trials of {base.run.strategy} {base.model.name} over "
          + ", ".join(map(str, params)) + f"; runs in {search_dir}", file=out, flush=True)

    def resources(sampled: dict):
        return tune.PlacementGroupFactory(trial_bundles(build_config(with_values(values, overrides, sampled))),
                                          strategy=base.resources.placement)

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, values=values, overrides=overrides, search_dir=search_dir, cwd=os.getcwd(),
                             tensorboard=tensorboard),
        resources=resources)
    sched = None
    if scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        sched = ASHAScheduler(time_attr="training_iteration", max_t=base.run.epochs, grace_period=1, reduction_factor=2)
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    # Tune's results as JSON and CSV, but not its TensorBoard files: the trials' run folders are the logdir
    saved = os.environ.get("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS")
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    try:
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(metric="best_accuracy", mode="max", num_samples=1 if grid else trials,
                                        search_alg=BasicVariantGenerator(random_state=seed,
                                                                         max_concurrent=concurrent or 0),
                                        scheduler=sched),
            run_config=tune.RunConfig(name="tune", storage_path=os.path.join(search_dir, ".tune"), verbose=0,
                                      callbacks=[JsonLoggerCallback(), CSVLoggerCallback(), progress_lines(out)]))
        # Tune prints its own banner and tables (verbose=0 leaves some): into ray.log, unless --verbose
        quiet = raylog.Stream()
        with contextlib.ExitStack() as stack:
            if not verbose:
                stack.enter_context(contextlib.redirect_stdout(quiet))
                stack.enter_context(contextlib.redirect_stderr(quiet))
            grid_result = tuner.fit()
        quiet.flush()
    finally:
        if saved is None:
            os.environ.pop("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", None)
        else:
            os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = saved
    rows = [trial_row(r, search_dir, base.run.epochs) for r in grid_result]
    rows.sort(key=lambda r: -1 if r["best_accuracy"] is None else r["best_accuracy"], reverse=True)
    best = next((r for r in rows if r["summary"] is not None), None)
    best_yaml = None
    if best is not None:
        best_yaml = os.path.join(search_dir, "best.yaml")
        write_best(best_yaml, best, base.run.storage, search_dir)
    write_results(search_dir, rows, params, grid, best)
    return {"dir": search_dir, "rows": rows, "best": best, "best_yaml": best_yaml}


def trial_row(result, search_dir: str, epochs: int) -> dict:
    import json

    metrics = result.metrics or {}
    found = re.search(r"_(\d{5})_", os.path.basename(result.path or ""))
    name = trial_name(str(metrics.get("trial_id") or (found.group(1) if found else "unknown")))
    path = os.path.join(search_dir, name, "summary.json")
    summary = None
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            summary = json.load(fh)
    if result.error is not None:
        status = "error: " + " ".join(str(result.error).split())[-240:]
    elif metrics.get("diverged"):
        status = "diverged"
    elif summary is None:
        status = f"stopped early by the scheduler after {metrics.get('epoch', 0)} of {epochs} epochs"
    else:
        status = "done"
    best = None
    if summary is not None:
        best = summary.get("val_accuracy")
        if best is None:
            best = summary.get("best_test_accuracy")
    if best is None:
        best = metrics.get("best_accuracy")
    params = {k: _plain(v) for k, v in (result.config or {}).items()}
    return {"trial": name, "status": status, "params": params, "best_accuracy": best,
            "test_accuracy": None if summary is None else next(
                (summary[k] for k in ("best_test_accuracy", "test_accuracy") if summary.get(k) is not None), None),
            "final_test_accuracy": None if summary is None else summary.get("test_accuracy"),
            "epochs": None if summary is None else summary.get("epochs"),
            "train_s": None if summary is None else summary.get("train_s"), "summary": summary}


def write_best(path: str, best: dict, storage: str, search_dir: str) -> None:
    """The best trial's full config, as ``--config`` takes it: the sampled values and its seed;
    the rerun goes to its own run folder under the job's storage."""
    import yaml

    config = {name: dict(section) for name, section in best["summary"]["config"].items()}
    config["run"].update(run_name=None, resume=None, storage=storage)
    head = (f"# best trial of {os.path.basename(search_dir)}: {best['trial']} ("
            + ", ".join(f"{k}={_fmt(v)}" for k, v in best["params"].items())
            + f"); best validation accuracy {_num(best['best_accuracy'])}, test accuracy there "
            f"{_num(best['test_accuracy'])}\n# rerun: python -m ray_train --config {path}\n")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(head + yaml.safe_dump(config, sort_keys=False))


def _num(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def write_results(search_dir: str, rows: list[dict], params: list[Param], grid: bool, best: dict | None) -> None:
    keys = [p.key for p in params]
    lines = [f"# {'grid' if grid else 'random'} search {os.path.basename(search_dir)}", "",
             "Space: " + ", ".join(f"`{p}`" for p in params) + ". Accuracy: the best validation accuracy of the "
             "trial (test where the data has no validation split); test: the test accuracy at that epoch.", "",
             "| trial | " + " | ".join(keys) + " | best val acc | test acc | epochs | train s | status |",
             "|---|" + "---:|" * len(keys) + "---:|---:|---:|---:|---|"]
    for r in rows:
        vals = " | ".join(_fmt(r["params"].get(k)) for k in keys)
        lines.append(f"| {r['trial']} | {vals} | {_num(r['best_accuracy'])} | {_num(r['test_accuracy'])} | "
                     f"{r['epochs'] if r['epochs'] is not None else '-'} | "
                     f"{'-' if r['train_s'] is None else format(r['train_s'], '.1f')} | {r['status']} |")
    if best is not None:
        lines += ["", f"Best: {best['trial']}; its config is best.yaml (python -m ray_train --config best.yaml)."]
    with open(os.path.join(search_dir, "results.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    write_json(os.path.join(search_dir, "results.json"),
               {"grid": grid, "space": [str(p) for p in params],
                "best": None if best is None else best["trial"],
                "trials": [{k: v for k, v in r.items() if k != "summary"} for r in rows]})


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m ray_train search", description=(
        "Random search (or --grid, a grid of the same budget) over config fields on Ray Tune: each trial one "
        "training run of any strategy, its replicas inside the trial's resources, trials in parallel as the "
        "cluster allows; results in TensorBoard's HPARAMS tab and the best trial's config in best.yaml."),
        epilog="Example: python -m ray_train search --model mlp30 --epochs 3 --trials 8 "
        "--space 'optim.lr=loguniform(1e-3,1e-1)' --space 'model.dropout=uniform(0,0.5)'")
    p.add_argument("--trials", type=int, default=8, help="trials (the grid's budget with --grid) (default 8)")
    p.add_argument("--space", action="append", default=[], metavar="SECTION.FIELD=KIND(ARGS)",
                   help="a searched field, repeatable: uniform(a,b), loguniform(a,b), choice(x,y,...) or randint(a,b) "
                   "(both ends included), e.g. 'optim.lr=loguniform(1e-3,1e-1)'")
    p.add_argument("--scheduler", choices=("none", "asha"), default="none",
                   help="asha: stop weak trials early on each epoch's validation accuracy (default none)")
    p.add_argument("--grid", action="store_true",
                   help="a grid instead: round(trials ** (1/d)) points per parameter over the same ranges "
                   "(log-spaced for loguniform)")
    p.add_argument("--concurrent", type=int, default=None,
                   help="at most K trials at once (default: as many as the cluster's resources allow)")
    add_training_flags(p, skip=OWN_FLAGS)
    add_output_flags(p)  # a trial writes its lines to logs/<trial>.log, where no progress bar shows
    add_cluster_flags(p)
    return p


def main(argv: list[str]) -> int:
    def search() -> int:
        args = build_parser().parse_args(argv)
        if args.trials < 1:
            raise UserError(f"--trials: must be at least 1, got {args.trials}")
        if args.concurrent is not None and args.concurrent < 1:
            raise UserError(f"--concurrent: must be at least 1, got {args.concurrent}")
        params = parse_space(args.space)
        values, overrides = job_values(args, skip=OWN_FLAGS)
        check_space(params, values, overrides)
        t0 = time.perf_counter()
        result = run_search(values, overrides, params, args.trials, grid=args.grid, scheduler=args.scheduler,
                            concurrent=args.concurrent, tensorboard=not args.no_tensorboard, address=args.address,
                            verbose=args.verbose)
        with open(os.path.join(result["dir"], "results.md"), encoding="utf-8") as fh:
            print("\n" + fh.read(), flush=True)
        print(f"search: {len(result['rows'])} trials in {time.perf_counter() - t0:.0f} s; results in {result['dir']}/"
              "results.md" + (f"; HPARAMS: tensorboard --logdir {result['dir']}" if not args.no_tensorboard else "")
              + (f"; best config: {result['best_yaml']}" if result["best_yaml"] else ""), flush=True)
        if result["best"] is None:
            return fail("no trial finished (see results.md)", 1)
        return 0

    return exit_status(search)
