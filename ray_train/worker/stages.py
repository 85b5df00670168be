"""Model parallelism's pieces that need no actors (issue 22's groundwork): a network as a line of
layers, cut into S consecutive stages balanced by parameter count; the GPipe and 1F1B schedules
of M micro-batches; and a one-process pipeline that runs a schedule stage by stage, passing
activations forward and their gradients backward as stage actors will. It is the reference the
stage actors are held to: S stages x M micro-batches give one process's gradients on the whole
batch (tests/test_stages.py).

Balanced by parameter count, not measured forward time: the count is the same on every machine
and run (a split decided by timing would differ between a resumed run and the original), and it
is what bounds a stage's memory, the reason to cut a network at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

SCHEDULES = ("gpipe", "1f1b")


class SplitError(ValueError):
    """The network cannot be cut as asked; the message says why and what to do."""


# -- the network as a line of layers ----------------------------------------------------------------
def layers(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """(qualified name, module) in execution order: an nn.Sequential's children, recursively, and a
    module whose children are all nn.Sequential taken to run them in registration order (the
    networks of models/: MLP.net; ConvNet.features then .classifier). Anything else is one piece.
    A factory's list of stage modules (models.staged.Stages) is a line of those modules, each one
    piece. ``split`` checks the line against the network's own output."""
    from models.staged import Stages

    children = list(model.named_children())
    if isinstance(model, Stages):
        return [(f"{prefix}{name}", child) for name, child in children]
    if isinstance(model, nn.Sequential) or (children and all(isinstance(c, nn.Sequential) for _, c in children)):
        out = []
        for name, child in children:
            out += layers(child, f"{prefix}{name}.")
        return out
    return [(prefix[:-1], model)]


def _weight(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def balanced_cuts(weights: list[int], stages: int) -> list[int]:
    """Start indices of ``stages`` contiguous non-empty parts of ``weights`` whose largest sum is
    the least possible (ties: the earliest cuts). A layer without parameters weighs 1."""
    w = [max(1, x) for x in weights]
    n = len(w)
    prefix = [0]
    for x in w:
        prefix.append(prefix[-1] + x)
    inf = float("inf")
    # best[k][i]: the least largest part when the first i layers form k parts
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    start = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], start[k][i] = cost, j
    cuts, i = [], n
    for k in range(stages, 0, -1):
        i = start[k][i]
        cuts.append(i)
    return cuts[::-1]


def split(model: nn.Module, stages: int, split_at: list[str] | None = None,
          example: torch.Tensor | None = None) -> list[nn.Sequential]:
    """``model`` as ``stages`` nn.Sequential stages sharing its modules (the whole network's
    state_dict stays the union of theirs). ``split_at`` names the layers where a new stage begins
    (len: stages - 1); else the cut is balanced by parameter count. With ``example`` (a batch of
    inputs) the stages are checked to compute what the network computes."""
    return [nn.Sequential(*[m for _, m in part]) for part in cut(model, stages, split_at, example)]


def cut(model: nn.Module, stages: int, split_at: list[str] | None = None,
        example: torch.Tensor | None = None) -> list[list[tuple[str, nn.Module]]]:
    """``split``'s stages as their layers, (qualified name, module): a stage's parameter ``w`` of
    layer ``name`` is the whole network's ``name.w``."""
    line = layers(model)
    names = [n for n, _ in line]
    if split_at:
        unknown = [n for n in split_at if n not in names]
        if unknown:
            raise SplitError(f"--split-at: {unknown[0]!r} is not a layer of the network; its layers: {', '.join(names)}")
        if len(split_at) != stages - 1:
            raise SplitError(f"--split-at: {len(split_at)} names make {len(split_at) + 1} stages, not --stages {stages}")
        cuts = [0] + sorted(names.index(n) for n in split_at)
        if len(set(cuts)) != len(cuts):
            raise SplitError("--split-at: the first layer, or one layer twice, leaves a stage empty")
    else:
        if stages > len(line):
            raise SplitError(f"--stages: {stages} stages, but the network splits into only {len(line)} layers "
                             f"({', '.join(names)})")
        cuts = balanced_cuts([_weight(m) for _, m in line], stages)
    bounds = cuts + [len(line)]
    named = [line[a:b] for a, b in zip(bounds, bounds[1:])]
    parts = [nn.Sequential(*[m for _, m in part]) for part in named]
    if example is not None:
        was = model.training
        model.eval()
        with torch.no_grad():
            want, got = model(example), example
            for p in parts:
                got = p(got)
        model.train(was)
        if got.shape != want.shape or not torch.allclose(got, want, atol=1e-6):
            raise SplitError(f"{type(model).__name__} does not run its layers in a line, so it cannot be cut "
                             "automatically; give an nn.Sequential, or a module whose children are nn.Sequential run in order")
    return named


# -- schedules -----------------------------------------------------------------------------------------
def schedule(kind: str, stages: int, micro: int) -> list[list[tuple[str, int]]]:
    """Per stage, its actions in order: ("F", m) forward of micro-batch m, ("B", m) its backward.
    gpipe: every forward, then every backward. 1f1b: stage s runs min(M, S - s - 1) forwards, then
    alternates one forward and one backward, then the remaining backwards: at most S - s
    micro-batches' activations held at once, against GPipe's M. Backwards run in micro-batch
    order in both, so both accumulate the same gradients in the same order."""
    if kind not in SCHEDULES:
        raise SplitError(f"--pipeline-schedule: unknown value {kind!r}; allowed: {', '.join(SCHEDULES)}")
    out = []
    for s in range(stages):
        if kind == "gpipe":
            out.append([("F", m) for m in range(micro)] + [("B", m) for m in range(micro)])
            continue
        warm = min(micro, stages - s - 1)
        acts = [("F", m) for m in range(warm)]
        for i in range(micro - warm):
            acts += [("F", warm + i), ("B", i)]
        acts += [("B", m) for m in range(micro - warm, micro)]
        out.append(acts)
    return out


def in_flight(actions: list[tuple[str, int]]) -> int:
    """The most micro-batches whose activations a stage holds at once under ``actions``."""
    held = peak = 0
    for kind, _ in actions:
        held += 1 if kind == "F" else -1
        peak = max(peak, held)
    return peak


def bubble(stages: int, micro: int) -> float:
    """The idle share of a pipeline's time with equal stages: (S - 1) / (M + S - 1), either schedule."""
    return (stages - 1) / (micro + stages - 1)


# -- one process, the schedule followed stage by stage ------------------------------------------------
@dataclass
class PipelineStep:
    loss_sum: float  # the batch's summed loss
    correct: int
    peak: list[int] = field(default_factory=list)  # per stage: the most activations it held at once


def run_schedule(parts: list[nn.Module], x: torch.Tensor, y: torch.Tensor, loss_fn, micro: int,
                 kind: str = "1f1b") -> PipelineStep:
    """Forward and backward of one batch through ``parts`` in ``micro`` equal micro-batches,
    each stage taking its actions in ``schedule`` order as soon as its input has arrived (the
    activation from the stage before, or the gradient from the stage after). The gradients
    accumulated in the parts' parameters are those of ``loss_fn`` (a batch mean) over the whole
    batch: each micro-batch's mean loss is weighted by its share of the batch."""
    if len(y) % micro:
        raise SplitError(f"--micro-batches: {micro} does not divide the batch of {len(y)}")
    xs, ys = x.chunk(micro), y.chunk(micro)
    plan = schedule(kind, len(parts), micro)
    acts: dict[tuple[int, int], torch.Tensor] = {}  # (stage, m) -> the stage's input, kept for its backward
    outs: dict[tuple[int, int], torch.Tensor] = {}  # (stage, m) -> its output
    grads: dict[tuple[int, int], torch.Tensor] = {}  # (stage, m) -> gradient of the loss wrt its output
    held = [0] * len(parts)
    peak = [0] * len(parts)
    position = [0] * len(parts)
    loss_sum, correct, last = 0.0, 0, len(parts) - 1
    while any(position[s] < len(plan[s]) for s in range(len(parts))):
        progressed = False
        for s, part in enumerate(parts):
            if position[s] == len(plan[s]):
                continue
            kind_, m = plan[s][position[s]]
            if kind_ == "F":
                if s > 0 and (s - 1, m) not in outs:
                    continue  # its input has not arrived
                inp = xs[m] if s == 0 else outs[(s - 1, m)].detach().requires_grad_()
                acts[(s, m)], outs[(s, m)] = inp, part(inp)
                held[s] += 1
                peak[s] = max(peak[s], held[s])
            else:
                if s < last and (s, m) not in grads:
                    continue  # its output's gradient has not come back
                out = outs.pop((s, m))
                if s == last:
                    loss = loss_fn(out, ys[m])
                    loss_sum += float(loss.detach()) * len(ys[m])
                    correct += int((out.detach().argmax(1) == ys[m]).sum())
                    (loss * (len(ys[m]) / len(y))).backward()
                else:
                    out.backward(grads.pop((s, m)))
                inp = acts.pop((s, m))
                if s > 0:
                    grads[(s - 1, m)] = inp.grad
                held[s] -= 1
            position[s] += 1
            progressed = True
        if not progressed:
            raise RuntimeError(f"the {kind} schedule deadlocked")  # a bug in schedule(), never the user's
    return PipelineStep(loss_sum, correct, peak)
