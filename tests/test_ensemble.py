"""Ensembles on the shared 2-CPU Ray cluster: a 5-member vote of net D on MNIST-5k (the vote makes
no more errors than the members' mean), its summary, TensorBoard tags, persisted members and the
evaluate.py round trip; queueing, restart from a checkpoint and a member left out with a warning;
bad input through the CLI."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from ray_train.cli import main
from ray_train.strategies.ensemble.member import EnsembleMember, bootstrap_indices
from scripts import evaluate

MEMBERS, EPOCHS, BATCH, TRAIN, TEST = 5, 2, 64, 3500, 1000  # mnist5k less its 500 validation digits
STEPS = TRAIN // BATCH  # one replica per member


@pytest.fixture(scope="module")
def vote_run(ray_cluster, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    argv = ["--strategy", "ensemble", "--members", str(MEMBERS), "--model", "net_d", "--epochs", str(EPOCHS),
            "--cpus-per-replica", "0.4", "--lr", "0.05", "--run-name", "vote", "--storage", str(storage),
            "--log-every", "20", "--no-progress"]
    assert main(argv) == 0
    run_dir = storage / "vote"
    return run_dir, json.loads((run_dir / "summary.json").read_text())


def test_the_vote_makes_no_more_errors_than_the_members_mean(vote_run):
    _, s = vote_run
    members = s["members"]
    assert [m["seed"] for m in members] == list(range(MEMBERS))
    assert all(m["status"] == "ok" and m["epochs"] == EPOCHS for m in members)
    errors = [m["test_errors"] for m in members]
    assert all(e < 0.15 * TEST for e in errors), errors  # two epochs of net D: ~95% each
    assert s["member_mean_errors"] == pytest.approx(np.mean(errors))
    assert s["member_best_errors"] == min(errors)
    assert s["vote_errors"] <= s["member_mean_errors"], (s["vote_errors"], errors)
    assert s["test_errors"] == s["vote_errors"] == round((1 - s["vote_accuracy"]) * TEST)
    assert s["soft_vote_errors"] == round((1 - s["soft_vote_accuracy"]) * TEST)
    assert s["oracle_accuracy"] >= max(s["vote_accuracy"], max(m["test_accuracy"] for m in members))
    d = np.array(s["disagreement"])
    assert d.shape == (MEMBERS, MEMBERS) and np.allclose(d, d.T) and not d.diagonal().any()
    assert 0 < s["mean_disagreement"] < 0.2  # different seeds disagree on some digits, not most


def test_summary_holds_the_ensemble_keys(vote_run):
    _, s = vote_run
    for key in ("test_accuracy", "test_errors", "test_loss", "train_samples", "train_s", "samples_per_s",
                "members", "vote_accuracy", "vote_errors", "soft_vote_accuracy", "soft_vote_errors",
                "oracle_accuracy", "disagreement", "warnings", "history"):
        assert key in s, key
    assert s["strategy"] == "ensemble" and s["epochs"] == EPOCHS and s["warnings"] == []
    assert s["replicas"] == MEMBERS and s["concurrent_members"] == MEMBERS  # 5 x 0.4 CPU fit in 2
    assert s["train_samples"] == MEMBERS * EPOCHS * STEPS * BATCH
    assert [h["members"] for h in s["history"]] == [MEMBERS] * EPOCHS
    last = s["history"][-1]["test_accuracy"]
    assert last == pytest.approx(s["member_mean_accuracy"])
    assert 0 < s["test_loss"] < 0.5  # soft-vote NLL


def test_event_files_hold_member_and_ensemble_tags(vote_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, s = vote_run
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    for k in range(MEMBERS):
        assert len(acc.Scalars(f"member_{k}/train/loss")) == EPOCHS * -(-STEPS // 20)
        points = acc.Scalars(f"member_{k}/test/accuracy")
        assert [round(p.value, 4) for p in points][-1] == round(s["members"][k]["test_accuracy"], 4)
        assert len(points) == EPOCHS and f"member_{k}/lr" in scalars
    for key in ("vote_accuracy", "soft_vote_accuracy", "oracle_accuracy", "member_mean_accuracy"):
        assert acc.Scalars(f"ensemble/{key}")[0].value == pytest.approx(s[key], abs=1e-6)
    images = acc.Tags()["images"]
    assert "ensemble/vote_errors" in images and "test/confusion_matrix" in images
    grid = acc.Images("ensemble/vote_errors")[0]
    assert grid.width > 0 and grid.height > 0


def test_members_are_persisted_loadable_with_weights_only(vote_run):
    run_dir, s = vote_run
    info = json.loads((run_dir / "ensemble.json").read_text())
    assert [m["seed"] for m in info["members"]] == list(range(MEMBERS)) and info["weights"] == [1.0] * MEMBERS
    for k in range(MEMBERS):
        state = torch.load(run_dir / "members" / f"member_{k}" / "model.pt", weights_only=True)
        assert state["spec"]["model"] == "net_d" and state["spec"]["seed"] == k
        assert state["test_errors"] == s["members"][k]["test_errors"]
        ckpts = sorted(os.listdir(run_dir / "members" / f"member_{k}" / "checkpoints"))
        assert ckpts == [f"ckpt-{e:06d}.pt" for e in range(1, EPOCHS + 1)]


def test_evaluate_reloads_the_ensemble_and_predicts_images(vote_run, capsys, tmp_path):
    run_dir, s = vote_run
    assert evaluate.main(["--run", str(run_dir), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    # Same weights, same digits: the same errors, counted without Ray in this process.
    assert [m["test_errors"] for m in again["members"]] == [m["test_errors"] for m in s["members"]]
    assert (again["vote_errors"], again["soft_vote_errors"]) == (s["vote_errors"], s["soft_vote_errors"])
    assert again["oracle_accuracy"] == pytest.approx(s["oracle_accuracy"])

    from ray_train.config import DataConfig
    from ray_train.data.loaders import load_dataset

    data = load_dataset(DataConfig())
    x = data.x_test[:6, 0]
    np.save(tmp_path / "six.npy", x)
    idx = tmp_path / "six-idx3-ubyte"
    idx.write_bytes(b"\x00\x00\x08\x03" + b"".join(int(d).to_bytes(4, "big") for d in x.shape) + x.tobytes())
    outputs = []
    for path in (tmp_path / "six.npy", idx):
        assert evaluate.main(["--run", str(run_dir), "--images", str(path)]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 6 and all(len(line.split("votes ")[1].split("  ")[0].split()) == MEMBERS
                                       for line in lines)
        outputs.append([line.split(": ", 1)[1] for line in lines])
    assert outputs[0] == outputs[1]  # both formats, same pixels, same votes
    votes = [int(line.split()[0]) for line in outputs[0]]
    assert sum(v == y for v, y in zip(votes, data.y_test[:6])) >= 5


@pytest.mark.parametrize("argv,needle", [
    (["--run", "/nonexistent/run"], "no such run folder"),
    (["--run", "."], "not a run folder"),
    (["--images", "x.npy"], "--run"),
])
def test_evaluate_bad_input(capsys, argv, needle):
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_bootstrap_sample_is_seeded_and_covers_about_63_percent():
    a, b = bootstrap_indices(TRAIN, 3), bootstrap_indices(TRAIN, 4)
    assert np.array_equal(a, bootstrap_indices(TRAIN, 3)) and not np.array_equal(a, b)
    assert 0.60 < len(np.unique(a)) / TRAIN < 0.66  # 1 - 1/e = 0.632


# -- failures: a member that dies once is resumed; one that keeps dying is left out ---------------
class DyingMember(EnsembleMember):
    """Seed 5: the first replica to start epoch 2 dies (once). Seed 7: dies at epoch 2 every time."""

    def set_epoch(self, epoch, lr, start=0):
        if epoch == 1 and self.ctx.seed == 7:
            os._exit(1)
        if epoch == 1 and self.ctx.seed == 5:
            try:
                os.close(os.open(os.path.join(self.cfg.run.storage, "died-once"), os.O_CREAT | os.O_EXCL))
                os._exit(1)
            except FileExistsError:
                pass
        return super().set_epoch(epoch, lr, start)


@pytest.fixture(scope="module")
def failure_run(ray_cluster, tmp_path_factory):
    from ray import cloudpickle

    from ray_train.strategies.ensemble import runner as ensemble

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors cannot import this test file
    storage = tmp_path_factory.mktemp("fail")
    cfg = storage / "ens.yaml"
    cfg.write_text("ensemble:\n  members: [{seed: 5}, {seed: 5}, {seed: 7}]\n")
    argv = ["--config", str(cfg), "--strategy", "ensemble", "--model", "mlp30", "--optimizer", "momentum",
            "--lr", "0.1", "--epochs", str(EPOCHS), "--cpus-per-replica", "0.8", "--max-failures", "1",
            "--run-name", "fail", "--storage", str(storage), "--no-progress", "--no-tensorboard"]
    mp = pytest.MonkeyPatch()
    mp.setattr(ensemble, "MEMBER_CLASS", DyingMember)
    from contextlib import redirect_stdout
    from io import StringIO

    out = StringIO()
    try:
        with redirect_stdout(out):
            assert main(argv) == 0
    finally:
        mp.undo()
    return json.loads((storage / "fail" / "summary.json").read_text()), out.getvalue(), storage / "fail"


def test_a_dead_member_resumes_from_its_checkpoint_exactly(failure_run):
    s, out, _ = failure_run
    a, b = s["members"][0], s["members"][1]
    assert sorted([a["restarts"], b["restarts"]]) == [0, 1]  # exactly one of the two seed-5 members died
    resumed = a if a["restarts"] else b
    assert resumed["resumed_from_epochs"] == [1] and resumed["status"] == "ok" and resumed["epochs"] == EPOCHS
    assert "died in epoch 2; restarting from checkpoint" in out and "(epoch 1), failure 1 of at most 1" in out
    # Same seed, same data order, model, momentum and RNG restored: the resumed member ends exactly
    # where the uninterrupted one does.
    assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-6)
    assert a["test_errors"] == b["test_errors"] and a["test_accuracy"] > 0.8
    assert a["train_samples"] == b["train_samples"] == EPOCHS * STEPS * BATCH


def test_a_member_that_cannot_be_restarted_is_left_out_with_a_warning(failure_run):
    s, out, run_dir = failure_run
    dropped = s["members"][2]
    assert dropped["status"] == "failed" and dropped["test_accuracy"] is None and dropped["restarts"] == 1
    assert s["members_voting"] == 2 and s["concurrent_members"] == 2  # 3 x 0.8 CPU: the third queued
    assert len(s["warnings"]) == 1 and "member 2" in s["warnings"][0] and "run.max_failures is 1" in s["warnings"][0]
    assert "WARNING: member 2 (mlp30, seed 7) dropped" in out
    # The vote of the two survivors (identical members) equals each of them.
    assert s["vote_errors"] == s["members"][0]["test_errors"]
    info = json.loads((run_dir / "ensemble.json").read_text())
    assert [m["status"] for m in info["members"]] == ["ok", "ok", "failed"]


# -- --resume: members continue from their own checkpoints -------------------------------------------
def test_resume_after_an_interruption_equals_the_uninterrupted_run(ray_cluster, tmp_path, capsys):
    """An uninterrupted 2-epoch run, and a copy of it turned into an interrupted one: member 1's
    epoch-2 checkpoint and weights gone, as if the process stopped after logging epoch 2 but before
    checkpointing it. ``--resume`` retrains member 1's second epoch only: the same numbers, and no
    TensorBoard point written twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    argv = ["--strategy", "ensemble", "--members", "2", "--model", "mlp30", "--epochs", "2", "--lr", "0.1",
            "--cpus-per-replica", "0.5", "--log-every", "20", "--storage", str(tmp_path), "--no-progress"]
    assert main([*argv, "--run-name", "straight"]) == 0
    straight = json.loads((tmp_path / "straight" / "summary.json").read_text())
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "straight", cut)
    (cut / "summary.json").unlink()
    (cut / "members" / "member_1" / "checkpoints" / "ckpt-000002.pt").unlink()
    (cut / "members" / "member_1" / "model.pt").unlink()
    capsys.readouterr()
    assert main(["--resume", str(cut), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "member 1: resuming from" in out and "(epoch 1)" in out and "(epoch 2)" in out
    assert "member 1 epoch   2" in out and "member 0 epoch" not in out  # member 0 had finished
    assert "starting from scratch" not in out
    resumed = json.loads((cut / "summary.json").read_text())
    for a, b in zip(straight["members"], resumed["members"]):
        assert (a["test_errors"], a["epochs"], a["train_samples"]) == (b["test_errors"], b["epochs"], b["train_samples"])
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-6)
    assert resumed["vote_errors"] == straight["vote_errors"]
    acc = EventAccumulator(str(cut), size_guidance={"scalars": 0})
    acc.Reload()
    for tag in ("member_1/train/loss", "member_1/test/accuracy", "member_0/train/loss", "ensemble/vote_errors"):
        steps = [e.step for e in acc.Scalars(tag)]
        assert len(steps) == len(set(steps)), (tag, steps)  # nothing written twice
        assert steps == [e.step for e in EventAccumulator(str(tmp_path / "straight")).Reload().Scalars(tag)], tag


def test_resume_with_dropout_is_exact(ray_cluster, tmp_path):
    """Members' checkpoints hold every replica's RNG: two net_h members (dropout 0.5) stopped after
    one epoch and resumed to two end with the parameters of an uninterrupted two-epoch run."""
    argv = ["--strategy", "ensemble", "--members", "2", "--model", "net_h", "--lr", "0.03", "--optimizer", "sgd",
            "--cpus-per-replica", "0.5", "--log-every", "20", "--storage", str(tmp_path), "--no-progress",
            "--no-tensorboard"]
    assert main([*argv, "--epochs", "2", "--run-name", "straight"]) == 0
    assert main([*argv, "--epochs", "1", "--run-name", "stopped"]) == 0
    assert main(["--resume", str(tmp_path / "stopped"), "--epochs", "2", "--no-progress", "--no-tensorboard"]) == 0
    for k in range(2):
        a, b = (torch.load(tmp_path / run / "members" / f"member_{k}" / "model.pt", weights_only=True)["model"]
                for run in ("straight", "stopped"))
        diff = max(float((a[n] - b[n]).abs().max()) for n in a)
        print(f"member {k}: max abs parameter difference, resumed vs uninterrupted: {diff:.3g}")
        assert diff <= 1e-6
        ckpt = torch.load(tmp_path / "stopped" / "members" / f"member_{k}" / "checkpoints" / "ckpt-000002.pt",
                          weights_only=True)
        assert ckpt["epoch"] == 2 and len(ckpt["engine"]["rng"]) == 1  # one replica per member, its RNG kept


# -- bad input: one line, exit 2 --------------------------------------------------------------------
@pytest.mark.parametrize("yaml_text,flags,needle", [
    (None, ["--members", "0"], "ensemble.members"),
    ("ensemble: {members: []}\n", [], "member list is empty"),
    ("ensemble: {members: [{model: net_z}]}\n", [], "ensemble.members[0].model"),
    ("ensemble: {members: 3, weights: [1, 2]}\n", [], "ensemble.weights"),
    ("ensemble: {members: [{dropout: 1.5}]}\n", [], "ensemble.members[0]: model.dropout"),
    ("ensemble: {members: 2, weights: [0, 0]}\n", [], "at least one member weight"),
])
def test_bad_ensemble_input(ray_cluster, capsys, tmp_path, yaml_text, flags, needle):
    argv = ["--strategy", "ensemble", "--storage", str(tmp_path), "--no-tensorboard", "--no-progress", *flags]
    if yaml_text is not None:
        (tmp_path / "bad.yaml").write_text(yaml_text)
        argv += ["--config", str(tmp_path / "bad.yaml")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ray_train: error:") and needle in err[0], err
